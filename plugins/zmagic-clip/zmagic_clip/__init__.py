"""CLIP text guidance for zmagic: the ``clip-text`` energy (open_clip, default ViT-B/16 OpenAI).

Public for other plugins (zmagic-style builds its CLIP backbone with them; import them from here,
``from zmagic_clip import ...``, not from the submodules): :class:`LoadedClip`, :func:`load_open_clip`,
``DEFAULT_PRETRAINED``, ``OPENAI_MEAN``, ``OPENAI_STD``, :func:`attention_context` and
:func:`model_config_problem` (for options validators).
"""
from .energy import ClipPreprocess, ClipTextEnergy, ClipTextOptions, attention_context, build_clip_text
from .loading import DEFAULT_PRETRAINED, OPENAI_MEAN, OPENAI_STD, LoadedClip, load_open_clip, model_config_problem

__version__ = "0.1.0"
__all__ = ["ClipPreprocess", "ClipTextEnergy", "ClipTextOptions", "build_clip_text",
           # public for other plugins
           "LoadedClip", "load_open_clip", "DEFAULT_PRETRAINED", "OPENAI_MEAN", "OPENAI_STD", "attention_context",
           "model_config_problem"]
