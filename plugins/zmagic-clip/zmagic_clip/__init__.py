"""CLIP text guidance for zmagic: the ``clip-text`` energy (open_clip, default ViT-B/16 OpenAI)."""
from .energy import ClipPreprocess, ClipTextEnergy, ClipTextOptions, build_clip_text
from .loading import LoadedClip, load_open_clip

__version__ = "0.1.0"
__all__ = ["ClipPreprocess", "ClipTextEnergy", "ClipTextOptions", "build_clip_text", "LoadedClip",
           "load_open_clip"]
