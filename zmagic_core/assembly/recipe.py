"""Recipes: one file (YAML or JSON) that describes a whole run, checked before anything loads.

Component options sit beside ``kind`` (``combiner: {kind: cagrad, c: 0.4}``) or under
``options``; any field can be overridden with ``path.to.field=value`` (``--set`` on the CLI).

Bad input is refused with a ConfigError / InputError naming it, never a traceback, and with bounded
time and memory: a recipe file is at most ``MAX_RECIPE_BYTES`` (1 MiB) of UTF-8 text; YAML aliases
may not expand the recipe beyond ``MAX_NODES`` values or ``MAX_DEPTH`` levels (a "billion laughs"
file is refused before anything expands it), recursive aliases are refused; numbers are finite
(no ``.nan`` / ``.inf`` anywhere); values shown in messages are cut (``contracts.errors.shorten``).
Schema bounds: ``scale > 0``, ``num_samples <= MAX_SAMPLES``, seeds in ``[0, MAX_SEED]``, explicit
``seeds`` unique; windows against the model's schedule are checked by ``assembly.build``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from zmagic_core.contracts.errors import ConfigError, InputError, clip_text, shorten

MAX_RECIPE_BYTES = 1 << 20   # a recipe file larger than 1 MiB is refused unread
MAX_NODES = 20_000           # values in a recipe (YAML aliases expanded); a real one has hundreds
MAX_DEPTH = 32               # nesting levels of mappings and lists
MAX_SAMPLES = 1_000_000      # num_samples, len(seeds), batch_size
MAX_SEED = 2**63 - 1         # seeds fit a signed 64-bit integer (torch generators, numpy, JSON readers)
MAX_TIME_TRAVEL = 50
MAX_OVERRIDE_CHARS = 1 << 16  # the value of one --set
TOO_MANY = (f"more than {MAX_NODES} values; a recipe needs far fewer (for many samples give seed and "
            f"num_samples, not a long seeds list)")


class ComponentSpec(BaseModel):
    """A component by kind, with its options; unknown keys beside ``kind`` become options."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _collect_options(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"kind": data}
        if not isinstance(data, dict):
            return data
        fields = set(cls.model_fields)
        extra = {k: v for k, v in data.items() if k not in fields}
        if not extra:
            return data
        kept = {k: v for k, v in data.items() if k in fields}
        kept["options"] = {**(data.get("options") or {}), **extra}
        return kept


class ModelSpec(ComponentSpec):
    kind: str = "shapes"


class SolverSpec(ComponentSpec):
    kind: str = "ddpm"
    steps: int = Field(100, ge=1, le=1000, description="number of visited timesteps")


class CombinerSpec(ComponentSpec):
    kind: str = "sum"


class ConditionSpec(ComponentSpec):
    name: Optional[str] = Field(None, description="label in traces and records (default: the kind)")
    rule: Literal["fixed", "constant", "adaptive"] = "adaptive"
    scale: float = Field(1.0, gt=0, allow_inf_nan=False, description="guidance scale (finite, > 0)")
    start: int = Field(1000, ge=0, description="guidance active for stop <= t <= start; at most T (the "
                                                  "model's timesteps: 1000 = from the first step)")
    stop: int = Field(0, ge=0, description="below T")
    time_travel: int = Field(0, ge=0, le=MAX_TIME_TRAVEL, description="repeats of each step inside the window")

    @model_validator(mode="after")
    def _window(self):
        if self.stop > self.start:
            raise ValueError(f"window is empty: stop ({self.stop}) > start ({self.start})")
        return self


class Recipe(BaseModel):
    """Everything a run needs."""

    model_config = ConfigDict(extra="forbid")
    model: ModelSpec = Field(default_factory=ModelSpec)
    solver: SolverSpec = Field(default_factory=SolverSpec)
    combiner: CombinerSpec = Field(default_factory=CombinerSpec)
    conditions: list[ConditionSpec] = Field(default_factory=list)
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of sample 0; sample i uses seed + i")
    num_samples: int = Field(4, ge=1, le=MAX_SAMPLES)
    seeds: Optional[list[int]] = Field(None, min_length=1, max_length=MAX_SAMPLES,
                                       description="explicit per-sample seeds, unique, in [0, 2^63 - 1] "
                                                   "(overrides seed/num_samples)")
    batch_size: int = Field(8, ge=1, le=MAX_SAMPLES)
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    output: Optional[str] = None
    progress: bool = True

    _plan: Any = PrivateAttr(default=None)  # the CheckedRecipe once checked: checked once per run
    _source_dir: Optional[str] = PrivateAttr(default=None)  # folder of the recipe file: base of relative paths

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: Optional[list[int]]) -> Optional[list[int]]:
        if seeds is None:
            return seeds
        bad = next((s for s in seeds if not 0 <= s <= MAX_SEED), None)
        if bad is not None:
            raise ValueError(f"seed {shorten(bad)} is outside [0, {MAX_SEED}]")
        if len(set(seeds)) != len(seeds):
            seen: set[int] = set()
            repeated = next(s for s in seeds if s in seen or seen.add(s))
            raise ValueError(f"seeds must be unique; {repeated} appears more than once")
        return seeds

    def sample_seeds(self) -> list[int]:
        """The seed of every sample (num_samples is bounded by the schema, so this list is too)."""
        return list(self.seeds) if self.seeds is not None else [self.seed + i for i in range(self.num_samples)]


# -- reading -----------------------------------------------------------------------------------
def validation_problems(exc: ValidationError, prefix: str = "") -> list[str]:
    """One line per field pydantic rejected: ``where: message (got value)``, values cut short."""
    lines = []
    for err in exc.errors():
        loc = ".".join(p if isinstance(p, str) and len(p) <= 100 else shorten(p, 100)
                       for p in (prefix, *(str(x) for x in err["loc"])) if p != "")
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {shorten(value)})"
        lines.append(f"{loc or 'recipe'}: {clip_text(str(err['msg']), 300)}{shown}")
    return lines


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    return "invalid recipe:\n  " + "\n  ".join(validation_problems(exc, prefix))


def _node_size(node: yaml.Node, what: str) -> int:
    """Values in a composed YAML document once its aliases are expanded, without expanding them
    (aliases share their node, so this is linear in the file); refuses recursion and excess."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(n: yaml.Node, depth: int) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"{what}: a YAML alias refers to itself (recursive anchor)")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{what}: nested deeper than {MAX_DEPTH} levels")
        open_nodes.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            for child in n.value:
                total += size(child, depth + 1)
                if total > MAX_NODES:
                    break
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                total += size(k, depth + 1) + size(v, depth + 1)
                if total > MAX_NODES:
                    break
        open_nodes.discard(key)
        if total > MAX_NODES:
            raise ConfigError(f"{what}: more than {MAX_NODES} values once YAML aliases are expanded "
                              "(an alias bomb?); a recipe needs far fewer")
        sizes[key] = total
        return total

    return size(node, 0)


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader whose composer refuses, as it goes, documents nested deeper than MAX_DEPTH or of
    more than MAX_NODES nodes: the scanner never reads further than the limit (its cost per token
    grows with the nesting, so a file of 100 000 brackets would take minutes)."""

    def __init__(self, text: str, what: str):
        super().__init__(text)
        self._what, self._depth, self._nodes = what, 0, 0

    def compose_node(self, parent, index):
        self._depth += 1
        self._nodes += 1
        if self._depth > MAX_DEPTH:
            raise ConfigError(f"{self._what}: nested deeper than {MAX_DEPTH} levels")
        if self._nodes > MAX_NODES:
            raise ConfigError(f"{self._what}: {TOO_MANY}")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        # a key given twice would silently lose its first value (merge keys, `<<`, override by design)
        seen: set = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise ConfigError(f"{self._what}: line {key_node.start_mark.line + 1}: the key "
                                      f"{clip_text(key_node.value, 60)!r} is given twice in one mapping")
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _load_yaml(text: str, what: str) -> Any:
    """YAML (safe tags only) with the alias, depth and size limits; yaml.YAMLError passes through."""
    loader = _BoundedLoader(text, what)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _node_size(node, what)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"cannot parse {what}: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ConfigError(f"cannot parse {what}: {clip_text(str(exc), 200)}") from None
    finally:
        loader.dispose()


def parse_yaml(text: str, what: str) -> Any:
    """YAML (safe tags only) with the alias, depth and size limits; ConfigError names ``what``."""
    try:
        return _load_yaml(text, what)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse {what}: {clip_text(' '.join(str(exc).split()), 400)}") from None


def check_values(data: Any, what: str = "recipe", root: str = "") -> None:
    """Refuse non-finite numbers, excess nesting and excess size anywhere in parsed recipe data
    (iterative, cycle-safe: a dict given by a caller may hold anything); ``root`` prefixes the paths named."""
    seen: set[int] = set()
    stack: list[tuple[Any, str, int]] = [(data, root, 0)]
    count = 0
    while stack:
        value, where, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ConfigError(f"{what}: {TOO_MANY}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where or what}: {value} is not a finite number")
        if isinstance(value, (dict, list)):
            if id(value) in seen and depth:
                continue  # shared (a YAML alias): checked once
            seen.add(id(value))
            if depth >= MAX_DEPTH:
                raise ConfigError(f"{where or what}: nested deeper than {MAX_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                name = k if isinstance(k, str) and len(k) <= 60 else str(k) if isinstance(k, int) else shorten(k, 60)
                stack.append((v, f"{where}.{name}" if where else name, depth + 1))


def _override_value(raw: str, shown: str, path: str = "") -> Any:
    """The value of ``path=value``, parsed as YAML; text that is not YAML stays a string."""
    try:
        value = _load_yaml(raw, f"override {shown}")
    except yaml.YAMLError:
        return raw
    check_values(value, f"override {shown}", root=path)  # a bad item is named by its whole path
    return value


COMPONENTS = ("model", "solver", "combiner")


def apply_override(data: dict, assignment: str) -> None:
    """Set ``a.b.0.c=value`` in nested dicts and lists; the value is parsed as YAML.

    ConfigError (naming the override) for a path with an empty part, a list index that does not
    exist, or a path that goes through a scalar (``solver.steps.x=3``, ``seed.0=1``)."""
    shown = shorten(assignment, 120)
    if "=" not in assignment:
        raise ConfigError(f"override {shown} must look like path.to.field=value")
    path, raw = assignment.split("=", 1)
    path = path.strip()
    if not path:
        raise ConfigError(f"override {shown} names no field")
    keys = path.split(".")
    if any(not k for k in keys):
        raise ConfigError(f"override {shown}: the path {clip_text(path, 120)} has an empty part")
    if len(raw) > MAX_OVERRIDE_CHARS:
        raise ConfigError(f"override {shown}: the value is {len(raw)} characters; an override value may have at "
                          f"most {MAX_OVERRIDE_CHARS} (put large values in the recipe file)")
    value = _override_value(raw, shown, path)
    node: Any = data
    for i, key in enumerate(keys):
        here = ".".join(keys[:i]) or "recipe"
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not (key.isascii() and key.isdigit()) or int(key) >= len(node):
                has = f"items 0 to {len(node) - 1}" if node else "no items"
                raise ConfigError(f"override {shown}: no item {clip_text(key, 60)} in {clip_text(here, 120)} "
                                  f"(it has {has})")
            if last:
                node[int(key)] = value
                return
            index = int(key)
            component = i == 1 and keys[0] == "conditions"
            if component and isinstance(node[index], str):  # shorthand `- shapes-mask` becomes a mapping
                node[index] = {"kind": node[index]}
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[key] = value
                return
            component = i == 0 and key in COMPONENTS
            if component and isinstance(node.get(key), str):  # shorthand `combiner: sum` becomes a mapping
                node[key] = {"kind": node[key]}
            if node.get(key) is None:
                if keys[i + 1].isdigit():  # a new list would be empty: no index exists in it
                    raise ConfigError(f"override {shown}: {clip_text('.'.join(keys[:i + 1]), 120)} is not a list "
                                      f"in the recipe, so it has no item {clip_text(keys[i + 1], 60)}")
                node[key] = {}
            node = node[key]
        else:
            raise ConfigError(f"override {shown}: {clip_text(here, 120)} is {shorten(node, 60)} "
                              f"({type(node).__name__}), not a mapping or list, so it has no field "
                              f"{clip_text('.'.join(keys[i:]), 120)}")


def _read_text(path: Path) -> str:
    if not path.exists():
        raise InputError(f"recipe file not found: {path}")
    if not path.is_file():
        raise InputError(f"recipe {path} is not a file")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise InputError(f"recipe {path} is {size} bytes; a recipe file may be at most "
                             f"{MAX_RECIPE_BYTES} bytes (1 MiB)")
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise InputError(f"recipe {path} is larger than {MAX_RECIPE_BYTES} bytes (1 MiB)")
    if b"\x00" in raw:
        raise InputError(f"recipe {path} is a binary file, not YAML or JSON text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"recipe {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                         f"{exc.start})") from None


def _unique_keys(what: str):
    """json.loads's object_pairs_hook: a key given twice in one object is refused, not overwritten."""
    def pairs(items: list) -> dict:
        out: dict = {}
        for key, value in items:
            if key in out:
                raise ConfigError(f"{what}: the key {clip_text(key, 60)!r} is given twice in one object")
            out[key] = value
        return out
    return pairs


def read_data(source: Union[str, Path, dict], overrides: tuple[str, ...] | list[str] = ()) -> dict:
    """The recipe's data (a dict) from a file or a dict, with the overrides applied, before the
    schema: size, encoding, alias, nesting and number checks done."""
    if isinstance(source, dict):
        try:
            data = json.loads(json.dumps(source))
        except (TypeError, ValueError, RecursionError) as exc:
            raise ConfigError(f"recipe is not plain data (mappings, lists, strings, numbers): "
                              f"{clip_text(str(exc), 200)}") from None
    else:
        path = Path(source)
        text = _read_text(path)
        if path.suffix == ".json":
            try:
                data = json.loads(text, object_pairs_hook=_unique_keys(f"recipe {path}"))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"cannot parse recipe {path}: {exc}") from None
            except RecursionError:
                raise ConfigError(f"cannot parse recipe {path}: nested too deeply") from None
            except ValueError as exc:  # a number of more digits than Python converts
                raise ConfigError(f"cannot parse recipe {path}: {clip_text(str(exc), 200)}") from None
        else:
            data = parse_yaml(text, f"recipe {path}")
        if data is None:  # an empty file is the default recipe (the shapes world, unguided)
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {path} must be a mapping of fields, got {type(data).__name__}")
    check_values(data)
    for assignment in overrides:
        apply_override(data, assignment)
    if overrides:
        check_values(data)
    return data


def read_recipe(source: Union[str, Path, dict], overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Read, override and validate a recipe's fields (file path or dict); ConfigError names what is
    wrong.  Kinds and options are checked against the plugins by ``assembly.build.check_recipe``."""
    data = read_data(source, overrides)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc), problems=validation_problems(exc)) from None
    if not isinstance(source, dict):
        recipe._source_dir = str(Path(source).resolve().parent)
    return recipe


def recipe_identity(recipe: Recipe) -> dict:
    """The fields that decide what a sample looks like (not how many, where, or how fast)."""
    data = recipe.model_dump(mode="json")
    for key in ("seed", "num_samples", "seeds", "batch_size", "output", "progress", "device"):
        data.pop(key, None)
    return data


