"""A recipe checked against the installed plugins (once per run), then built into a Pipeline."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from pydantic import ValidationError

from zmagic_core.assembly.recipe import ComponentSpec, Recipe, format_validation_error, read_recipe
from zmagic_core.contracts.components import BuildContext
from zmagic_core.contracts.errors import ConfigError, UnknownComponentError
from zmagic_core.contracts.options import path_fields
from zmagic_core.method.guidance import Condition
from zmagic_core.plugins.registry import Registration, Registry, get_registry
from zmagic_core.sampling.pipeline import Pipeline

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class CheckedRecipe:
    """A recipe whose kinds resolved to registrations and whose options passed their models."""

    recipe: Recipe
    registry: Registry
    parts: dict[str, tuple[Registration, dict]] = field(default_factory=dict)  # "model", "conditions.0", ...

    def built(self, where: str, context: BuildContext) -> Any:
        """The component at ``where``, built from its factory with the checked options."""
        reg, options = self.parts[where]
        try:
            return reg.factory(context, **options)
        except TypeError as exc:
            raise ConfigError(f"{where}: {reg.category} {reg.name!r} rejected its options: {exc}") from None


def load_recipe(source: Union[str, Path, dict], overrides: tuple[str, ...] | list[str] = (),
                registry: Optional[Registry] = None, check: bool = True) -> Recipe:
    """Read a recipe and (``check``) check it against the plugins; the check is kept for the build."""
    recipe = read_recipe(source, overrides)
    if check:
        check_recipe(recipe, registry)
    return recipe


def _registration(registry: Registry, category: str, spec: ComponentSpec, where: str) -> Registration:
    try:
        return registry.get(category, spec.kind)
    except UnknownComponentError as exc:
        raise ConfigError(f"{where}.kind: {exc}") from None


def _resolve_paths(registration: Registration, spec: ComponentSpec, base: Optional[str]) -> None:
    """Relative values of the options declared as paths resolve against the recipe's folder, so a recipe
    works from any working directory; a path-or-name option only when that file or folder exists."""
    if base is None or registration.options is None:
        return
    for key, marker in path_fields(registration.options).items():
        value = spec.options.get(key)
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        candidate = Path(base) / value
        if not marker.or_name or candidate.exists():
            spec.options[key] = str(candidate)


def _checked_options(registration: Registration, spec: ComponentSpec, where: str, base: Optional[str] = None) -> dict:
    _resolve_paths(registration, spec, base)
    options_model = registration.options
    if options_model is None:
        return dict(spec.options)
    try:
        return options_model.model_validate(spec.options).model_dump(exclude_unset=True, by_alias=True)
    except ValidationError as exc:
        allowed = ", ".join(options_model.model_fields) or "none"
        raise ConfigError(format_validation_error(exc, f"{where}.options")
                          + f"\n  ({spec.kind} accepts: {allowed})") from None


def check_recipe(recipe: Recipe, registry: Optional[Registry] = None) -> CheckedRecipe:
    """Check kinds, options, device and condition counts without building anything."""
    registry = registry or get_registry()
    if recipe._plan is not None and recipe._plan.registry is registry:
        return recipe._plan
    plan = CheckedRecipe(recipe, registry)
    for category, spec, where in (("model", recipe.model, "model"), ("solver", recipe.solver, "solver"),
                                  ("combiner", recipe.combiner, "combiner")):
        reg = _registration(registry, category, spec, where)
        plan.parts[where] = (reg, _checked_options(reg, spec, where, recipe._source_dir))
    for i, cond in enumerate(recipe.conditions):
        where = f"conditions.{i}"
        reg = _registration(registry, "energy", cond, where)
        plan.parts[where] = (reg, _checked_options(reg, cond, where, recipe._source_dir))

    model_reg, model_options = plan.parts["model"]
    n = len(recipe.conditions) + (model_reg.adds_conditions(model_options) if model_reg.adds_conditions else 0)
    combiner_cls = plan.parts["combiner"][0].component
    if combiner_cls is not None and n:
        lo, hi = combiner_cls.min_conditions, combiner_cls.max_conditions
        if n < lo or (hi is not None and n > hi):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            raise ConfigError(f"combiner.kind: {recipe.combiner.kind!r} needs {want} conditions, "
                              f"the recipe has {n}")
    _check_device(recipe.device)
    recipe._plan = plan
    return plan


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device: {device!r} is not a device (use cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} requested but no CUDA device is available here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {device!r} requested but MPS is not available here")


def build_pipeline(recipe: Union[Recipe, CheckedRecipe, str, Path, dict], registry: Optional[Registry] = None
                   ) -> Pipeline:
    """Build model, solver, combiner and conditions of a recipe (checked first if it was not) into a Pipeline."""
    if isinstance(recipe, CheckedRecipe):
        plan = recipe
    else:
        if not isinstance(recipe, Recipe):
            recipe = read_recipe(recipe)
        plan = check_recipe(recipe, registry)
    recipe = plan.recipe
    context = BuildContext(device=torch.device(recipe.device), dtype=DTYPES[recipe.dtype], seed=recipe.seed)
    # 1. the base model first: energies may need it (the shapes energies read its world)
    context.model = plan.built("model", context)
    # 2. the step map and the combiner
    solver, combiner = plan.built("solver", context), plan.built("combiner", context)
    # 3. the recipe's conditions, in order (order matters for `dependent`)
    conditions = [Condition(spec.name or spec.kind, plan.built(f"conditions.{i}", context), spec.rule, spec.scale,
                            spec.start, spec.stop, spec.time_travel)
                  for i, spec in enumerate(recipe.conditions)]
    return Pipeline(context.model, solver, combiner, conditions, steps=recipe.solver.steps, device=context.device)


def build_evaluators(plan: CheckedRecipe, context: Optional[BuildContext] = None
                     ) -> tuple[dict[str, Any], dict[str, str]]:
    """(evaluators that apply to this recipe, by name; errors of those that failed to build or to answer)."""
    context = context or BuildContext(device=torch.device(plan.recipe.device))
    recipe_json = plan.recipe.model_dump(mode="json")
    evaluators, errors = {}, {}
    for name in plan.registry.names("evaluator"):
        reg = plan.registry.get("evaluator", name)
        if reg.name != name:  # an alias of one already seen
            continue
        try:
            evaluator = reg.factory(context)
            if evaluator.applies_to(recipe_json):
                evaluators[name] = evaluator
        except Exception as exc:  # one plugin's evaluator never costs the others theirs
            errors[name] = f"{type(exc).__name__}: {exc}"
    return evaluators, errors
