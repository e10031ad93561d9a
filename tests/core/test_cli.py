"""The `zmagic` command end to end on small recipes: outputs, resume, clear errors."""
import json

import pytest
import yaml

from zmagic_core.app.cli import main

SMALL = {
    "model": {"kind": "shapes", "size": 16},
    "solver": {"kind": "ddpm", "steps": 12},
    "combiner": {"kind": "dependent"},
    "conditions": [
        {"kind": "shapes-attribute", "attribute": "color", "value": "red", "scale": 0.2},
        {"kind": "shapes-mask", "reference": "red circle center", "scale": 0.2},
    ],
    "num_samples": 3,
    "batch_size": 2,
    "progress": False,
}


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


def test_generate_writes_everything(recipe_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["generate", str(recipe_file), "--out", str(out)]) == 0
    for name in ("grid.png", "energy.png", "cosine.png", "record.json", "recipe.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("sample_*.png")) == ["sample_0000.png", "sample_0001.png", "sample_0002.png"]
    record = json.loads((out / "record.json").read_text())
    assert record["seeds"] == [0, 1, 2] and record["completed"] == [0, 1, 2]
    assert record["recipe"]["combiner"] == {"kind": "dependent", "options": {}}
    trace = record["trace"]["0"]
    assert len(trace) == 12 and trace[0]["t"] > trace[-1]["t"]
    assert set(trace[0]["energy"]) == {"shapes-attribute", "shapes-mask"}
    assert "cos(g1,g2|1)" in trace[0]  # Algorithm 1 ran; g2 at x_t is computed only with trace_cosine
    assert trace[0]["cosine"] == {}
    assert main(["generate", str(recipe_file), "--out", str(tmp_path / "cos"), "--set", "combiner.trace_cosine=true"]) == 0
    traced = json.loads((tmp_path / "cos" / "record.json").read_text())["trace"]["0"]
    assert "shapes-attribute~shapes-mask" in traced[0]["cosine"] and "cos(g1,g2|1)" in traced[0]
    assert set(record["final_energy"]["1"]) == {"shapes-attribute", "shapes-mask"}
    summary = record["evaluation"]["shapes"]["summary"]
    assert summary["samples"] == 3 and 0 <= summary["joint_satisfaction"] <= 1
    assert "joint satisfaction" in capsys.readouterr().out


def test_resume_skips_written_samples_and_refuses_other_recipes(recipe_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["generate", str(recipe_file), "--out", str(out)]) == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("sample_*")}
    (out / "sample_0001.png").unlink()
    assert main(["generate", str(recipe_file), "--out", str(out), "--set", "num_samples=4"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("sample_*")}
    assert after["sample_0000.npy"] == first["sample_0000.npy"]  # untouched
    assert after["sample_0001.npy"] != first["sample_0001.npy"]  # regenerated
    assert "sample_0003.png" in after
    record = json.loads((out / "record.json").read_text())
    assert record["completed"] == [0, 1, 2, 3]
    capsys.readouterr()
    assert main(["generate", str(recipe_file), "--out", str(out), "--set", "combiner.kind=sum"]) == 2
    err = capsys.readouterr().err
    assert "different recipe" in err and "combiner.kind" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("sample_*")} == after


def test_resumed_sample_equals_fresh_sample(recipe_file, tmp_path):
    import numpy as np

    a, b = tmp_path / "a", tmp_path / "b"
    fine = ["--set", "solver.steps=50"]  # coarse steps amplify float32 rounding differences between batch shapes
    main(["generate", str(recipe_file), "--out", str(a)] + fine)
    main(["generate", str(recipe_file), "--out", str(b), "--set", "batch_size=1", "--set", "num_samples=2"] + fine)
    main(["generate", str(recipe_file), "--out", str(b), "--set", "batch_size=3"] + fine)
    for i in range(3):  # equal up to float32 rounding, which depends on the batch's matmul shapes
        np.testing.assert_allclose(np.load(a / f"sample_{i:04d}.npy"), np.load(b / f"sample_{i:04d}.npy"), atol=5e-3)
    c = tmp_path / "c"
    main(["generate", str(recipe_file), "--out", str(c)] + fine)
    for i in range(3):  # same batches: bit for bit
        assert np.array_equal(np.load(a / f"sample_{i:04d}.npy"), np.load(c / f"sample_{i:04d}.npy"))


def test_set_overrides_combiner_option(recipe_file, tmp_path):
    out = tmp_path / "c"
    assert main(["generate", str(recipe_file), "--out", str(out), "--set", "combiner.kind=cagrad",
                 "--set", "combiner.c=0.4", "--set", "num_samples=1"]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["recipe"]["combiner"] == {"kind": "cagrad", "options": {"c": 0.4}}


@pytest.mark.parametrize("override,words", [
    (["combiner.kind=dependant"], ["combiner.kind", "dependant", "dependent", "cagrad"]),
    (["conditions.0.kind=shapes-colour"], ["conditions.0.kind", "shapes-colour", "shapes-attribute"]),
    (["combiner.c=1.5", "combiner.kind=cagrad"], ["combiner.options.c", "1.5"]),
    (["conditions.1.rule=fast"], ["conditions.1.rule", "fast"]),
    (["solver.steps=0"], ["solver.steps", "0"]),
    (["conditions.0.tau=-1"], ["conditions.0.options.tau", "-1"]),
    (["conditions.0.colour=red"], ["conditions.0.options.colour", "accepts"]),
    (["model.kind=nope"], ["model.kind", "nope", "shapes"]),
    (["device=cuda:0"], ["device", "cuda"]),
    (["conditions.2.kind=shapes-style"], ["conditions.2"]),
])
def test_bad_recipes_name_the_field(recipe_file, tmp_path, capsys, override, words):
    args = ["generate", str(recipe_file), "--out", str(tmp_path / "x")]
    for o in override:
        args += ["--set", o]
    if override == ["device=cuda:0"]:
        import torch
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    assert main(args) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, (w, err)
    assert "Traceback" not in err
    assert not (tmp_path / "x" / "sample_0000.png").exists()


def test_dependent_needs_two_conditions(recipe_file, tmp_path, capsys):
    data = dict(SMALL, conditions=SMALL["conditions"][:1])
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["generate", str(path), "--out", str(tmp_path / "y")]) == 2
    assert "needs exactly 2 conditions" in capsys.readouterr().err


@pytest.mark.parametrize("content,words", [
    (None, ["recipe file not found"]),
    ("model: [unclosed", ["cannot parse recipe"]),
    ("- just\n- a list\n", ["must be a mapping"]),
    ("modle: {kind: shapes}\n", ["modle", "Extra inputs"]),
])
def test_bad_recipe_files(tmp_path, capsys, content, words):
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    assert main(["generate", str(path), "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_bad_reference_path_is_clear(recipe_file, tmp_path, capsys):
    bad = tmp_path / "missing.png"
    assert main(["generate", str(recipe_file), "--out", str(tmp_path / "r"), "--set", f"conditions.1.reference={bad}"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and str(bad) in err
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    assert main(["generate", str(recipe_file), "--out", str(tmp_path / "r2"), "--set", f"conditions.1.reference={junk}"]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_output_path_that_is_a_file(recipe_file, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["generate", str(recipe_file), "--out", str(f)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_plugins_table(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "zmagic_core.plugins.builtin" in out and "combiner: sum, dependent, cagrad" in out


def test_reference_paths_are_relative_to_the_recipe(tmp_path, monkeypatch):
    from zmagic_core.files.images import save_image
    from zmagic_core.models.shapes import render

    folder = tmp_path / "recipes"
    folder.mkdir()
    save_image(render("circle", "red", "center", 16), folder / "ref.png")
    data = dict(SMALL, conditions=[SMALL["conditions"][0], {"kind": "shapes-mask", "reference": "ref.png"}],
                num_samples=1)
    (folder / "r.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "recipes/r.yaml", "--out", str(tmp_path / "o")]) == 0


def test_ctrl_c_is_one_line_and_exit_130(recipe_file, tmp_path, capsys, monkeypatch):
    import zmagic_core.app.runner as runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "generate", interrupted)
    assert main(["generate", str(recipe_file), "--out", str(tmp_path / "x")]) == 130
    err = capsys.readouterr().err
    assert err.startswith("zmagic: error: interrupted") and err.count("\n") == 1 and "Traceback" not in err
