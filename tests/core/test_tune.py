"""`zmagic tune`: the beam search finds a known optimum of a synthetic objective (with and without a
constraint), a tiny tune on the shapes world writes a runnable best recipe and a held-out comparison,
a killed tune resumes reusing its finished candidates, and bad tune sections fail in one line."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from zmagic_core.app.cli import main
from zmagic_core.app.tune import (BeamSearch, GridSearch, ObjectiveSpec, ParameterSpec, StrategySpec, Trial,
                                  make_strategy, search)
from zmagic_core.contracts.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "experiments"


# -- strategies on a synthetic objective ----------------------------------------------------------
SPACE = [ParameterSpec(path="a", start=0.05, factor=2, maximum=3.2),
         ParameterSpec(path="b", start=0.05, factor=2, maximum=3.2)]   # 7 x 7 grid: 0.05 .. 3.2


def bowl(params):
    """A bowl in log2 space with its minimum at a = 0.4, b = 1.6 (grid indices 3 and 5)."""
    return (math.log2(params["a"] / 0.4)) ** 2 + 0.5 * (math.log2(params["b"] / 1.6)) ** 2


def evaluations(strategy, loss=bowl, violation=lambda p: 0.0):
    calls = []

    def evaluate(params, round_):
        calls.append((round_, dict(params)))
        return Trial(params, loss(params), violation(params))
    history = search(strategy, evaluate)
    return history, calls


def test_grid_is_tfg_log_grid():
    assert SPACE[0].grid() == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2]
    assert ParameterSpec(path="x", start=0.1, factor=3, maximum=1).grid() == [0.1, 0.3, 0.9]
    assert ParameterSpec(path="x", values=[0.2, 0.5, "none"]).grid() == [0.2, 0.5, "none"]


def test_beam_search_finds_the_known_optimum_with_fewer_evaluations_than_the_grid():
    history, calls = evaluations(BeamSearch(SPACE, beam=2, rounds=12))
    best = min(history, key=Trial.rank)
    assert best.params == {"a": 0.4, "b": 1.6} and best.loss == 0.0
    assert calls[0] == (0, {"a": 0.05, "b": 0.05})             # TFG: everything starts at the smallest value
    assert len({json.dumps(p, sort_keys=True) for _, p in calls}) == len(calls)  # never the same candidate twice
    assert len(calls) <= 26                                     # of the 49 grid points
    # the search stopped because the beam had no untried move left, not at the round limit
    assert max(r for r, _ in calls) < 12
    # the exhaustive grid agrees on the optimum, with every point evaluated
    grid_history, grid_calls = evaluations(GridSearch(SPACE))
    assert len(grid_calls) == 49 and min(grid_history, key=Trial.rank).params == best.params


def test_beam_rounds_directions_and_width():
    # one round: the start, then its one-step moves up (one per parameter)
    _, calls = evaluations(BeamSearch(SPACE, beam=2, rounds=1))
    assert calls == [(0, {"a": 0.05, "b": 0.05}), (1, {"a": 0.1, "b": 0.05}), (1, {"a": 0.05, "b": 0.1})]
    # the loss rises as a grows: with moves up only, a stays at the start; both directions come back down
    slope = lambda p: p["a"] + (math.log2(p["b"] / 0.2)) ** 2  # noqa: E731
    up, _ = evaluations(BeamSearch(SPACE, beam=1, rounds=10), slope)
    assert min(up, key=Trial.rank).params == {"a": 0.05, "b": 0.2}
    both, calls = evaluations(BeamSearch([ParameterSpec(path="a", values=[1, 2, 3, 4, 5])], beam=1, rounds=10,
                                         directions="both"), lambda p: abs(p["a"] - 3))
    assert min(both, key=Trial.rank).params == {"a": 3}
    assert [p["a"] for _, p in calls] == [1, 2, 3, 4]           # up to 4, worse than 3: no untried move left
    with pytest.raises(ConfigError, match="directions up\\|both"):
        BeamSearch(SPACE, directions="sideways")


def test_beam_search_respects_a_constraint():
    # the unconstrained optimum a = 0.4 is infeasible when a <= 0.2 is required: the best feasible is a = 0.2
    history, _ = evaluations(BeamSearch(SPACE, beam=3, rounds=12), violation=lambda p: max(0.0, p["a"] - 0.2))
    best = min(history, key=Trial.rank)
    assert best.params == {"a": 0.2, "b": 1.6} and best.feasible
    assert any(not t.feasible for t in history)                 # it looked past the boundary and ranked those last


def test_objective_value_loss_and_violation():
    obj = ObjectiveSpec(maximize={"joint": 1.0, "tv": -0.5}, constraints=["on >= 0.95", "e < 2"])
    m = {"joint": 0.8, "tv": 0.4, "on": 0.9, "e": 2.0}
    assert obj.value(m) == pytest.approx(0.6) and obj.loss(m) == pytest.approx(-0.6)
    assert obj.violation(m) == pytest.approx(0.05 + 1e-12)        # on misses by 0.05; e < 2 fails at equality
    assert obj.violation({**m, "on": 0.95, "e": 1.0}) == 0.0
    assert obj.violation({"joint": 1, "tv": 0}) == math.inf      # a missing metric never counts as met
    assert math.isnan(obj.value({"joint": 1.0}))


class Halving:
    """A user strategy (``package.module:Class``): halves x from its start, three times."""

    def __init__(self, space, x0=8.0):
        self.x0 = x0

    def propose(self, history):
        return [] if len(history) >= 3 else [{"x": self.x0 / 2 ** len(history)}]


def test_a_strategy_given_as_module_and_class():
    strategy = make_strategy(StrategySpec(kind=f"{__name__}:Halving", x0=4.0), SPACE)
    history, _ = evaluations(strategy, loss=lambda p: p["x"])
    assert [t.params["x"] for t in history] == [4.0, 2.0, 1.0]
    with pytest.raises(ConfigError, match="unknown strategy 'anneal'"):
        make_strategy(StrategySpec(kind="anneal"), SPACE)
    with pytest.raises(ConfigError, match="does not take these options"):
        make_strategy(StrategySpec(kind="beam", temperature=3), SPACE)


# -- a tiny tune on the shapes world -------------------------------------------------------------------
ROWS = [
    {"id": "red", "conditions.0.value": "red", "conditions.1.reference": "red circle center"},
    {"id": "blue", "conditions.0.value": "blue", "conditions.1.reference": "blue square top-left"},
    {"id": "green", "conditions.0.value": "green", "conditions.1.reference": "green triangle bottom"},
]


def tiny(folder: Path, **tune) -> Path:
    spec = {
        "name": "tiny",
        "recipe": {"model": {"kind": "shapes", "size": 16}, "solver": {"kind": "ddpm", "steps": 24},
                   "combiner": {"kind": "sum"},
                   "conditions": [{"kind": "shapes-attribute", "name": "attr", "attribute": "color", "value": "red",
                                   "scale": 0.25},
                                  {"kind": "shapes-mask", "name": "mask", "reference": "red circle center",
                                   "scale": 0.25}],
                   "batch_size": 2},
        "rows": ROWS, "variants": [{"name": "sum", "set": {"combiner.kind": "sum"}}],
        "seed": 1, "samples_per_row": 2, "threads": 1, "evaluation": {"bootstrap": 200, "oracle": False},
        "tune": {"objective": {"minimize": {"tv_distance": 1.0}, "constraints": ["on_manifold >= 0.5"]},
                 "space": [{"path": ["conditions.0.scale", "conditions.1.scale"], "name": "scale",
                            "start": 0.1, "factor": 4, "maximum": 1.6}],
                 "strategy": {"kind": "beam", "beam": 1, "rounds": 1},
                 "validation": ["red", "blue"], "candidate": {"samples_per_row": 2, "steps": 20}, **tune},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tune.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sample_stamps(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "candidates").rglob("sample_*.npy")}


def test_tiny_tune_writes_best_recipe_table_figure_and_held_out_comparison(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["tune", str(tiny(tmp_path)), "--out", str(out)]) == 0
    result = json.loads((out / "tune.json").read_text())
    assert [c["params"] for c in result["candidates"]] == [{"scale": 0.1}, {"scale": 0.4}]
    assert result["validation_rows"] == ["red", "blue"] and result["held_out_rows"] == ["green"]
    for c in result["candidates"] + [result["default"]]:
        assert set(c["metrics"]) >= {"tv_distance", "on_manifold", "joint_satisfaction"} and not c["reused"]
        assert c["set"]["solver.steps"] == 20
    # the candidate with the lowest TV among the feasible ones is the best
    feasible = [c for c in result["candidates"] if c["feasible"]]
    assert result["best"]["objective"] == min(c["objective"] for c in feasible)
    scale = result["best"]["params"]["scale"]
    # best.yaml is a recipe `zmagic generate` runs, with the tuned scale on both conditions and the full steps
    assert main(["check", str(out / "best.yaml")]) == 0
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert [c["scale"] for c in best["conditions"]] == [scale, scale] and best["solver"]["steps"] == 24
    tuned = yaml.safe_load((out / "tuned-experiment.yaml").read_text())
    assert [v["name"] for v in tuned["variants"]] == ["sum-untuned", "sum-tuned"] and "tune" not in tuned
    lines = (out / "candidates.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 1 + 2 and lines[0].startswith("#,round,id,scale,objective,feasible")
    assert (out / "objective.png").stat().st_size > 5000
    held = result["held_out"]["table"]["tv_distance"]
    assert held["untuned"]["rows"] == 1 and held["difference"]["value"] == pytest.approx(
        held["tuned"]["value"] - held["untuned"]["value"])
    report = (out / "report.md").read_text()
    assert "## Held-out rows" in report and "Verdict:" in report and "objective.png" in report


def test_a_killed_tune_resumes_and_reuses_its_finished_candidates(tmp_path):
    path = tiny(tmp_path, strategy={"kind": "beam", "beam": 1, "rounds": 2}, held_out=[])  # search only
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", ZMAGIC_LOAD_PLUGINS="")
    proc = subprocess.Popen([sys.executable, "-m", "zmagic_core", "tune", str(path), "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if len(list(out.glob("candidates/*/candidate.json"))) >= 2:  # the untuned recipe and the first candidate
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the tune finished before it could be killed: " + proc.stderr.read().decode()[-500:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name for p in out.glob("candidates/*/candidate.json")}
    before = sample_stamps(out)
    assert not (out / "tune.json").exists() and len(finished) >= 2
    assert main(["tune", str(path), "--out", str(out)]) == 0
    result = json.loads((out / "tune.json").read_text())
    after = sample_stamps(out)
    for c in [result["default"]] + result["candidates"]:
        assert c["reused"] == (c["id"] in finished), c
    # finished candidates were not recomputed: their samples are the same files, untouched
    kept = {k: v for k, v in before.items() if k.split("/")[1] in finished}
    assert kept and all(after[k] == v for k, v in kept.items())
    # a rerun reuses everything and decides the same; a candidate whose result was damaged runs again
    damaged = result["candidates"][0]["id"]
    (out / "candidates" / damaged / "candidate.json").write_text("{")
    assert main(["tune", str(path), "--out", str(out)]) == 0
    again = json.loads((out / "tune.json").read_text())
    assert [c["reused"] for c in again["candidates"]] == [c["id"] != damaged for c in again["candidates"]]
    assert again["best"]["params"] == result["best"]["params"]
    assert [c["metrics"] for c in again["candidates"]] == [c["metrics"] for c in result["candidates"]]
    assert sample_stamps(out) == after  # its samples were complete: read again, not redrawn


# -- bad tune sections -----------------------------------------------------------------------------
@pytest.mark.parametrize("tune, message", [
    ({"strategy": {"kind": "anneal"}}, "tune.strategy.kind: unknown strategy 'anneal'"),
    ({"objective": {"minimize": {"tv_distance": 1}, "constraints": ["on_manifold about 0.9"]}},
     "constraint 'on_manifold about 0.9' must look like 'metric >= number'"),
    ({"objective": {"minimize": {"tv_distance": 1}, "maximize": {"joint_satisfaction": 1}}},
     "give exactly one of minimize or maximize"),
    ({"space": [{"path": "conditions.0.scale", "start": 1.0, "maximum": 0.5}]}, "maximum (0.5) is below start (1.0)"),
    ({"space": [{"path": "conditions.0.scale", "start": 0.1}]}, "a log grid needs maximum"),
    ({"space": [{"path": "conditions.5.scale", "start": 0.1, "maximum": 1}]},
     "tune.space conditions.5.scale: variant candidate"),
    ({"validation": ["red", "purple"]}, "tune.validation: no row with id 'purple'"),
    ({"held_out": ["red"]}, "rows red are both validation and held-out rows"),
    ({"variant": "cagrad"}, "tune.variant: no variant 'cagrad'; variants: sum"),
    ({"candidate": {"samples_per_row": 0}},
     "tune.candidate.samples_per_row: Input should be greater than or equal to 1"),
    ({"budget": 3}, "tune.budget: Extra inputs are not permitted"),
    ({"objective": {"minimize": {"tvd": 1}}}, "tune.objective names metric(s) tvd that the evaluators did not report"),
])
def test_bad_tune_sections_fail_in_one_line(tmp_path, capsys, tune, message):
    out = tmp_path / "out"
    assert main(["tune", str(tiny(tmp_path, **tune)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zmagic: error: ") and "\n" not in err and message in err, err
    assert "Traceback" not in err


def test_an_experiment_without_a_tune_section_is_refused(tmp_path, capsys):
    assert main(["tune", str(EXAMPLES / "shapes.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "has no tune section" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_example_tune_file_is_checked_without_sampling():
    from zmagic_core.app.tune import read_tune

    tune = read_tune(EXAMPLES / "shapes-tune.yaml")
    assert len(tune.validation) == 6 and len(tune.held_out) == 6
    assert not {r.key for r in tune.validation} & {r.key for r in tune.held_out}
    staging = read_tune(EXAMPLES / "shapes-staging-tune.yaml")  # a window searched like any recipe path
    assert [(p.path, p.values[0], p.values[-1]) for p in staging.spec.space] == [("conditions.0.start", 1000, 400)]


# -- the quality benchmark's tuned mode ----------------------------------------------------------------
def test_bench_tuned_mode_tunes_each_method_and_reports_both_scales(monkeypatch):
    from zmagic_core.app.bench import quality

    best = {"sum": 0.4, "dep 1>2": 0.1}

    def fake_run(world, scenario, method, seeds, scale, steps, batch_size, combiner=None, order=None):
        # TV smallest at the method's own best scale; off the manifold above 0.8
        tv = 0.2 + 0.1 * abs(math.log2(scale / best[method])) + (0.0 if method == "dep 1>2" else 0.05)
        return {"tv_all": tv, "on_manifold": 1.0 if scale <= 0.8 else 0.5, "joint_on_manifold": 1 - tv,
                "cpu_seconds": 0.0}

    monkeypatch.setattr(quality, "run_method", fake_run)
    tuned = quality.tune_methods(None, [("sum", None), ("dep 1>2", None)], 4, 5, 4, lambda m: None)
    assert {m: t["scale"] for m, t in tuned.items()} == best
    assert all(t["feasible"] for t in tuned.values())
    assert all(len({r["scale"] for r in t["trials"]}) == len(t["trials"]) for t in tuned.values())
    equal = {"attr+mask": {m: [fake_run(None, None, m, None, 0.5, 0, 0)] for m in best}}
    own = {"attr+mask": {m: [fake_run(None, None, m, None, best[m], 0, 0)] for m in best}}
    text = "\n".join(quality.tuned_section({"samples": 4, "methods": tuned, "results": own}, equal, 0.5))
    assert "| attr+mask | sum (own scale 0.4) | 0.282 | 0.250 |" in text
    # dependent: TV 0.432 at the equal scale (sum 0.282), 0.2 at its own (sum 0.25)
    assert "attr+mask: +0.150 at equal scale, -0.050 at own scales" in text
    assert "dep 1>2` has the lower TV in 0 of 1 scenarios, at each method's own best scale in 1 of 1" in text
    assert "At equal scale it had no advantage" in text


def test_a_tune_refuses_an_output_folder_of_other_files(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "recipe.json").write_text("{}")  # say, a `zmagic generate` run folder
    assert main(["tune", str(tiny(tmp_path)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "output folder" in err and "holds other files (recipe.json)" in err and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["recipe.json"]
