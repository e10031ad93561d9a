"""Plugin discovery through (faked) entry points, isolation of broken plugins, clear errors."""
import importlib.metadata
import sys
import types

import pytest

import zmagic_core.plugins.builtin  # noqa: F401  (imported before distributions are faked)
from zmagic_core.contracts.errors import ContestedComponentError, UnknownComponentError
from zmagic_core.contracts.hookspecs import hookimpl
from zmagic_core.plugins.registry import Registry
from zmagic_core.testing import FakeDist, FakeEntryPoint


def plugin_module(name, energy_names=(), solver_names=(), fail=False):
    mod = types.ModuleType(name)

    @hookimpl
    def register_energies(register):
        if fail:
            raise RuntimeError("weights folder missing")
        for n in energy_names:
            register(n, lambda context, **o: None)

    @hookimpl
    def register_solvers(register):
        for n in solver_names:
            register(n, lambda context, **o: None)

    mod.register_energies, mod.register_solvers = register_energies, register_solvers
    return mod


@pytest.fixture
def fake_dists(monkeypatch):
    dists = []
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: list(dists))
    monkeypatch.delenv("ZMAGIC_LOAD_PLUGINS", raising=False)
    return dists


def test_entry_points_are_discovered_once_and_lazily(fake_dists):
    calls = []
    mod = plugin_module("good", energy_names=["good-energy"])
    ep = FakeEntryPoint("good", mod)
    original = ep.load
    ep.load = lambda: calls.append(1) or original()
    fake_dists.append(FakeDist("zmagic-good", "1.2.3", [ep]))
    reg = Registry()
    assert calls == []  # nothing loads before the first look-up
    assert reg.get("energy", "good-energy").plugin == "good"
    reg.names("energy")
    assert calls == [1]
    info = {p.name: p for p in reg.plugins()}["good"]
    assert info.version == "1.2.3" and info.registers == {"energy": ["good-energy"]} and not info.errors


def test_builtins_register_through_the_same_hooks(fake_dists):
    reg = Registry()
    assert {"sum", "dependent", "cagrad"} <= set(reg.names("combiner"))
    assert {"ddpm", "ddim", "pc"} <= set(reg.names("solver"))
    assert "shapes" in reg.names("model")
    assert {"shapes-attribute", "shapes-mask", "shapes-keypoints", "shapes-style"} <= set(reg.names("energy"))


def test_broken_plugins_are_isolated_and_reported(fake_dists):
    fake_dists.append(FakeDist("zmagic-broken", "0.1", [FakeEntryPoint("broken", ImportError("No module named 'dlib'"))]))
    fake_dists.append(FakeDist("zmagic-raises", "0.1", [FakeEntryPoint("raises", plugin_module("raises", ["x"], ["solver-x"], fail=True))]))
    fake_dists.append(FakeDist("zmagic-good", "0.2", [FakeEntryPoint("good", plugin_module("good", ["good-energy"]))]))
    reg = Registry()
    assert reg.get("energy", "good-energy")
    infos = {p.name: p for p in reg.plugins()}
    assert "dlib" in infos["broken"].errors[0] and "import failed" in infos["broken"].errors[0]
    assert any("weights folder missing" in e for e in infos["raises"].errors)
    # the failing hook did not stop the same plugin's other hook
    assert reg.get("solver", "solver-x").plugin == "raises"


def test_duplicate_names_are_contested_and_builtins_win(fake_dists):
    fake_dists.append(FakeDist("zmagic-a", "1", [FakeEntryPoint("a", plugin_module("a", ["same"]))]))
    fake_dists.append(FakeDist("zmagic-b", "1", [FakeEntryPoint("b", plugin_module("b", ["same", "other"]))]))
    fake_dists.append(FakeDist("zmagic-c", "1", [FakeEntryPoint("c", plugin_module("c", solver_names=["ddpm"]))]))
    reg = Registry()
    with pytest.raises(ContestedComponentError) as err:  # neither plugin's "same" is picked silently
        reg.get("energy", "same")
    assert "'a' (zmagic-a 1)" in str(err.value) and "'b' (zmagic-b 1)" in str(err.value)
    assert reg.get("energy", "other").plugin == "b"
    assert "same" in reg.names("energy")
    infos = {p.name: p for p in reg.plugins()}
    assert any("'same' is also registered by 'b' (zmagic-b 1)" in e for e in infos["a"].errors)
    assert any("'same' is also registered by 'a' (zmagic-a 1)" in e for e in infos["b"].errors)
    # a built-in name always means the built-in; the plugin is refused it and a recipe gets a note
    assert reg.get("solver", "ddpm").plugin == "zmagic_core.plugins.builtin"
    assert any("'ddpm' is a built-in name" in e for e in infos["c"].errors)
    assert any("'c' (zmagic-c 1)" in n for n in reg.notes("solver", "ddpm"))
    reg.unregister_plugin("b")
    assert reg.get("energy", "same").plugin == "a"


def test_duplicate_across_categories_is_fine(fake_dists):
    fake_dists.append(FakeDist("zmagic-a", "1", [FakeEntryPoint("a", plugin_module("a", ["ddpm"]))]))
    reg = Registry()
    assert reg.get("energy", "ddpm").plugin == "a" and reg.get("solver", "ddpm").plugin == "zmagic_core.plugins.builtin"


def test_unknown_kind_lists_what_is_available(fake_dists):
    reg = Registry()
    with pytest.raises(UnknownComponentError) as err:
        reg.get("combiner", "dependant")
    msg = str(err.value)
    assert "unknown combiner kind 'dependant'" in msg and "dependent" in msg and "cagrad" in msg


@pytest.mark.parametrize("value,expected", [("", set()), ("a", {"a"}), ("zmagic-b, a", {"a", "b"})])
def test_load_plugins_env_restricts_loading(fake_dists, monkeypatch, value, expected):
    fake_dists.append(FakeDist("zmagic-a", "1", [FakeEntryPoint("a", plugin_module("a", ["ea"]))]))
    fake_dists.append(FakeDist("zmagic-b", "1", [FakeEntryPoint("b", plugin_module("b", ["eb"]))]))
    monkeypatch.setenv("ZMAGIC_LOAD_PLUGINS", value)
    reg = Registry()
    loaded = {p.name for p in reg.plugins() if not p.builtin}
    assert loaded == expected
    assert "shapes" in reg.names("model")


def test_load_plugins_env_naming_no_installed_plugin_is_reported(fake_dists, monkeypatch):
    fake_dists.append(FakeDist("zmagic-a", "1", [FakeEntryPoint("a", plugin_module("a", ["ea"]))]))
    monkeypatch.setenv("ZMAGIC_LOAD_PLUGINS", "a,bogus")
    reg = Registry()
    assert reg.get("energy", "ea").plugin == "a"
    (report,) = [p for p in reg.plugins() if p.errors]
    assert report.name == "(ZMAGIC_LOAD_PLUGINS)" and "names no installed plugin: bogus" in report.errors[0]


def test_register_and_unregister_in_process(fake_dists):
    reg = Registry()
    reg.register_plugin(plugin_module("local", ["local-energy"]), "local")
    assert reg.get("energy", "local-energy").plugin == "local"
    reg.unregister_plugin("local")
    with pytest.raises(UnknownComponentError):
        reg.get("energy", "local-energy")
