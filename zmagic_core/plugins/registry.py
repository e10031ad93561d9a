"""Plugin discovery: built-ins and entry points (group ``zmagic``) behind one registry.

Entry points load once, lazily, on the first look-up.  A plugin that fails to import or whose
hook raises (any exception, SystemExit and other BaseExceptions included; only KeyboardInterrupt
passes) is recorded with its error in ``zmagic plugins``; the other plugins stay usable.  A
component name must match ``[a-z0-9][a-z0-9._-]*`` (at most 64 characters); a registration with a
bad name or bad arguments is recorded as an error of its plugin and skipped.
``ZMAGIC_LOAD_PLUGINS=a,b`` restricts which entry points load (an empty value loads the built-ins only).

Names that two parties claim (the policy, stated here and in the messages):

- a built-in name (``sum``, ``ddpm``, ``shapes``...) always means the built-in: a plugin that
  registers it is refused that name (an error of the plugin), and a recipe using the name gets a
  warning naming the plugin (``Registry.notes``, printed by ``zmagic generate`` and ``zmagic check``);
- a name that two plugins register, or any component of a plugin name that two distributions
  provide, is *contested*: ``zmagic plugins`` reports it on both plugins, and a look-up of it
  raises ``ContestedComponentError`` naming both packages; nothing picks one silently.

An unknown kind that one of the project's own plugins provides (``KNOWN_PACKAGES``) says which
package to install, or why the installed one did not provide it.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pluggy
from pydantic import BaseModel

from zmagic_core.contracts import hookspecs
from zmagic_core.contracts.errors import (ContestedComponentError, PluginError, UnknownComponentError, clip_text,
                                          shorten)

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


NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
MAX_NAME_LENGTH = 64

# (category, kind) -> the distribution of this project that provides it (the hint of an unknown kind)
KNOWN_PACKAGES = {
    ("energy", "clip-text"): "zmagic-clip",
    ("energy", "faceid"): "zmagic-faceid",
    ("energy", "face-id"): "zmagic-faceid",
    ("energy", "landmark"): "zmagic-landmark",
    ("energy", "landmarks"): "zmagic-landmark",
    ("energy", "parsing"): "zmagic-parsing",
    ("energy", "face-parsing"): "zmagic-parsing",
    ("energy", "style"): "zmagic-style",
}


def valid_name(name: Any) -> bool:
    return isinstance(name, str) and len(name) <= MAX_NAME_LENGTH and NAME_PATTERN.fullmatch(name) is not None


def _error_text(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = ""
    return f"{type(exc).__name__}: {clip_text(' '.join(text.split()), 300)}" if text else type(exc).__name__


def _normalize(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


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
    distribution: str = ""  # the installed distribution providing the entry point ("" for in-process plugins)

    def describe(self) -> str:
        """``'name' (distribution version)``: how messages name this plugin."""
        source = " ".join(p for p in (self.distribution, self.version) if p)
        return f"{self.name!r}" + (f" ({source})" if source else "")


class Registry:
    """Holds every registered component, keyed by category and name (aliases included)."""

    def __init__(self, load_entry_points: bool = True, builtins: tuple[str, ...] = BUILTIN_MODULES):
        self._load_entry_points = load_entry_points
        self._builtins = builtins
        self._pm = pluggy.PluginManager("zmagic")
        self._pm.add_hookspecs(hookspecs)
        self._infos: dict[str, PluginInfo] = {}
        self._table: dict[str, dict[str, Registration]] = {c: {} for c in HOOKS}
        # contested names: every registration that claims the name (the look-up is refused)
        self._contested: dict[str, dict[str, list[Registration]]] = {c: {} for c in HOOKS}
        # built-in names a plugin also registered: category -> name -> the plugins refused it
        self._shadowed: dict[str, dict[str, list[str]]] = {c: {} for c in HOOKS}
        # plugin names that two distributions provide: name -> descriptions of both
        self._contested_plugins: dict[str, list[str]] = {}
        self._refused: list[PluginInfo] = []  # entry points not loaded (their name was taken)
        self._excluded: set[str] = set()  # distributions ZMAGIC_LOAD_PLUGINS left out
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
        try:
            dists = list(importlib.metadata.distributions())
        except Exception as exc:  # a broken installation must not stop the built-ins
            self._refused.append(PluginInfo("(entry points)", errors=[f"listing installed packages failed: "
                                                                      f"{_error_text(exc)}"]))
            return
        seen: set[str] = set()
        for dist in dists:
            try:
                eps = [ep for ep in dist.entry_points if ep.group == ENTRY_POINT_GROUP]
                if not eps:
                    continue
                dist_name = dist.metadata["Name"] or eps[0].name
                version = dist.version or ""
            except Exception as exc:  # unreadable metadata of one distribution
                self._refused.append(PluginInfo(f"({getattr(dist, '_path', 'a distribution')})",
                                                errors=[f"reading its metadata failed: {_error_text(exc)}"]))
                continue
            for ep in eps:
                seen |= {ep.name, dist_name}
                if allowed is not None and ep.name not in allowed and dist_name not in allowed:
                    self._excluded.add(_normalize(dist_name))
                    continue
                self._load_entry_point(ep, dist_name, version)
        unknown = sorted((allowed or set()) - seen)
        if unknown:  # a typo in the list would otherwise load nothing and say nothing
            self._refused.append(PluginInfo(f"({LOAD_PLUGINS_ENV})", errors=[
                f"names no installed plugin: {', '.join(unknown)} (installed: {', '.join(sorted(seen)) or 'none'})"]))

    def _load_entry_point(self, ep, dist_name: str, version: str) -> None:
        name = ep.name
        if name in self._infos:
            first = self._infos[name]
            if first.distribution and _normalize(first.distribution) == _normalize(dist_name):
                return  # the same distribution found twice on the path: loaded once
            other = PluginInfo(f"{name} [{dist_name}]", version, distribution=dist_name,
                               errors=[f"plugin name {name!r} is already taken by {first.describe()}; not loaded"])
            self._refused.append(other)
            if first.builtin:
                return
            claimants = self._contested_plugins.setdefault(name, [first.describe()])
            claimants.append(PluginInfo(name, version, distribution=dist_name).describe())
            first.errors.append(f"plugin name {name!r} is also provided by {dist_name} {version}; "
                                f"look-ups of its components are refused until one is uninstalled")
            return
        try:
            plugin = ep.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a broken plugin must not take the others down
            self._infos[name] = PluginInfo(name, version, errors=[f"import failed: {_error_text(exc)}"],
                                           distribution=dist_name)
            return
        self._add(plugin, name, version=version, distribution=dist_name)

    def register_plugin(self, plugin: Any, name: str, version: str = "") -> PluginInfo:
        """Add a plugin object (module or instance with hookimpls) in-process, e.g. in tests."""
        self._ensure_loaded()
        if name in self._infos:
            raise PluginError(f"a plugin named {name!r} is already registered ({self._infos[name].describe()})")
        return self._add(plugin, name, version)

    def unregister_plugin(self, name: str) -> None:
        plugin = self._pm.get_plugin(name)
        if plugin is not None:
            self._pm.unregister(plugin)
        self._infos.pop(name, None)
        self._contested_plugins.pop(name, None)
        for category, table in self._table.items():
            for key in [k for k, r in table.items() if r.plugin == name]:
                del table[key]
            contested = self._contested[category]
            for key in list(contested):
                left = [r for r in contested[key] if r.plugin != name]
                if len(left) > 1:
                    contested[key] = left
                else:
                    del contested[key]
                    if left:
                        table[key] = left[0]
            for key, names in list(self._shadowed[category].items()):
                if name in names:
                    names.remove(name)
                if not names:
                    del self._shadowed[category][key]

    def _add(self, plugin: Any, name: str, version: str = "", builtin: bool = False,
             distribution: str = "") -> PluginInfo:
        info = PluginInfo(name, version, builtin, distribution=distribution)
        self._infos[name] = info
        try:
            self._pm.register(plugin, name=name)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            info.errors.append(f"hook validation failed: {_error_text(exc)}")
            return info
        for category, hook_name in HOOKS.items():
            try:
                impls = [i for i in getattr(self._pm.hook, hook_name).get_hookimpls() if i.plugin_name == name]
            except Exception as exc:  # pragma: no cover - pluggy internals
                info.errors.append(f"{hook_name}: {_error_text(exc)}")
                continue
            for impl in impls:
                try:
                    impl.function(register=self._registrar(category, info))
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # SystemExit, GeneratorExit, ... from a plugin's hook
                    info.errors.append(f"{hook_name} raised {_error_text(exc)}")
        if not info.registers and not info.errors and not builtin:  # a misspelt or undecorated hook does nothing
            found = sorted(n for n in dir(plugin) if n.startswith("register") and callable(getattr(plugin, n, None)))
            info.errors.append("registers nothing: no @hookimpl function named " + ", ".join(HOOKS.values())
                               + (f" (found {', '.join(found)}: misspelt, or without @hookimpl?)" if found else ""))
        return info

    def _registrar(self, category: str, info: PluginInfo):
        def register(name: str, factory: Callable[..., Any], options: Optional[type] = None, aliases=(),
                     component: Optional[type] = None, adds_conditions: Optional[Callable[[dict], int]] = None):
            problem = _registration_problem(name, factory, options, aliases, component, adds_conditions)
            if problem:
                info.errors.append(f"{category} {shorten(name, 80)}: {problem}; ignored")
                return
            aliases = (aliases,) if isinstance(aliases, str) else tuple(aliases)
            reg = Registration(category, name, factory, info.name, aliases, options, component, adds_conditions)
            table, contested = self._table[category], self._contested[category]
            claimed = False
            for key in dict.fromkeys((name, *aliases)):
                owner = table.get(key)
                if key in contested:
                    contested[key].append(reg)
                    owners = " and ".join(self._describe(r) for r in contested[key][:-1])
                    info.errors.append(f"{category} {key!r} is also registered by {owners}; contested")
                    claimed = True
                elif owner is None:
                    table[key] = reg
                    claimed = True
                elif owner.plugin == info.name:
                    info.errors.append(f"{category} {key!r} is registered twice by this plugin; the first kept")
                elif self._infos.get(owner.plugin) is not None and self._infos[owner.plugin].builtin:
                    info.errors.append(f"{category} {key!r} is a built-in name; the built-in one is used, "
                                       f"this plugin's is ignored")
                    self._shadowed[category].setdefault(key, []).append(info.name)
                else:
                    del table[key]
                    contested[key] = [owner, reg]
                    first = self._infos.get(owner.plugin)
                    if first is not None:
                        first.errors.append(f"{category} {key!r} is also registered by {info.describe()}; contested")
                    info.errors.append(f"{category} {key!r} is also registered by {self._describe(owner)}; contested")
                    claimed = True
            if claimed:
                info.registers.setdefault(category, []).append(name)

        return register

    def _describe(self, reg: Registration) -> str:
        info = self._infos.get(reg.plugin)
        return info.describe() if info is not None else repr(reg.plugin)

    # -- look-up -------------------------------------------------------------------------------
    def names(self, category: str) -> list[str]:
        self._ensure_loaded()
        return sorted({*self._table[category], *self._contested[category]})

    def get(self, category: str, name: str) -> Registration:
        """The registration of ``name``; UnknownComponentError (with the package that provides it, when
        known) or ContestedComponentError (naming the packages that both register it)."""
        self._ensure_loaded()
        if category not in self._table:
            raise PluginError(f"unknown component category {category!r}; expected one of {list(HOOKS)}")
        if not isinstance(name, str):
            raise UnknownComponentError(category, name, self.names(category))
        if name in self._contested[category]:
            raise ContestedComponentError(category, name, [self._describe(r) for r in self._contested[category][name]])
        try:
            reg = self._table[category][name]
        except KeyError:
            raise UnknownComponentError(category, name, self.names(category),
                                        hint=self.package_hint(category, name)) from None
        if reg.plugin in self._contested_plugins:
            raise ContestedComponentError(category, name, self._contested_plugins[reg.plugin])
        return reg

    def notes(self, category: str, name: str) -> list[str]:
        """Warnings about a name that resolved: plugins that registered a built-in name and were refused it."""
        self._ensure_loaded()
        refused = self._shadowed.get(category, {}).get(name, [])
        return [f"{category} {name!r} is a built-in name that plugin {self._infos[p].describe()} also registers; "
                f"the built-in one is used" for p in refused if p in self._infos]

    def package_hint(self, category: str, name: str) -> str:
        """For a kind one of the project's plugins provides: what to install, or why it did not load."""
        package = KNOWN_PACKAGES.get((category, name))
        if package is None:  # a third party's kind: point at plugins that failed or were left out
            failed = [i.name for i in self.plugins() if i.errors and not i.builtin]
            hints = ([f"plugin(s) that failed to load: {', '.join(failed)}; see `zmagic plugins`"] if failed else []) \
                + ([f"{LOAD_PLUGINS_ENV} leaves out {', '.join(sorted(self._excluded))}"] if self._excluded else [])
            return f"({'; '.join(hints)})" if hints else ""
        infos = [i for i in self.plugins() if i.distribution and _normalize(i.distribution) == package]
        for info in infos:
            if info.errors:
                return (f"({package} is installed but its plugin {info.name!r} failed: "
                        f"{clip_text(info.errors[0], 200)}; see `zmagic plugins`)")
        if infos:
            return f"({package} is installed but does not register {category} {name!r}; see `zmagic plugins`)"
        if package in self._excluded:
            return f"({package} is installed but {LOAD_PLUGINS_ENV} leaves it out)"
        if not self._load_entry_points and _installed(package):
            return f"({package} is installed; this registry does not load entry points)"
        return f"(pip install {package})"

    def plugins(self) -> list[PluginInfo]:
        self._ensure_loaded()
        return list(self._infos.values()) + list(self._refused)


def _installed(package: str) -> bool:
    try:
        return any(_normalize(d.metadata["Name"] or "") == package for d in importlib.metadata.distributions())
    except Exception:
        return False


def _registration_problem(name, factory, options, aliases, component, adds_conditions) -> str:
    """What is wrong with the arguments of one ``register(...)`` call ("" if nothing)."""
    rule = (f"a name is a string of lowercase letters, digits, '.', '_', '-' (first a letter or digit, "
            f"at most {MAX_NAME_LENGTH})")
    if not valid_name(name):
        return f"bad name ({rule})"
    if isinstance(aliases, str):
        aliases = (aliases,)
    try:
        aliases = tuple(aliases)
    except TypeError:
        return f"aliases must be a name or a list of names, got {type(aliases).__name__}"
    bad = [a for a in aliases if not valid_name(a)]
    if bad:
        return f"bad alias {shorten(bad[0], 80)} ({rule})"
    if not callable(factory):
        return f"factory is not callable (got {type(factory).__name__})"
    if options is not None and not (isinstance(options, type) and issubclass(options, BaseModel)):
        return f"options must be a pydantic model class, got {shorten(options, 80)}"
    if component is not None and not isinstance(component, type):
        return f"component must be a class, got {shorten(component, 80)}"
    if adds_conditions is not None and not callable(adds_conditions):
        return "adds_conditions must be callable"
    return ""


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
