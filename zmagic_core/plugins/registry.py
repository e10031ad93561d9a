"""Plugin discovery: built-ins and entry points (group ``zmagic``) behind one registry.

Entry points load once, lazily, on the first look-up.  A plugin that fails to import, whose
hook raises, or that registers a name already taken is recorded with its error and skipped;
the other plugins stay usable.  ``ZMAGIC_LOAD_PLUGINS=a,b`` restricts which entry points load
(an empty value loads the built-ins only).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pluggy

from zmagic_core.contracts import hookspecs
from zmagic_core.contracts.errors import PluginError, UnknownComponentError

ENTRY_POINT_GROUP = "zmagic"
LOAD_PLUGINS_ENV = "ZMAGIC_LOAD_PLUGINS"
BUILTIN_MODULES = ("zmagic_core.plugins.builtin",)

# category -> hook name; the order is the order `zmagic plugins` prints.
HOOKS = {
    "model": "register_models",
    "solver": "register_solvers",
    "combiner": "register_combiners",
    "energy": "register_energies",
    "evaluator": "register_evaluators",
}


@dataclass
class Registration:
    """One registered component: how to build it and what is known before building it."""

    category: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    aliases: tuple[str, ...] = ()
    options: Optional[type] = None        # pydantic model checking the options before anything loads
    component: Optional[type] = None      # the class built (combiners: its condition counts are read)
    adds_conditions: Optional[Callable[[dict], int]] = None  # models: conditions added, from checked options


@dataclass
class PluginInfo:
    name: str
    version: str = ""
    builtin: bool = False
    registers: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


class Registry:
    """Holds every registered component, keyed by category and name (aliases included)."""

    def __init__(self, load_entry_points: bool = True, builtins: tuple[str, ...] = BUILTIN_MODULES):
        self._load_entry_points = load_entry_points
        self._builtins = builtins
        self._pm = pluggy.PluginManager("zmagic")
        self._pm.add_hookspecs(hookspecs)
        self._infos: dict[str, PluginInfo] = {}
        self._table: dict[str, dict[str, Registration]] = {c: {} for c in HOOKS}
        self._loaded = False

    # -- loading -----------------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module_name in self._builtins:
            module = importlib.import_module(module_name)
            self._add(module, module_name, version=_core_version(), builtin=True)
        if self._load_entry_points:
            self._load_from_entry_points()

    def _load_from_entry_points(self) -> None:
        wanted = os.environ.get(LOAD_PLUGINS_ENV)
        allowed = None if wanted is None else {w.strip() for w in wanted.split(",") if w.strip()}
        for dist in importlib.metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP:
                    continue
                dist_name = dist.metadata["Name"] or ep.name
                if allowed is not None and ep.name not in allowed and dist_name not in allowed:
                    continue
                if ep.name in self._infos:
                    continue
                try:
                    plugin = ep.load()
                except Exception as exc:  # a broken plugin must not take the others down
                    self._infos[ep.name] = PluginInfo(
                        ep.name, dist.version, errors=[f"import failed: {type(exc).__name__}: {exc}"]
                    )
                    continue
                self._add(plugin, ep.name, version=dist.version)

    def register_plugin(self, plugin: Any, name: str, version: str = "") -> PluginInfo:
        """Add a plugin object (module or instance with hookimpls) in-process, e.g. in tests."""
        self._ensure_loaded()
        return self._add(plugin, name, version)

    def unregister_plugin(self, name: str) -> None:
        plugin = self._pm.get_plugin(name)
        if plugin is not None:
            self._pm.unregister(plugin)
        self._infos.pop(name, None)
        for table in self._table.values():
            for key in [k for k, r in table.items() if r.plugin == name]:
                del table[key]

    def _add(self, plugin: Any, name: str, version: str = "", builtin: bool = False) -> PluginInfo:
        info = PluginInfo(name, version, builtin)
        self._infos[name] = info
        try:
            self._pm.register(plugin, name=name)
        except Exception as exc:
            info.errors.append(f"hook validation failed: {exc}")
            return info
        for category, hook_name in HOOKS.items():
            impls = [i for i in getattr(self._pm.hook, hook_name).get_hookimpls() if i.plugin_name == name]
            for impl in impls:
                try:
                    impl.function(register=self._registrar(category, info))
                except Exception as exc:
                    info.errors.append(f"{hook_name} raised {type(exc).__name__}: {exc}")
        return info

    def _registrar(self, category: str, info: PluginInfo):
        def register(name: str, factory: Callable[..., Any], options: Optional[type] = None, aliases=(),
                     component: Optional[type] = None, adds_conditions: Optional[Callable[[dict], int]] = None):
            table = self._table[category]
            aliases = (aliases,) if isinstance(aliases, str) else tuple(aliases)
            for key in (name, *aliases):
                if key in table:
                    owner = table[key].plugin
                    info.errors.append(f"{category} {key!r} is already registered by {owner!r}; ignored")
                    return
            reg = Registration(category, name, factory, info.name, aliases, options, component, adds_conditions)
            for key in (name, *aliases):
                table[key] = reg
            info.registers.setdefault(category, []).append(name)

        return register

    # -- look-up -------------------------------------------------------------------------------
    def names(self, category: str) -> list[str]:
        self._ensure_loaded()
        return sorted(self._table[category])

    def get(self, category: str, name: str) -> Registration:
        self._ensure_loaded()
        if category not in self._table:
            raise PluginError(f"unknown component category {category!r}; expected one of {list(HOOKS)}")
        try:
            return self._table[category][name]
        except KeyError:
            raise UnknownComponentError(category, name, self._table[category]) from None

    def plugins(self) -> list[PluginInfo]:
        self._ensure_loaded()
        return list(self._infos.values())


def _core_version() -> str:
    try:
        return importlib.metadata.version("zmagic-core")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, created (and entry points loaded) on first use."""
    global _default
    if _default is None:
        _default = Registry()
    return _default


def reset_registry() -> None:
    """Forget the process-wide registry so the next look-up reloads plugins."""
    global _default
    _default = None
