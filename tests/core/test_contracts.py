"""The contracts the layers rest on: the factory contract, evaluators, the pipeline's ownership of
its conditions, the corrector's combiner, and one check of the recipe per run."""
import json

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

import zmagic_core
from zmagic_core import (BuildContext, Combined, Combiner, Condition, ConfigError, DDPMSolver, Evaluator,
                         FinishedRun, PCSolver, Pipeline, ShapesModel, SumCombiner, hookimpl, load_recipe)
import zmagic_core.plugins.registry as registry_module
from zmagic_core.app.cli import main
from zmagic_core.app.runner import generate
from zmagic_core.models.shapes import AttributeEnergy, MaskEnergy
from zmagic_core.plugins.registry import Registry


def with_plugin(monkeypatch, tmp_path, plugin, recipe_text: str):
    """The CLI's registry holds only the shapes world and ``plugin`` for this test; returns a recipe file with
    ``recipe_text``."""
    reg = Registry(load_entry_points=False)
    reg.register_plugin(plugin, "test-plugin")
    monkeypatch.setattr(registry_module, "_default", reg)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text)
    return recipe

RECIPE = {"model": {"kind": "shapes", "size": 16}, "solver": {"kind": "ddpm", "steps": 8},
          "conditions": [{"kind": "shapes-attribute", "name": "red", "attribute": "color", "value": "red",
                          "scale": 0.25}],
          "num_samples": 3, "batch_size": 3, "progress": False}


class CountingOptions(BaseModel):
    """Options of the test energy; counts how often a recipe's options are validated."""
    model_config = ConfigDict(extra="forbid")
    level: float = 0.0


VALIDATIONS = []


class Brightness(zmagic_core.Energy):
    def __init__(self, level):
        super().__init__()
        self.level = level

    def forward(self, images):
        return (images.mean(dim=(1, 2, 3)) - self.level).abs()


def build_brightness(context, **options):
    return Brightness(options.get("level", 0.0))


class MeanBrightness(Evaluator):
    def applies_to(self, recipe):
        return True

    def evaluate(self, run: FinishedRun):
        return {"mean": float(run.images.mean()), "n": len(run.indices), "model": type(run.model).__name__,
                "conditions": [c.name for c in run.conditions]}


class Broken(Evaluator):
    def applies_to(self, recipe):
        return True

    def evaluate(self, run):
        raise RuntimeError("no reference folder")


class NotForShapes(Evaluator):
    def applies_to(self, recipe):
        return recipe["model"]["kind"] != "shapes"

    def evaluate(self, run):  # pragma: no cover - must not be called
        raise AssertionError("asked for a run it does not apply to")


class TestPlugin:
    @hookimpl
    def register_energies(self, register):
        def validate(data):
            VALIDATIONS.append(dict(data))
            return CountingOptions.model_validate(data)

        options = type("Options", (CountingOptions,), {"model_validate": classmethod(lambda cls, d: validate(d))})
        register("test-brightness", build_brightness, options=options, aliases=("tb",), component=Brightness)

    @hookimpl
    def register_evaluators(self, register):
        register("mean-brightness", lambda context, **o: MeanBrightness())
        register("broken", lambda context, **o: Broken())
        register("not-for-shapes", lambda context, **o: NotForShapes())


@pytest.fixture
def registry():
    reg = Registry(load_entry_points=False)
    reg.register_plugin(TestPlugin(), "test-plugin")
    return reg


def test_factory_contract_is_explicit(registry):
    reg = registry.get("energy", "tb")
    assert reg.name == "test-brightness" and reg.aliases == ("tb",) and reg.component is Brightness
    assert issubclass(reg.options, CountingOptions)
    combiner = registry.get("combiner", "cagrad")
    assert combiner.component is zmagic_core.CAGradCombiner and combiner.options is zmagic_core.CAGradCombiner.Options
    sd = registry.get("model", "stable-diffusion")
    assert sd.adds_conditions({"prompt": "a face"}) == 1 and sd.adds_conditions({}) == 0
    with pytest.raises(ConfigError, match=r"conditions\.0\.options.*level"):
        load_recipe({**RECIPE, "conditions": [{"kind": "tb", "level": "bright"}]}, registry=registry)


def test_recipe_is_checked_once_per_run(registry, tmp_path):
    VALIDATIONS.clear()
    recipe = load_recipe({**RECIPE, "conditions": [{"kind": "test-brightness", "level": 0.3}]}, registry=registry)
    generate(recipe, tmp_path / "run", registry=registry)
    assert VALIDATIONS == [{"level": 0.3}]  # load_recipe checked; generate and its build reused that check


def test_evaluators_add_metrics_and_one_failure_loses_nothing(registry, tmp_path):
    recipe = load_recipe(RECIPE, registry=registry)
    record = generate(recipe, tmp_path / "run", registry=registry)
    evaluation = record["evaluation"]
    assert evaluation["mean-brightness"]["n"] == 3 and evaluation["mean-brightness"]["model"] == "ShapesModel"
    assert evaluation["mean-brightness"]["conditions"] == ["red"]
    assert evaluation["shapes"]["summary"]["samples"] == 3  # the core's own evaluator, through the same hook
    assert "not-for-shapes" not in evaluation
    assert evaluation["errors"] == {"broken": "RuntimeError: no reference folder"}
    stored = json.loads((tmp_path / "run" / "record.json").read_text())
    assert stored["evaluation"]["mean-brightness"] == evaluation["mean-brightness"]
    # a resumed run (nothing left to generate) still evaluates, building the model it needs
    again = generate(load_recipe(RECIPE, registry=registry), tmp_path / "run", registry=registry)
    assert again["evaluation"]["shapes"] == evaluation["shapes"]


def test_pipeline_copies_conditions_instead_of_renaming_them():
    world = ShapesModel(16)
    a = Condition("c", AttributeEnergy(world, "color", "red"), scale=0.25)
    b = Condition("c", MaskEnergy(world, "red circle center"), scale=0.25)
    pipe = Pipeline(world, DDPMSolver(), SumCombiner(), [a, b], steps=4)
    assert [c.name for c in pipe.conditions] == ["c", "c#2"]
    assert a.name == "c" and b.name == "c"  # the caller's objects are untouched
    assert pipe.conditions[1].energy is b.energy


class ScaledSum(Combiner):
    """Sum of the active g_i times a factor; records every call."""

    def __init__(self, factor):
        self.factor, self.calls = factor, 0

    def combine(self, step):
        self.calls += 1
        return Combined(self.factor * torch.stack([g.detach() for g in step.base().grads]).sum(0))


def test_corrector_combiner_is_a_parameter():
    world = ShapesModel(16)
    conds = [Condition("red", AttributeEnergy(world, "color", "red"), scale=0.25)]
    solver = PCSolver(corrector_steps=1)
    default = Pipeline(world, solver, SumCombiner(), conds, steps=5).run([0], progress=False)
    corrector = ScaledSum(1.0)
    same = Pipeline(world, solver, SumCombiner(), conds, steps=5, corrector_combiner=corrector).run([0], progress=False)
    assert corrector.calls == 4  # one corrector move after every step but the last
    assert torch.equal(same.samples, default.samples)  # the default is the sum
    other = Pipeline(world, solver, SumCombiner(), conds, steps=5, corrector_combiner=ScaledSum(3.0)).run(
        [0], progress=False)
    assert not torch.equal(other.samples, default.samples)


def test_build_context_defaults():
    ctx = BuildContext()
    assert ctx.device == torch.device("cpu") and ctx.model is None


class PathsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: zmagic_core.FilePath
    label: str = "x"


class PathsPlugin:
    @hookimpl
    def register_energies(self, register):
        register("paths", lambda context, **o: Brightness(0.0), options=PathsOptions)


def test_only_declared_path_options_are_rewritten(tmp_path, monkeypatch):
    (tmp_path / "recipes" / "ref.png").parent.mkdir()
    (tmp_path / "recipes" / "ref.png").write_bytes(b"")
    (tmp_path / "recipes" / "blue").mkdir()  # a folder that happens to share a label's name
    recipe_file = tmp_path / "recipes" / "r.yaml"
    recipe_file.write_text("conditions: [{kind: paths, image: ref.png, label: blue}]\n")
    monkeypatch.chdir(tmp_path)
    reg = Registry(load_entry_points=False)
    reg.register_plugin(PathsPlugin(), "paths")
    recipe = load_recipe(recipe_file, registry=reg)
    assert recipe.conditions[0].options == {"image": str(tmp_path / "recipes" / "ref.png"), "label": "blue"}


class NaNEnergy(zmagic_core.Energy):
    def forward(self, images):
        return images.mean(dim=(1, 2, 3)) * float("nan")


class NaNPlugin:
    @hookimpl
    def register_energies(self, register):
        register("nan-energy", lambda context, **o: NaNEnergy())


def test_a_condition_disabled_for_most_of_the_run_is_reported(tmp_path, monkeypatch, capsys):
    """Nothing is dropped silently: the record counts it, the terminal warns, the exit code is non-zero."""
    recipe = with_plugin(monkeypatch, tmp_path, NaNPlugin(), "model: {kind: shapes, size: 16}\nsolver: {kind: ddpm, "
                         "steps: 6}\nconditions: [{kind: shapes-attribute, name: red, attribute: color, value: red, "
                         "scale: 0.25}, {kind: nan-energy, name: broken}]\nnum_samples: 2\nprogress: false\n")
    assert main(["generate", str(recipe), "--out", str(tmp_path / "a")]) == 3
    err = capsys.readouterr().err
    assert "condition 'broken' was disabled" in err and "--allow-disabled" in err and "Traceback" not in err
    record = json.loads((tmp_path / "a" / "record.json").read_text())  # strict JSON: NaN energies became null
    assert record["problems"]["disabled_most"] == ["broken"]
    assert record["problems"]["disabled"]["broken"]["sample_steps"] == 12  # 2 samples x 6 steps
    assert "red" not in record["problems"]["disabled"]
    assert main(["generate", str(recipe), "--out", str(tmp_path / "b"), "--allow-disabled"]) == 0


def test_a_stacked_call_that_runs_out_of_memory_is_split_and_reported(tmp_path, monkeypatch, capsys):
    """CAGrad's stacked network calls are retried in halves on an out-of-memory error: the run completes, the
    terminal says how many points per call it went on with and how to start there, the record keeps it."""
    from zmagic_core.models.shapes import ShapesModel

    predict = ShapesModel.predict

    def small_device(self, x, t):
        if x.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return predict(self, x, t)

    monkeypatch.setattr(ShapesModel, "predict", small_device)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {kind: shapes}\nsolver: {kind: ddpm, steps: 4}\ncombiner: {kind: cagrad}\n"
                      "conditions: [{kind: shapes-attribute, attribute: color, value: red},"
                      " {kind: shapes-mask, reference: red circle center},"
                      " {kind: shapes-keypoints, reference: red circle center}]\nnum_samples: 2\nbatch_size: 2\n"
                      "progress: false\n")
    assert main(["generate", str(recipe), "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "ran out of device memory" in err and "combiner.stack=2" in err and "Traceback" not in err
    record = json.loads((tmp_path / "a" / "record.json").read_text())
    assert record["problems"]["stack_lowered_to"] == 2 and len(record["completed"]) == 2


class AliasedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    config_path: zmagic_core.FilePath = Field(alias="config")


class AliasedPlugin:
    @hookimpl
    def register_energies(self, register):
        register("aliased", lambda context, **o: None, options=AliasedOptions)


def test_an_aliased_path_option_resolves_by_either_name_and_errors_list_the_alias(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "c.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    reg = Registry(load_entry_points=False)
    reg.register_plugin(AliasedPlugin(), "aliased")
    for key in ("config", "config_path"):
        recipe_file = tmp_path / "recipes" / f"{key}.yaml"
        recipe_file.write_text(f"conditions: [{{kind: aliased, {key}: c.json}}]\n")
        recipe = load_recipe(recipe_file, registry=reg)
        assert recipe.conditions[0].options == {key: str(tmp_path / "recipes" / "c.json")}  # resolved either way
    (tmp_path / "recipes" / "bad.yaml").write_text("conditions: [{kind: aliased, config: c.json, colour: 1}]\n")
    with pytest.raises(ConfigError, match=r"aliased accepts: config\)"):
        load_recipe(tmp_path / "recipes" / "bad.yaml", registry=reg)


class BuildFails:
    @hookimpl
    def register_energies(self, register):
        def build(context, **options):
            raise zmagic_core.InputError("no face found in reference image blank.png")
        register("fails", build)


def test_generate_checks_files_before_loading_and_a_failed_build_leaves_no_folder(tmp_path, monkeypatch, capsys):
    import zmagic_core.app.runner as runner

    def no_build(*args, **kwargs):
        raise AssertionError("the pipeline was built although a file is missing")

    recipe = with_plugin(monkeypatch, tmp_path, BuildFails(), "model: {kind: shapes, size: 16}\nsolver: {kind: ddpm, "
                         "steps: 2}\nconditions: [{kind: shapes-style, reference: gone.png}]\n")
    with monkeypatch.context() as patch:
        patch.setattr(runner, "build_pipeline", no_build)
        assert main(["generate", str(recipe), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err == "zmagic: error: conditions.0.options.reference: file not found: gone.png\n"
    assert not (tmp_path / "a").exists()
    recipe.write_text("model: {kind: shapes, size: 16}\nsolver: {kind: ddpm, steps: 2}\nconditions: [{kind: fails}]\n")
    assert main(["generate", str(recipe), "--out", str(tmp_path / "b")]) == 2
    assert "no face found in reference image blank.png" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


# -- a plugin author's mistakes are named where they are made --------------------------------------
class FirstRowOnly(Combiner):
    """A combiner that drops the batch dimension (a plugin bug): its guidance has the wrong shape."""

    def combine(self, step):
        return Combined(torch.stack([g.detach() for g in step.base().grads]).sum(0)[0])


class Wide(zmagic_core.Energy):
    def forward(self, images):
        return images.flatten(2).mean(2)  # (B, 3): one value per channel, not per image


class Detached(zmagic_core.Energy):
    def forward(self, images):
        return images.detach().mean(dim=(1, 2, 3))


def test_a_combiner_or_energy_breaking_its_contract_stops_the_run_naming_it():
    world = ShapesModel(16)
    red = Condition("red", AttributeEnergy(world, "color", "red"), scale=0.25)
    mask = Condition("mask", MaskEnergy(world, "red circle center"), scale=0.25)
    with pytest.raises(ConfigError, match=r"combiner FirstRowOnly: its guidance has shape \(3, 16, 16\); it must "
                                          r"have the shape of x_t, \(2, 3, 16, 16\)"):
        Pipeline(world, DDPMSolver(), FirstRowOnly(), [red, mask], steps=3).run([0, 1], progress=False)
    with pytest.raises(ConfigError, match=r"condition 'wide': its energy returned a tensor of shape \(2, 3\)"):
        Pipeline(world, DDPMSolver(), SumCombiner(), [red, Condition("wide", Wide(), scale=0.25)],
                 steps=3).run([0, 1], progress=False)
    with pytest.raises(ConfigError, match="condition 'flat': its energy is not differentiable"):
        Pipeline(world, DDPMSolver(), SumCombiner(), [Condition("flat", Detached(), scale=0.25)],
                 steps=3).run([0, 1], progress=False)


class FailsInABatch(Combiner):
    """Sum, except that a batch of more than one sample raises: every sample then runs alone."""

    def combine(self, step):
        if step.x.shape[0] > 1:
            raise RuntimeError("CUDA out of memory (a stand-in)")
        return Combined(torch.stack([g.detach() for g in step.base().grads]).sum(0))


class BadFactories:
    @hookimpl
    def register_combiners(self, register):
        register("fails-in-a-batch", lambda context, **o: FailsInABatch())
        register("not-a-combiner", lambda context, **o: object())


def test_a_batch_rerun_sample_by_sample_is_said_and_a_factory_of_the_wrong_thing_is_one_line(tmp_path, monkeypatch,
                                                                                           capsys):
    recipe = with_plugin(monkeypatch, tmp_path, BadFactories(), "model: {kind: shapes, size: 16}\nsolver: {kind: ddpm, "
                         "steps: 3}\ncombiner: {kind: fails-in-a-batch}\nconditions: [{kind: shapes-attribute, "
                         "attribute: color, value: red}]\nnum_samples: 2\nbatch_size: 2\nprogress: false\n")
    assert main(["generate", str(recipe), "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "the batch of seeds" in err and "CUDA out of memory (a stand-in)" in err and "one by one" in err
    record = json.loads((tmp_path / "a" / "record.json").read_text())
    assert record["completed"] == [0, 1] and len(record["problems"]["batches_rerun"]) == 1
    assert main(["generate", str(recipe), "--out", str(tmp_path / "b"), "--set", "combiner.kind=not-a-combiner"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "combiner 'not-a-combiner' (plugin" in err and "built a object, which has no combine" in err


class Misspelt:
    def register_energy(self, register):  # neither the hook's name nor decorated
        register("never", lambda context, **o: None)


def test_a_plugin_that_registers_nothing_is_reported_with_what_it_has():
    reg = Registry(load_entry_points=False)
    reg.register_plugin(Misspelt(), "misspelt")
    (info,) = [p for p in reg.plugins() if p.name == "misspelt"]
    assert info.errors and "registers nothing" in info.errors[0] and "found register_energy" in info.errors[0]
    with pytest.raises(zmagic_core.UnknownComponentError, match="plugin.s. that failed to load: misspelt"):
        reg.get("energy", "never")


def test_joint_satisfaction_says_which_conditions_it_does_not_judge(registry, tmp_path, monkeypatch, capsys):
    """The shapes world's exact check knows p(c | k) for its own energies only: a plugin condition is named as
    not judged, so a 1.000 is not read as "every condition met"."""
    monkeypatch.setattr(registry_module, "_default", registry)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {kind: shapes, size: 16}\nsolver: {kind: ddpm, steps: 3}\nconditions: [{kind: "
                      "shapes-attribute, name: red, attribute: color, value: red}, {kind: test-brightness, name: bright, "
                      "level: 0.9}]\nnum_samples: 2\nprogress: false\n")
    assert main(["generate", str(recipe), "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "(over the shapes-world conditions only; bright not judged)" in out
    record = json.loads((tmp_path / "a" / "record.json").read_text())
    assert record["evaluation"]["shapes"]["summary"]["not_judged"] == ["bright"]
    assert set(record["evaluation"]["shapes"]["summary"]["satisfaction"]) == {"red"}
