"""Staged guidance in the quality benchmark: the layout conditions guide from the first step, the appearance
conditions only from the staged start down, the start chosen by a sweep on held-out scenarios."""
import pytest

from zmagic_core.app.bench import quality
from zmagic_core.method.combiners import CAGradCombiner, SumCombiner
from zmagic_core.models.shapes import ShapesModel


class Watching(SumCombiner):
    """Sum, recording which conditions are active at each step."""

    def __init__(self, seen):
        self.seen = seen

    def combine(self, step):
        self.seen[step.t] = {c.name for c in step.conditions}
        return super().combine(step)


@pytest.mark.parametrize("stage", [None, 600])
def test_a_staged_run_holds_the_appearance_conditions_back_until_the_start(stage):
    scenario = next(s for s in quality.SCENARIOS if s["name"] == "3 conditions")  # circle, style, kp
    seen: dict = {}
    quality.run_method(ShapesModel(32), scenario, "sum staged", [0], 0.5, 20, 1, lambda: Watching(seen), stage=stage)
    assert seen and all(names == ({"circle", "style", "kp"} if stage is None or t <= stage else {"kp"})
                        for t, names in seen.items())
    assert any(t > 600 for t in seen) and any(t <= 600 for t in seen)


def test_staged_labels_build_the_plain_combiner():
    assert isinstance(quality.make_combiner("cagrad c=0 staged"), CAGradCombiner)
    assert quality.make_combiner("cagrad c=0 staged").c == 0.0
    assert quality.method_order("dep 1>2 staged", 2) == [0, 1]
    for sc in quality.SCENARIOS:  # staged rows only where layout and appearance conditions meet
        kinds = {kind in quality.LAYOUT_KINDS for _, kind, _ in sc["conditions"]}
        staged = [m for m in sc.get("methods", []) if m.endswith(quality.STAGED)]
        assert bool(staged) == (kinds == {True, False}), sc["name"]
        assert all(m in quality.METHOD_HELP for m in staged)


def test_the_staging_sweep_picks_by_health_then_tv_then_no_staging_then_the_earliest_start(monkeypatch):
    """The rule on made-up runs whose TV depends on the start."""
    def sweep(tv, unhealthy=()):
        def fake_run(world, scenario, method, seeds, scale, steps, batch_size, combiner=None, order=None, stage=None):
            return {"tv_all": tv[stage], "joint": 0.5, "on_manifold": 0.9 if stage in unhealthy else 1.0,
                    "fallbacks": 0, "nonfinite_steps": 0, "cpu_seconds": 0.0}
        monkeypatch.setattr(quality, "run_method", fake_run)
        return quality.staging_sweep(None, 4, 5, 4, 0.5, lambda line: None)

    base = {v: 0.6 for v in quality.STAGE_SWEEP}
    assert sweep({**base, 600: 0.3})["stage"] == 600
    assert sweep({**base, 600: 0.3}, unhealthy=(600,))["stage"] is None  # lowest TV, but off the manifold
    assert sweep({**base, 600: 0.3, 700: 0.305, 500: 0.301})["stage"] == 700  # tied: the earliest start
    assert sweep({**base, None: 0.595})["stage"] is None  # tied with no staging: no staging
    out = sweep({**base, 600: 0.3})
    assert len(out["rows"]) == len(quality.STAGE_SWEEP) * len(quality.STAGE_TUNING) * len(quality.STAGE_METHODS)
    page = "\n".join(quality.staging_section(out))
    assert "Chosen: **t <= 600**" in page and "| t <= 600 | 0.30 (j 0.50) |" in page


def test_the_staged_example_recipe_holds_its_appearance_conditions_back():
    """examples/shapes/three-conditions-staged.yaml: per-condition windows, as a user writes them."""
    from pathlib import Path

    from zmagic_core.assembly.build import build_pipeline, load_recipe

    path = Path(__file__).resolve().parents[2] / "examples" / "shapes" / "three-conditions-staged.yaml"
    pipe = build_pipeline(load_recipe(path, ["solver.steps=10"]))
    result = pipe.run([0, 1], batch_size=2, progress=False)
    guided = [set(rec["grad_norm"]) for rec in result.trace[0]]
    assert len(guided) == len(pipe.schedule.timesteps)
    for t, names in zip(pipe.schedule.timesteps, guided):
        assert names == ({"kp"} if t > 600 else {"kp", "circle", "style"}), t


def test_a_run_without_staged_rows_has_no_staging_section():
    assert quality.staging_section(None) == []
    assert "`--staged-start`" in "\n".join(quality.staging_section({"stage": 700}))
