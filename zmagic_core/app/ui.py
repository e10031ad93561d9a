"""`zmagic ui`: a web app (Gradio) that builds a recipe in a form, runs it and compares combiners.

The page is a form over a recipe: base model, solver and combiner (each with the fields of its
registered options model) and up to :data:`MAX_CONDITIONS` conditions, each with its kind's option
fields, its step-size rule, scale and window.  A run turns the form into a recipe dict, checks it
with ``assembly.build.load_recipe`` and runs ``app.runner.generate`` into a normal run folder under
a per-session output folder: exactly what ``zmagic generate`` does with the same recipe.

Why fixed condition slots and not ``@gr.render``: the form's fields are generated from each kind's
pydantic options model, but the *set* of Gradio components is fixed when the page is built.  Every
slot owns a pool of widgets (text boxes, numbers, checkboxes, dropdowns, image uploads), as many of
each as the most demanding installed kind needs; choosing a kind relabels, refills and shows the
widgets that kind uses and hides the rest.  The components never change identity, so a run, a
recipe load or a save reads and writes plain values in a known order: no re-render can drop what
the user typed, the event wiring is static, and the form <-> recipe mapping is a pure function
(``FormLayout``, ``form_to_recipe``, ``recipe_to_form``) that is tested without a browser.

Progress and cancel: ``generate`` is run in a worker thread.  When ``generate`` accepts a
``callback`` (forwarded to ``Pipeline.run``), it counts the steps and raises :class:`RunCancelled`
to stop; otherwise the step counter is read from the sampling loop's tqdm bar and a cancel raises
:class:`RunCancelled` in the worker thread asynchronously.  ``RunCancelled`` is a
``KeyboardInterrupt``, which the pipeline lets through; the runner's files are written atomically,
so a cancelled folder holds whole samples only (and resumes like any run folder).
"""
from __future__ import annotations

import ctypes
import html
import inspect
import logging
import re
import shutil
import tempfile
import threading
import time
import types
import typing
import uuid
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

try:
    import gradio as gr
except ImportError:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError('the zmagic web app needs Gradio: pip install "zmagic-core[ui]"') from None

import yaml
from pydantic_core import PydanticUndefined

from zmagic_core.app.runner import generate, problem_messages
from zmagic_core.assembly.build import load_recipe
from zmagic_core.assembly.recipe import CombinerSpec, ConditionSpec, ModelSpec, Recipe, SolverSpec, read_recipe
from zmagic_core.contracts.errors import ConfigError, UnknownComponentError, ZmagicError
from zmagic_core.contracts.options import path_fields
from zmagic_core.plugins.registry import Registry, get_registry

log = logging.getLogger("zmagic.ui")

MAX_CONDITIONS = 4
COMPARE = ("sum", "dependent", "cagrad")
PARTS = ("model", "solver", "combiner")  # the form's components besides the conditions
CATEGORY = {"model": "model", "solver": "solver", "combiner": "combiner", "condition": "energy"}
POOLS = ("text", "number", "check", "choice")  # widget pools, in this order in the flat form
SETTINGS = ("num_samples", "batch_size", "seed", "seeds", "device", "dtype")  # Recipe fields in the form
CONDITION_COMMON = ("name", "rule", "scale", "start", "stop", "time_travel")  # ConditionSpec fields
SOLVER_COMMON = ("steps",)  # SolverSpec fields

# What the page shows first: the shapes world's red-circle recipe (examples/shapes/red-circle.yaml).
DEFAULT_RECIPE: dict = {
    "model": {"kind": "shapes", "size": 32},
    "solver": {"kind": "ddpm", "steps": 100},
    "combiner": {"kind": "dependent"},
    "conditions": [
        {"kind": "shapes-attribute", "name": "red", "attribute": "color", "value": "red", "scale": 0.25},
        {"kind": "shapes-mask", "name": "mask", "reference": "red circle center", "scale": 0.25},
    ],
    "num_samples": 8,
    "batch_size": 8,
    "device": "cpu",
}


# -- one form field per option: what widget, how its value maps to the recipe and back ------------
class FieldValueError(ValueError):
    """A widget's value cannot become an option value (not YAML, not a number)."""


def _strip_annotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _members(annotation: Any) -> tuple[list[Any], bool]:
    """The non-None members of a (possibly Optional / Union / Annotated) annotation, and whether None is allowed."""
    annotation = _strip_annotated(annotation)
    if typing.get_origin(annotation) in (Union, types.UnionType):
        members, optional = [], False
        for arg in typing.get_args(annotation):
            if arg is type(None):
                optional = True
                continue
            inner, inner_optional = _members(arg)
            members += inner
            optional = optional or inner_optional
        return members, optional
    return [annotation], False


def _bounds(metadata) -> str:
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "multiple_of": "multiple of"}
    parts = []
    for m in metadata:
        for attr, sign in signs.items():
            value = getattr(m, attr, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


def _flow_yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip().removesuffix("...").strip()


@dataclass(frozen=True)
class FormField:
    """One option (or recipe field) as a widget.

    ``widget``: ``text`` (a string), ``path`` (a string naming a file: text box plus, in condition
    slots, an image upload), ``yaml`` (lists, mappings: typed as YAML), ``number`` (with a default
    value), ``numtext`` (a number that may stay empty, typed in a text box), ``check`` (a bool),
    ``choice`` (a Literal, or an optional bool).  ``pool`` is the widget pool it lives in
    and ``index`` its place there for its kind.  ``default`` is the raw widget value of the default.
    """

    key: str
    widget: str
    label: str
    info: str
    required: bool
    default: Any  # the option's default value (PydanticUndefined when required)
    choices: tuple = ()  # (label, raw value) pairs for ``choice``
    values: tuple = ()  # the option values behind the choices' raw values, same order (without the blank)
    integer: bool = False
    accepts_str: bool = True
    accepts_mapping: bool = False  # a dict or list is also a valid value (typed as YAML)
    pool: str = "text"
    index: int = 0

    # raw widget value -> (present, option value); an absent field is left out of the recipe
    def to_option(self, raw: Any) -> tuple[bool, Any]:
        value = self._parse(raw)
        if value is _ABSENT:
            return False, None
        if not self.required and self.default is not PydanticUndefined and _same(value, self.default):
            return False, None  # the default: left out, so the recipe stays as short as one written by hand
        return True, value

    def _parse(self, raw: Any) -> Any:
        if self.widget in ("text", "path", "yaml"):
            text = "" if raw is None else str(raw).strip()
            if not text:
                return _ABSENT
            if self.widget == "yaml" or (self.accepts_mapping and text[0] in "{["):
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError as exc:
                    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                    raise FieldValueError(f"not valid YAML ({problem}) (got {text!r})") from None
                if self.accepts_str and not isinstance(value, (dict, list)):
                    return text
                return value
            return text
        if self.widget in ("number", "numtext"):
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                return _ABSENT
            try:
                number = float(raw)
            except (TypeError, ValueError):
                raise FieldValueError(f"not a number (got {raw!r})") from None
            return int(number) if self.integer and number.is_integer() else number
        if self.widget == "check":
            return bool(raw)
        if self.widget == "choice":
            if raw is None or raw == "":
                return _ABSENT
            for (_, option_raw), value in zip(self._real_choices(), self.values):
                if option_raw == raw:
                    return value
            allowed = ", ".join(str(v) for v in self.values)
            raise FieldValueError(f"must be one of {allowed} (got {raw!r})")
        raise AssertionError(self.widget)

    def _real_choices(self) -> tuple:
        return tuple(c for c in self.choices if c[1] != "")

    # option value -> raw widget value
    def to_raw(self, value: Any) -> Any:
        if self.widget in ("text", "path"):
            if value is None:
                return ""
            return _flow_yaml(value) if isinstance(value, (dict, list)) else str(value)
        if self.widget == "yaml":
            return "" if value is None else _flow_yaml(value)
        if self.widget == "number":
            return value
        if self.widget == "numtext":
            return "" if value is None else str(value)
        if self.widget == "check":
            return bool(value)
        if self.widget == "choice":
            if value is None:
                return ""
            for (_, option_raw), option_value in zip(self._real_choices(), self.values):
                if _same(option_value, value):
                    return option_raw
            return str(value)  # not a choice: kept, so the check names it
        raise AssertionError(self.widget)

    def default_raw(self) -> Any:
        if self.default is PydanticUndefined:
            return {"number": None, "check": False, "choice": None}.get(self.widget, "")  # text-like: ""
        return self.to_raw(self.default)


class _Absent:
    def __repr__(self):
        return "<absent>"


_ABSENT = _Absent()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _field_of(key: str, info, is_path: bool) -> FormField:
    members, optional = _members(info.annotation)
    literal = [m for m in members if typing.get_origin(m) is Literal]
    accepts_str = any(m is str for m in members)
    accepts_mapping = any(typing.get_origin(m) in (dict, list) or m in (dict, list) for m in members)
    required = info.is_required()
    default = PydanticUndefined if required else info.get_default(call_default_factory=True)
    bounds = _bounds(info.metadata)
    notes = [info.description or ""]
    if bounds:
        notes.append(bounds)
    integer = False
    choices: tuple = ()
    values: tuple = ()
    if is_path:
        widget = "path"
        if accepts_mapping:
            notes.append("a file path, a name, or a YAML mapping")
    elif members == [bool]:
        if optional:  # None means "let the component decide": a three-way choice
            widget, values = "choice", (True, False)
            choices = (("(default)", ""), ("true", "true"), ("false", "false"))
        else:
            widget = "check"
    elif literal and len(literal) == len(members):
        widget = "choice"
        values = tuple(v for m in literal for v in typing.get_args(m))
        choices = tuple((str(v), str(v)) for v in values)
        if optional or not required:
            choices = (("(default)", ""),) + choices
    elif members in ([int], [float], [int, float], [float, int]):
        integer = members == [int]
        # a number box cannot be empty (it shows 0), so a number without a default value is typed as text
        widget = "number" if default not in (PydanticUndefined, None) else "numtext"
        if default is None:
            notes.append("empty: default")
    elif accepts_str and not accepts_mapping:
        widget = "text"
    elif accepts_str:
        widget = "text"
        notes.append("text, or a YAML mapping/list")
    else:
        widget = "yaml"
        notes.append("YAML, e.g. [1, 2]")
    label = key + (" *" if required else "")
    info_text = "; ".join(n for n in notes if n)
    pool = {"text": "text", "path": "text", "yaml": "text", "numtext": "text"}.get(widget, widget)
    return FormField(key, widget, label, info_text, required, default, choices, values, integer, accepts_str,
                     accepts_mapping, pool)


def fields_of(model: Any, keys: Optional[tuple[str, ...]] = None, skip: tuple[str, ...] = ()) -> list[FormField]:
    """The form fields of a pydantic model's fields (by alias), in declaration order, with pool indices
    assigned: path fields take the first text-pool places (their image uploads sit beside them)."""
    if model is None:
        return []
    paths = path_fields(model)
    found = []
    for name, info in model.model_fields.items():
        key = info.alias or name
        if (keys is not None and key not in keys) or key in skip:
            continue
        found.append(_field_of(key, info, key in paths))
    if keys is not None:
        found.sort(key=lambda f: keys.index(f.key))
    ordered = [f for f in found if f.widget == "path"] + [f for f in found if f.widget != "path"]
    counters: dict[str, int] = {}
    placed = {}
    for f in ordered:
        placed[f.key] = dataclasses.replace(f, index=counters.get(f.pool, 0))
        counters[f.pool] = counters.get(f.pool, 0) + 1
    return [placed[f.key] for f in found]


# -- the whole form: a nested dict of raw widget values, and its flat order on the page -------------
class FormLayout:
    """Which widgets each kind uses, and the flat order of every value the page holds.

    A *form* is ``{"settings": {key: raw}, "model": {"kind", "fields", "free"}, "solver": {"kind",
    "common", "fields", "free"}, "combiner": {...}, "conditions": [{"kind", "common", "fields",
    "free"}, ...]}`` holding raw widget values (``free``: a YAML mapping of options, shown for kinds
    that register no options model).  :meth:`flatten` / :meth:`unflatten` convert it to and from the
    list of values in component order: settings; model kind and pool; solver kind, steps and pool;
    combiner kind and pool; per condition slot: kind, common fields, pool.
    """

    def __init__(self, registry: Optional[Registry] = None, max_conditions: int = MAX_CONDITIONS):
        self.registry = registry or get_registry()
        self.max_conditions = max_conditions
        self.settings = fields_of(Recipe, SETTINGS)
        self.common = {"model": [], "solver": fields_of(SolverSpec, SOLVER_COMMON), "combiner": [],
                       "condition": fields_of(ConditionSpec, CONDITION_COMMON)}
        self._fields: dict[tuple[str, str], list[FormField]] = {}
        self.pools = {part: self._pool_sizes(part) for part in CATEGORY}

    # kinds and their fields
    def kinds(self, part: str) -> list[str]:
        category = CATEGORY[part]
        return [n for n in self.registry.names(category) if self.registry.get(category, n).name == n]

    def canonical(self, part: str, kind: str) -> str:
        return self.registry.get(CATEGORY[part], kind).name

    def options_model(self, part: str, kind: str):
        try:
            return self.registry.get(CATEGORY[part], kind).options
        except UnknownComponentError:
            return None

    def free(self, part: str, kind: str) -> bool:
        """True when the kind registers no options model: its options are typed as one YAML mapping."""
        return self.options_model(part, kind) is None

    def fields(self, part: str, kind: Optional[str]) -> list[FormField]:
        if not kind:
            return []
        if (part, kind) not in self._fields:
            model = self.options_model(part, kind)
            self._fields[(part, kind)] = fields_of(model) if model is not None else []
        return self._fields[(part, kind)]

    def field(self, part: str, kind: str, key: str) -> FormField:
        for f in self.fields(part, kind):
            if f.key == key:
                return f
        raise KeyError(f"{kind} has no option {key!r}")

    @staticmethod
    def spec_fields(part: str) -> tuple[str, ...]:
        spec = {"model": ModelSpec, "solver": SolverSpec, "combiner": CombinerSpec, "condition": ConditionSpec}[part]
        return tuple(spec.model_fields)

    def _pool_sizes(self, part: str) -> dict[str, int]:
        sizes = {p: 0 for p in POOLS}
        sizes["path"] = 0
        for kind in self.kinds(part):
            used: dict[str, int] = {}
            for f in self.fields(part, kind):
                used[f.pool] = used.get(f.pool, 0) + 1
                if f.widget == "path":
                    used["path"] = used.get("path", 0) + 1
            for p, n in used.items():
                sizes[p] = max(sizes[p], n)
        return sizes

    def default_kind(self, part: str) -> str:
        kinds = self.kinds(part)
        preferred = {"model": "shapes", "solver": "ddpm", "combiner": "dependent", "condition": "shapes-attribute"}[part]
        return preferred if preferred in kinds else kinds[0]

    # a component's widget pool as a flat vector
    def pool_size(self, part: str) -> int:
        return sum(self.pools[part][p] for p in POOLS) + 1  # + the free-options box

    def pool_vector(self, part: str, kind: Optional[str], raw: dict[str, Any], free: str = "") -> list:
        """Raw values in pool order; places the kind does not use hold blanks."""
        blanks = {"text": "", "number": None, "check": False, "choice": None}
        vectors = {p: [blanks[p]] * self.pools[part][p] for p in POOLS}
        for f in self.fields(part, kind):
            vectors[f.pool][f.index] = raw.get(f.key, f.default_raw())
        return [v for p in POOLS for v in vectors[p]] + [free or ""]

    def pool_values(self, part: str, kind: Optional[str], vector: list) -> tuple[dict[str, Any], str]:
        """(raw value per field of ``kind``, the free-options text) from a pool vector."""
        offsets, at = {}, 0
        for p in POOLS:
            offsets[p] = at
            at += self.pools[part][p]
        raw = {f.key: vector[offsets[f.pool] + f.index] for f in self.fields(part, kind)}
        return raw, vector[at] or ""

    def default_section(self, part: str, kind: Optional[str] = None) -> dict:
        kind = kind or self.default_kind(part)
        return {"kind": kind, "common": {f.key: f.default_raw() for f in self.common[part]},
                "fields": {f.key: f.default_raw() for f in self.fields(part, kind)}, "free": ""}

    # the flat order of the page
    def section_size(self, part: str) -> int:
        return 1 + len(self.common[part]) + self.pool_size(part)

    def flat_size(self) -> int:
        return (len(self.settings) + sum(self.section_size(p) for p in PARTS)
                + self.max_conditions * self.section_size("condition"))

    def _flatten_section(self, part: str, section: dict) -> list:
        kind = section.get("kind")
        common = section.get("common", {})
        return ([kind] + [common.get(f.key, f.default_raw()) for f in self.common[part]]
                + self.pool_vector(part, kind, section.get("fields", {}), section.get("free", "")))

    def flatten(self, form: dict) -> tuple[list, list[bool]]:
        """(values in component order, which condition slots are in use)."""
        settings = form.get("settings", {})
        values = [settings.get(f.key, f.default_raw()) for f in self.settings]
        for part in PARTS:
            values += self._flatten_section(part, form.get(part) or self.default_section(part))
        conditions = list(form.get("conditions", []))
        if len(conditions) > self.max_conditions:
            raise ConfigError(f"conditions: the form holds up to {self.max_conditions} conditions, "
                              f"the recipe has {len(conditions)}")
        for i in range(self.max_conditions):
            section = conditions[i] if i < len(conditions) else self.default_section("condition")
            values += self._flatten_section("condition", section)
        active = [i < len(conditions) for i in range(self.max_conditions)]
        return values, active

    def _unflatten_section(self, part: str, values: list) -> dict:
        kind = values[0]
        n = len(self.common[part])
        common = {f.key: values[1 + k] for k, f in enumerate(self.common[part])}
        raw, free = self.pool_values(part, kind, values[1 + n:])
        return {"kind": kind, "common": common, "fields": raw, "free": free}

    def unflatten(self, values: list, active: Optional[list[bool]] = None) -> dict:
        values = list(values)
        if len(values) != self.flat_size():
            raise ValueError(f"expected {self.flat_size()} form values, got {len(values)}")
        form: dict = {"settings": {f.key: values[k] for k, f in enumerate(self.settings)}}
        at = len(self.settings)
        for part in PARTS:
            size = self.section_size(part)
            form[part] = self._unflatten_section(part, values[at:at + size])
            at += size
        size = self.section_size("condition")
        form["conditions"] = []
        form["slots"] = []  # the slot of each condition, for placing its errors
        for i in range(self.max_conditions):
            if active is None or active[i]:
                form["conditions"].append(self._unflatten_section("condition", values[at:at + size]))
                form["slots"].append(i)
            at += size
        return form


# -- form <-> recipe --------------------------------------------------------------------------
def _free_options(text: str, where: str, errors: list[str]) -> dict:
    text = (text or "").strip()
    if not text:
        return {}
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        errors.append(f"{where}.options: not valid YAML ({getattr(exc, 'problem', None) or exc})")
        return {}
    if not isinstance(value, dict):
        errors.append(f"{where}.options: must be a YAML mapping of option: value (got {text!r})")
        return {}
    return value


def _section_to_spec(layout: FormLayout, part: str, section: dict, where: str, errors: list[str]) -> dict:
    kind = section.get("kind")
    if not kind:
        errors.append(f"{where}.kind: choose a kind")
        return {}
    spec: dict = {"kind": kind}
    for f in layout.common[part]:
        try:
            present, value = f.to_option(section.get("common", {}).get(f.key, f.default_raw()))
        except FieldValueError as exc:
            errors.append(f"{where}.{f.key}: {exc}")
            continue
        if present:
            spec[f.key] = value
    options: dict = {}
    raw = section.get("fields", {})
    for f in layout.fields(part, kind):
        try:
            present, value = f.to_option(raw.get(f.key, f.default_raw()))
        except FieldValueError as exc:
            errors.append(f"{where}.options.{f.key}: {exc}")
            continue
        if present:
            options[f.key] = value
    if layout.free(part, kind):
        options.update(_free_options(section.get("free", ""), where, errors))
    if set(options) & set(layout.spec_fields(part)):
        spec["options"] = options  # an option named like a spec field (`name`, `steps`): kept apart
    else:
        spec.update(options)  # beside `kind`, as recipes are written by hand
    return spec


def form_to_recipe(form: dict, layout: FormLayout) -> dict:
    """The recipe dict a form describes (what ``load_recipe`` and a saved recipe file take).

    Empty fields and fields left at their defaults are left out.  Values that cannot be read at all
    (a non-YAML list, a non-number) raise one ConfigError naming every such field by its recipe path
    (``conditions.0.options.points: ...``), as ``load_recipe`` names the fields it rejects."""
    errors: list[str] = []
    recipe: dict = {}
    for part in PARTS:
        recipe[part] = _section_to_spec(layout, part, form.get(part) or {}, part, errors)
    recipe["conditions"] = [_section_to_spec(layout, "condition", c, f"conditions.{i}", errors)
                            for i, c in enumerate(form.get("conditions", []))]
    settings = form.get("settings", {})
    for f in layout.settings:
        try:
            present, value = f.to_option(settings.get(f.key, f.default_raw()))
        except FieldValueError as exc:
            errors.append(f"{f.key}: {exc}")
            continue
        if present:
            recipe[f.key] = value
    if errors:
        raise ConfigError("invalid recipe:\n  " + "\n  ".join(errors))
    return recipe


def _spec_to_section(layout: FormLayout, part: str, spec: dict, where: str, notes: list[str]) -> dict:
    category = CATEGORY[part]
    try:
        kind = layout.canonical(part, spec["kind"])
    except UnknownComponentError as exc:
        raise ConfigError(f"{where}.kind: {exc}") from None
    if kind != spec["kind"]:
        notes.append(f"{where}.kind: {spec['kind']!r} is shown as {kind!r} (the same {category})")
    options = dict(spec.get("options") or {})
    raw, free = {}, ""
    if layout.free(part, kind):
        free = _flow_yaml(options) if options else ""
    else:
        known = {f.key: f for f in layout.fields(part, kind)}
        for key, value in options.items():
            if key in known:
                raw[key] = known[key].to_raw(value)
            else:
                notes.append(f"{where}.options.{key}: not an option of {kind} (accepts: {', '.join(known) or 'none'}); "
                             "left out")
    section = layout.default_section(part, kind)
    section["fields"].update(raw)
    section["free"] = free
    for f in layout.common[part]:
        if f.key in spec:
            section["common"][f.key] = f.to_raw(spec[f.key])
    return section


def recipe_to_form(source: Union[dict, str, Path], layout: FormLayout) -> tuple[dict, list[str]]:
    """(the form showing a recipe, notes on what the form could not show).  The recipe is read with
    ``read_recipe`` (its fields checked, options collected beside ``kind``); a recipe that is not
    valid at that level, names an unknown kind or has more conditions than the form's slots raises
    ConfigError."""
    recipe = read_recipe(source)
    data = recipe.model_dump(mode="json", exclude_unset=False)
    notes: list[str] = []
    if len(recipe.conditions) > layout.max_conditions:
        raise ConfigError(f"conditions: the form holds up to {layout.max_conditions} conditions, "
                          f"the recipe has {len(recipe.conditions)}")
    form: dict = {"settings": {}}
    for part in PARTS:
        spec = dict(data[part])
        spec_fields = getattr(recipe, part).model_fields_set  # common fields written in the recipe only
        spec = {k: v for k, v in spec.items() if k in ("kind", "options") or k in spec_fields}
        form[part] = _spec_to_section(layout, part, spec, part, notes)
    form["conditions"] = []
    for i, (cond, model) in enumerate(zip(data["conditions"], recipe.conditions)):
        spec = {k: v for k, v in cond.items() if k in ("kind", "options") or k in model.model_fields_set}
        form["conditions"].append(_spec_to_section(layout, "condition", spec, f"conditions.{i}", notes))
    for f in layout.settings:
        if f.key in recipe.model_fields_set:
            form["settings"][f.key] = f.to_raw(data[f.key])
    for key in ("output", "progress"):
        if key in recipe.model_fields_set:
            notes.append(f"{key}: not used here (runs go to this session's output folder)")
    return form, notes


# -- errors: each message line to the form area of the field it names --------------------------
_TOP = {"model", "solver", "combiner"} | set(Recipe.model_fields) | {"recipe"}
_LOCATION = re.compile(r"^(?P<loc>[A-Za-z_][\w-]*(?:\.[\w-]+)*)(?: \([^)]*\))?: ")


def area_of(location: str) -> Optional[str]:
    """``conditions.1.options.value`` -> ``condition-1``; ``combiner.kind`` -> ``components``; recipe
    fields -> ``settings``; anything else None."""
    parts = location.split(".")
    if parts[0] == "conditions" and len(parts) > 1 and parts[1].isdigit():
        return f"condition-{int(parts[1])}"
    if parts[0] == "conditions":
        return "settings"
    if parts[0] in ("model", "solver", "combiner"):
        return "components"
    if parts[0] in _TOP:
        return "settings"
    return None


def split_errors(message: str, where: Optional[str] = None) -> dict[str, list[str]]:
    """The lines of a ZmagicError message by form area (see :func:`area_of`); lines that name no
    field go to the area of the previous line, or to ``where`` (the component that failed, when
    known), else to ``general``.  Areas of conditions are numbered as in the recipe."""
    out: dict[str, list[str]] = {}
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if lines and lines[0] == "invalid recipe:":
        lines = lines[1:]
    current = area_of(where) if where else None
    for line in lines:
        match = _LOCATION.match(line)
        area = area_of(match.group("loc")) if match else None
        if area is None:
            area = current or "general"
            if where and not match and area == area_of(where) and not line.startswith("("):
                line = f"{where}: {line}"
        current = area
        out.setdefault(area, []).append(line)
    return out


def failing_part(exc: BaseException) -> Optional[str]:
    """Which recipe part (``conditions.0``, ``model``) was being built when ``exc`` was raised: the
    ``where`` of ``CheckedRecipe.built`` in the traceback.  A build error (a shapes colour that does not
    exist, weights not found) does not name its field; this places it next to its component."""
    where = None
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "built" and isinstance(frame.f_locals.get("where"), str):
            where = frame.f_locals["where"]
        tb = tb.tb_next
    return where


def _check_alone(recipe: dict, registry: Optional[Registry]) -> Optional[str]:
    try:
        load_recipe(recipe, registry=registry)
    except ZmagicError as exc:
        return str(exc)
    return None


def check_form(recipe_dict: dict, registry: Optional[Registry] = None) -> tuple[Optional[Recipe], dict[str, list[str]]]:
    """(the checked recipe, or None and the errors by area).

    ``load_recipe`` stops at the first bad component.  When the whole recipe fails, the model, the
    solver, the combiner and each condition that the first message did not name are checked once
    more, each alone in an otherwise default recipe (a condition as ``conditions.0`` beside the
    form's model kind and a ``sum`` combiner, its message renumbered), so that every bad part of the
    form shows its message at once."""
    try:
        return load_recipe(recipe_dict, registry=registry), {}
    except ZmagicError as exc:
        errors = split_errors(str(exc))
    reported = "\n".join(line for lines in errors.values() for line in lines)
    registry = registry or get_registry()
    for part in PARTS:
        spec = recipe_dict.get(part)
        if spec is None or re.search(rf"(?m)^{part}\.", reported):
            continue
        message = _check_alone({part: spec}, registry)
        if message:
            for area, lines in split_errors(message).items():
                errors.setdefault(area, []).extend(lines)
    model_kind = (recipe_dict.get("model") or {}).get("kind", "shapes")
    if model_kind not in registry.names("model"):
        model_kind = "shapes"
    for j, condition in enumerate(recipe_dict.get("conditions") or []):
        if f"condition-{j}" in errors:
            continue
        message = _check_alone({"model": {"kind": model_kind}, "combiner": {"kind": "sum"}, "conditions": [condition]},
                               registry)
        if message:
            message = re.sub(r"(?m)^(\s*)conditions\.0\b", lambda m: f"{m.group(1)}conditions.{j}", message)
            for area, lines in split_errors(message).items():
                errors.setdefault(area, []).extend(lines)
    return None, errors


# -- running in a worker thread, with a step counter and a cancel --------------------------------
class RunCancelled(KeyboardInterrupt):
    """Raised inside a run to stop it (a KeyboardInterrupt: the pipeline lets it through)."""


def _generate_takes_callback() -> bool:
    try:
        return "callback" in inspect.signature(generate).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _sampling_bars() -> list:
    """The live tqdm bars of the sampling loop (read for the step counter when generate takes no callback)."""
    try:
        from tqdm import tqdm as std_tqdm

        return [b for b in list(getattr(std_tqdm, "_instances", ())) if getattr(b, "desc", "").startswith("sampling")]
    except Exception:  # pragma: no cover - the counter is a nicety
        return []


class Job:
    """One session's generation(s) in a worker thread: a list of (label, recipe, folder) run in order."""

    def __init__(self, runs: list[tuple[str, Recipe, Path]]):
        self.runs = runs
        self.cancel = threading.Event()
        self.index = 0  # which run
        self.step = 0  # steps done in this run (all batches)
        self._bars: dict[int, Any] = {}  # without a callback: the sampling bars seen in this run
        self.total = 0
        self.started = time.perf_counter()
        self.results: dict[str, dict] = {}
        self.errors: dict[str, BaseException] = {}
        self.cancelled = False
        self.callback = _generate_takes_callback()
        self.thread = threading.Thread(target=self._work, name="zmagic-ui-run", daemon=True)

    def start(self) -> "Job":
        self.thread.start()
        return self

    def _on_step(self, info: dict) -> None:
        self.step += 1
        if self.cancel.is_set():
            raise RunCancelled()

    def _work(self) -> None:
        try:
            for index, (label, recipe, out) in enumerate(self.runs):
                if self.cancel.is_set():
                    raise RunCancelled()
                self.index, self.step, self._bars = index, 0, {}
                batches = -(-len(recipe.sample_seeds()) // recipe.batch_size)
                self.total = recipe.solver.steps * batches
                try:
                    if self.callback:
                        self.results[label] = generate(recipe, out, progress=False, callback=self._on_step)
                    else:
                        self.results[label] = generate(recipe, out, progress=True)
                except RunCancelled:
                    raise
                except Exception as exc:  # reported on the page, per run; the next runs go on
                    self.errors[label] = exc
                    if not isinstance(exc, ZmagicError):
                        log.exception("run %s failed", label)
        except RunCancelled:
            self.cancelled = True

    def steps_done(self) -> int:
        """Steps done in the current run, across its batches."""
        if not self.callback:  # one sampling bar per batch, kept once seen (so its id stays its own): summed
            for bar in _sampling_bars():
                self._bars[id(bar)] = bar
            self.step = min(sum(getattr(bar, "n", 0) for bar in self._bars.values()), self.total)
        return self.step

    def stop(self) -> None:
        """Ask the run to stop; without a callback, raise RunCancelled in its thread."""
        self.cancel.set()
        if not self.callback and self.thread.is_alive() and self.thread.ident is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread.ident),
                                                       ctypes.py_object(RunCancelled))

    def running(self) -> bool:
        return self.thread.is_alive()


# -- presenting a finished run -------------------------------------------------------------------
def gallery_items(record: dict, out: Path) -> list[tuple[str, str]]:
    seeds = record.get("seeds", [])
    items = []
    for index in record.get("completed", []):
        path = out / f"sample_{index:04d}.png"
        if path.exists():
            seed = seeds[index] if index < len(seeds) else "?"
            items.append((str(path), f"#{index} seed {seed}"))
    return items


def energy_table(record: dict) -> tuple[list[str], list[list]]:
    """(headers, rows) of record["final_energy"]: one row per sample and a mean row."""
    finals = {int(k): v for k, v in (record.get("final_energy") or {}).items()}
    names = sorted({n for v in finals.values() for n in v})
    seeds = record.get("seeds", [])
    rows = []
    for index in sorted(finals):
        seed = seeds[index] if index < len(seeds) else None
        rows.append([index, seed] + [_fmt(finals[index].get(n)) for n in names])
    means = record.get("mean_final_energy") or {}
    if rows:
        rows.append(["mean", ""] + [_fmt(means.get(n)) for n in names])
    return ["sample", "seed"] + names, rows


def _fmt(value) -> Any:
    return "" if value is None else round(float(value), 4)


def summary_line(record: dict, out: Path) -> str:
    done, total = len(record.get("completed", [])), len(record.get("seeds", []))
    text = f"{done} of {total} samples in {record.get('seconds', 0):.1f} s, folder `{out}`"
    shapes = (record.get("evaluation") or {}).get("shapes")
    if shapes and "summary" in shapes:
        s = shapes["summary"]
        text += (f"; shapes world's exact check: joint satisfaction {s['joint_satisfaction']:.2f}, "
                 f"on-manifold {s['on_manifold']:.2f}")
        if s.get("not_judged"):  # plugin conditions have no exact likelihood in the shapes world
            text += f" (not judged: {', '.join(s['not_judged'])})"
    failed = record.get("failed") or {}
    if failed:
        text += "; failed: " + "; ".join(f"sample {i}: {m}" for i, m in failed.items())
    for line in problem_messages(record.get("problems") or {}):  # as the CLI warns: nothing is dropped silently
        text += f"; warning: {line}"
    return text


def _error_html(lines: list[str]) -> str:
    if not lines:
        return ""
    return '<div class="zmagic-error"><pre>' + html.escape("\n".join(lines)) + "</pre></div>"


def _message_md(title: str, message: str) -> str:
    """A title and a message shown verbatim (an indented Markdown code block)."""
    return f"**{title}**\n\n" + "\n".join("    " + line for line in message.splitlines())


def _error_box(elem_id: str):
    """An error area: hidden while empty."""
    return gr.HTML("", visible=False, elem_id=elem_id, padding=False)


def _error_update(lines: list[str]):
    text = _error_html(lines)
    return gr.update(value=text, visible=bool(text))


def _safe_name(name: str, fallback: str = "file") -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).strip("._")
    return name[:100] or fallback


CSS = """
.zmagic-error pre { color: #b00020; background: #fff0f0; border: 1px solid #f2b8b5; border-radius: 6px;
  padding: 6px 8px; white-space: pre-wrap; font-size: 0.85em; margin: 4px 0; }
.zmagic-gallery img { image-rendering: pixelated; }
.zmagic-check { min-width: 180px !important; flex: 1 1 180px !important; }
"""


# -- the app ---------------------------------------------------------------------------------------
class ZmagicApp:
    """The Gradio app.  ``out_root``: the folder that holds one output folder per session;
    ``initial``: the recipe (dict or file) the form shows first."""

    def __init__(self, registry: Optional[Registry] = None, out_root: Union[str, Path] = "outputs/ui",
                 initial: Union[dict, str, Path, None] = None, max_conditions: int = MAX_CONDITIONS):
        self.registry = registry or get_registry()
        self.layout = FormLayout(self.registry, max_conditions)
        self.out_root = Path(out_root).resolve()
        self._upload_root: Optional[Path] = None  # a temporary folder, made on the first upload
        self.initial_form, self.initial_notes = recipe_to_form(initial if initial is not None else DEFAULT_RECIPE,
                                                               self.layout)
        self.jobs: dict[str, Job] = {}
        self.blocks: Optional[gr.Blocks] = None

    # per-session folders
    @staticmethod
    def _session(request: Optional[gr.Request]) -> str:
        return _safe_name(getattr(request, "session_hash", None) or "local", "local")[:16]

    def session_out(self, request) -> Path:
        return self.out_root / self._session(request)

    @property
    def upload_root(self) -> Path:
        """The temporary folder that holds one folder of uploads per session (removed by close())."""
        if self._upload_root is None:
            self._upload_root = Path(tempfile.mkdtemp(prefix="zmagic-ui-uploads-"))
        return self._upload_root

    def session_uploads(self, request) -> Path:
        folder = self.upload_root / self._session(request)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _new_run_folder(self, request, label: str) -> Path:
        base = self.session_out(request)
        base.mkdir(parents=True, exist_ok=True)
        number = 1 + sum(1 for p in base.iterdir() if p.is_dir())
        return base / f"{number:03d}-{label}-{uuid.uuid4().hex[:6]}"

    # -- building the page ----------------------------------------------------------------------
    def build(self) -> gr.Blocks:
        L = self.layout
        values, active = L.flatten(self.initial_form)
        n_settings = len(L.settings)
        it = iter(values[n_settings:])  # the settings are placed last on the page, first in the flat order
        with gr.Blocks(title="zmagic", analytics_enabled=False, delete_cache=(3600, 86400)) as blocks:
            self.blocks = blocks
            gr.Markdown("## zmagic: multi-condition guided generation\nPick a base model, a solver and a combiner, "
                        "add conditions, run. Fields marked * are required. A run writes a normal run folder, the "
                        "same as `zmagic generate` with the recipe this form saves.")
            with gr.Row(equal_height=False):
                with gr.Column(scale=5, min_width=480):
                    with gr.Row():
                        recipe_file = gr.File(label="Load a recipe (YAML or JSON)", type="filepath", height=90,
                                              file_types=[".yaml", ".yml", ".json"], elem_id="recipe-upload")
                        with gr.Column(min_width=160):
                            save_btn = gr.Button("Save the form as a recipe", elem_id="save-recipe")
                            saved_file = gr.File(label="recipe.yaml", interactive=False, visible=False, height=60,
                                                 elem_id="saved-recipe")
                    load_status = gr.Markdown(self._notes_md(self.initial_notes), elem_id="load-status")

                    sections: dict[str, dict] = {}
                    with gr.Group():
                        for part in PARTS:
                            sections[part] = self._section(part, part, it, image_uploads=False)
                        components_error = _error_box("error-components")

                    active_state = gr.State(active)
                    slots, groups, remove_btns = [], [], []
                    for i in range(L.max_conditions):
                        with gr.Group(visible=active[i], elem_id=f"cond{i}") as group:
                            slot = self._section("condition", f"cond{i}", it, image_uploads=True, number=i)
                            slot["error"] = _error_box(f"error-cond{i}")
                        slots.append(slot)
                        groups.append(group)
                        remove_btns.append(slot["remove"])
                    add_btn = gr.Button("Add a condition", size="sm", elem_id="add-condition",
                                        interactive=not all(active))

                    with gr.Group():
                        with gr.Row():
                            settings = [self._widget(f, values[k], elem_id=f"setting-{f.key}")
                                        for k, f in enumerate(L.settings)]
                        settings_error = _error_box("error-settings")
                    with gr.Row():
                        run_btn = gr.Button("Run", variant="primary", elem_id="run")
                        compare_btn = gr.Button("Compare combiners", elem_id="compare")
                        cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                    status = gr.Markdown("", elem_id="status")
                    general_error = _error_box("error-general")

                with gr.Column(scale=4, min_width=400):
                    with gr.Tabs(selected="run", elem_id="results") as tabs:
                        with gr.Tab("Run", id="run", elem_id="tab-run"):
                            gallery = gr.Gallery(label="Samples", columns=4, height=260, elem_id="gallery",
                                                 elem_classes=["zmagic-gallery"], object_fit="contain")
                            energy_img = gr.Image(label="Energy per condition over the steps (Figure 3)", type="filepath",
                                                  interactive=False, elem_id="energy-plot")
                            cosine_img = gr.Image(label="Cosine between the conditions' gradients (Figure 1)",
                                                  type="filepath", interactive=False, elem_id="cosine-plot")
                            table = gr.Dataframe(label="Final energy per sample and condition", interactive=False,
                                                 headers=["sample", "seed"], elem_id="final-energy")
                        with gr.Tab("Compare combiners", id="compare", elem_id="tab-compare"):
                            gr.Markdown("The same seeds under `sum` (FreeDoM), `dependent` (Algorithm 1) and `cagrad` "
                                        "(Algorithm 2); the form's combiner keeps its options, the others their defaults.")
                            compare_galleries = [gr.Gallery(label=name, columns=4, height=240, elem_id=f"compare-{name}",
                                                            elem_classes=["zmagic-gallery"], object_fit="contain")
                                                 for name in COMPARE]
                            compare_table = gr.Dataframe(label="Per combiner", interactive=False, elem_id="compare-table",
                                                         headers=["combiner", "samples", "joint satisfaction", "seconds"])

            widgets = list(settings)  # every form value's component, in the layout's flat order
            for part in PARTS:
                widgets += sections[part]["values"]
            for slot in slots:
                widgets += slot["values"]
            assert len(widgets) == L.flat_size()
            errors = {"settings": settings_error, "components": components_error, "general": general_error}
            for i, slot in enumerate(slots):
                errors[f"slot-{i}"] = slot["error"]
            self._errors = errors
            self._gallery, self._energy, self._cosine, self._table, self._status = (gallery, energy_img, cosine_img,
                                                                                    table, status)

            # -- events ---------------------------------------------------------------------------
            for part in PARTS:
                sec = sections[part]
                sec["kind"].input(self._on_kind(part), inputs=[sec["kind"]], outputs=sec["pool"] + [components_error])
            for i, slot in enumerate(slots):
                slot["kind"].input(self._on_kind("condition"), inputs=[slot["kind"]],
                                   outputs=slot["pool"] + [slot["error"]] + slot["images"])
                for j, image in enumerate(slot["images"]):
                    image.upload(self._on_upload, inputs=[image], outputs=[slot["texts"][j]])
                remove_btns[i].click(self._on_remove(i), inputs=[active_state],
                                     outputs=[active_state, add_btn, slot["error"]] + groups)
            add_btn.click(self._on_add, inputs=[active_state], outputs=[active_state, add_btn] + groups)

            self._load_targets = self._update_targets(settings, sections, slots)
            load_outputs = [load_status, active_state, add_btn] + groups + self._load_targets + list(errors.values())
            recipe_file.upload(self._on_load(len(groups)), inputs=[recipe_file], outputs=load_outputs)
            # the form's values reach a handler as one {component: value} dict (inputs given as a set)
            self._widgets, self._active = widgets, active_state
            form_inputs = set(widgets) | {active_state}
            save_btn.click(self._on_save, inputs=form_inputs, outputs=[saved_file, load_status])

            self._tabs = tabs
            run_outputs = [status, gallery, energy_img, cosine_img, table, tabs] + list(errors.values())
            run_evt = run_btn.click(self._on_run, inputs=form_inputs, outputs=run_outputs,
                                    concurrency_limit=1, concurrency_id="generate", show_progress="minimal")
            compare_outputs = [status, compare_table, tabs] + compare_galleries + list(errors.values())
            cmp_evt = compare_btn.click(self._on_compare(compare_galleries, compare_table),
                                        inputs=form_inputs, outputs=compare_outputs, concurrency_limit=1,
                                        concurrency_id="generate", show_progress="minimal")
            cancel_btn.click(self._on_cancel, inputs=None, outputs=[status], cancels=[run_evt, cmp_evt], queue=False)
            blocks.unload(self._on_unload)
        return blocks

    def _notes_md(self, notes: list[str]) -> str:
        return "" if not notes else "Loaded with notes:\n" + "\n".join(f"- {html.escape(n)}" for n in notes)

    def _widget(self, f: FormField, value: Any, elem_id: str, visible: bool = True):
        """A fixed widget (run settings, a condition's rule, scale and window, the solver's steps)."""
        if f.widget == "number":
            return gr.Number(value=value, label=f.label, info=f.info or None, precision=0 if f.integer else None,
                             elem_id=elem_id, visible=visible, min_width=90)
        if f.widget == "check":
            return gr.Checkbox(value=bool(value), label=f.label, info=f.info or None, elem_id=elem_id, visible=visible)
        if f.widget == "choice":
            return gr.Dropdown(choices=list(f.choices), value=value, label=f.label, info=f.info or None,
                               elem_id=elem_id, visible=visible, min_width=110)
        return gr.Textbox(value=value, label=f.label, info=f.info or None, elem_id=elem_id, visible=visible,
                          max_lines=1, min_width=110)

    def _section(self, part: str, prefix: str, it, image_uploads: bool, number: Optional[int] = None) -> dict:
        """A component's kind, its common fields and its widget pool, filled from the iterator of flat values."""
        L = self.layout
        kind_value = next(it)
        label = {"model": "Base model", "solver": "Solver", "combiner": "Combiner",
                 "condition": f"Condition {(number or 0) + 1}"}[part]
        out: dict = {"values": [], "pool": [], "texts": [], "images": []}
        with gr.Row():
            out["kind"] = gr.Dropdown(choices=L.kinds(part), value=kind_value, label=label, elem_id=f"{prefix}-kind",
                                      min_width=160, scale=2)
            if part == "condition":  # name, then the step-size rule, scale and window on their own row
                common = [self._widget(L.common[part][0], next(it), elem_id=f"{prefix}-name")]
                out["remove"] = gr.Button("Remove", size="sm", elem_id=f"{prefix}-remove", min_width=80, scale=0)
            else:
                common = [self._widget(f, next(it), elem_id=f"{prefix}-{f.key}") for f in L.common[part]]
        if part == "condition":
            with gr.Row():
                common += [self._widget(f, next(it), elem_id=f"{prefix}-{f.key}") for f in L.common[part][1:]]
        out["values"] += [out["kind"]] + common
        sizes = L.pools[part]
        pool_values = [next(it) for _ in range(L.pool_size(part))]
        fields = {(f.pool, f.index): f for f in L.fields(part, kind_value)}
        at = 0
        pool: list = []
        n_images = sizes["path"] if image_uploads else 0
        with gr.Row():
            for p in POOLS:
                for j in range(sizes[p]):
                    f = fields.get((p, j))
                    value = pool_values[at]
                    at += 1
                    w = self._pool_widget(p, f, value, f"{prefix}-{p}{j}")
                    if p == "text" and j < n_images:
                        image = gr.Image(label=f"upload {f.key}" if f else "upload", type="filepath",
                                         sources=["upload"], visible=bool(f and f.widget == "path"),
                                         elem_id=f"{prefix}-image{j}", height=110, interactive=True, min_width=140)
                        out["images"].append(image)
                    pool.append(w)
                    if p == "text":
                        out["texts"].append(w)
        free = gr.Textbox(value=pool_values[at], label="options (YAML mapping)", visible=L.free(part, kind_value),
                          elem_id=f"{prefix}-free", lines=2)
        pool.append(free)
        out["pool"] = pool
        out["values"] += pool
        return out

    @staticmethod
    def _pool_widget(p: str, f: Optional[FormField], value: Any, elem_id: str):
        visible = f is not None
        label = f.label if f else ""
        info = (f.info or None) if f else None
        # widths: a row of options wraps rather than squeezing a field under its description
        if p == "number":
            return gr.Number(value=value, label=label, info=info, visible=visible, elem_id=elem_id, min_width=150)
        if p == "check":
            return gr.Checkbox(value=bool(value), label=label, info=info, visible=visible, elem_id=elem_id,
                               min_width=180, elem_classes=["zmagic-check"])
        if p == "choice":
            return gr.Dropdown(choices=list(f.choices) if f else [], value=value, label=label, info=info,
                               visible=visible, elem_id=elem_id, min_width=180)
        return gr.Textbox(value=value, label=label, info=info, visible=visible, elem_id=elem_id, max_lines=3,
                          min_width=200)

    def _pool_updates(self, part: str, kind: Optional[str], raw: dict, free: str = "") -> list:
        """gr.update per pool widget (then the free box): label, info, choices, value and visibility for ``kind``."""
        L = self.layout
        vector = L.pool_vector(part, kind, raw, free)
        fields = {(f.pool, f.index): f for f in L.fields(part, kind)}
        updates, at = [], 0
        for p in POOLS:
            for j in range(L.pools[part][p]):
                f = fields.get((p, j))
                value = vector[at]
                at += 1
                if f is None:
                    updates.append(gr.update(visible=False, value=value))
                    continue
                kwargs = dict(visible=True, label=f.label, info=f.info or None, value=value)
                if p == "choice":
                    kwargs["choices"] = list(f.choices)
                if p == "number":
                    kwargs["precision"] = 0 if f.integer else None
                updates.append(gr.update(**kwargs))
        updates.append(gr.update(visible=bool(kind) and L.free(part, kind), value=vector[at]))
        return updates

    def _image_updates(self, kind: Optional[str]) -> list:
        paths = [f for f in self.layout.fields("condition", kind) if f.widget == "path"]
        return [gr.update(visible=j < len(paths), value=None, label=f"upload {paths[j].key}" if j < len(paths) else "")
                for j in range(self.layout.pools["condition"]["path"])]

    @staticmethod
    def _update_targets(settings, sections, slots) -> list:
        """The components a recipe load sets, in the order of ``_on_load``'s updates."""
        targets = list(settings)
        for part in PARTS:
            targets += sections[part]["values"]
        for slot in slots:
            targets += slot["values"] + slot["images"]
        return targets

    # -- event handlers ---------------------------------------------------------------------------
    def _on_kind(self, part: str):
        def handler(kind):
            defaults = self.layout.default_section(part, kind)
            updates = self._pool_updates(part, kind, defaults["fields"])
            if part == "condition":
                return updates + [_error_update([])] + self._image_updates(kind)
            return updates + [_error_update([])]

        return handler

    def _on_upload(self, path, request: gr.Request):
        """Copy an uploaded reference into this session's upload folder; its text box names the copy."""
        if not path:
            return gr.update()
        source = Path(path)
        target = self.session_uploads(request) / f"{uuid.uuid4().hex[:8]}-{_safe_name(source.name, 'upload.png')}"
        shutil.copyfile(source, target)
        return str(target)

    def _on_add(self, active):
        active = list(active)
        if False in active:
            active[active.index(False)] = True
        return [active, gr.update(interactive=False in active)] + [gr.update(visible=a) for a in active]

    def _on_remove(self, i: int):
        def handler(active):
            active = list(active)
            active[i] = False
            return [active, gr.update(interactive=True), _error_update([])] + [gr.update(visible=a) for a in active]

        return handler

    def _on_load(self, n_groups: int):
        L = self.layout

        def handler(path):
            blank_errors = [_error_update([]) for _ in self._errors]
            nothing = [gr.update()] * (2 + n_groups + len(self._load_targets))
            if not path:
                return ["", *nothing, *blank_errors]
            try:
                form, notes = recipe_to_form(path, L)
                values, active = L.flatten(form)
            except ZmagicError as exc:
                return [_message_md("Cannot load this recipe:", str(exc)), *nothing, *blank_errors]
            it = iter(values)
            updates = [gr.update(value=next(it)) for _ in L.settings]
            for part in [*PARTS] + ["condition"] * L.max_conditions:
                kind = next(it)
                common = [next(it) for _ in L.common[part]]
                raw, free = L.pool_values(part, kind, [next(it) for _ in range(L.pool_size(part))])
                updates += [gr.update(value=kind)] + [gr.update(value=v) for v in common] \
                    + self._pool_updates(part, kind, raw, free)
                if part == "condition":
                    updates += self._image_updates(kind)
            message = f"Loaded {html.escape(Path(path).name)}." + ("\n\n" + self._notes_md(notes) if notes else "")
            return ([message, active, gr.update(interactive=False in active)] + [gr.update(visible=a) for a in active]
                    + updates + blank_errors)

        return handler

    def _form(self, data: dict) -> dict:
        """The form from a handler's {component: value} inputs."""
        return self.layout.unflatten([data[w] for w in self._widgets], data[self._active])

    def _on_save(self, data: dict, request: gr.Request):
        L = self.layout
        form = self._form(data)
        try:
            recipe = form_to_recipe(form, L)
        except ZmagicError as exc:
            return gr.update(value=None, visible=False), _message_md("Cannot save the form:", str(exc))
        folder = self.session_out(request)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        _, errors = check_form(recipe, self.registry)
        note = "Saved recipe.yaml (download it above)."
        if errors:
            note += " It does not pass the checks yet: run it to see where."
        return gr.update(value=str(path), visible=True), note

    def _form_errors(self, errors: dict[str, list[str]], slots_of: list[int]) -> dict:
        """{error component: html} for every area (empty ones cleared)."""
        out = {c: _error_update([]) for c in self._errors.values()}
        for area, lines in errors.items():
            if area.startswith("condition-"):
                k = int(area.split("-")[1])
                target = self._errors.get(f"slot-{slots_of[k]}") if k < len(slots_of) else self._errors["settings"]
            else:
                target = self._errors.get(area, self._errors["general"])
            out[target] = _error_update(lines)
        return out

    def _prepare(self, data: dict) -> tuple[Optional[dict], Optional[Recipe], dict, list[int]]:
        """(recipe dict, checked recipe, {error component: update}, slot of each condition)."""
        form = self._form(data)
        slots_of = form["slots"]
        try:
            recipe_dict = form_to_recipe(form, self.layout)
            recipe, errors = check_form(recipe_dict, self.registry)
        except ZmagicError as exc:
            return None, None, self._form_errors(split_errors(str(exc)), slots_of), slots_of
        except Exception as exc:  # a plugin's options model that fails oddly: a message, not a traceback
            log.exception("checking the form failed")
            return None, None, self._form_errors({"general": [f"{type(exc).__name__}: {exc}"]}, slots_of), slots_of
        return recipe_dict, recipe, self._form_errors(errors, slots_of), slots_of

    def _watch(self, job: Job, names: list[str], progress) -> typing.Iterator[str]:
        """Status lines while ``job`` runs, every 0.25 s."""
        while job.running():
            done = job.steps_done()
            label = names[job.index] if job.index < len(names) else ""
            prefix = f"{label} ({job.index + 1} of {len(names)}): " if len(names) > 1 else ""
            text = f"Running {prefix}step {done} / {job.total} ({time.perf_counter() - job.started:.0f} s)"
            try:
                progress((done, job.total), desc=f"{prefix}sampling", unit="steps")
            except Exception:  # pragma: no cover - a progress bar is a nicety
                pass
            yield text
            job.thread.join(0.25)

    def _start(self, request, runs) -> Optional[Job]:
        session = self._session(request)
        previous = self.jobs.get(session)
        if previous is not None and previous.running():
            return None
        job = Job(runs).start()
        self.jobs[session] = job
        return job

    def _on_run(self, data: dict, request: gr.Request, progress=gr.Progress()):
        recipe_dict, recipe, errors, slots_of = self._prepare(data)
        if recipe is None:
            yield {self._status: "Not run: fix the fields marked in red.", **errors}
            return
        out = self._new_run_folder(request, recipe.combiner.kind)
        job = self._start(request, [(recipe.combiner.kind, recipe, out)])
        if job is None:
            yield {self._status: "A run of this session is still stopping; try again in a moment.", **errors}
            return
        clear = {self._gallery: None, self._energy: None, self._cosine: None, self._table: None}
        yield {self._status: "Starting…", self._tabs: gr.Tabs(selected="run"), **clear, **errors}
        for text in self._watch(job, [recipe.combiner.kind], progress):
            yield {self._status: text}
        yield self._finish_run(job, recipe.combiner.kind, out, slots_of)

    def _finish_run(self, job: Job, label: str, out: Path, slots_of: list[int]) -> dict:
        if job.cancelled:
            return {self._status: f"Cancelled. The samples finished so far are in `{out}` (a run folder that resumes)."}
        if label in job.errors:
            exc = job.errors[label]
            if isinstance(exc, ZmagicError):
                errors = self._form_errors(split_errors(str(exc), failing_part(exc)), slots_of)
                return {self._status: "The run stopped: see the message next to the field.", **errors}
            return {self._status: f"The run failed: {type(exc).__name__}: {html.escape(str(exc))}"}
        record = job.results[label]
        headers, rows = energy_table(record)
        energy, cosine = out / "energy.png", out / "cosine.png"
        return {
            self._status: "Done: " + summary_line(record, out),
            self._gallery: gallery_items(record, out),
            self._energy: str(energy) if energy.exists() else None,
            self._cosine: str(cosine) if cosine.exists() else None,
            self._table: gr.update(value=rows, headers=headers) if rows else None,
        }

    def _on_compare(self, galleries, table):
        def handler(data: dict, request: gr.Request, progress=gr.Progress()):
            recipe_dict, recipe, errors, slots_of = self._prepare(data)
            if recipe is None:
                yield {self._status: "Not run: fix the fields marked in red.", **errors}
                return
            base = self._new_run_folder(request, "compare")
            runs, failed = [], {}
            for name in COMPARE:
                variant = dict(recipe_dict)
                variant["combiner"] = recipe_dict["combiner"] if recipe_dict["combiner"]["kind"] == name else {"kind": name}
                try:
                    runs.append((name, load_recipe(variant, registry=self.registry), base / name))
                except ZmagicError as exc:
                    failed[name] = str(exc)
            job = self._start(request, runs)
            if job is None:
                yield {self._status: "A run of this session is still stopping; try again in a moment.", **errors}
                return
            yield {self._status: "Starting…", self._tabs: gr.Tabs(selected="compare"), table: None,
                   **{g: None for g in galleries}, **errors}
            for text in self._watch(job, [r[0] for r in runs], progress):
                yield {self._status: text}
            if job.cancelled:
                yield {self._status: f"Cancelled. The finished runs are in `{base}`."}
                return
            rows, names = [], []
            results: dict = {self._status: f"Compared {', '.join(COMPARE)} on the same seeds; folders under `{base}`."}
            built = next((e for e in job.errors.values() if isinstance(e, ZmagicError) and failing_part(e)), None)
            if built is not None:  # a build error (a bad value) is the form's, whichever combiner met it first
                results.update(self._form_errors(split_errors(str(built), failing_part(built)), slots_of))
            for name, gallery in zip(COMPARE, galleries):
                exc = job.errors.get(name)
                record = job.results.get(name)
                if record is not None:
                    out = base / name
                    results[gallery] = gallery_items(record, out)
                    names = sorted(set(names) | set(record.get("mean_final_energy") or {}))
                else:
                    results[gallery] = None
                    failed.setdefault(name, str(exc) if exc is not None else "not run")
            for name in COMPARE:
                record = job.results.get(name)
                if record is None:
                    rows.append([name, "", "", ""] + [""] * len(names) + [failed.get(name, "")])
                    continue
                shapes = ((record.get("evaluation") or {}).get("shapes") or {}).get("summary") or {}
                means = record.get("mean_final_energy") or {}
                rows.append([name, len(record.get("completed", [])), _fmt(shapes.get("joint_satisfaction")),
                             round(record.get("seconds", 0.0), 2)] + [_fmt(means.get(n)) for n in names] + [""])
            headers = ["combiner", "samples", "joint satisfaction", "seconds"] + [f"mean E {n}" for n in names] + ["error"]
            results[table] = gr.update(value=rows, headers=headers)
            yield results

        return handler

    def _on_cancel(self, request: gr.Request):
        job = self.jobs.get(self._session(request))
        if job is None or not job.running():
            return "Nothing is running."
        job.stop()
        return "Cancelled: the run stops at its next step."

    def _on_unload(self, request: gr.Request):
        job = self.jobs.pop(self._session(request), None)
        if job is not None and job.running():
            job.stop()
        if self._upload_root is not None:
            shutil.rmtree(self._upload_root / self._session(request), ignore_errors=True)

    def close(self) -> None:
        """Stop the runs, the server, and remove the uploads."""
        try:
            for job in list(self.jobs.values()):
                if job.running():
                    job.stop()
            if self.blocks is not None:
                self.blocks.close()
        finally:
            if self._upload_root is not None:
                shutil.rmtree(self._upload_root, ignore_errors=True)

    # -- serving ---------------------------------------------------------------------------------
    def launch(self, host: str = "127.0.0.1", port: Optional[int] = None, block: bool = True, quiet: bool = False):
        """Serve the app; ``block=False`` returns at once (tests), ``close()`` stops it."""
        blocks = self.blocks or self.build()
        self.out_root.mkdir(parents=True, exist_ok=True)
        blocks.queue(default_concurrency_limit=4)
        blocks.launch(server_name=host, server_port=port, prevent_thread_lock=not block, inbrowser=False,
                      share=False, show_error=False, quiet=quiet, allowed_paths=[str(self.out_root)],
                      max_file_size="50mb", ssr_mode=False, css=CSS, footer_links=[])
        return blocks
