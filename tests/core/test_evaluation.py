"""`zmagic eval` on an unfinished experiment (variants over different rows and samples) and its
command-line checks."""
import json
import shutil
from pathlib import Path

import yaml

from zmagic_core.app import cli
from zmagic_core.app.experiment_command import main

EXPERIMENT = {
    "name": "unfinished",
    "recipe": {
        "model": {"kind": "shapes", "size": 16},
        "solver": {"kind": "ddpm", "steps": 5},
        "combiner": {"kind": "sum"},
        "conditions": [
            {"kind": "shapes-attribute", "name": "attr", "attribute": "color", "value": "red", "scale": 0.2},
            {"kind": "shapes-mask", "name": "mask", "reference": "red circle center", "scale": 0.2},
        ],
        "batch_size": 2,
    },
    "rows": [
        {"id": "a", "conditions.0.value": "red", "conditions.1.reference": "red circle center"},
        {"id": "b", "conditions.0.value": "blue", "conditions.1.reference": "blue square top-left"},
        {"id": "c", "conditions.0.value": "green", "conditions.1.reference": "green triangle bottom"},
    ],
    "variants": [{"name": "sum"}, {"name": "dependent", "set": {"combiner.kind": "dependent"}}],
    "samples_per_row": 2,
    "threads": 1,
    "evaluation": {"bootstrap": 50, "oracle": False},
}


def test_eval_of_an_unfinished_experiment_says_what_each_variant_lacks_and_marks_no_best(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(EXPERIMENT))
    out = tmp_path / "out"
    assert main(["experiment", str(path), "--out", str(out), "--no-eval"]) == 0
    # as if generation had been killed: dependent lacks row c and one sample of row a
    shutil.rmtree(out / "dependent" / "c")
    (out / "dependent" / "a" / "record.json").unlink()
    (out / "dependent" / "a" / "sample_0001.json").unlink()
    assert main(["eval", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["variants"]["dependent"] == {"label": "dependent", "samples": 3, "rows": 2, "missing_rows": ["c"],
                                                "missing_samples": 3}
    assert metrics["variants"]["sum"]["missing_samples"] == 0 and metrics["variants"]["sum"]["rows"] == 3
    assert "tv_distance" in metrics["unmatched"] and "guide:attr" in metrics["unmatched"]
    assert metrics["best"] == {}  # not measured on the same rows and samples: nobody is best
    assert metrics["summary"]["dependent"]["tv_distance"]["rows"] == 2
    report = (out / "report.md").read_text()
    assert "- dependent: incomplete: lacks 1 of 3 rows (c) and 3 of 6 samples" in report
    assert "| dependent (incomplete: 2/3 rows, 3/6 samples) |" in report and "| sum |" in report
    assert "No best is marked on any metric: the variants were measured over different rows or samples" in report
    table = [line for line in report.split("## Which evaluator")[0].splitlines() if line.startswith("|")]
    assert len(table) == 4 and not any("**" in line for line in table)  # nothing in bold
    # finished: the same rows and samples again, nothing noted; --bootstrap 0 leaves the intervals out
    assert main(["experiment", str(path), "--out", str(out), "--no-eval"]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--bootstrap", "0"]) == 0
    assert "incomplete" not in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["unmatched"] == [] and metrics["bootstrap"]["resamples"] == 0
    assert metrics["summary"]["sum"]["tv_distance"]["low"] is None
    assert "incomplete" not in (out / "report.md").read_text()


def test_a_metric_missing_on_some_rows_is_not_compared_the_others_are():
    from zmagic_core.app.evaluation import unmatched_metrics

    nan = float("nan")
    both = {"r1": (0, 1), "r2": (0, 1)}
    per_row = {"a": {"m1": {"r1": 1.0, "r2": 2.0}, "m2": {"r1": 1.0, "r2": nan}},
               "b": {"m1": {"r1": 0.5, "r2": 1.0}, "m2": {"r1": 2.0, "r2": 3.0}}}
    assert unmatched_metrics(per_row, {"a": both, "b": both}, ["a", "b"]) == ["m2"]
    fewer = {"r1": (0,), "r2": (0, 1)}  # the same rows, but one sample fewer in r1
    assert unmatched_metrics(per_row, {"a": both, "b": fewer}, ["a", "b"]) == ["m1", "m2"]
    assert unmatched_metrics({"a": per_row["a"]}, {"a": both}, ["a", "b"]) == []  # one variant: nothing to compare


def test_eval_refuses_a_negative_bootstrap_in_one_line(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path), "--bootstrap", "-5"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("zmagic eval: error: argument --bootstrap: must be 0 (no intervals) or "
                                            "more, got -5")
    assert not (tmp_path / "metrics.json").exists()
