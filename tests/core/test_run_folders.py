"""Run folders are reliable: killed runs resume, damaged files are regenerated or refused in one
line, one process writes at a time, and a folder never mixes results of different inputs."""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from zmagic_core.app.cli import main
from zmagic_core.app.identity import fingerprint, folder_identity, identity_differences, identity_hash
from zmagic_core.app.runner import LOCK, lock_folder
from zmagic_core.files.atomic import TEMP_SUFFIX, WRITE_DELAY_ENV, is_temporary, write_bytes, write_json
from zmagic_core.files.images import save_image

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
# the kill test: writes every few hundredths of a second
KILLED = dict(SMALL, combiner={"kind": "sum"}, solver={"kind": "ddpm", "steps": 30}, num_samples=12)
DERIVED = {"recipe.json", "record.json", "grid.png", "energy.png", "cosine.png"}


def _strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{path} holds {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def _check_files(out: Path) -> None:
    """Every file under its final name is whole: JSON strict and parseable, arrays load, PNGs decode."""
    for p in out.iterdir():
        if is_temporary(p) or p.name == LOCK:
            continue
        if p.suffix == ".json":
            _strict_json(p)
        elif p.suffix == ".npy":
            assert np.load(p, allow_pickle=False).shape == (3, 16, 16), p
        elif p.suffix == ".png":
            with Image.open(p) as im:
                im.load()
        else:
            raise AssertionError(f"unexpected file {p}")


def _expected_names(n: int) -> set[str]:
    return DERIVED | {f"sample_{i:04d}.{ext}" for i in range(n) for ext in ("npy", "png", "json")}


def _check_complete(out: Path, n: int) -> None:
    assert {p.name for p in out.iterdir()} == _expected_names(n)  # each sample once; no temporary, no lock
    _check_files(out)
    record = _strict_json(out / "record.json")
    assert record["completed"] == list(range(n)) and record["failed"] == {}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("zmagic: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- killed runs ----------------------------------------------------------------------------------
def _start(recipe: Path, out: Path, delay: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", ZMAGIC_LOAD_PLUGINS="")
    env.pop(WRITE_DELAY_ENV, None)
    if delay:
        env[WRITE_DELAY_ENV] = str(delay)
    return subprocess.Popen([sys.executable, "-m", "zmagic_core", "generate", str(recipe), "--out", str(out),
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_at_write(proc: subprocess.Popen, out: Path, pattern: str, nth: int, timeout: float = 30.0) -> bool:
    """SIGKILL ``proc`` while the ``nth`` temporary file of a final name matching ``pattern`` is being
    written; False when the process ended first."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            names = os.listdir(out)
        except FileNotFoundError:
            names = []
        # a temporary file is named .<final name>.<pid>-<random>.zmagic-tmp
        seen |= {n for n in names if is_temporary(n)
                 and re.fullmatch(pattern, n[1:-len(TEMP_SUFFIX)].rsplit(".", 1)[0])}
        if len(seen) >= nth:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    return False


def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    recipe = tmp_path / "killed.yaml"
    recipe.write_text(yaml.safe_dump(KILLED))
    reference, out = tmp_path / "reference", tmp_path / "out"
    uninterrupted = _start(recipe, reference)  # in parallel with the killed ones
    rng = random.Random(0)
    during_write = 0
    # kills while a given file is half written (the writer pauses mid-file), then at random moments
    sample = r"sample_\d{4}\."
    plan = [(r"recipe\.json", 1), (sample + "npy", 1), (sample + "png", 2), (sample + "json", 3),
            (sample + "npy", 3), None, None, (r"record\.json", 1), (r"grid\.png", 1), (r"cosine\.png", 1)]
    for step in plan:
        proc = _start(recipe, out, delay=0.05)
        if step is None:
            time.sleep(rng.uniform(1.5, 3.5))  # imports take about 1.5 s
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = proc.returncode == -signal.SIGKILL
        else:
            name, nth = step
            killed = _kill_at_write(proc, out, name, nth)
        left = [p.name for p in out.iterdir() if is_temporary(p)] if out.exists() else []
        during_write += bool(killed and left)
        if out.exists():
            _check_files(out)  # whatever the moment of the kill, no file is half written under its name
        assert killed or proc.returncode == 0, proc.stderr.read().decode()
    assert during_write >= 6  # most kills landed inside a write (8 aimed at one)
    assert len(list(out.glob("sample_*.json"))) >= 4  # the killed runs made progress: the last one resumes
    final = _start(recipe, out)
    assert final.wait(60) == 0, final.stderr.read().decode()
    assert uninterrupted.wait(60) == 0, uninterrupted.stderr.read().decode()
    _check_complete(out, 12)
    _check_complete(reference, 12)
    for i in range(12):
        a, b = reference / f"sample_{i:04d}", out / f"sample_{i:04d}"
        assert np.array_equal(np.load(a.with_suffix(".npy")), np.load(b.with_suffix(".npy"))), i
        for ext in (".npy", ".png", ".json"):  # byte for byte, records and hashes included
            assert a.with_suffix(ext).read_bytes() == b.with_suffix(ext).read_bytes(), (i, ext)


# -- damaged files ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """A finished 3-sample run to copy and damage."""
    base = tmp_path_factory.mktemp("good")
    recipe = base / "small.yaml"
    recipe.write_text(yaml.safe_dump(SMALL))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests (the autouse one_thread fixture): the bits depend on it
    try:
        assert main(["generate", str(recipe), "--out", str(base / "run")]) == 0
    finally:
        torch.set_num_threads(threads)
    return recipe, base / "run"


@pytest.fixture
def damaged(good_run, tmp_path):
    recipe, run = good_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return recipe, run, out


def _stamps(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("sample_*")}


def _resumes_to(good: Path, out: Path) -> None:
    """The resumed folder is complete and its samples equal the good folder's, byte for byte."""
    _check_complete(out, 3)
    for i in range(3):
        for ext in ("npy", "png", "json"):
            name = f"sample_{i:04d}.{ext}"
            assert (good / name).read_bytes() == (out / name).read_bytes(), name


@pytest.mark.parametrize("damage,regenerated", [
    ("truncated-json", {1}), ("missing-npy", {2}), ("wrong-png", {0}), ("garbage-record", set()),
    ("garbage-recipe", set()), ("missing-recipe", set()), ("leftover-temporary", set()),
    ("seedless-json", {1}), ("other-identity-json", {2}),
])
def test_damaged_files_are_regenerated(damaged, capsys, damage, regenerated):
    recipe, good, out = damaged
    if damage == "truncated-json":
        text = (out / "sample_0001.json").read_text()
        (out / "sample_0001.json").write_text(text[: len(text) // 2])
    elif damage == "missing-npy":
        (out / "sample_0002.npy").unlink()
    elif damage == "wrong-png":  # a valid PNG, but not the one the JSON names
        save_image(torch.zeros(3, 16, 16), out / "sample_0000.png")
    elif damage == "garbage-record":
        (out / "record.json").write_bytes(b"\x00{garbage")
    elif damage == "garbage-recipe":
        (out / "recipe.json").write_text('{"identity_sha256": ')
    elif damage == "missing-recipe":
        (out / "recipe.json").unlink()
    elif damage == "leftover-temporary":
        (out / f".sample_0001.npy.123-abcd{TEMP_SUFFIX}").write_bytes(b"\x93NUMPY half")
    elif damage == "seedless-json":
        data = json.loads((out / "sample_0001.json").read_text())
        del data["seed"]
        (out / "sample_0001.json").write_text(json.dumps(data))
    elif damage == "other-identity-json":
        data = json.loads((out / "sample_0002.json").read_text())
        data["identity"] = "0" * 64
        (out / "sample_0002.json").write_text(json.dumps(data))
    before = _stamps(out)
    assert main(["generate", str(recipe), "--out", str(out)]) == 0, capsys.readouterr().err
    after = _stamps(out)
    rewritten = {int(n[7:11]) for n in after if after[n] != before.get(n)}
    assert rewritten == regenerated
    _resumes_to(good, out)
    marker = _strict_json(out / "recipe.json")
    assert marker == _strict_json(good / "recipe.json")


def test_unreadable_recipe_json_with_foreign_samples_is_refused(damaged, capsys):
    recipe, good, out = damaged
    (out / "recipe.json").write_text("not json")
    data = json.loads((out / "sample_0001.json").read_text())
    data["identity"] = "f" * 64
    (out / "sample_0001.json").write_text(json.dumps(data))
    before = _stamps(out)
    assert main(["generate", str(recipe), "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert str(out / "recipe.json") in err and "unreadable" in err
    (out / "recipe.json").unlink()
    assert main(["generate", str(recipe), "--out", str(out)]) == 2
    assert "unknown run" in _one_line_error(capsys)
    assert _stamps(out) == before


def test_a_folder_of_an_older_format_is_refused(damaged, capsys):
    recipe, good, out = damaged
    (out / "recipe.json").write_text(json.dumps({"identity": SMALL}))
    assert main(["generate", str(recipe), "--out", str(out)]) == 2
    assert "older zmagic" in _one_line_error(capsys)


def test_resumed_samples_are_drawn_in_their_original_batches(tmp_path):
    """Several threads make the dependent combiner's bits depend on the batch: a regenerated sample
    is drawn with the rest of its original batch, so it still equals the uninterrupted run's."""
    from zmagic_core.app.runner import _batches

    assert _batches([1, 4, 5, 9], 10, 4) == [([0, 1, 2, 3], [1]), ([4, 5, 6, 7], [4, 5]), ([8, 9], [9])]
    torch.set_num_threads(2)  # the autouse one_thread fixture restores it
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(SMALL))
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["generate", str(recipe), "--out", str(a)]) == 0
    shutil.copytree(a, b)
    (b / "sample_0001.npy").unlink()
    (b / "sample_0002.json").unlink()
    assert main(["generate", str(recipe), "--out", str(b)]) == 0
    _resumes_to(a, b)


def test_a_done_sample_of_another_seed_is_refused(damaged, capsys):
    recipe, good, out = damaged
    assert main(["generate", str(recipe), "--out", str(out), "--set", "seed=5"]) == 2
    assert "seed" in _one_line_error(capsys)


def test_json_is_strict_and_nan_becomes_null(tmp_path):
    text = write_json(tmp_path / "a.json", {"e": float("nan"), "t": [float("inf"), 1.5, np.float32(2.0)],
                                              "n": {"x": -float("inf")}})
    assert _strict_json(tmp_path / "a.json") == {"e": None, "t": [None, 1.5, 2.0], "n": {"x": None}}
    assert "NaN" not in text and "Infinity" not in text
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failing_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    write_bytes(target, b"old")

    def broken(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


# -- one writer ----------------------------------------------------------------------------------
def test_a_held_folder_is_refused(good_run, tmp_path, capsys):
    recipe, _ = good_run
    out = tmp_path / "run"
    out.mkdir()
    with lock_folder(out):
        assert main(["generate", str(recipe), "--out", str(out)]) == 2
        err = _one_line_error(capsys)
        assert str(out) in err and f"pid {os.getpid()}" in err and "in use" in err
        assert not any(out.glob("sample_*"))
    assert main(["generate", str(recipe), "--out", str(out)]) == 0
    assert not (out / LOCK).exists()


def test_the_lock_of_a_killed_process_does_not_stick(good_run, tmp_path, capsys):
    recipe, _ = good_run
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(out / LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, str(os.getpid()).encode())\n"
         "print('locked', flush=True)\ntime.sleep(60)\n"], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        assert main(["generate", str(recipe), "--out", str(out)]) == 2
        assert f"pid {holder.pid}" in _one_line_error(capsys)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK).exists()  # left behind by the killed holder, but no longer locked
    assert main(["generate", str(recipe), "--out", str(out)]) == 0
    _check_complete(out, 3)


# -- identity ------------------------------------------------------------------------------------
def _reference_recipe(tmp_path: Path, reference: str) -> Path:
    data = dict(SMALL, conditions=[SMALL["conditions"][0], {"kind": "shapes-mask", "reference": reference,
                                                             "scale": 0.2}], num_samples=2)
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_changed_reference_contents_are_refused(tmp_path, capsys):
    from zmagic_core.models.shapes import render

    ref = tmp_path / "ref.png"
    save_image(render("circle", "red", "center", 16), ref)
    recipe = _reference_recipe(tmp_path, "ref.png")
    out = tmp_path / "run"
    assert main(["generate", str(recipe), "--out", str(out)]) == 0
    identity = _strict_json(out / "recipe.json")["identity"]
    assert list(identity["files"]) == ["conditions.1.options.reference"]
    before = _stamps(out)
    save_image(render("square", "blue", "center", 16), ref)  # same path, other contents
    assert main(["generate", str(recipe), "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert "different recipe" in err and "conditions.1.options.reference (file contents)" in err
    assert _stamps(out) == before
    ref.unlink()
    assert main(["generate", str(recipe), "--out", str(out)]) == 2
    assert "conditions.1.options.reference" in _one_line_error(capsys)


def test_a_failed_build_does_not_block_the_corrected_recipe(tmp_path, capsys):
    from zmagic_core.models.shapes import render

    out = tmp_path / "run"
    assert main(["generate", str(_reference_recipe(tmp_path, "missing.png")), "--out", str(out)]) == 2
    assert "not found" in _one_line_error(capsys)
    assert not (out / "recipe.json").exists() and not any(out.glob("sample_*"))
    save_image(render("circle", "red", "center", 16), tmp_path / "ref.png")
    assert main(["generate", str(_reference_recipe(tmp_path, "ref.png")), "--out", str(out)]) == 0
    _check_complete(out, 2)


def test_package_versions_are_in_the_identity_and_the_record(good_run, tmp_path, capsys, monkeypatch):
    recipe, run = good_run
    record = _strict_json(run / "record.json")
    versions = record["versions"]
    assert versions["zmagic-core"] and versions["torch"] == torch.__version__ and versions["device"]["type"] == "cpu"
    assert record["identity"] == _strict_json(run / "recipe.json")["identity_sha256"]
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = _stamps(out)
    monkeypatch.setattr(torch, "__version__", "0.0.1-other")
    assert main(["generate", str(recipe), "--out", str(out)]) == 2
    assert f"torch version ({versions['torch']} -> 0.0.1-other)" in _one_line_error(capsys)
    assert _stamps(out) == before


def test_identity_contents(tmp_path):
    from zmagic_core.assembly.build import check_recipe, load_recipe
    from zmagic_core.contracts.options import FilePath
    from zmagic_core.plugins.registry import Registry
    from pydantic import BaseModel
    import zmagic_core

    class Options(BaseModel):
        weights: FilePath

    class Plugin:
        @zmagic_core.hookimpl
        def register_energies(self, register):
            register("weighted", lambda context, **o: None, options=Options)

    registry = Registry(load_entry_points=False)
    registry.register_plugin(Plugin(), "weights-plugin", version="1.2.3")
    folder = tmp_path / "weights"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"a")
    (folder / "sub" / "b.bin").write_bytes(b"b")

    core = check_recipe(load_recipe(SMALL, check=False), registry)
    assert "batch_size" not in folder_identity(core)["recipe"]  # the shapes world is batch-invariant
    assert set(folder_identity(core)["versions"]) == {"zmagic-core", "torch"}

    data = dict(SMALL, combiner={"kind": "sum"},
                conditions=SMALL["conditions"] + [{"kind": "weighted", "weights": str(folder)}])
    plan = check_recipe(load_recipe(data, check=False), registry)
    identity = folder_identity(plan)
    assert identity["recipe"]["batch_size"] == 2  # a plugin's network need not be
    assert identity["versions"]["plugin weights-plugin"] == "1.2.3"
    assert identity["files"]["conditions.2.options.weights"]["files"] == 2
    (folder / "sub" / "b.bin").write_bytes(b"c")
    changed = folder_identity(plan)
    assert identity_hash(changed) != identity_hash(identity)
    assert identity_differences(identity, changed) == ["conditions.2.options.weights (folder contents)"]


def test_large_files_are_identified_by_size_and_time(tmp_path, monkeypatch):
    import zmagic_core.app.identity as ident

    f = tmp_path / "big.bin"
    f.write_bytes(b"x" * 100)
    assert "sha256" in fingerprint(f)
    monkeypatch.setattr(ident, "LARGE_FILE", 10)
    entry = fingerprint(f)
    assert entry == {"size": 100, "mtime_ns": f.stat().st_mtime_ns}
    os.utime(f, ns=(entry["mtime_ns"] + 10**9, entry["mtime_ns"] + 10**9))
    assert fingerprint(f) != entry


def test_a_folder_of_other_files_is_refused_and_left_alone(good_run, tmp_path, capsys):
    """`--out` naming a folder of someone else's files (no recipe.json, no samples) is refused before anything
    is written; a folder holding only a record of ours (a run whose samples all failed) is taken up."""
    recipe, _ = good_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "record.json").write_text("my notes")
    (mine / "grid.png").write_bytes(b"my picture")
    assert main(["generate", str(recipe), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "holds other files (grid.png, record.json)" in err and err.count("\n") == 1
    assert sorted(p.name for p in mine.iterdir()) == ["grid.png", "record.json"]
    assert (mine / "record.json").read_text() == "my notes"

    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "record.json").write_text(json.dumps({"identity": "0" * 64, "completed": [], "failed": {"0": "x"}}))
    assert main(["generate", str(recipe), "--out", str(failed)]) == 0
    _check_complete(failed, 3)
