"""The web app's form without a browser: fields generated from options models, form -> recipe,
recipe -> form, the flat order of the page's values, errors placed by field, runs and cancels."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, Optional, Union

import pytest
from pydantic import BaseModel, ConfigDict, Field

from zmagic_core.app.ui import (DEFAULT_RECIPE, FormLayout, Job, area_of, check_form, energy_table, failing_part,
                                fields_of, form_to_recipe, gallery_items, recipe_to_form, split_errors,
                                summary_line)
from zmagic_core.assembly.build import build_pipeline, load_recipe
from zmagic_core.contracts.errors import ConfigError, ZmagicError
from zmagic_core.contracts.options import FilePath, PathOrName

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "shapes").glob("*.yaml"))


@pytest.fixture(scope="module")
def layout():
    return FormLayout()


def _resolved(recipe) -> dict:
    """A checked recipe with every option's default filled in: two recipes that run the same compare equal."""
    data = recipe.model_dump(mode="json")
    plan = recipe._plan
    for where, (reg, options) in plan.parts.items():
        full = reg.options.model_validate(options).model_dump(mode="json") if reg.options else options
        target = data["conditions"][int(where.split(".")[1])] if where.startswith("conditions.") else data[where]
        target["kind"] = reg.name
        target["options"] = full
    return data


def _form_with(layout, **changes) -> dict:
    form, _ = recipe_to_form(DEFAULT_RECIPE, layout)
    for path, value in changes.items():
        node = form
        keys = path.split("__")
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node[key]
        node[keys[-1]] = value
    return form


# -- fields from options models ---------------------------------------------------------------------
class Everything(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    choice: Literal["a", "b"] = "a"
    flag: bool = False
    maybe: Optional[bool] = None
    count: int = Field(3, ge=1, le=9)
    ratio: float = Field(0.5, gt=0, lt=1, description="a ratio")
    cap: Optional[float] = Field(None, gt=0)
    points: Optional[list[list[float]]] = None
    image: FilePath = "x.png"
    reference: Union[PathOrName, dict[str, str]] = "red circle center"


def test_each_option_type_gets_its_widget():
    fields = {f.key: f for f in fields_of(Everything)}
    assert [f.key for f in fields_of(Everything)] == list(Everything.model_fields)  # declaration order
    assert fields["text"].widget == "text" and fields["text"].required and fields["text"].label == "text *"
    assert fields["choice"].widget == "choice" and fields["choice"].values == ("a", "b")
    assert fields["flag"].widget == "check"
    assert fields["maybe"].widget == "choice" and fields["maybe"].values == (True, False)  # three-way
    assert fields["count"].widget == "number" and fields["count"].integer and ">= 1" in fields["count"].info
    assert "<= 9" in fields["count"].info
    assert fields["ratio"].info == "a ratio; > 0, < 1"
    assert fields["cap"].widget == "numtext"  # a number box cannot be empty: an optional number is typed
    assert fields["points"].widget == "yaml"
    assert fields["image"].widget == "path" and fields["reference"].widget == "path"
    assert fields["reference"].accepts_mapping
    # path fields take the first text places: the image uploads beside them
    assert (fields["image"].pool, fields["image"].index, fields["reference"].index) == ("text", 0, 1)
    assert {fields["text"].index, fields["points"].index, fields["cap"].index} == {2, 3, 4}


def test_raw_values_become_options_and_back():
    fields = {f.key: f for f in fields_of(Everything)}
    assert fields["count"].to_option(4.0) == (True, 4) and isinstance(fields["count"].to_option(4.0)[1], int)
    assert fields["count"].to_option(3) == (False, None)  # the default: left out
    assert fields["count"].to_option(None) == (False, None)
    assert fields["cap"].to_option(" 0.5 ") == (True, 0.5) and fields["cap"].to_option("") == (False, None)
    assert fields["maybe"].to_option("false") == (True, False) and fields["maybe"].to_option("") == (False, None)
    assert fields["points"].to_option("[[0.5, 0.25]]") == (True, [[0.5, 0.25]])
    assert fields["reference"].to_option("{shape: circle, color: red, position: center}")[1] == {
        "shape": "circle", "color": "red", "position": "center"}
    assert fields["reference"].to_option("blue square top-left") == (True, "blue square top-left")
    assert fields["text"].to_option("   ") == (False, None)  # empty: the check says it is required
    for key, value in (("points", [[0.5, 0.25]]), ("maybe", True), ("cap", 2.0), ("choice", "b"),
                       ("reference", {"shape": "circle"}), ("count", 7), ("flag", True)):
        assert fields[key].to_option(fields[key].to_raw(value)) == (True, value), key
    with pytest.raises(ValueError, match="not valid YAML"):
        fields["points"].to_option("[[0.5,")
    with pytest.raises(ValueError, match="not a number"):
        fields["cap"].to_option("lots")


# -- recipe <-> form --------------------------------------------------------------------------------
def test_default_recipe_round_trips(layout):
    form, notes = recipe_to_form(DEFAULT_RECIPE, layout)
    assert notes == []
    assert form["model"]["kind"] == "shapes" and form["model"]["fields"]["size"] == 32
    assert [c["kind"] for c in form["conditions"]] == ["shapes-attribute", "shapes-mask"]
    assert form["conditions"][0]["fields"]["value"] == "red" and form["conditions"][0]["common"]["scale"] == 0.25
    recipe = form_to_recipe(form, layout)
    assert recipe["conditions"][1] == {"kind": "shapes-mask", "name": "mask", "scale": 0.25,
                                       "reference": "red circle center"}
    assert _resolved(load_recipe(recipe)) == _resolved(load_recipe(DEFAULT_RECIPE))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_recipes_survive_the_form(layout, path):
    form, notes = recipe_to_form(path, layout)
    assert notes == []
    assert _resolved(load_recipe(form_to_recipe(form, layout))) == _resolved(load_recipe(path))


def test_flat_values_round_trip_with_slots(layout):
    form, _ = recipe_to_form(DEFAULT_RECIPE, layout)
    values, active = layout.flatten(form)
    assert len(values) == layout.flat_size() and active == [True, True, False, False]
    again = layout.unflatten(values, active)
    assert form_to_recipe(again, layout) == form_to_recipe(form, layout) and again["slots"] == [0, 1]
    # condition 1 removed, a third one added in slot 3: the recipe holds slots 1 and 3, in that order
    values3, _ = layout.flatten({**form, "conditions": form["conditions"] + [form["conditions"][0]]})
    later = layout.unflatten(values3, [False, True, True, False])
    assert [c["kind"] for c in later["conditions"]] == ["shapes-mask", "shapes-attribute"] and later["slots"] == [1, 2]
    # a pool place the kind does not use is ignored
    sizes = layout.pools["condition"]
    assert len(layout.pool_vector("condition", "shapes-attribute", {})) == sum(sizes[p] for p in
                                                                               ("text", "number", "check", "choice")) + 1


def test_aliases_unknown_options_and_limits(layout):
    recipe = {**DEFAULT_RECIPE, "combiner": {"kind": "zmagic", "hessian": False}, "output": "somewhere",
              "conditions": [{**DEFAULT_RECIPE["conditions"][0], "colour": "red"}, DEFAULT_RECIPE["conditions"][1]]}
    form, notes = recipe_to_form(recipe, layout)
    assert form["combiner"]["kind"] == "dependent" and form["combiner"]["fields"]["hessian"] is False
    assert any("'zmagic' is shown as 'dependent'" in n for n in notes)
    assert any(n.startswith("conditions.0.options.colour: not an option of shapes-attribute") for n in notes)
    assert any(n.startswith("output: not used here") for n in notes)
    with pytest.raises(ConfigError, match=r"conditions.0.kind: unknown energy kind 'nope'"):
        recipe_to_form({"conditions": [{"kind": "nope"}]}, layout)
    with pytest.raises(ConfigError, match="up to 4 conditions, the recipe has 5"):
        recipe_to_form({"conditions": [DEFAULT_RECIPE["conditions"][0]] * 5}, layout)
    with pytest.raises(ConfigError, match=r"conditions.0.scale"):
        recipe_to_form({"conditions": [{"kind": "shapes-mask", "reference": "x", "scale": -1}]}, layout)


def test_options_named_like_spec_fields_go_under_options(layout):
    # a hypothetical option called `name` must not become the condition's name
    section = {"kind": "shapes-mask", "common": {"name": "m"}, "fields": {"reference": "red circle center"}}
    form = {"model": {"kind": "shapes"}, "solver": {"kind": "ddpm"}, "combiner": {"kind": "sum"}, "conditions": [section]}
    assert form_to_recipe(form, layout)["conditions"][0] == {"kind": "shapes-mask", "name": "m",
                                                             "reference": "red circle center"}


# -- errors, named and placed as load_recipe names them ----------------------------------------------
def test_unreadable_values_are_named_by_recipe_path(layout):
    form = _form_with(layout, conditions__1__kind="shapes-keypoints",
                      conditions__1__fields={"points": "[[0.5,", "temperature": 0.05})
    form["settings"]["seeds"] = "[1, 2"
    with pytest.raises(ConfigError) as info:
        form_to_recipe(form, layout)
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid recipe:"
    assert any(line.strip().startswith("conditions.1.options.points: not valid YAML") for line in lines)
    assert any(line.strip().startswith("seeds: not valid YAML") for line in lines)


def test_bad_options_are_placed_next_to_their_condition(layout):
    form = _form_with(layout, conditions__0__fields={"attribute": "color", "value": "", "tau": -1.0},
                      conditions__1__fields={"reference": "red circle center", "softness": 0.0, "temperature": 1.0})
    recipe, errors = check_form(form_to_recipe(form, layout))
    assert recipe is None and set(errors) == {"condition-0", "condition-1"}  # both at once
    assert errors["condition-0"][0].startswith("conditions.0.options.value: Field required")
    assert any(line.startswith("conditions.0.options.tau: Input should be greater than 0") for line in errors["condition-0"])
    assert any(line.startswith("(shapes-attribute accepts:") for line in errors["condition-0"])
    assert errors["condition-1"][0].startswith("conditions.1.options.softness: Input should be greater than 0")


def test_component_and_setting_errors_have_their_areas(layout):
    form = _form_with(layout, model__fields={"size": 4, "sigma0": 0.1})
    assert set(check_form(form_to_recipe(form, layout))[1]) == {"components"}
    form = _form_with(layout)
    form["conditions"] = form["conditions"][:1]  # dependent needs exactly two
    errors = check_form(form_to_recipe(form, layout))[1]
    assert errors == {"components": ["combiner.kind: 'dependent' needs exactly 2 conditions, the recipe has 1"]}
    form = _form_with(layout)
    form["settings"]["num_samples"] = 0
    assert set(check_form(form_to_recipe(form, layout))[1]) == {"settings"}
    assert check_form(form_to_recipe(_form_with(layout), layout))[1] == {}


def test_split_errors_and_areas():
    assert area_of("conditions.3.options.value") == "condition-3"
    assert area_of("combiner.kind") == area_of("model.options.size") == "components"
    assert area_of("num_samples") == area_of("recipe") == "settings"
    assert area_of("reference word 'x' is not") is None
    message = ("invalid recipe:\n  conditions.1.options.value: Field required\n  (shapes-attribute accepts: a, b)\n"
               "  device: bad")
    assert split_errors(message) == {"condition-1": ["conditions.1.options.value: Field required",
                                                     "(shapes-attribute accepts: a, b)"],
                                     "settings": ["device: bad"]}
    assert split_errors("unknown color 'purple'") == {"general": ["unknown color 'purple'"]}
    assert split_errors("unknown color 'purple'", "conditions.0") == {
        "condition-0": ["conditions.0: unknown color 'purple'"]}


def test_a_build_error_is_traced_to_its_condition():
    recipe = {**DEFAULT_RECIPE, "conditions": [DEFAULT_RECIPE["conditions"][1],
                                               {**DEFAULT_RECIPE["conditions"][0], "value": "purple"}]}
    with pytest.raises(ZmagicError) as info:
        build_pipeline(load_recipe(recipe))
    assert failing_part(info.value) == "conditions.1"
    errors = split_errors(str(info.value), failing_part(info.value))
    assert list(errors) == ["condition-1"] and "purple" in errors["condition-1"][0]
    assert errors["condition-1"][0].startswith("conditions.1: ")


# -- runs: the same folder as `zmagic generate`, a step counter, a cancel ------------------------------
FAST = {"model": {"kind": "shapes", "size": 8}, "solver": {"kind": "ddpm", "steps": 5}, "combiner": "dependent",
        "conditions": DEFAULT_RECIPE["conditions"], "num_samples": 2, "batch_size": 2}


def test_a_job_writes_a_run_folder_and_its_tables(tmp_path):
    recipe = load_recipe(FAST)
    job = Job([("dependent", recipe, tmp_path / "run")]).start()
    job.thread.join(60)
    assert not job.running() and not job.errors and not job.cancelled
    record = job.results["dependent"]
    assert (tmp_path / "run" / "record.json").exists() and (tmp_path / "run" / "energy.png").exists()
    assert [caption for _, caption in gallery_items(record, tmp_path / "run")] == ["#0 seed 0", "#1 seed 1"]
    headers, rows = energy_table(record)
    assert headers == ["sample", "seed", "mask", "red"] and [r[0] for r in rows] == [0, 1, "mean"]
    assert record["problems"]["fallback_sample_steps"] == 0 and "warning" not in summary_line(record, tmp_path)


def test_the_summary_line_shows_what_the_run_did_not_do_as_asked(tmp_path):
    """The page says what `zmagic generate` warns about: a disabled condition, the fallback, a lowered stack."""
    problems = {"disabled": {"broken": {"sample_steps": 12, "share": 1.0}}, "fallback_sample_steps": 3,
                "stack_lowered_to": 2, "disabled_most": ["broken"]}
    text = summary_line({"completed": [0, 1], "seeds": [0, 1], "seconds": 1.0, "problems": problems}, tmp_path)
    assert "2 of 2 samples" in text
    assert "warning: condition 'broken' was disabled (non-finite energy or gradient) at 12 guided" in text
    assert "fallback fired at 3 sample-steps" in text and "combiner.stack=2" in text


def test_a_job_counts_steps_and_cancels(tmp_path):
    long = {**FAST, "model": {"kind": "shapes", "size": 16}, "solver": {"kind": "ddpm", "steps": 1000}}
    job = Job([("dependent", load_recipe(long), tmp_path / "run")]).start()
    deadline = time.perf_counter() + 30
    while job.steps_done() < 3 and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert 3 <= job.steps_done() < job.total == 1000
    job.stop()
    job.thread.join(10)
    assert not job.running() and job.cancelled and not job.results
    assert not (tmp_path / "run" / "record.json").exists() and not (tmp_path / "run" / ".zmagic.lock").exists()


# -- packaging: the optional extra and the command --------------------------------------------------
def test_without_gradio_the_import_and_the_command_name_the_extra():
    code = ("import sys; sys.modules['gradio'] = None\n"
            "try:\n    import zmagic_core.app.ui\nexcept ImportError as e:\n    print(e)\n"
            "import argparse\nfrom zmagic_core.app.ui_command import add_ui_parser\n"
            "parser = argparse.ArgumentParser(); add_ui_parser(parser.add_subparsers())\n"
            "args = parser.parse_args(['ui'])\n"
            "from zmagic_core.contracts.errors import ZmagicError\n"
            "try:\n    args.func(args)\nexcept ZmagicError as e:\n    print('command:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    message = 'the zmagic web app needs Gradio: pip install "zmagic-core[ui]"'
    assert out.stdout.splitlines() == [message, "command: " + message], out.stderr


def test_the_command_parses_and_binds_to_localhost():
    import argparse

    from zmagic_core.app.ui_command import add_ui_parser, cmd_ui

    parser = argparse.ArgumentParser()
    add_ui_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["ui"])
    assert (args.host, args.port, args.out, args.func) == ("127.0.0.1", 7860, "outputs/ui", cmd_ui)
    args = parser.parse_args(["ui", "--host", "0.0.0.0", "--port", "9000", "--recipe", "r.yaml"])
    assert (args.host, args.port, args.recipe) == ("0.0.0.0", 9000, "r.yaml")
