"""zmagic: zero-shot multi-condition guided diffusion (Z-Magic) as a plugin framework.

This module is the public API: everything a plugin author or a script needs, listed in
``__all__``.  Names are imported on first use, so ``import zmagic_core`` (and the ``zmagic``
command) stays light until something is asked for.

Layers, lowest first (a layer imports only the ones before it; docs/architecture.md):
``contracts`` -> ``files`` -> ``method`` -> ``models`` and ``sampling`` (same rank, never each
other) -> ``plugins`` -> ``assembly`` -> ``app``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_PUBLIC = {
    # component interfaces and what a factory receives
    "DiffusionModel": "contracts.components", "Prediction": "contracts.components",
    "Energy": "contracts.components", "Solver": "contracts.components", "Combiner": "contracts.components",
    "Combined": "contracts.components", "Evaluator": "contracts.components", "FinishedRun": "contracts.components",
    "BuildContext": "contracts.components",
    # options that name files (resolved against the recipe's folder; hashed into a run's identity)
    "FilePath": "contracts.options", "PathOrName": "contracts.options", "PathOption": "contracts.options",
    # plugin hooks
    "hookimpl": "contracts.hookspecs", "hookspec": "contracts.hookspecs",
    # errors a user can act on
    "ZmagicError": "contracts.errors", "ConfigError": "contracts.errors", "UnknownComponentError": "contracts.errors",
    "PluginError": "contracts.errors", "InputError": "contracts.errors", "WeightsNotFoundError": "contracts.errors",
    # what a combiner reads: the step, the evaluation at a point, the conditions
    "GuidanceStep": "method.guidance", "Evaluation": "method.guidance", "Condition": "method.guidance",
    "conditional_gradients": "method.combiners", "vector_jacobian_products": "method.combiners",
    "cosine": "method.combiners",
    # files: images and weights
    "load_image": "files.images", "save_image": "files.images",
    "find_weights": "files.weights", "read_state_dict": "files.weights", "load_strict": "files.weights",
    "search_dirs": "files.weights", "hub_offline": "files.weights", "unreachable": "files.weights",
    "WEIGHTS_DIR_ENV": "files.weights",
    # the built-in components
    "DDPMSolver": "method.solvers", "DDIMSolver": "method.solvers", "PCSolver": "method.solvers",
    "SumCombiner": "method.combiners", "DependentCombiner": "method.combiners", "CAGradCombiner": "method.combiners",
    "ShapesModel": "models.shapes", "render": "models.shapes", "ShapesFlowModel": "models.shapes",
    "AttributeEnergy": "models.shapes", "MaskEnergy": "models.shapes", "KeypointEnergy": "models.shapes",
    "StyleEnergy": "models.shapes",
    # running: the loop, recipes, the registry
    "Pipeline": "sampling.pipeline", "RunResult": "sampling.pipeline",
    "Recipe": "assembly.recipe", "load_recipe": "assembly.build", "check_recipe": "assembly.build",
    "build_pipeline": "assembly.build", "get_registry": "plugins.registry",
    # scripts: the diffusers-style entry point (from_pretrained / from_pipe, .images)
    "ZMagicPipeline": "assembly.scripting", "ZMagicOutput": "assembly.scripting",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'zmagic_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"zmagic_core.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers see the names
    from zmagic_core.assembly.build import build_pipeline, check_recipe, load_recipe  # noqa: F401
    from zmagic_core.assembly.recipe import Recipe  # noqa: F401
    from zmagic_core.assembly.scripting import ZMagicOutput, ZMagicPipeline  # noqa: F401
    from zmagic_core.contracts.components import (BuildContext, Combined, Combiner, DiffusionModel, Energy,  # noqa: F401
                                                  Evaluator, FinishedRun, Prediction, Solver)
    from zmagic_core.contracts.errors import (ConfigError, InputError, PluginError, UnknownComponentError,  # noqa: F401
                                              WeightsNotFoundError, ZmagicError)
    from zmagic_core.contracts.hookspecs import hookimpl, hookspec  # noqa: F401
    from zmagic_core.contracts.options import FilePath, PathOption, PathOrName  # noqa: F401
    from zmagic_core.files.images import load_image, save_image  # noqa: F401
    from zmagic_core.files.weights import (WEIGHTS_DIR_ENV, find_weights, hub_offline, load_strict,  # noqa: F401
                                           read_state_dict, search_dirs, unreachable)
    from zmagic_core.method.combiners import (CAGradCombiner, DependentCombiner, SumCombiner,  # noqa: F401
                                              conditional_gradients, cosine, vector_jacobian_products)
    from zmagic_core.method.guidance import Condition, Evaluation, GuidanceStep  # noqa: F401
    from zmagic_core.method.solvers import DDIMSolver, DDPMSolver, PCSolver  # noqa: F401
    from zmagic_core.models.shapes import (AttributeEnergy, KeypointEnergy, MaskEnergy, ShapesFlowModel,  # noqa: F401
                                           ShapesModel, StyleEnergy, render)
    from zmagic_core.plugins.registry import get_registry  # noqa: F401
    from zmagic_core.sampling.pipeline import Pipeline, RunResult  # noqa: F401
