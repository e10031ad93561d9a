"""A recipe checked against the installed plugins (once per run), then built into a Pipeline.

``check_recipe`` stops at the first problem (a ConfigError naming the field); ``find_problems``
(``zmagic check``) collects every problem at once, adding files that options declared as paths name
but that do not exist.  Both run before anything loads.  ``build_pipeline`` checks what only the
built model knows (its number of timesteps T against windows and steps, whether it honours the
recipe's dtype), and turns a factory that raises anything into one ConfigError naming the component
and its plugin.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from pydantic import ValidationError

from zmagic_core.assembly.recipe import (CombinerSpec, ComponentSpec, ConditionSpec, ModelSpec, Recipe, SolverSpec,
                                         check_values, format_validation_error, read_data, read_recipe,
                                         validation_problems)
from zmagic_core.contracts.components import BuildContext
from zmagic_core.contracts.errors import ConfigError, ZmagicError, clip_text, shorten
from zmagic_core.contracts.options import path_fields
from zmagic_core.method.guidance import Condition
from zmagic_core.method.schedule import strided_timesteps
from zmagic_core.plugins.registry import BUILTIN_MODULES, Registration, Registry, get_registry
from zmagic_core.sampling.pipeline import Pipeline

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_TYPES = ("cpu", "cuda", "mps")
# What is known before building about the core's own models whose options do not say it.
BUILTIN_MODEL_FACTS = {"shapes": {"timesteps": 1000, "dtypes": ("float32",)}}
# Suffixes that make a path-or-name option value a file path (not a hub id or a description).
FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".safetensors", ".ckpt",
                 ".bin", ".pt", ".pth", ".onnx", ".pkl", ".npz", ".npy", ".json", ".yaml", ".yml", ".txt", ".dat")


@dataclass
class CheckedRecipe:
    """A recipe whose kinds resolved to registrations and whose options passed their models."""

    recipe: Recipe
    registry: Registry
    parts: dict[str, tuple[Registration, dict]] = field(default_factory=dict)  # "model", "conditions.0", ...
    notes: list[str] = field(default_factory=list)  # warnings (a plugin refused a built-in name it registers)

    def built(self, where: str, context: BuildContext) -> Any:
        """The component at ``where``, built from its factory with the checked options; whatever the
        factory raises becomes one ZmagicError naming the component and its plugin."""
        reg, options = self.parts[where]
        try:
            built = reg.factory(context, **options)
        except (ZmagicError, KeyboardInterrupt):
            raise
        except TypeError as exc:
            raise ConfigError(f"{where}: {reg.category} {reg.name!r} (plugin {_plugin_text(self.registry, reg)}) "
                              f"could not be built with its options: {clip_text(str(exc), 300)}") from exc
        except BaseException as exc:  # any exception of a plugin's factory, SystemExit included
            text = clip_text(" ".join(str(exc).split()), 300)
            raise ConfigError(f"{where}: {reg.category} {reg.name!r} (plugin {_plugin_text(self.registry, reg)}) "
                              f"failed to build: {type(exc).__name__}" + (f": {text}" if text else "")) from exc
        lacking = [a for a in BUILT_NEEDS.get(reg.category, ()) if not callable(getattr(built, a, None))]
        if lacking:  # caught here, not as an AttributeError deep in sampling
            raise ConfigError(f"{where}: {reg.category} {reg.name!r} (plugin {_plugin_text(self.registry, reg)}) "
                              f"built a {type(built).__name__}, which has no {', '.join(lacking)}")
        return built


# what a built component must be able to do, by category
BUILT_NEEDS = {"model": ("predict", "decode"), "solver": ("step",), "combiner": ("combine",),
               "energy": ("__call__",), "evaluator": ("evaluate", "applies_to")}


def _plugin_text(registry: Registry, reg: Registration) -> str:
    infos = {i.name: i for i in registry.plugins()}
    info = infos.get(reg.plugin)
    return info.describe() if info is not None else repr(reg.plugin)


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
    except ZmagicError as exc:  # unknown (with the package that provides it) or contested
        raise ConfigError(f"{where}.kind: {exc}") from None


def _resolve_paths(registration: Registration, spec: ComponentSpec, base: Optional[str]) -> None:
    """Relative values of the options declared as paths resolve against the recipe's folder, so a recipe
    works from any working directory; a path-or-name option only when that file or folder exists."""
    if base is None or registration.options is None:
        return
    names = {info.alias or name: name for name, info in registration.options.model_fields.items()}
    for alias, marker in path_fields(registration.options).items():
        for key in dict.fromkeys((alias, names.get(alias, alias))):  # a model may accept the field's own name too
            value = spec.options.get(key)
            if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
                continue
            try:
                candidate = Path(base) / value
                if not marker.or_name or candidate.exists():
                    spec.options[key] = str(candidate)
            except (OSError, ValueError):  # a value no file system accepts (embedded NUL, too long)
                continue


def _checked_options(registration: Registration, spec: ComponentSpec, where: str, base: Optional[str] = None) -> dict:
    _resolve_paths(registration, spec, base)
    options_model = registration.options
    if options_model is None:
        return dict(spec.options)
    try:
        options = options_model.model_validate(spec.options).model_dump(exclude_unset=True, by_alias=True)
        check_values(options, root=f"{where}.options")  # "inf" / "nan" given as text pass a float field's parsing
        return options
    except ValidationError as exc:
        allowed = ", ".join(info.alias or name for name, info in options_model.model_fields.items()) or "none"
        problems = validation_problems(exc, f"{where}.options")
        raise ConfigError(format_validation_error(exc, f"{where}.options") + f"\n  ({spec.kind} accepts: {allowed})",
                          problems=[f"{p} ({spec.kind} accepts: {allowed})" for p in problems]) from None
    except ZmagicError:
        raise
    except Exception as exc:  # a plugin's validator raising something else than ValueError
        raise ConfigError(f"{where}.options: {spec.kind!r} options check failed: {type(exc).__name__}: "
                          f"{clip_text(str(exc), 300)}") from None


def _module_available(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _check_requirements(registration: Registration, spec: ComponentSpec, where: str) -> None:
    """Modules an options model declares (``required_modules = (("diffusers", "pip install ..."),)``)."""
    for module, how in getattr(registration.options, "required_modules", ()) or ():
        if not _module_available(module):
            raise ConfigError(f"{where}.kind: {spec.kind!r} needs the {module} package, which is not installed: "
                              f"{how}")


def _builtin(registration: Registration) -> bool:
    return registration.plugin in BUILTIN_MODULES


def known_timesteps(registration: Registration, options: dict) -> Optional[int]:
    """T of a model before it is built: its ``num_train_timesteps`` option, or what is known of the
    core's own models; None when only the built model knows (a scheduler config)."""
    value = options.get("num_train_timesteps")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if _builtin(registration):
        return BUILTIN_MODEL_FACTS.get(registration.name, {}).get("timesteps")
    return None


def _check_windows(recipe: Recipe, timesteps: int, what: str) -> None:
    """Each condition's window inside the schedule [0, T) and holding at least one visited step;
    the steps at most T."""
    steps = recipe.solver.steps
    if steps > timesteps:
        raise ConfigError(f"solver.steps: {steps} steps, but {what} has {timesteps} timesteps; use at most {timesteps}")
    visited = strided_timesteps(timesteps, steps)
    for i, c in enumerate(recipe.conditions):
        where = f"conditions.{i}"
        # an unset start is the default "from the first step", whatever T is
        start = c.start if "start" in c.model_fields_set else min(c.start, timesteps)
        if c.stop >= timesteps:
            raise ConfigError(f"{where}.stop: {c.stop} is not below T = {timesteps} (the timesteps of {what}); "
                              f"the condition would never be active")
        if start > timesteps:
            raise ConfigError(f"{where}.start: {c.start} is beyond the schedule of {what} (t runs from "
                              f"{timesteps - 1} down to 0; start may be at most {timesteps})")
        if not any(c.stop <= t <= start for t in visited):
            near = min(visited, key=lambda t: min(abs(t - start), abs(t - c.stop)))
            raise ConfigError(f"{where}: the window stop={c.stop} .. start={start} holds none of the {steps} "
                              f"visited timesteps (the nearest is {near}); the condition would never be active")


def _check_device(device: str, dtype: str = "float32", field: str = "device") -> None:
    """A device this machine has, of a kind zmagic runs on (cpu, cuda[:N], mps), supporting ``dtype``;
    errors name ``field`` (the recipe's device, or a model's own)."""
    shown = shorten(device, 60)
    try:
        dev = torch.device(device)
    except Exception:
        raise ConfigError(f"{field}: {shown} is not a device (use cpu, cuda, cuda:N or mps)") from None
    if dev.type not in DEVICE_TYPES:
        raise ConfigError(f"{field}: {shown} is not supported; zmagic runs on cpu, cuda, cuda:N or mps")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise ConfigError(f"{field}: {shown}: the CPU has no numbered devices; use cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{field}: {shown} requested but no CUDA device is available here")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"{field}: {shown} requested but this machine has {count} CUDA device(s) "
                              f"(cuda:0 to cuda:{count - 1})")
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"dtype: bfloat16 is not supported by CUDA device {shown}; use float16 or float32")
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{field}: {shown} requested but MPS is not available here")
        if dev.index not in (None, 0):
            raise ConfigError(f"{field}: {shown}: there is one MPS device; use mps")


def _check_model_facts(recipe: Recipe, model_reg: Registration, model_options: dict) -> None:
    facts = BUILTIN_MODEL_FACTS.get(model_reg.name, {}) if _builtin(model_reg) else {}
    dtypes = facts.get("dtypes")
    if dtypes and recipe.dtype not in dtypes:
        raise ConfigError(f"dtype: model {model_reg.name!r} computes in {' or '.join(dtypes)} only; "
                          f"{recipe.dtype} is not supported (remove dtype or set it to {dtypes[0]})")
    timesteps = known_timesteps(model_reg, model_options)
    if timesteps is not None:
        _check_windows(recipe, timesteps, f"model {recipe.model.kind!r}")


def _check_counts(recipe: Recipe, plan: CheckedRecipe) -> None:
    model_reg, model_options = plan.parts["model"]
    added = 0
    if model_reg.adds_conditions:
        try:
            added = int(model_reg.adds_conditions(model_options))
        except Exception as exc:
            raise ConfigError(f"model.kind: {recipe.model.kind!r} could not count its conditions: "
                              f"{type(exc).__name__}: {clip_text(str(exc), 200)}") from None
    n = len(recipe.conditions) + added
    combiner_cls = plan.parts["combiner"][0].component
    if combiner_cls is not None and n:
        lo, hi = getattr(combiner_cls, "min_conditions", 0), getattr(combiner_cls, "max_conditions", None)
        if n < lo or (hi is not None and n > hi):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            raise ConfigError(f"combiner.kind: {recipe.combiner.kind!r} needs {want} conditions, "
                              f"the recipe has {n}")


class _Problems:
    """Runs checks: the first problem raises (``collect`` False) or every problem is kept."""

    def __init__(self, collect: bool):
        self.collect, self.found = collect, []

    def run(self, check: Callable[[], Any]) -> Any:
        try:
            return check()
        except ZmagicError as exc:
            if not self.collect:
                raise
            self.found.extend(exc.problems)
            return None


def _part_specs(recipe: Recipe):
    yield "model", recipe.model, "model"
    yield "solver", recipe.solver, "solver"
    yield "combiner", recipe.combiner, "combiner"
    for i, cond in enumerate(recipe.conditions):
        yield "energy", cond, f"conditions.{i}"


def _check_part(plan: CheckedRecipe, category: str, spec: ComponentSpec, where: str, problems: _Problems,
                base: Optional[str]) -> None:
    reg = problems.run(lambda: _registration(plan.registry, category, spec, where))
    if reg is None:
        return
    plan.notes.extend(plan.registry.notes(category, spec.kind))
    problems.run(lambda: _check_requirements(reg, spec, where))
    options = problems.run(lambda: _checked_options(reg, spec, where, base))
    if options is not None:
        plan.parts[where] = (reg, options)


def _check(recipe: Recipe, registry: Registry, problems: _Problems) -> CheckedRecipe:
    plan = CheckedRecipe(recipe, registry)
    for category, spec, where in _part_specs(recipe):
        _check_part(plan, category, spec, where, problems, recipe._source_dir)
    if "model" in plan.parts:
        problems.run(lambda: _check_model_facts(recipe, *plan.parts["model"]))
    if "model" in plan.parts and "combiner" in plan.parts:
        problems.run(lambda: _check_counts(recipe, plan))
    problems.run(lambda: _check_device(recipe.device, recipe.dtype))
    model_device = plan.parts["model"][1].get("device") if "model" in plan.parts else None
    if isinstance(model_device, str):  # a model placed apart (e.g. the text encoders' device) is checked alike
        problems.run(lambda: _check_device(model_device, recipe.dtype, "model.options.device"))
    return plan


def check_recipe(recipe: Recipe, registry: Optional[Registry] = None) -> CheckedRecipe:
    """Check kinds, options, device, dtype, windows (when T is known) and condition counts without
    building anything; the first problem raises a ConfigError naming its field."""
    registry = registry or get_registry()
    if recipe._plan is not None and recipe._plan.registry is registry:
        return recipe._plan
    plan = _check(recipe, registry, _Problems(collect=False))
    recipe._plan = plan
    return plan


# -- zmagic check: every problem at once -----------------------------------------------------------
def _looks_like_path(value: str) -> bool:
    """A path-or-name value that is meant as a path: absolute, ./ ../ ~, a backslash, more than one
    slash, or a file suffix; ``org/name`` alone is a hub id."""
    if value.startswith(("/", "./", "../", "~", ".\\")) or "\\" in value or value.count("/") > 1:
        return True
    return value.lower().endswith(FILE_SUFFIXES)


def missing_files(plan: CheckedRecipe) -> list[str]:
    """One line per path option naming a file that does not exist (its field, its value)."""
    missing = []
    for where, (reg, options) in plan.parts.items():
        if reg.options is None:
            continue
        for key, marker in path_fields(reg.options).items():
            value = options.get(key)
            if not isinstance(value, str) or not value:
                continue
            try:
                exists = Path(value).expanduser().exists()
            except (OSError, ValueError):
                exists = False
            if not exists and (not marker.or_name or _looks_like_path(value)):
                missing.append(f"{where}.options.{key}: file not found: {clip_text(value, 200)}")
    return missing


def _raw_parts(data: dict):
    """(category, spec class, raw value, where) of each component in raw recipe data."""
    for category, cls, key in (("model", ModelSpec, "model"), ("solver", SolverSpec, "solver"),
                               ("combiner", CombinerSpec, "combiner")):
        yield category, cls, data.get(key), key
    conditions = data.get("conditions")
    if isinstance(conditions, list):
        for i, raw in enumerate(conditions):
            yield "energy", ConditionSpec, raw, f"conditions.{i}"


def _component_only(cls: type, raw: Any) -> Optional[ComponentSpec]:
    """The kind and options of a raw component whose other fields (scale, steps...) may be invalid."""
    if raw is None:
        raw = {}
    if isinstance(raw, str):
        raw = {"kind": raw}
    if not isinstance(raw, dict):
        return None
    own = set(cls.model_fields) - set(ComponentSpec.model_fields)
    kept = {k: v for k, v in raw.items() if k not in own}
    kind = cls.model_fields["kind"]
    if "kind" not in kept and not kind.is_required():
        kept["kind"] = kind.default
    try:
        return ComponentSpec.model_validate(kept)
    except ValidationError:
        return None


def check_report(source: Union[Recipe, str, Path, dict], overrides: tuple[str, ...] | list[str] = (),
                 registry: Optional[Registry] = None) -> tuple[list[str], Optional[CheckedRecipe]]:
    """(every problem of a recipe, one line each; the checked recipe when there is none)."""
    registry = registry or get_registry()
    problems = _Problems(collect=True)
    if isinstance(source, Recipe):
        recipe = source
    else:
        try:
            data = read_data(source, overrides)
        except ZmagicError as exc:
            return list(exc.problems), None
        try:
            recipe = Recipe.model_validate(data)
            if not isinstance(source, dict):
                recipe._source_dir = str(Path(source).resolve().parent)
        except ValidationError as exc:
            # the fields are wrong; still check every component that is readable on its own
            found = validation_problems(exc)
            base = None if isinstance(source, dict) else str(Path(source).resolve().parent)
            plan = CheckedRecipe(Recipe(), registry)
            for category, cls, raw, where in _raw_parts(data):
                spec = _component_only(cls, raw)
                if spec is None:
                    continue  # unreadable: already reported
                before = len(problems.found)
                _check_part(plan, category, spec, where, problems, base)
                found += [p for p in problems.found[before:] if p not in found]
            return found + missing_files(plan), None
    plan = _check(recipe, registry, problems)
    found = problems.found + missing_files(plan)
    if found:
        return found, None
    recipe._plan = plan
    return [], plan


def find_problems(source: Union[Recipe, str, Path, dict], overrides: tuple[str, ...] | list[str] = (),
                  registry: Optional[Registry] = None) -> list[str]:
    """Every problem of a recipe at once, before anything loads: fields, unknown kinds (with the
    package that provides them), invalid options, missing packages, files named by path options that
    do not exist, device, dtype, windows and condition counts.  One line each; [] if none."""
    return check_report(source, overrides, registry)[0]


def describe_plan(plan: CheckedRecipe) -> list[str]:
    """One line per resolved component: where, kind, the registration and its plugin, the options."""
    infos = {i.name: i for i in plan.registry.plugins()}
    lines = []
    for where, (reg, options) in plan.parts.items():
        info = infos.get(reg.plugin)
        source = info.describe() if info is not None else repr(reg.plugin)
        shown = json.dumps(options, default=str, sort_keys=True)
        lines.append(f"{where}: {reg.category} {reg.name!r} from {source}" + (f" {clip_text(shown, 300)}"
                                                                            if options else ""))
    return lines


# -- building ---------------------------------------------------------------------------------------
def check_built_model(plan: CheckedRecipe, model: Any) -> None:
    """What only the built model knows: its T against steps and windows; whether it honours the dtype."""
    recipe = plan.recipe
    alphas = getattr(model, "alphas_cumprod", None)
    if isinstance(alphas, torch.Tensor) and alphas.ndim == 1 and len(alphas) > 0:
        _check_windows(recipe, int(alphas.shape[0]), f"model {recipe.model.kind!r}")
    if recipe.dtype != "float32" and isinstance(model, torch.nn.Module):
        want = DTYPES[recipe.dtype]
        tensors = list(model.parameters()) + list(model.buffers())
        if tensors and not any(t.dtype == want for t in tensors):
            raise ConfigError(f"dtype: model {recipe.model.kind!r} ignores dtype {recipe.dtype} (it computes in "
                              f"{tensors[0].dtype}); remove dtype or set it to float32")


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
    check_built_model(plan, context.model)
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
        try:
            reg = plan.registry.get("evaluator", name)
            if reg.name != name:  # an alias of one already seen
                continue
            evaluator = reg.factory(context)
            if evaluator.applies_to(recipe_json):
                evaluators[name] = evaluator
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # one plugin's evaluator never costs the others theirs
            errors[name] = f"{type(exc).__name__}: {clip_text(str(exc), 300)}"
    return evaluators, errors
