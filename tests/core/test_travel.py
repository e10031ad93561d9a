"""Time travel in the quality benchmark: the `travel` rows repeat every guided step, the number of repeats
chosen by a sweep on held-out scenarios."""
import json

import pytest

from zmagic_core.app.bench import quality
from zmagic_core.method.combiners import CAGradCombiner, SumCombiner
from zmagic_core.models.shapes import ShapesModel


class Counting(SumCombiner):
    """Sum, counting its calls per timestep."""

    def __init__(self, calls):
        self.calls = calls

    def combine(self, step):
        self.calls[step.t] = self.calls.get(step.t, 0) + 1
        return super().combine(step)


@pytest.mark.parametrize("travel", [0, 2])
def test_a_travel_run_takes_every_guided_step_one_more_time_per_repeat(travel):
    scenario = next(s for s in quality.SCENARIOS if s["name"] == "4 conditions")
    calls: dict = {}
    run = quality.run_method(ShapesModel(32), scenario, "sum travel", [0, 1], 0.5, 6, 2, lambda: Counting(calls),
                             travel=travel)
    assert len(calls) == 6 and set(calls.values()) == {1 + travel}
    assert run["finite_samples"] == 2


def test_travel_labels_build_the_plain_combiner_and_run_on_the_three_and_four_condition_sets():
    assert isinstance(quality.make_combiner("cagrad c=0 travel"), CAGradCombiner)
    assert quality.make_combiner("cagrad c=0 travel").c == 0.0
    assert type(quality.make_combiner("sum travel")) is SumCombiner
    with_travel = {sc["name"] for sc in quality.SCENARIOS if any(m.endswith(quality.TRAVEL) for m in sc.get("methods", []))}
    assert with_travel == {"3 conditions", "4 conditions"}
    assert all(m in quality.METHOD_HELP for m in ("sum travel", "cagrad c=0 travel"))
    reported = {str(sc["conditions"]) for sc in quality.SCENARIOS}
    assert not any(str(sc["conditions"]) in reported for sc in quality.TRAVEL_TUNING)  # held out


def test_the_travel_sweep_picks_by_health_then_tv_then_the_fewest_repeats(monkeypatch):
    """The rule on made-up runs whose TV depends on the number of repeats."""
    def sweep(tv, unhealthy=()):
        def fake_run(world, scenario, method, seeds, scale, steps, batch_size, combiner=None, order=None, stage=None,
                     travel=0):
            return {"tv_all": tv[travel], "joint": 0.5, "on_manifold": 0.9 if travel in unhealthy else 1.0,
                    "fallbacks": 0, "nonfinite_steps": 0, "cpu_seconds": 0.0}
        monkeypatch.setattr(quality, "run_method", fake_run)
        return quality.travel_sweep(None, 4, 5, 4, 0.5, lambda line: None)

    assert sweep({0: 0.6, 1: 0.3, 2: 0.5})["travel"] == 1
    assert sweep({0: 0.6, 1: 0.3, 2: 0.5}, unhealthy=(1,))["travel"] == 2  # lowest TV, but off the manifold
    assert sweep({0: 0.6, 1: 0.305, 2: 0.3})["travel"] == 1  # tied: the fewest repeats
    assert sweep({0: 0.3, 1: 0.295, 2: 0.5})["travel"] == 0
    out = sweep({0: 0.6, 1: 0.3, 2: 0.5})
    assert len(out["rows"]) == len(quality.TRAVEL_SWEEP) * len(quality.TRAVEL_TUNING) * len(quality.TRAVEL_METHODS)
    page = "\n".join(quality.travel_section(out))
    assert "Chosen: **1 repeat(s) per step**" in page and "| 1 | 0.30 (j 0.50, m 1.00) |" in page
    assert "| 1 |" in page and "| mean TV | unhealthy runs |" in page


def test_a_run_without_travel_rows_has_no_travel_section_and_a_given_count_skips_the_sweep(tmp_path, monkeypatch):
    assert quality.travel_section(None) == []
    monkeypatch.setattr(quality, "travel_sweep", lambda *a, **k: pytest.fail("--travel given: no sweep"))
    out = tmp_path / "report"
    argv = ["--samples", "2", "--seeds-sets", "1", "--steps", "4", "--scale", "0.5", "--scenarios", "4 conditions",
            "--methods", "sum", "sum travel", "--travel", "1", "--out", str(out)]
    assert quality.main(argv) == 0
    page = (out / "benchmarks.md").read_text()
    assert "`--travel`): no sweep" in page and "Chosen: **1 repeat(s) per step**" in page
    assert "| sum travel |" in page
    results = json.loads((out / "benchmarks" / "quality.json").read_text())
    assert results["meta"]["travel_sweep"] == {"travel": 1}
    runs = results["results"]["4 conditions"]
    assert runs["sum travel"][0]["tv_all"] is not None and runs["sum"][0]["seeds"] == runs["sum travel"][0]["seeds"]


def test_the_flow_travel_example_recipe_repeats_every_step():
    """examples/shapes/flow-four-conditions-travel.yaml, as a user runs it: every step taken twice."""
    from pathlib import Path

    from zmagic_core.assembly.build import build_pipeline, load_recipe

    path = Path(__file__).resolve().parents[2] / "examples" / "shapes" / "flow-four-conditions-travel.yaml"
    pipe = build_pipeline(load_recipe(path, ["solver.steps=5"]))
    calls: dict = {}
    inner = pipe.combiner

    class Counted:  # the recipe's combiner, counting its calls per timestep
        def __getattr__(self, name):
            return getattr(inner, name)

        def combine(self, step):
            calls[step.t] = calls.get(step.t, 0) + 1
            return inner.combine(step)

    pipe.combiner = Counted()
    result = pipe.run([0, 1], batch_size=2, progress=False)
    assert len(calls) == 5 and set(calls.values()) == {2}
    assert not result.errors and len(result.trace[0]) == 5


def test_row_suffixes_combine_in_any_order_and_a_count_for_no_row_is_reported(tmp_path, capsys):
    assert quality.split_label("cagrad c=0 travel staged") == ("cagrad c=0", {quality.STAGED, quality.TRAVEL})
    assert quality.split_label("sum staged travel") == ("sum", {quality.STAGED, quality.TRAVEL})
    assert quality.make_combiner("cagrad c=0.5 travel staged").c == 0.5
    argv = ["--samples", "2", "--seeds-sets", "1", "--steps", "3", "--scale", "0.5", "--scenarios", "attr+mask",
            "--methods", "sum", "--travel", "1", "--out", str(tmp_path / "report")]
    assert quality.main(argv) == 0
    assert "--travel 1 has no effect: no travel row runs on the chosen scenarios and methods" in capsys.readouterr().out
