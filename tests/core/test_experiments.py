"""Experiments: files checked like recipes, manifests, seeds independent of how the work is cut,
a pre-flight that reports everything and leaves nothing, refusal of a changed experiment, two
processes (torchrun, gloo) byte-identical to one, killed runs that resume to the same bytes."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from zmagic_core.app.experiment import read_experiment, sample_seed
from zmagic_core.app.experiment_command import main
from zmagic_core.files.atomic import WRITE_DELAY_ENV, is_temporary

RECIPE = {
    "model": {"kind": "shapes", "size": 16},
    "solver": {"kind": "ddpm", "steps": 10},
    "combiner": {"kind": "sum"},
    "conditions": [
        {"kind": "shapes-attribute", "name": "attr", "attribute": "color", "value": "red", "scale": 0.2},
        {"kind": "shapes-mask", "name": "mask", "reference": "red circle center", "scale": 0.2},
    ],
    "batch_size": 2,
}
ROWS = [
    {"id": "red", "conditions.0.value": "red", "conditions.1.reference": "red circle center"},
    {"conditions.0.value": "blue", "conditions.1.reference": "blue square top-left"},
    {"id": "green", "conditions.0.attribute": "shape", "conditions.0.value": "triangle",
     "conditions.1.reference": "green triangle bottom", "seeds": [5, 6, 7]},
]
EXPERIMENT = {
    "name": "tiny",
    "recipe": RECIPE,
    "manifest": "rows.jsonl",
    "variants": [{"name": "sum", "set": {"combiner.kind": "sum"}},
                 {"name": "dependent", "set": {"combiner.kind": "dependent"}}],
    "seed": 3,
    "samples_per_row": 3,
    "threads": 1,
    "evaluation": {"bootstrap": 200},
}


def write_experiment(folder: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = changes.pop("rows_", ROWS)
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump({**EXPERIMENT, **changes}))
    return path


def sample_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("sample_*"))}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("zmagic: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- the file ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,expected", [
    ({"samples_per_row": 0}, "samples_per_row: Input should be greater than or equal to 1 (got 0)"),
    ({"variants": [{"name": "a b"}]}, "variants.0.name: String should match pattern"),
    ({"variants": [{"name": "x"}, {"name": "x"}]}, "variant names must be unique; repeated: x"),
    ({"manifest": "rows.txt"}, "manifest: manifest must be a .jsonl or .csv file"),
    ({"colour": 1}, "colour: Extra inputs are not permitted"),
    ({"rows_": [{"conditions.0.value": "red", "not a path": 1}]}, "rows.jsonl line 1: 'not a path' is not a recipe path"),
    ({"rows_": [{"seeds": [1]}]}, "rows.jsonl line 1: seeds lists 1 seeds, the experiment needs 3"),
    # a variant named like the folder's own files (or the oracle's key in metrics.json) would collide with them
    ({"variants": [{"name": "sum"}, {"name": "oracle"}]}, "variants.1.name: 'oracle' is reserved"),
    ({"variants": [{"name": "figures"}]}, "variants.0.name: 'figures' is reserved"),
    ({"variants": [{"name": "Report.md"}]}, "variants.0.name: 'Report.md' is reserved"),
    ({"variants": [{"name": "metrics.json"}]}, "variants.0.name: 'metrics.json' is reserved"),
    ({"variants": [{"name": "experiment.json"}]}, "variants.0.name: 'experiment.json' is reserved"),
    # what the experiment decides is refused in a row or a variant, never silently overwritten
    ({"rows_": [{"seeds": [1, 2, 3, 4]}]}, "rows.jsonl line 1: seeds lists 4 seeds, the experiment needs 3"),
    ({"rows_": [{"id": "a", "seed": 5}]}, "rows.jsonl line 1: 'seed' cannot be set by a row: sample seeds come "
                                          "from the experiment's seed (or a row's own `seeds` list)"),
    ({"rows_": [{"num_samples": 2}]}, "rows.jsonl line 1: 'num_samples' cannot be set by a row: the number of "
                                      "samples per row is the experiment's samples_per_row"),
    ({"rows_": [{"seeds.0": 2}]}, "rows.jsonl line 1: 'seeds.0' cannot be set by a row"),
    ({"variants": [{"name": "a", "set": {"seed": 1}}]}, "variants.0.set: 'seed' cannot be set by a variant"),
    ({"variants": [{"name": "a", "set": {"output": "x"}}]}, "variants.0.set: 'output' cannot be set by a variant"),
])
def test_a_bad_experiment_file_fails_in_one_line_naming_the_field(tmp_path, capsys, change, expected):
    path = write_experiment(tmp_path, **change)
    assert main(["experiment", str(path), "--out", str(tmp_path / "out")]) == 2
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_csv_and_jsonl_manifests_give_the_same_rows_and_resolve_paths_against_their_folder(tmp_path):
    data = tmp_path / "data"
    (data / "refs").mkdir(parents=True)
    (data / "refs" / "x.png").write_bytes(b"")
    (data / "rows.csv").write_text("id,conditions.0.value,conditions.0.scale,conditions.1.reference,seeds\n"
                                   "a,red,0.3,refs/x.png,1 2 3\n"
                                   "b,blue,,blue square top,\n")
    (data / "rows.jsonl").write_text(json.dumps({"id": "a", "conditions.0.value": "red", "conditions.0.scale": 0.3,
                                                 "conditions.1.reference": "refs/x.png", "seeds": [1, 2, 3]}) + "\n"
                                     + json.dumps({"id": "b", "conditions.0.value": "blue",
                                                   "conditions.1.reference": "blue square top"}) + "\n")
    spec = {**EXPERIMENT, "manifest": "data/rows.csv"}
    from_csv = read_experiment(spec_file(tmp_path, spec))
    from_jsonl = read_experiment(spec_file(tmp_path, {**spec, "manifest": "data/rows.jsonl"}))
    assert [(r.key, r.values, r.seeds) for r in from_csv.rows] == [(r.key, r.values, r.seeds) for r in from_jsonl.rows]
    a, b = from_csv.rows
    assert a.values["conditions.1.reference"] == str((data / "refs" / "x.png").resolve())
    assert b.values["conditions.1.reference"] == "blue square top"  # a name, not a file
    recipe = from_csv.recipe("dependent", a)
    assert recipe.conditions[0].options["value"] == "red" and recipe.conditions[0].scale == 0.3
    assert recipe.combiner.kind == "dependent" and recipe.seeds == [1, 2, 3]


@pytest.mark.parametrize("lines,expected", [
    ("a,red\n", "rows.csv line 2: 2 cell(s), the header has 3 columns"),
    ("a,red,0.3\nb,blue\n", "rows.csv line 3: 2 cell(s), the header has 3 columns"),
    ("a,red,0.3,x\n", "rows.csv line 2: 4 cell(s), the header has 3 columns"),
    ("a,red,0.3\n\nb\n", "rows.csv line 4: 1 cell(s), the header has 3 columns"),  # blank lines counted
])
def test_a_csv_row_with_the_wrong_number_of_cells_is_refused_naming_file_and_line(tmp_path, capsys, lines, expected):
    (tmp_path / "rows.csv").write_text("id,conditions.0.value,conditions.0.scale\n" + lines)
    path = spec_file(tmp_path, {**EXPERIMENT, "manifest": "rows.csv"})
    assert main(["experiment", str(path), "--out", str(tmp_path / "out")]) == 2
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_csv_empty_cells_keep_the_base_value_and_blank_lines_are_skipped(tmp_path, capsys):
    (tmp_path / "rows.csv").write_text("id,conditions.0.value,conditions.0.scale\na,,0.3\n   \nb,'',\n")
    exp = read_experiment(spec_file(tmp_path, {**EXPERIMENT, "manifest": "rows.csv"}))
    a, b = exp.rows
    assert a.values == {"conditions.0.scale": 0.3} and b.values == {"conditions.0.value": ""}
    assert exp.recipe("sum", a).conditions[0].options["value"] == "red"  # the base recipe's
    (tmp_path / "rows.csv").write_text("id,conditions.0.value,id\na,red,b\n")
    assert main(["experiment", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "rows.csv line 1: column(s) 'id' given twice" in one_line_error(capsys)


def spec_file(folder: Path, spec: dict) -> Path:
    path = folder / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_sample_seeds_depend_only_on_experiment_seed_row_and_index(tmp_path):
    exp = read_experiment(write_experiment(tmp_path))
    small = read_experiment(write_experiment(tmp_path / "b", samples_per_row=2, batch_size=1, rows_=ROWS[:2]))
    row = exp.rows[1]
    assert exp.seeds(row) == [sample_seed(3, "row-0001", i) for i in range(3)]
    assert small.seeds(small.rows[1]) == exp.seeds(row)[:2]          # more samples extend, never reshuffle
    assert exp.seeds(exp.rows[2]) == [5, 6, 7]                        # a row's own seeds
    assert len({s for r in exp.rows[:2] for s in exp.seeds(r)}) == 6  # rows differ
    assert sample_seed(4, "row-0001", 0) != sample_seed(3, "row-0001", 0)


# -- pre-flight ---------------------------------------------------------------------------------------
def test_preflight_reports_every_missing_input_together_and_leaves_nothing(tmp_path, capsys):
    rows = [dict(ROWS[0], **{"conditions.1.reference": "refs/missing.png"}), ROWS[1]]
    path = write_experiment(tmp_path, rows_=rows, variants=[
        {"name": "ok", "set": {}},
        {"name": "bad-combiner", "set": {"combiner.kind": "no-such-combiner"}},
        {"name": "no-plugin", "set": {"conditions.1.kind": "clip-text-xl"}},
    ])
    out = tmp_path / "out"
    assert main(["experiment", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pre-flight found 3 problem(s); nothing was generated" in err
    assert "refs/missing.png" in err and "file not found" in err
    assert "unknown combiner kind 'no-such-combiner'" in err
    assert "unknown energy kind 'clip-text-xl'" in err
    assert not out.exists()


# -- generation -------------------------------------------------------------------------------------
def test_experiment_runs_resumes_and_refuses_a_changed_experiment(tmp_path, capsys):
    path = write_experiment(tmp_path)
    out = tmp_path / "out"
    assert main(["experiment", str(path), "--out", str(out)]) == 0
    capsys.readouterr()
    folders = sorted(str(p.relative_to(out)) for p in out.glob("*/*") if p.is_dir())
    assert folders == ["dependent/green", "dependent/red", "dependent/row-0001",
                       "sum/green", "sum/red", "sum/row-0001"]
    record = json.loads((out / "sum" / "green" / "record.json").read_text())
    assert record["seeds"] == [5, 6, 7] and record["completed"] == [0, 1, 2]
    first = sample_files(out)
    assert len(first) == 2 * 3 * 3 * 3
    (out / "sum" / "red" / "sample_0001.json").unlink()  # resume: only that sample again, the same bytes
    stamp = (out / "sum" / "red" / "sample_0000.npy").stat().st_mtime_ns
    assert main(["experiment", str(path), "--out", str(out), "--no-eval"]) == 0
    assert sample_files(out) == first
    assert (out / "sum" / "red" / "sample_0000.npy").stat().st_mtime_ns == stamp
    # more samples per row extend the folders; a changed seed, row or variant is refused in one line
    capsys.readouterr()
    assert main(["experiment", str(write_experiment(tmp_path, seed=4)), "--out", str(out)]) == 2
    assert "differs in: seed (3 -> 4)" in one_line_error(capsys)
    changed = [dict(ROWS[0], **{"conditions.0.value": "blue"})] + ROWS[1:]
    assert main(["experiment", str(write_experiment(tmp_path, rows_=changed)), "--out", str(out)]) == 2
    assert "row red (changed)" in one_line_error(capsys)
    assert main(["experiment", str(write_experiment(tmp_path, variants=EXPERIMENT["variants"][:1])),
                 "--out", str(out)]) == 2
    assert "variant dependent (removed)" in one_line_error(capsys)
    assert sample_files(out) == first


def test_evaluation_writes_metrics_report_and_figures_with_the_oracle(tmp_path, capsys):
    path = write_experiment(tmp_path)
    out = tmp_path / "out"
    assert main(["experiment", str(path), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["variants"]) == {"sum", "dependent"} and set(metrics["reference"]) == {"oracle"}
    for key in ("joint_satisfaction", "on_manifold", "tv_distance", "guide:attr", "guide:mask"):
        for variant in ("sum", "dependent", "oracle"):
            entry = metrics["summary"][variant][key]
            assert entry["rows"] == 3 and entry["low"] <= entry["value"] <= entry["high"], (variant, key)
    assert metrics["metrics"]["tv_distance"]["independent"] and not metrics["metrics"]["guide:mask"]["independent"]
    assert metrics["metrics"]["guide:mask"]["evaluator"].startswith("guide: shapes-mask")
    assert set(metrics["energy_curves"]["oracle"]) == {"attr", "mask"}
    report = (out / "report.md").read_text()
    assert "| oracle (exact conditional, reference) |" in report and "TV distance" in report
    assert "no: the guiding network judging itself" in report
    for name in ("energy.png", "metric_tv_distance.png", "metric_joint_satisfaction.png"):
        assert (out / "figures" / name).stat().st_size > 1000
    # `zmagic eval` again: the same numbers (bootstrap seeded), and the table printed
    before = metrics["summary"]
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert "| variant |" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["summary"] == before


def test_bootstrap_interval_known_answers():
    from zmagic_core.app.evaluation import bootstrap

    assert bootstrap([2.0, 2.0, 2.0], 500, 0.95, 0) == {"value": 2.0, "low": 2.0, "high": 2.0, "rows": 3}
    # two rows 0 and 10: resampled means are 0, 5, 10 with probabilities 1/4, 1/2, 1/4
    two = bootstrap([0.0, 10.0], 4000, 0.95, 1)
    assert two["value"] == 5.0 and two["low"] == 0.0 and two["high"] == 10.0
    assert bootstrap([0.0, 10.0], 4000, 0.4, 1)["low"] == 5.0        # the central 40% is all 5
    assert bootstrap([1.0, float("nan"), 3.0], 100, 0.95, 0)["rows"] == 2  # a row with no value is left out
    big = bootstrap(list(range(100)), 2000, 0.95, 0)  # close to mean +- 1.96 sd / sqrt(n)
    assert abs(big["low"] - (49.5 - 1.96 * 28.87 / 10)) < 1.0 and abs(big["high"] - (49.5 + 1.96 * 28.87 / 10)) < 1.0


# -- scale-out: two processes ------------------------------------------------------------------------
def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", ZMAGIC_LOAD_PLUGINS="")
    env.pop(WRITE_DELAY_ENV, None)
    return env


def test_two_processes_write_the_same_bytes_as_one(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed beside this python")
    path = write_experiment(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    started = time.monotonic()
    single = subprocess.run([sys.executable, "-m", "zmagic_core.app.experiment_command", "experiment", str(path),
                             "--out", str(one), "--no-eval", "--set", "batch_size=3"], env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    double = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
                             "-m", "zmagic_core.app.experiment_command", "experiment", str(path), "--out", str(two),
                             "--no-eval"], env=_env(), capture_output=True, text=True, timeout=180)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "over 2 process(es)" in double.stdout
    a, b = sample_files(one), sample_files(two)
    assert len(a) == 54 and a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:5]
    assert not [p for p in two.rglob("*") if is_temporary(p) or p.name.endswith(".lock")]
    assert time.monotonic() - started < 120


# -- killed runs --------------------------------------------------------------------------------------
def test_killed_experiment_resumes_losing_and_duplicating_nothing(tmp_path):
    path = write_experiment(tmp_path)
    reference, out = tmp_path / "reference", tmp_path / "out"
    command = [sys.executable, "-m", "zmagic_core.app.experiment_command", "experiment", str(path), "--no-eval"]
    env = dict(_env(), **{WRITE_DELAY_ENV: "0.01"})  # a write in progress at most moments
    started = time.monotonic()
    done = subprocess.run(command + ["--out", str(reference)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    whole = time.monotonic() - started
    rng = random.Random(1)
    total = 2 * 3 * 3 * 3
    kills, partial = 0, 0
    for _ in range(5):
        before = len(list(out.rglob("sample_*.json")))
        proc = subprocess.Popen(command + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        # kill once a few more samples are on disk: a write is in progress at most moments then,
        # and waiting on files (not on a share of the reference run's time) holds on a loaded machine
        target = before + rng.randint(1, 6)
        deadline = time.monotonic() + 4 * whole + 30
        while proc.poll() is None and time.monotonic() < deadline:
            if len(list(out.rglob("sample_*.json"))) >= target:
                time.sleep(rng.uniform(0.0, 0.05))
                break
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.read().decode()
        count = len(list(out.rglob("sample_*.json")))
        partial += 0 < count < total
        if proc.returncode == 0:
            break  # the killed runs left nothing to do
    assert kills >= 3 and partial >= 1
    final = subprocess.run(command + ["--out", str(out)], env=_env(), capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    a, b = sample_files(reference), sample_files(out)
    assert len(a) == total and a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert not [p for p in out.rglob("*") if is_temporary(p) or p.name.endswith(".lock")]
    for record in out.glob("*/*/record.json"):
        assert json.loads(record.read_text())["completed"] == [0, 1, 2]


def test_an_experiment_warns_about_a_folder_whose_condition_was_disabled(tmp_path, capsys, monkeypatch):
    """Nothing is dropped silently in an experiment either: a condition disabled by non-finite values in one
    variant is named, with its folder, at the end of the run."""
    import zmagic_core
    import zmagic_core.plugins.registry as registry_module
    from zmagic_core import hookimpl
    from zmagic_core.plugins.registry import Registry

    class NaNEnergy(zmagic_core.Energy):
        def forward(self, images):
            return images.mean(dim=(1, 2, 3)) * float("nan")

    class NaNPlugin:
        @hookimpl
        def register_energies(self, register):
            register("nan-energy", lambda context, **o: NaNEnergy())

    reg = Registry(load_entry_points=False)
    reg.register_plugin(NaNPlugin(), "nan")
    monkeypatch.setattr(registry_module, "_default", reg)
    variants = [{"name": "plain"},
                {"name": "broken", "set": {"conditions.1": {"kind": "nan-energy", "name": "broken"}}}]
    path = write_experiment(tmp_path, variants=variants, samples_per_row=1, rows_=ROWS[:1])
    assert main(["experiment", str(path), "--out", str(tmp_path / "out"), "--no-eval"]) == 0
    out = capsys.readouterr().out
    assert "warning: broken/red: condition 'broken' was disabled (non-finite energy or gradient)" in out
    assert "plain/red" not in out.split("generated")[-1]


def test_a_row_whose_conditions_fail_to_build_costs_only_its_own_folder(tmp_path, capsys, monkeypatch):
    """A later row's condition that cannot be built (say, a reference with no face: the pre-flight builds
    the first row's conditions only) is that folder's failure: the other rows are generated and evaluated,
    the report and record.json say why, the exit code is 1."""
    import zmagic_core
    import zmagic_core.plugins.registry as registry_module
    from zmagic_core import InputError, hookimpl
    from zmagic_core.plugins.registry import Registry

    class Flat(zmagic_core.Energy):
        def forward(self, images):
            return images.mean(dim=(1, 2, 3)) ** 2

    def build(context, reference="ok"):
        if reference == "blank":
            raise InputError("no face found in reference image blank.png")
        return Flat()

    class PickyPlugin:
        @hookimpl
        def register_energies(self, register):
            register("picky", build)

    reg = Registry(load_entry_points=False)
    reg.register_plugin(PickyPlugin(), "picky")
    monkeypatch.setattr(registry_module, "_default", reg)
    rows = [{"id": "good", "conditions.1.reference": "ok"}, {"id": "blank", "conditions.1.reference": "blank"},
            {"id": "good2", "conditions.1.reference": "ok"}]
    recipe = dict(RECIPE, conditions=[RECIPE["conditions"][0], {"kind": "picky", "name": "picky", "reference": "ok"}])
    path = write_experiment(tmp_path, recipe=recipe, rows_=rows, variants=[{"name": "sum"}], samples_per_row=2)
    out = tmp_path / "out"
    assert main(["experiment", str(path), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "generated 4 samples" in printed and "2 failed" in printed
    for key in ("good", "good2"):
        assert json.loads((out / "sum" / key / "record.json").read_text())["completed"] == [0, 1]
    record = json.loads((out / "sum" / "blank" / "record.json").read_text())
    assert record["completed"] == [] and set(record["failed"]) == {"0", "1"}
    assert all("no face found in reference image blank.png" in m for m in record["failed"].values())
    report = (out / "report.md").read_text()
    assert "sum/blank: 2 sample(s) failed: building its conditions failed: no face found" in report
    assert "oracle/blank: not sampled: no face found" in report
