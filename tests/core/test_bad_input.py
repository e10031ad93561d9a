"""Bad input of every kind gets one clear line, exit code 2, no traceback, in bounded time.

Classes (the Reliability issue): A recipe values (scales, windows, seeds, counts, dtype, device);
B ``--set`` overrides; C recipe files (size, encoding, YAML aliases, huge values in messages);
D plugins (bad names, raising imports, hooks and factories, contested names, package hints);
E image files; F the [diffusers] extra missing; G ``zmagic --version`` and ``zmagic check``.
Most cases run ``zmagic`` in-process (``main([...])``); every error case asserts a single
``zmagic: error:`` line naming the problem, and that the case took well under two seconds.
"""
from __future__ import annotations

import importlib.metadata
import json
import struct
import sys
import time
import types
import zlib
from typing import Optional

import pytest
import yaml
from pydantic import BaseModel, ConfigDict

import zmagic_core.assembly.build  # noqa: F401  (imported before any case is timed)
import zmagic_core.plugins.builtin  # noqa: F401  (imported before distributions are faked)
import zmagic_core.plugins.registry as registry_module
from zmagic_core.app.cli import main
from zmagic_core.assembly.build import build_pipeline, check_recipe, find_problems, load_recipe
from zmagic_core.assembly.recipe import MAX_RECIPE_BYTES, read_recipe
from zmagic_core.contracts.errors import ConfigError, ContestedComponentError, InputError, UnknownComponentError
from zmagic_core.contracts.hookspecs import hookimpl
from zmagic_core.contracts.options import FilePath, PathOrName
from zmagic_core.files.images import MAX_PIXELS, load_image
from zmagic_core.models.shapes.world import ShapesModel
from zmagic_core.plugins.registry import Registry
from zmagic_core.testing import FakeDist, FakeEntryPoint

BASE = {
    "model": {"kind": "shapes", "size": 8},
    "solver": {"kind": "ddpm", "steps": 2},
    "combiner": {"kind": "sum"},
    "conditions": [{"kind": "shapes-attribute", "attribute": "color", "value": "red", "scale": 0.2}],
    "num_samples": 1,
    "batch_size": 1,
    "progress": False,
}
SECONDS = 2.0  # every case, error or not, is refused (or checked) well within this


@pytest.fixture(autouse=True)
def core_only_registry(monkeypatch):
    """The built-ins only, whatever plugins are installed here (a fresh registry per test)."""
    monkeypatch.setenv("ZMAGIC_LOAD_PLUGINS", "")
    monkeypatch.setattr(registry_module, "_default", None)


@pytest.fixture
def base_file(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


def run(capsys, *args):
    capsys.readouterr()
    started = time.perf_counter()
    rc = main([str(a) for a in args])
    elapsed = time.perf_counter() - started
    out, err = capsys.readouterr()
    return rc, out, err, elapsed


def assert_refused(result, *words):
    rc, out, err, elapsed = result
    assert "Traceback" not in out + err
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("zmagic: error: "), line
    assert len(line) < 2200, len(line)
    for w in words:
        assert w in line, (w, line)
    assert elapsed < SECONDS, elapsed
    return line


def assert_checked_ok(result):
    rc, out, err, elapsed = result
    assert "Traceback" not in out + err
    assert rc == 0, err
    assert out.startswith("ok"), out
    assert elapsed < SECONDS, elapsed
    return out


def recipe_with(tmp_path, name="r.yaml", **fields):
    data = json.loads(json.dumps(BASE))
    condition = fields.pop("condition", None)
    if condition:
        data["conditions"][0].update(condition)
    data.update(fields)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# == A: recipe values ========================================================================
BAD_VALUES = [
    ("conditions.0.scale=0", ["conditions.0.scale", "greater than 0"]),
    ("conditions.0.scale=-1", ["conditions.0.scale"]),
    ("conditions.0.scale=.nan", ["conditions.0.scale", "finite"]),
    ("conditions.0.scale=.inf", ["conditions.0.scale", "finite"]),
    ("conditions.0.scale=-.inf", ["conditions.0.scale", "finite"]),
    ("conditions.0.scale=1e400", ["conditions.0.scale", "finite"]),
    ("conditions.0.scale=abc", ["conditions.0.scale"]),
    ("conditions.0.start=5000", ["conditions.0.start", "5000", "1000"]),
    ("conditions.0.start=1001", ["conditions.0.start"]),
    ("conditions.0.stop=1000", ["conditions.0.stop", "never"]),
    ("conditions.0.start=-1", ["conditions.0.start"]),
    ("conditions.0.stop=-5", ["conditions.0.stop"]),
    ("conditions.0.time_travel=51", ["conditions.0.time_travel", "50"]),
    ("conditions.0.time_travel=1000000000", ["conditions.0.time_travel"]),
    ("conditions.0.time_travel=-1", ["conditions.0.time_travel"]),
    ("conditions.0.rule=fast", ["conditions.0.rule", "fast"]),
    ("seed=-1", ["seed"]),
    ("seed=1180591620717411303424", ["seed", "9223372036854775807"]),  # 2**70
    ("seed=18446744073709551615", ["seed"]),  # 2**64 - 1: seed + i would overflow a generator
    ("seeds=[-1]", ["seeds", "-1"]),
    ("seeds=[1, 2, 1]", ["seeds", "unique", "1"]),
    ("seeds=[]", ["seeds", "at least 1"]),
    ("seeds=[18446744073709551616]", ["seeds"]),
    ("seeds=[a]", ["seeds"]),
    ("seeds=5", ["seeds"]),
    ("num_samples=0", ["num_samples"]),
    ("num_samples=1000000000000", ["num_samples", "1000000"]),
    ("num_samples=1000001", ["num_samples", "1000000"]),
    ("num_samples=1.5", ["num_samples"]),
    ("batch_size=0", ["batch_size"]),
    ("batch_size=1000000000000", ["batch_size"]),
    ("solver.steps=0", ["solver.steps"]),
    ("solver.steps=1000000", ["solver.steps"]),
    ("combiner.kind=dependent", ["combiner.kind", "exactly 2 conditions"]),
    ("dtype=float16", ["dtype", "float32"]),
    ("dtype=bfloat16", ["dtype", "float32"]),
    ("dtype=float64", ["dtype", "float64"]),
    ("device=tpu", ["device", "tpu"]),
    ("device=cuda:99", ["device", "cuda:99"]),
    ("device=xla", ["device", "xla", "not supported"]),
    ("device=meta", ["device", "meta"]),
    ("device=ipu", ["device", "ipu"]),
    ("device=cpu:1", ["device", "cpu:1"]),
    ("device=''", ["device"]),
    ("device=mps:3", ["device", "mps:3"]),
    ("device=CUDA", ["device", "CUDA"]),
    ("device=cuda:-1", ["device"]),
    ("device=[cpu]", ["device"]),
    ("model.size=4", ["model.options.size"]),
    ("model.sigma0=.nan", ["model.sigma0", "finite"]),
]


@pytest.mark.parametrize("override,words", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_values_are_refused_up_front(base_file, tmp_path, capsys, override, words):
    assert_refused(run(capsys, "generate", base_file, "--out", tmp_path / "out", "--set", override), *words)
    assert not (tmp_path / "out" / "sample_0000.png").exists()
    assert_refused(run(capsys, "check", base_file, "--set", override), *words)


@pytest.mark.parametrize("override", [
    "conditions.0.scale=0.001", "conditions.0.scale=1e6", "conditions.0.start=1000", "conditions.0.start=999",
    "conditions.0.stop=500", "conditions.0.time_travel=50", "seeds=[3, 1, 2]", "seed=9223372036854775807",
    "num_samples=1000000", "device=cpu", "device=cpu:0", "dtype=float32", "conditions.0.rule=fixed",
])
def test_valid_values_pass(base_file, capsys, override):
    assert_checked_ok(run(capsys, "check", base_file, "--set", override))


def test_a_window_between_the_visited_steps_is_refused(base_file, capsys):
    # 2 steps visit t = 500 and t = 0 only: a window 100..400 would never guide
    line = assert_refused(run(capsys, "check", base_file, "--set", "conditions.0.start=400",
                              "--set", "conditions.0.stop=100"), "conditions.0", "never")
    assert "500" in line or "0" in line


def test_a_huge_sample_count_is_refused_before_any_seed_exists(base_file, capsys):
    import tracemalloc

    tracemalloc.start()
    try:
        assert_refused(run(capsys, "generate", base_file, "--set", "num_samples=1000000000000"), "num_samples")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, peak


def test_the_valid_base_recipe_runs(base_file, tmp_path, capsys):
    rc, out, err, _ = run(capsys, "generate", base_file, "--out", tmp_path / "ok", "--set", "seeds=[5, 2]")
    assert rc == 0, err
    assert "Traceback" not in err
    assert json.loads((tmp_path / "ok" / "record.json").read_text())["seeds"] == [5, 2]


class BigScheduleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timesteps: int = 100


def small_schedule_plugin():
    mod = types.ModuleType("small_schedule")

    @hookimpl
    def register_models(register):
        register("small-schedule", lambda context, timesteps=100: ShapesModel(size=8, num_train_timesteps=timesteps),
                 options=BigScheduleOptions)

    mod.register_models = register_models
    return mod


@pytest.mark.parametrize("fields,words", [
    ({"condition": {"start": 500}}, ["conditions.0.start", "500", "at most 100"]),
    ({"condition": {"stop": 100}}, ["conditions.0.stop", "100"]),
    ({"solver": {"kind": "ddpm", "steps": 200}}, ["solver.steps", "200", "100 timesteps"]),
])
def test_windows_are_checked_against_the_built_model(fields, words):
    """T known only once the model is built (a plugin model with 100 timesteps)."""
    registry = Registry(load_entry_points=False)
    registry.register_plugin(small_schedule_plugin(), "small-schedule")
    data = json.loads(json.dumps(BASE))
    data["model"] = {"kind": "small-schedule"}
    for key, value in fields.items():
        if key == "condition":
            data["conditions"][0].update(value)
        else:
            data[key] = value
    recipe = load_recipe(data, registry=registry)  # the check passes: T is not known yet
    with pytest.raises(ConfigError) as err:
        build_pipeline(recipe, registry)
    assert all(w in str(err.value) for w in words), str(err.value)
    data["conditions"][0].update(start=99, stop=0)
    data["solver"] = {"kind": "ddpm", "steps": 2}
    build_pipeline(load_recipe(data, registry=registry), registry)  # inside [0, 100): fine


def test_a_model_that_ignores_the_dtype_is_refused_after_the_build():
    registry = Registry(load_entry_points=False)
    registry.register_plugin(small_schedule_plugin(), "small-schedule")
    data = dict(json.loads(json.dumps(BASE)), model={"kind": "small-schedule"}, dtype="bfloat16")
    with pytest.raises(ConfigError) as err:
        build_pipeline(load_recipe(data, registry=registry), registry)
    assert "dtype" in str(err.value) and "bfloat16" in str(err.value)


# == B: overrides ============================================================================
BAD_OVERRIDES = [
    ("solver.steps.x=3", ["solver.steps.x=3", "solver.steps", "not a mapping or list"]),
    ("conditions.0.scale.a=1", ["conditions.0.scale", "not a mapping or list"]),
    ("seed.0=1", ["seed.0=1", "seed", "no item 0"]),
    ("num_samples.x.y=2", ["num_samples", "not a mapping or list"]),
    ("progress.a=1", ["progress", "not a mapping or list"]),
    ("conditions.0.kind.x=1", ["conditions.0.kind", "not a mapping or list"]),
    ("conditions.0.attribute.a.b=1", ["conditions.0.attribute"]),
    ("conditions.x.scale=1", ["conditions.x.scale=1", "no item x"]),
    ("conditions.5.scale=1", ["no item 5", "0 to 0"]),
    ("conditions.-1.scale=1", ["no item -1"]),
    ("conditions.²=1", ["no item"]),
    ("seeds.0=1", ["seeds"]),
    ("=3", ["names no field"]),
    ("noequals", ["path.to.field=value"]),
    (".=3", ["empty part"]),
    ("model..kind=shapes", ["model..kind", "empty part"]),
    ("model.kind.=shapes", ["empty part"]),
    (".model.kind=shapes", ["empty part"]),
    ("device.x=1", ["device"]),
    ("conditions=5", ["conditions"]),
    ("conditions.0=3", ["conditions.0"]),
    ("solver=[1,2]", ["solver"]),
    ("model=null", ["model"]),
    ("combiner.kind={a: 1}", ["combiner.kind"]),
    ("seed=[1", ["seed"]),
    ("seed=!!python/object/apply:os.system [true]", ["seed"]),
    ("conditions.0.scale=" + "9" * 5000, ["override", "conditions.0.scale"]),
    ("conditions=" + "[" * 5000 + "]" * 5000, ["override", "nested"]),
    ("conditions=&a [*a]", ["override", "refers to itself"]),
    ("x" * 100_000 + "=1", ["characters"]),
    ("model.kind=" + "a" * 60_000, ["model.kind", "unknown model kind", "characters"]),
    ("conditions.0.temperature=" + "r" * 60_000, ["conditions.0.options.temperature", "characters"]),
    ("conditions.0.value=" + "r" * 60_000, ["unknown color", "characters"]),  # refused by the factory
    ("conditions.0.value=" + "r" * 10_000_000, ["conditions.0.value", "10000000 characters", "at most 65536"]),
    ("nope=1", ["nope", "Extra inputs"]),
]


@pytest.mark.parametrize("override,words", BAD_OVERRIDES, ids=[o[:40] for o, _ in BAD_OVERRIDES])
def test_bad_overrides_name_the_path(base_file, tmp_path, capsys, override, words):
    assert_refused(run(capsys, "generate", base_file, "--out", tmp_path / "out", "--set", override), *words)


def test_billion_laughs_in_an_override_is_refused(base_file, capsys):
    value = "[" + ",".join(["&a0 [1,1,1,1,1,1,1,1,1,1]"] + [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]"
                                                            for i in range(1, 9)]) + "]"
    assert_refused(run(capsys, "check", base_file, "--set", f"conditions.0.points={value}"), "20000 values")


@pytest.mark.parametrize("override,check", [
    ("combiner=cagrad", lambda r: r.combiner.kind == "cagrad"),
    ("combiner.c=0.3", lambda r: r.combiner.options == {"c": 0.3}),
    ("conditions.0=shapes-mask", lambda r: r.conditions[0].kind == "shapes-mask"),
    ("model.size=16", lambda r: r.model.options == {"size": 16}),
    ("conditions.0.value=[unclosed", lambda r: r.conditions[0].options["value"] == "[unclosed"),  # not YAML: text
])
def test_good_overrides_still_apply(base_file, override, check):
    assert check(read_recipe(base_file, [override]))


# == C: recipe files =========================================================================
def billion_laughs(last: str) -> str:
    text = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    prev = "a"
    for i in range(2, 10):
        name = chr(96 + i)
        text += f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]\n"
        prev = name
    return text + last.format(prev=prev)


def merge_bomb(levels: int) -> str:
    text = "a0: &a0 {x0: 1}\n"
    for i in range(1, levels):
        text += f"a{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}], x{i}: 1}}\n"
    return text


BAD_FILES = [
    ("laughs-size.yaml", billion_laughs("model: {{kind: shapes, size: *{prev}}}\n"), ["20000 values", "alias"]),
    ("laughs-conditions.yaml", billion_laughs("conditions: *{prev}\n"), ["20000 values"]),
    ("laughs-only.yaml", billion_laughs(""), ["20000 values"]),
    ("merge-bomb.yaml", merge_bomb(40), ["20000 values"]),
    ("many-values.yaml", "seeds: [" + ",".join(map(str, range(100_000))) + "]\n", ["20000 values", "num_samples"]),
    ("many-values.json", '{"seeds": [' + ",".join(map(str, range(100_000))) + "]}", ["20000 values"]),
    ("recursive.yaml", "a: &a [*a]\n", ["refers to itself"]),
    ("recursive-map.yaml", "model: &m {kind: shapes, x: *m}\n", ["refers to itself"]),
    ("deep.yaml", "a: " + "[" * 100_000 + "]" * 100_000 + "\n", ["nested"]),
    ("deep-map.yaml", "a: " + "{b: " * 2000 + "1" + "}" * 2000 + "\n", ["nested"]),
    ("deep-small.yaml", "model: {kind: shapes, size: " + "[" * 40 + "]" * 40 + "}\n", ["nested deeper than"]),
    ("huge-int.yaml", "seed: " + "9" * 100_000 + "\n", ["cannot parse", "digits"]),
    ("too-big.yaml", yaml.safe_dump(BASE) + "#" + "p" * (MAX_RECIPE_BYTES + 10) + "\n", ["at most 1048576 bytes"]),
    ("ten-mb.yaml", "model: {kind: " + "x" * 10_000_000 + "}\n", ["1048576"]),
    ("non-utf8.yaml", b"model: \xff\xfe kind\n", ["not UTF-8", "0xff"]),
    ("latin1.yaml", "model: {kind: caf\xe9}\n".encode("latin-1"), ["not UTF-8"]),
    ("png.yaml", b"\x89PNG\r\n\x1a\n" + bytes(range(1, 256)) * 10, ["not UTF-8"]),
    ("binary.yaml", bytes(range(256)) * 4, ["binary"]),
    ("nul.yaml", b"\x00" * 100, ["binary"]),
    ("utf16.yaml", yaml.safe_dump(BASE).encode("utf-16"), ["binary"]),
    ("python-tag.yaml", "seed: !!python/object/apply:os.system ['true']\n", ["cannot parse", "python/object"]),
    ("unclosed.yaml", "model: [unclosed", ["cannot parse"]),
    ("list.yaml", "- a\n- b\n", ["must be a mapping"]),
    ("scalar.yaml", "42\n", ["must be a mapping"]),
    ("two-docs.yaml", "seed: 1\n---\nseed: 2\n", ["cannot parse"]),
    ("unhashable-key.yaml", "? [a, b]\n: 1\n", ["cannot parse"]),
    ("nan.yaml", "conditions: [{kind: shapes-attribute, attribute: color, value: red, scale: .nan}]\n",
     ["conditions.0.scale", "finite"]),
    ("bad.json", '{"seed": ', ["cannot parse"]),
    ("nan.json", '{"conditions": [{"kind": "shapes-attribute", "attribute": "color", "value": "red", "scale": NaN}]}',
     ["finite"]),
    ("deep.json", "[" * 100_000 + "]" * 100_000, ["nested"]),
    ("huge-number.json", '{"seed": ' + "9" * 100_000 + "}", ["cannot parse"]),
    ("list.json", "[1, 2]", ["must be a mapping"]),
    ("long-key.yaml", "x" * 500_000 + ": 1\n", ["cannot parse"]),
    ("unknown-key.yaml", "x" * 1000 + ": 1\n", ["Extra inputs", "characters"]),
    ("long-value.yaml", "seed: " + "x" * 900_000 + "\n", ["seed", "characters"]),
]


@pytest.mark.parametrize("name,content,words", BAD_FILES, ids=[n for n, _, _ in BAD_FILES])
def test_bad_recipe_files_are_refused_quickly(tmp_path, capsys, name, content, words):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    line = assert_refused(run(capsys, "generate", path, "--out", tmp_path / "out"), *words)
    assert len(line) < 1200  # a huge value is cut in the message
    assert_refused(run(capsys, "check", path), *words)


@pytest.mark.parametrize("target,words", [
    ("missing.yaml", ["recipe file not found"]),
    (".", ["not a file"]),
    ("/dev/null", ["not a file"]),
])
def test_recipe_paths_that_are_not_files(tmp_path, capsys, monkeypatch, target, words):
    monkeypatch.chdir(tmp_path)
    assert_refused(run(capsys, "check", target), *words)


@pytest.mark.parametrize("content", ["", "# only a comment\n", "{}\n", "\ufeffseed: 1\n",
                                     "model: &m {kind: shapes, size: 8}\nsolver: {kind: ddpm, steps: 2}\n"])
def test_small_valid_files_pass(tmp_path, capsys, content):
    path = tmp_path / "ok.yaml"
    path.write_text(content, encoding="utf-8")
    assert_checked_ok(run(capsys, "check", path))


def test_a_huge_value_given_through_the_api_is_cut_in_the_message():
    data = dict(json.loads(json.dumps(BASE)), device="d" * 10_000_000, seed="s" * 10_000_000)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_recipe(data)
    assert time.perf_counter() - started < SECONDS
    assert len(str(err.value)) < 1000 and "10000000 characters" in str(err.value)
    data = dict(json.loads(json.dumps(BASE)), device="d" * 10_000_000)
    with pytest.raises(ConfigError) as err:
        load_recipe(data)
    assert len(str(err.value)) < 1000 and "device" in str(err.value)


def test_a_dict_recipe_with_a_cycle_or_objects_is_refused():
    cyclic: dict = {"model": {"kind": "shapes"}}
    cyclic["model"]["self"] = cyclic
    for data in (cyclic, {"model": {"kind": object()}}, {"seed": float("nan")}):
        with pytest.raises(ConfigError):
            read_recipe(data)


# == D: plugins ==============================================================================

class Boom(BaseException):
    """A BaseException that is neither Exception nor KeyboardInterrupt."""


@pytest.fixture
def fake_dists(monkeypatch):
    dists: list = []
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: list(dists))
    monkeypatch.delenv("ZMAGIC_LOAD_PLUGINS", raising=False)
    return dists


def energy_plugin(name, energies=(), fail: Optional[BaseException] = None, factory=None, options=None, **register_kw):
    mod = types.ModuleType(name)

    @hookimpl
    def register_energies(register):
        for n in energies:
            register(n, factory or (lambda context, **o: None), options=options, **register_kw)
        if fail is not None:
            raise fail

    mod.register_energies = register_energies
    return mod


def cli_registry(monkeypatch, registry):
    monkeypatch.setattr(registry_module, "_default", registry)
    return registry


@pytest.mark.parametrize("failure", [ImportError("No module named 'dlib'"), SystemExit(3), GeneratorExit(),
                                     Boom("plugin-side BaseException"), ValueError("x" * 100_000),
                                     RuntimeError("line one\nline two"), MemoryError()])
def test_a_plugin_that_raises_anything_on_import_or_in_a_hook_is_recorded(fake_dists, capsys, monkeypatch, failure):
    fake_dists.append(FakeDist("zmagic-broken", "0.1", [FakeEntryPoint("broken", failure)]))
    fake_dists.append(FakeDist("zmagic-hook", "0.1", [FakeEntryPoint("hook", energy_plugin("hook", ["hook-e"],
                                                                                           fail=failure))]))
    fake_dists.append(FakeDist("zmagic-good", "0.2", [FakeEntryPoint("good", energy_plugin("good", ["good-e"]))]))
    registry = cli_registry(monkeypatch, Registry())
    assert registry.get("energy", "good-e").plugin == "good"
    assert registry.get("energy", "hook-e").plugin == "hook"  # registered before the hook raised
    infos = {p.name: p for p in registry.plugins()}
    assert type(failure).__name__ in infos["broken"].errors[0] and "import failed" in infos["broken"].errors[0]
    assert any(type(failure).__name__ in e for e in infos["hook"].errors)
    assert all(len(e) < 500 and "\n" not in e for p in infos.values() for e in p.errors)
    rc, out, err, elapsed = run(capsys, "plugins")
    assert rc == 0 and "broken" in out and "good" in out and "Traceback" not in out + err


def test_keyboard_interrupt_is_not_swallowed(fake_dists):
    fake_dists.append(FakeDist("zmagic-ctrl-c", "0.1", [FakeEntryPoint("ctrl-c", KeyboardInterrupt())]))
    with pytest.raises(KeyboardInterrupt):
        Registry().names("energy")


BAD_NAMES = ["", "Bad", "with space", "x" * 65, "-lead", ".lead", "ünï", "a/b", "a:b", "tab\t", 5, None, b"bytes",
             ("a",)]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:20] for n in BAD_NAMES])
def test_a_bad_component_name_is_recorded_and_skipped(fake_dists, name):
    fake_dists.append(FakeDist("zmagic-bad", "1", [FakeEntryPoint("bad", energy_plugin("bad", [name, "fine-name"]))]))
    registry = Registry()
    assert registry.get("energy", "fine-name").plugin == "bad"
    info = {p.name: p for p in registry.plugins()}["bad"]
    assert any("bad name" in e for e in info.errors), info.errors
    assert all(len(e) < 500 for e in info.errors)


@pytest.mark.parametrize("kw,words", [
    ({"aliases": ("Bad Alias",)}, ["bad alias"]),
    ({"aliases": 5}, ["aliases"]),
    ({"options": dict}, ["options must be a pydantic model"]),
    ({"component": "not a class"}, ["component must be a class"]),
    ({"adds_conditions": 3}, ["adds_conditions"]),
])
def test_bad_registration_arguments_are_recorded(kw, words):
    registry = Registry(load_entry_points=False)
    info = registry.register_plugin(energy_plugin("args", ["some-energy"], **kw), "args")
    assert any(all(w in e for w in words) for e in info.errors), info.errors
    with pytest.raises(UnknownComponentError):
        registry.get("energy", "some-energy")


def test_a_non_callable_factory_is_recorded():
    registry = Registry(load_entry_points=False)
    info = registry.register_plugin(energy_plugin("nf", ["nf-energy"], factory="not callable"), "nf")
    assert any("not callable" in e for e in info.errors)


def recipe_using(tmp_path, kind, **extra):
    data = json.loads(json.dumps(BASE))
    data["conditions"] = [{"kind": kind, **extra}]
    path = tmp_path / "uses.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_name_two_plugins_register_is_refused_at_generate_time(fake_dists, tmp_path, capsys, monkeypatch):
    fake_dists.append(FakeDist("zmagic-one", "1.0", [FakeEntryPoint("one", energy_plugin("one", ["same"]))]))
    fake_dists.append(FakeDist("zmagic-two", "2.0", [FakeEntryPoint("two", energy_plugin("two", ["same"]))]))
    cli_registry(monkeypatch, Registry())
    path = recipe_using(tmp_path, "same")
    words = ["conditions.0.kind", "'same'", "zmagic-one 1.0", "zmagic-two 2.0"]
    assert_refused(run(capsys, "generate", path, "--out", tmp_path / "o"), *words)
    assert_refused(run(capsys, "check", path), *words)


def test_a_plugin_name_two_distributions_provide_is_refused(fake_dists, tmp_path, capsys, monkeypatch):
    fake_dists.append(FakeDist("zmagic-first", "1", [FakeEntryPoint("dup", energy_plugin("dup", ["dup-e"]))]))
    fake_dists.append(FakeDist("zmagic-second", "2", [FakeEntryPoint("dup", energy_plugin("dup", ["dup-other"]))]))
    registry = cli_registry(monkeypatch, Registry())
    with pytest.raises(ContestedComponentError) as err:
        registry.get("energy", "dup-e")
    assert "zmagic-first" in str(err.value) and "zmagic-second" in str(err.value)
    assert_refused(run(capsys, "generate", recipe_using(tmp_path, "dup-e"), "--out", tmp_path / "o"),
                   "zmagic-first", "zmagic-second")
    rc, out, _, _ = run(capsys, "plugins")
    assert rc == 0 and "zmagic-second" in out


def test_the_same_distribution_found_twice_is_loaded_once(fake_dists):
    dist = FakeDist("zmagic-twice", "1", [FakeEntryPoint("twice", energy_plugin("twice", ["twice-e"]))])
    fake_dists.extend([dist, dist])
    registry = Registry()
    assert registry.get("energy", "twice-e").plugin == "twice"
    assert not any(p.errors for p in registry.plugins())


def test_a_plugin_cannot_take_a_builtin_name(fake_dists, base_file, capsys, monkeypatch):
    fake_dists.append(FakeDist("zmagic-hijack", "1", [FakeEntryPoint("hijack", energy_plugin(
        "hijack", ["shapes-attribute"], factory=lambda context, **o: 1 / 0))]))
    registry = cli_registry(monkeypatch, Registry())
    assert registry.get("energy", "shapes-attribute").plugin == "zmagic_core.plugins.builtin"
    rc, out, err, _ = run(capsys, "check", base_file)
    assert rc == 0 and "zmagic: warning:" in err and "hijack" in err and "built-in one is used" in err


FAILURES = [ValueError("bad value"), RuntimeError("CUDA out of memory " + "z" * 10_000), SystemExit(1),
            MemoryError(), Boom("base exception"), AssertionError(), OSError(28, "No space left on device"),
            InputError("reference image missing: a.png")]


@pytest.mark.parametrize("failure", FAILURES, ids=[type(f).__name__ for f in FAILURES])
def test_a_factory_raising_anything_is_one_line_naming_kind_and_plugin(tmp_path, capsys, monkeypatch, failure):
    def factory(context, **options):
        raise failure

    registry = Registry(load_entry_points=False)
    registry.register_plugin(energy_plugin("exploding", ["explodes"], factory=factory), "exploding", version="9.9")
    cli_registry(monkeypatch, registry)
    path = recipe_using(tmp_path, "explodes")
    if isinstance(failure, InputError):  # the core's own errors pass unchanged
        assert_refused(run(capsys, "generate", path, "--out", tmp_path / "o"), "reference image missing")
        return
    assert_refused(run(capsys, "generate", path, "--out", tmp_path / "o"),
                   "conditions.0", "energy 'explodes'", "'exploding'", "failed to build", type(failure).__name__)


def test_keyboard_interrupt_in_a_factory_passes():
    def factory(context, **options):
        raise KeyboardInterrupt

    registry = Registry(load_entry_points=False)
    registry.register_plugin(energy_plugin("ctrl", ["ctrl-e"], factory=factory), "ctrl")
    data = dict(json.loads(json.dumps(BASE)), conditions=[{"kind": "ctrl-e"}])
    with pytest.raises(KeyboardInterrupt):
        build_pipeline(load_recipe(data, registry=registry), registry)


@pytest.mark.parametrize("kind,package", [
    ("clip-text", "zmagic-clip"), ("faceid", "zmagic-faceid"), ("face-id", "zmagic-faceid"),
    ("landmark", "zmagic-landmark"), ("landmarks", "zmagic-landmark"), ("parsing", "zmagic-parsing"),
    ("face-parsing", "zmagic-parsing"), ("style", "zmagic-style"),
])
def test_unknown_kinds_name_the_package_to_install(fake_dists, tmp_path, capsys, monkeypatch, kind, package):
    cli_registry(monkeypatch, Registry())
    path = recipe_using(tmp_path, kind)
    words = ["conditions.0.kind", f"unknown energy kind '{kind}'", f"(pip install {package})"]
    assert_refused(run(capsys, "generate", path, "--out", tmp_path / "o"), *words)
    assert_refused(run(capsys, "check", path), *words)


def test_an_installed_package_that_failed_says_so(fake_dists, tmp_path, capsys, monkeypatch):
    fake_dists.append(FakeDist("zmagic-clip", "0.1", [FakeEntryPoint("clip", ImportError("No module named 'open_clip'"))]))
    cli_registry(monkeypatch, Registry())
    assert_refused(run(capsys, "check", recipe_using(tmp_path, "clip-text")),
                   "zmagic-clip is installed", "open_clip")


def test_unknown_kinds_of_no_known_package_have_no_hint(fake_dists):
    with pytest.raises(UnknownComponentError) as err:
        Registry().get("model", "clip-text")  # a model, not the energy zmagic-clip provides
    assert "pip install" not in str(err.value)


def test_contested_evaluators_do_not_stop_a_run(fake_dists):
    def plugin(name):
        mod = types.ModuleType(name)

        @hookimpl
        def register_evaluators(register):
            register("judge", lambda context, **o: None)

        mod.register_evaluators = register_evaluators
        return mod

    fake_dists.append(FakeDist("zmagic-j1", "1", [FakeEntryPoint("j1", plugin("j1"))]))
    fake_dists.append(FakeDist("zmagic-j2", "1", [FakeEntryPoint("j2", plugin("j2"))]))
    registry = Registry()
    from zmagic_core.assembly.build import build_evaluators

    plan = check_recipe(load_recipe(BASE, check=False), registry)
    _, errors = build_evaluators(plan)
    assert "judge" in errors and "j1" in errors["judge"] and "j2" in errors["judge"]


# == E: images ===============================================================================
def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb costs no disk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def make_images(tmp_path):
    import numpy as np
    from PIL import Image

    files = {}
    rng = np.random.default_rng(0)
    pixels = Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8"))
    for suffix in ("png", "jpg"):
        full = tmp_path / f"full.{suffix}"
        pixels.save(full)
        data = full.read_bytes()
        files[f"truncated-{suffix}"] = data[: len(data) // 2]
    files["bomb-400mp"] = png_header(20_000, 20_000)
    files["bomb-1e9"] = png_header(40_000, 40_000)
    files["over-limit-60mp"] = png_header(8_000, 7_500)
    files["wide-100mp"] = png_header(100_000_000, 1)
    files["empty"] = b""
    files["random"] = bytes(rng.integers(0, 256, 5000, dtype=np.uint8))
    files["header-only"] = png_header(64, 64)[:20]
    files["text"] = b"not an image at all"
    files["eps"] = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    files["svg"] = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    return files


IMAGE_CASES = ["truncated-png", "truncated-jpg", "bomb-400mp", "bomb-1e9", "over-limit-60mp", "wide-100mp", "empty",
               "random", "header-only", "text", "eps", "svg"]


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_bad_images_are_one_line_input_errors(tmp_path, case):
    path = tmp_path / f"{case}.png"
    path.write_bytes(make_images(tmp_path)[case])
    started = time.perf_counter()
    with pytest.raises(InputError) as err:
        load_image(path)
    assert time.perf_counter() - started < SECONDS
    message = str(err.value)
    assert "\n" not in message and str(path) in message and len(message) < 600
    if case.startswith(("bomb", "over-limit", "wide")):
        assert str(MAX_PIXELS) in message


def test_truncated_images_stay_refused_when_pil_is_told_to_load_them(tmp_path, monkeypatch):
    from PIL import ImageFile

    path = tmp_path / "t.png"
    path.write_bytes(make_images(tmp_path)["truncated-png"])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(InputError, match="truncated"):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored


@pytest.mark.parametrize("where", ["missing.png", "folder"])
def test_missing_and_folder_images(tmp_path, where):
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="not found|not a file"):
        load_image(tmp_path / where)


@pytest.mark.parametrize("mode,suffix", [("RGB", "png"), ("RGBA", "png"), ("L", "png"), ("P", "png"), ("I;16", "png"),
                                         ("1", "png"), ("RGB", "jpg"), ("RGB", "gif"), ("RGB", "bmp"), ("RGB", "webp"),
                                         ("RGB", "tiff")])
def test_valid_images_load(tmp_path, mode, suffix):
    from PIL import Image

    path = tmp_path / f"ok.{suffix}"
    Image.new(mode, (5, 3)).save(path)
    image = load_image(path, size=4)
    assert image.shape == (3, 4, 4) and image.min() >= -1 and image.max() <= 1


@pytest.mark.parametrize("size", [0, -3, (100_000, 100_000)])
def test_resize_targets_are_bounded(tmp_path, size):
    from PIL import Image

    path = tmp_path / "ok.png"
    Image.new("RGB", (4, 4)).save(path)
    with pytest.raises(InputError, match="resize"):
        load_image(path, size=size)


def test_a_bad_reference_image_in_a_recipe_is_one_line(tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(20_000, 20_000))
    data = dict(json.loads(json.dumps(BASE)), conditions=[{"kind": "shapes-mask", "reference": str(bomb)}])
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump(data))
    assert_refused(run(capsys, "generate", path, "--out", tmp_path / "o"), str(bomb), str(MAX_PIXELS))


# == F: the [diffusers] extra ================================================================
@pytest.fixture
def no_diffusers(monkeypatch):
    for name in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError


@pytest.mark.parametrize("model", [{"kind": "diffusers-pixel"}, {"kind": "diffusers-pixel", "id": "some/repo"},
                                   {"kind": "stable-diffusion", "prompt": "a cat"}])
def test_a_diffusers_model_without_the_extra_names_it(no_diffusers, tmp_path, capsys, model):
    data = dict(json.loads(json.dumps(BASE)), model=model, conditions=[])
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(data))
    words = ["model.kind", "diffusers", 'pip install "zmagic-core[diffusers]"']
    assert_refused(run(capsys, "generate", path, "--out", tmp_path / "o"), *words)
    assert_refused(run(capsys, "check", path), *words)


def test_the_factory_itself_refuses_without_diffusers(no_diffusers, tmp_path):
    import torch

    from zmagic_core.contracts.components import BuildContext
    from zmagic_core.models.pretrained import build_diffusers_pixel

    with pytest.raises(ConfigError, match=r'zmagic-core\[diffusers\]'):
        build_diffusers_pixel(BuildContext(device=torch.device("cpu")), id=str(tmp_path))


def test_stable_diffusion_without_transformers(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)
    data = dict(json.loads(json.dumps(BASE)), model={"kind": "stable-diffusion"}, conditions=[])
    path = tmp_path / "sd.yaml"
    path.write_text(yaml.safe_dump(data))
    assert_refused(run(capsys, "check", path), "transformers", "zmagic-core[diffusers]")


# == G: zmagic --version, zmagic check =======================================================
def test_version(capsys):
    rc, out, err, _ = run(capsys, "--version")
    assert rc == 0 and "zmagic-core" in out and "torch" in out and not err


@pytest.mark.parametrize("argv", [[], ["generate"], ["nosuchcommand"], ["check"], ["generate", "a", "--bogus"]])
def test_usage_errors_return_2_without_a_traceback(capsys, argv):
    rc, out, err, _ = run(capsys, *argv)
    assert rc == 2 and "Traceback" not in out + err and "usage:" in err


class PathOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights: Optional[FilePath] = None
    reference: Optional[PathOrName] = None


def path_plugin():
    return energy_plugin("paths", ["with-paths"], options=PathOptions)


def test_check_reports_every_problem_at_once(fake_dists, tmp_path, capsys, monkeypatch):
    registry = Registry()
    registry.register_plugin(path_plugin(), "paths")
    cli_registry(monkeypatch, registry)
    data = {
        "model": {"kind": "shapes", "size": 3},                                   # invalid option
        "solver": {"kind": "dddpm"},                                              # unknown kind
        "combiner": {"kind": "dependent"},
        "conditions": [
            {"kind": "clip-text"},                                                # known package, not installed
            {"kind": "with-paths", "weights": "nowhere/w.safetensors",            # missing FilePath
             "reference": "missing-face.png"},                                   # path-like PathOrName, missing
            {"kind": "with-paths", "reference": "org/hub-model"},                 # a hub id: not a path
            {"kind": "shapes-mask", "reference": "red circle center"},            # a description: fine
            {"kind": "shapes-mask", "reference": "gone.png"},                     # missing PathOrName file
            {"kind": "shapes-attribute", "attribute": "colour", "value": "red"},  # invalid option
        ],
        "device": "tpu",
    }
    path = tmp_path / "many.yaml"
    path.write_text(yaml.safe_dump(data))
    rc, out, err, elapsed = run(capsys, "check", path)
    assert rc == 2 and "Traceback" not in out + err and elapsed < SECONDS
    lines = err.strip().splitlines()
    assert all(line.startswith("zmagic: error: ") for line in lines)
    expected = ["model.options.size", "solver.kind: unknown solver kind 'dddpm'",
                "conditions.0.kind: unknown energy kind 'clip-text'; available: ",
                "conditions.1.options.weights: file not found", "conditions.1.options.reference: file not found",
                "conditions.4.options.reference: file not found", "conditions.5.options.attribute", "device: 'tpu'"]
    for words in expected:
        assert sum(words in line for line in lines) == 1, (words, lines)
    assert not any("conditions.2" in line or "conditions.3" in line for line in lines), lines
    assert len(lines) == len(expected), lines
    assert "(pip install zmagic-clip)" in lines[2]
    # with the model fixed, the condition count is checked too (the model may add conditions)
    data["model"] = {"kind": "shapes"}
    path.write_text(yaml.safe_dump(data))
    rc, _, err, _ = run(capsys, "check", path)
    assert rc == 2 and "'dependent' needs exactly 2 conditions, the recipe has 6" in err


def test_check_reports_field_errors_and_component_errors_together(fake_dists, tmp_path, capsys, monkeypatch):
    cli_registry(monkeypatch, Registry())
    data = dict(json.loads(json.dumps(BASE)), num_samples=0, combiner={"kind": "nope"})
    data["conditions"].append({"kind": "shapes-mask", "reference": "gone.png", "scale": -1})
    path = tmp_path / "fields.yaml"
    path.write_text(yaml.safe_dump(data))
    rc, _, err, _ = run(capsys, "check", path)
    assert rc == 2
    for words in ("num_samples", "conditions.1.scale", "combiner.kind: unknown combiner kind 'nope'",
                  "conditions.1.options.reference: file not found"):
        assert words in err, (words, err)


def test_check_ok_lists_the_resolved_components(base_file, capsys):
    out = assert_checked_ok(run(capsys, "check", base_file, "--set", "combiner=independent"))
    assert "model: model 'shapes' from 'zmagic_core.plugins.builtin'" in out
    assert "combiner: combiner 'sum'" in out  # the alias resolved
    assert "conditions.0: energy 'shapes-attribute'" in out


def test_find_problems_is_the_same_list(base_file):
    assert find_problems(base_file) == []
    problems = find_problems(base_file, ["conditions.0.scale=0", "device=tpu"])
    assert len(problems) == 1 and "conditions.0.scale" in problems[0]  # a field error stops the cross checks
    problems = find_problems(base_file, ["device=tpu", "conditions.0.kind=nope"])
    assert len(problems) == 2


@pytest.mark.parametrize("device,dtype,words", [
    ("cuda:5", "float32", ["cuda:5", "2 CUDA device(s)"]),
    ("cuda:2", "float32", ["cuda:2", "cuda:0 to cuda:1"]),
    ("cuda", "bfloat16", ["bfloat16", "not supported"]),
    ("cuda:1", "bfloat16", ["bfloat16"]),
])
def test_cuda_devices_and_dtypes_this_machine_lacks(monkeypatch, device, dtype, words):
    """As on a machine with two GPUs without bfloat16 (faked: the checks read torch.cuda only)."""
    import torch

    from zmagic_core.assembly.build import _check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(ConfigError) as err:
        _check_device(device, dtype)
    assert all(w in str(err.value) for w in words), str(err.value)
    _check_device("cuda:1", "float16")  # present and supported: fine


def test_a_16_bit_image_keeps_its_tones_and_exif_orientation_is_applied(tmp_path):
    """A 16-bit greyscale PNG is scaled to 8 bits (PIL's own convert clips it to white), and a photo whose
    EXIF says "rotated" loads upright, as a viewer shows it."""
    import numpy as np
    import torch
    from PIL import Image

    ramp = (np.linspace(0, 65535, 64).reshape(8, 8)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    deep = load_image(tmp_path / "deep.png")
    Image.fromarray((ramp // 257).astype(np.uint8)).save(tmp_path / "shallow.png")
    shallow = load_image(tmp_path / "shallow.png")
    assert torch.allclose(deep, shallow, atol=2 / 255)
    assert deep.min() == -1 and deep.max() == 1

    wide = Image.new("RGB", (6, 2), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    wide.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").shape == (3, 6, 2)


@pytest.mark.parametrize("override,words", [
    ("model.sigma0=inf", ["model.options.sigma0", "inf is not a finite number"]),  # text that a float field parses
    ("model.sigma0=Infinity", ["model.options.sigma0", "not a finite number"]),
    ("conditions.0.value=[0.5, .nan]", ["conditions.0.value.1", "nan is not a finite number"]),  # named in full
])
def test_non_finite_numbers_given_as_text_are_refused_by_field(tmp_path, capsys, override, words):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert_refused(run(capsys, "check", path, "--set", override), *words)


@pytest.mark.parametrize("name,content", [
    ("twice.yaml", "seed: 1\ncombiner: {kind: cagrad}\ncombiner: {kind: sum}\n"),
    ("nested.yaml", "conditions:\n  - {kind: shapes-attribute, scale: 0.25, scale: 5}\n"),
    ("twice.json", '{"seed": 1, "seed": 2}'),
])
def test_a_key_given_twice_is_refused_not_overwritten(tmp_path, capsys, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert_refused(run(capsys, "check", path), "given twice")


def test_yaml_merge_keys_still_override(tmp_path, capsys):
    path = tmp_path / "merge.yaml"
    path.write_text("model: {kind: shapes, size: 8}\nsolver: {kind: ddpm, steps: 2}\n"
                    "conditions:\n  - &c {kind: shapes-attribute, attribute: color, value: red}\n"
                    "  - {<<: *c, attribute: shape, value: circle}\n")
    assert_checked_ok(run(capsys, "check", path))


@pytest.mark.parametrize("device,words", [("meta", ["model.options.device", "'meta' is not supported"]),
                                          ("cpu:3", ["model.options.device", "no numbered devices"])])
def test_a_model_device_is_checked_like_the_recipe_device(tmp_path, capsys, device, words):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(dict(BASE, model={"kind": "diffusers-pixel", "id": str(tmp_path), "device": device})))
    assert_refused(run(capsys, "check", path), *words)
