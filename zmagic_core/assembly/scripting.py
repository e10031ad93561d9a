"""``ZMagicPipeline``: the diffusers-style entry point for scripts.

    pipe = ZMagicPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", torch_dtype=torch.float16,
                                          device="cuda")
    out = pipe(prompt="a portrait", conditions=[{"kind": "style", "reference": "s.png", "scale": 0.2}],
               combiner="dependent", steps=50, seeds=[0, 1])
    out.images[0].save("0.png")

``from_pipe(pipeline)`` reuses an already-loaded diffusers pipeline's components: its scheduler's
config gives the noise schedule; the networks keep their dtype, device and offloading hooks.
Conditions (dicts as in a recipe, or Condition objects), the solver and the combiner go through the
same registry and checks as a recipe (:mod:`zmagic_core.assembly.build`), so a bad one gives the
same one-line error.

Supported pipelines: ``PIPELINE_KINDS`` maps a diffusers pipeline class name to (model kind,
builder(components, options, device) -> model).  A new kind adds one line there (a class name,
its kind and a ``*_from_components`` builder); ``from_pretrained`` reads the class name from
model_index.json's ``_class_name`` to pick the kind.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from zmagic_core.assembly.build import CheckedRecipe, check_built_model, check_recipe
from zmagic_core.assembly.recipe import read_recipe
from zmagic_core.contracts.components import BuildContext, Combiner
from zmagic_core.contracts.errors import ConfigError, WeightsNotFoundError
from zmagic_core.method.guidance import Condition
from zmagic_core.models.pretrained.flow_transformer import FLOW_LOADING_OPTIONS, flow_transformer_from_components
from zmagic_core.models.pretrained.loading import resolve_source
from zmagic_core.models.pretrained.sdxl import SDXL_LOADING_OPTIONS, sdxl_from_components
from zmagic_core.models.pretrained.stable_diffusion import LOADING_OPTIONS, stable_diffusion_from_components
from zmagic_core.sampling.pipeline import Pipeline

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# diffusers pipeline class -> (zmagic model kind, model from a pipeline's components)
PIPELINE_KINDS: dict[str, tuple[str, Callable]] = {
    "StableDiffusionPipeline": ("stable-diffusion", stable_diffusion_from_components),
    "StableDiffusionXLPipeline": ("stable-diffusion-xl", sdxl_from_components),
    "StableDiffusion3Pipeline": ("flow-transformer", flow_transformer_from_components),
    "FluxPipeline": ("flow-transformer", flow_transformer_from_components),
}


@dataclass
class ZMagicOutput:
    """What a call returns: PIL images (as diffusers pipelines do), the tensors, the per-step trace."""

    images: list                    # PIL.Image per completed seed
    samples: torch.Tensor           # final samples in model space (latents)
    image_tensors: torch.Tensor     # decoded images (N, 3, H, W) in [-1, 1]
    trace: list[list[dict]]
    seeds: list[int]
    condition_names: list[str]
    errors: dict[int, str] = field(default_factory=dict)  # seed -> message, for samples that failed


def _dtype_name(torch_dtype: Union[None, str, torch.dtype]) -> Optional[str]:
    if torch_dtype is None or isinstance(torch_dtype, str):
        return torch_dtype
    if torch_dtype not in DTYPE_NAMES:
        raise ConfigError(f"torch_dtype {torch_dtype}: expected one of {', '.join(DTYPE_NAMES.values())}")
    return DTYPE_NAMES[torch_dtype]


def pipeline_class_name(model: str, revision: Optional[str] = None, local_files_only: bool = False) -> Optional[str]:
    """model_index.json's ``_class_name`` of a folder or hub id (None when there is none)."""
    source = resolve_source(model, revision=revision, local_files_only=local_files_only)
    if source.local:
        index = Path(source.root) / "model_index.json"
        if not index.is_file():
            return None
        path = str(index)
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(source.root, "model_index.json", revision=revision,
                                   local_files_only=source.local_files_only or _offline())
        except Exception as exc:  # the hub client raises many types; all mean "cannot tell"
            raise WeightsNotFoundError(f"cannot read model_index.json of {model!r} ({type(exc).__name__}); pass "
                                       f"kind= explicitly or get the model: {source.how_to_get()}") from None
    try:
        return json.loads(Path(path).read_text()).get("_class_name")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model_index.json of {model!r} is not readable JSON ({exc})") from None


def _native_size(model: str, options: dict) -> dict:
    """height and width as diffusers pipelines default them (the UNet's sample_size times the VAE's
    downsampling) for a local folder, unless given; {} otherwise (the kind's own defaults apply)."""
    folder = Path(options.get("path") or model).expanduser()
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        size = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {k: size for k in ("height", "width") if k not in options}


def _offline() -> bool:
    from zmagic_core.files.weights import hub_offline

    return hub_offline()


def _kind_of(class_name: Optional[str], what: str) -> tuple[str, Callable]:
    if class_name not in PIPELINE_KINDS:
        known = ", ".join(PIPELINE_KINDS)
        raise ConfigError(f"{what} is a {class_name or 'model without model_index.json'}; ZMagicPipeline knows "
                          f"{known} (pass kind= for a folder of one of those layouts)")
    return PIPELINE_KINDS[class_name]


def _to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    from zmagic_core.files.images import to_uint8

    return [Image.fromarray(to_uint8(image)) for image in images]


class ZMagicPipeline:
    """A base model loaded once, called with a prompt, conditions, a combiner and seeds."""

    def __init__(self, model, kind: str, model_options: dict, device: torch.device, dtype: str = "float32"):
        self.model, self.kind, self.model_options = model, kind, dict(model_options)
        self.device, self.dtype = torch.device(device), dtype

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str, kind: Optional[str] = None, torch_dtype=None,
                        device: Union[None, str, torch.device] = None, **model_options) -> "ZMagicPipeline":
        """Load a hub id or a local folder as model ``kind`` (default: from model_index.json);
        ``model_options`` are the kind's recipe options (guidance_scale, height, decode_size, ...)."""
        if kind is None:
            kind = _kind_of(pipeline_class_name(model, model_options.get("revision"),
                                                bool(model_options.get("local_files_only"))), repr(model))[0]
        device = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = _dtype_name(torch_dtype) or "float32"
        options = {"id": model, **_native_size(model, model_options), **model_options,
                   "keep_text_encoder": True}  # prompts change between calls
        plan = check_recipe(read_recipe({"model": {"kind": kind, **options}, "device": device,
                                                   "dtype": dtype}))
        built = plan.built("model", BuildContext(device=torch.device(device), dtype=_torch_dtype(dtype)))
        check_built_model(plan, built)
        return cls(built, kind, options, device, dtype)

    @classmethod
    def from_pipe(cls, pipeline, **model_options) -> "ZMagicPipeline":
        """Reuse a loaded diffusers pipeline's components (not copied): its scheduler config, and its
        networks with their dtype, device and offloading hooks as they are."""
        kind, builder = _kind_of(type(pipeline).__name__, f"{type(pipeline).__name__} object")
        loading = [k for k in model_options if k in LOADING_OPTIONS + SDXL_LOADING_OPTIONS + FLOW_LOADING_OPTIONS]
        if loading:
            raise ConfigError(f"from_pipe reuses the pipeline's loaded components; {', '.join(loading)} "
                              f"cannot change them (use from_pretrained)")
        device = torch.device(getattr(pipeline, "_execution_device", None) or pipeline.device)
        denoiser = getattr(pipeline, "unet", None) or pipeline.transformer  # UNet families / SD3 and FLUX
        dtype = DTYPE_NAMES.get(denoiser.dtype, "float32")
        plan = check_recipe(read_recipe({"model": {"kind": kind, **model_options}, "device": str(device),
                                                   "dtype": dtype}))
        registration, options = plan.parts["model"]
        parts = {**pipeline.components, "scheduler_config": dict(pipeline.scheduler.config),
                 "force_zeros_for_empty_prompt": pipeline.config.get("force_zeros_for_empty_prompt", True)}
        sample_size = getattr(pipeline, "default_sample_size", None) or getattr(denoiser.config, "sample_size", None)
        size = sample_size * getattr(pipeline, "vae_scale_factor", 8) if isinstance(sample_size, int) else None
        native = {"height": size, "width": size} if isinstance(size, int) else {}
        opts = registration.options(**{**native, **options, "keep_text_encoder": True})
        if getattr(parts.get("vae"), "dtype", None) == torch.float16 and parts["vae"].config.get("force_upcast"):
            parts["vae"].to(torch.float32)  # what the diffusers pipeline itself does before decoding
        return cls(builder(parts, opts, device, move_modules=False), kind, model_options, device, dtype)

    # -- calling ---------------------------------------------------------------------------------
    def __call__(self, prompt: Optional[str] = None, conditions: Sequence[Union[dict, Condition]] = (),
                 combiner: Union[str, dict, Combiner] = "dependent", solver: Union[str, dict] = "ddim",
                 steps: int = 50, seeds: Optional[Sequence[int]] = None, num_images: int = 1, seed: int = 0,
                 guidance_scale: Optional[float] = None, negative_prompt: Optional[str] = None,
                 batch_size: int = 8, progress: bool = True) -> ZMagicOutput:
        """Sample one image per seed (``seeds``, or ``num_images`` seeds from ``seed``), the prompt as
        the first condition, then ``conditions`` in order (order matters for ``dependent``)."""
        if negative_prompt is None:
            negative_prompt = self.model_options.get("negative_prompt")
        model = self.model.with_prompt(prompt, negative_prompt, guidance_scale)
        plan = self._plan(prompt, conditions, combiner, solver, steps, seeds, num_images, seed, batch_size)
        recipe = plan.recipe
        context = BuildContext(device=self.device, dtype=_torch_dtype(self.dtype), seed=recipe.seed, model=model)
        check_built_model(plan, model)
        built_solver = plan.built("solver", context)
        built_combiner = combiner if isinstance(combiner, Combiner) else plan.built("combiner", context)
        specs = iter(enumerate(recipe.conditions))
        built_conditions = [item if isinstance(item, Condition) else _condition(plan, *next(specs), context)
                            for item in conditions]
        pipe = Pipeline(model, built_solver, built_combiner, built_conditions, steps=steps, device=self.device)
        result = pipe.run(recipe.sample_seeds(), batch_size=recipe.batch_size, progress=progress)
        return ZMagicOutput(_to_pil(result.images), result.samples, result.images, result.trace, result.seeds,
                            result.condition_names, result.errors)

    def _plan(self, prompt, conditions, combiner, solver, steps, seeds, num_images, seed, batch_size) -> CheckedRecipe:
        """The call as a recipe, checked as ``zmagic generate`` checks one (kinds, options, device,
        windows, condition counts); Condition and Combiner objects are checked by the Pipeline."""
        specs = [c for c in conditions if not isinstance(c, Condition)]
        bad = next((c for c in specs if not isinstance(c, dict)), None)
        if bad is not None:
            raise ConfigError(f"conditions: each is a dict as in a recipe or a Condition, got {type(bad).__name__}")
        objects = len(specs) < len(conditions) or isinstance(combiner, Combiner)
        data: dict[str, Any] = {
            "model": {"kind": self.kind, **self.model_options, "prompt": prompt},
            "solver": {**({"kind": solver} if isinstance(solver, str) else solver), "steps": steps},
            # with objects in the call the recipe cannot count the conditions: `sum` takes any number
            "combiner": "sum" if objects else combiner, "conditions": specs,
            "device": str(self.device), "dtype": self.dtype, "batch_size": batch_size,
            **({"seeds": list(seeds)} if seeds is not None else {"num_samples": num_images, "seed": seed})}
        plan = check_recipe(read_recipe(data))
        if objects and not isinstance(combiner, Combiner):  # the named combiner's kind and options, uncounted
            alone = check_recipe(read_recipe({"combiner": combiner}))
            plan.parts["combiner"] = alone.parts["combiner"]
        return plan


def _condition(plan: CheckedRecipe, i: int, spec, context: BuildContext) -> Condition:
    return Condition(spec.name or spec.kind, plan.built(f"conditions.{i}", context), spec.rule, spec.scale,
                     spec.start, spec.stop, spec.time_travel)


def _torch_dtype(name: str) -> torch.dtype:
    return {v: k for k, v in DTYPE_NAMES.items()}[name]
