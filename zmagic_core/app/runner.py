"""`zmagic generate`: run a recipe into a folder of PNGs, per-sample records and plots.

A folder belongs to one set of inputs, its *identity* (``app/identity.py``), and holds:

- ``recipe.json``: the identity marker, ``{"format", "identity_sha256", "identity", "recipe"}``;
  written only once the first sample is about to be written, so a recipe that fails its pre-flight
  or its build leaves nothing that refuses the corrected recipe.
- ``sample_NNNN.npy`` (the sample in model space, float32) and ``sample_NNNN.png`` (its image),
  written first; then ``sample_NNNN.json``: index, seed, ``identity`` (the identity's hash),
  ``sha256`` of the .npy and the .png, ``final_energy`` and ``trace``.
- ``record.json`` (derived from the samples: recipe, seeds, completed, failed, seconds, energies,
  traces, evaluation, ``versions`` of the packages and the device, ``identity``), ``grid.png``,
  ``energy.png``, ``cosine.png``.
- ``.zmagic.lock`` while a run holds the folder.

Every file is written atomically (``files/atomic.py``: temporary file in the folder, fsync,
``os.replace``), so a killed run (SIGKILL at any moment) leaves whole files or none, plus at most
hidden temporaries, which the next run ignores and removes.  JSON is strict: a non-finite number
(a NaN energy in a trace) is written as null.

Resume: a sample counts as done iff its JSON parses, its index, seed and identity hash match and
the sha256 of its .npy and .png match the JSON; anything else is generated again, overwriting the
leftovers, within the batch of the uninterrupted run (``_batches``: a batch holding a pending
sample is drawn whole, its done samples are not rewritten), so that a resumed folder equals an
uninterrupted run's byte for byte on the same device and thread count.  A done sample made with
another seed (``seed`` or ``seeds`` changed) is refused.  A damaged record.json is rebuilt from the
samples.  A missing or unreadable recipe.json is rebuilt when every sample JSON that parses carries
this run's identity hash (and one does, if the folder holds sample files at all); otherwise the run
is refused with a one-line error naming the file.

Identity (``folder_identity``): the recipe's fields (not seeds, counts, output, progress, device);
the contents of every file or folder named by an option declared as a path (sha256 of a file; a
folder as the sorted listing of relative path, size and sha256 of its files; a file larger than
256 MiB is identified by its size and modification time instead of its hash, so touching or
copying it counts as a change); the versions of zmagic-core, torch, the plugins whose components
the recipe uses, and diffusers for pretrained models.  ``batch_size`` is left out for the shapes
world with core components, whose samples are bitwise independent of their batch with one
intra-op thread (tested in tests/core/test_pipeline.py); for every other run it is part of the
identity, because convolution and matmul kernels (CPU and GPU) choose their algorithms and
reduction orders by batch size, so a sample drawn in a batch of another size would differ from an
uninterrupted run's.  The
device and the CPU thread count are not part of the identity (a folder may be resumed on another
machine) though they change the last bits of some results (with several intra-op threads the
dependent combiner's results round differently than with one, and depend on the batch even in the
shapes world: hence whole batches on resume); record.json records both.

One process writes into a folder at a time: ``lock_folder`` (an ``fcntl.flock`` on ``.zmagic.lock``,
released by the OS when the process dies) refuses a second one, naming the holder's pid.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from zmagic_core.app.identity import environment, folder_identity, identity_differences, identity_hash
from zmagic_core.app.plots import plot_cosines, plot_energies
from zmagic_core.assembly.build import build_evaluators, build_pipeline, check_recipe, missing_files
from zmagic_core.assembly.recipe import Recipe
from zmagic_core.contracts.components import FinishedRun
from zmagic_core.contracts.errors import ConfigError, InputError
from zmagic_core.files.atomic import clean_temporaries, npy_bytes, png_bytes, sha256_bytes, write_bytes, write_json
from zmagic_core.files.images import image_grid, load_image, to_uint8

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None

FORMAT = 2
MARKER, RECORD, LOCK = "recipe.json", "record.json", ".zmagic.lock"


def _sample_paths(out: Path, index: int) -> dict[str, Path]:
    stem = out / f"sample_{index:04d}"
    return {"png": stem.with_suffix(".png"), "json": stem.with_suffix(".json"), "npy": stem.with_suffix(".npy")}


# -- the folder: lock, identity marker, trusted samples ---------------------------------------------
@contextmanager
def lock_folder(folder: Path, name: str = LOCK) -> Iterator[Path]:
    """Hold ``folder`` for one writing process during the with-block, else raise InputError naming
    the holder's pid.  ``fcntl.flock`` on ``folder/name``: the OS drops the lock when the process
    dies, so a killed run leaves nothing stuck.  (Shards of a distributed run could each hold
    their own ``name``.)"""
    if fcntl is None:
        yield folder / name
        return
    path = folder / name
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"cannot write into output folder {folder}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InputError(f"output folder {folder} is in use by another zmagic process (pid {holder}); "
                             "wait for it to finish or choose another --out") from None
        try:  # the previous holder may have removed the file meanwhile: hold the one under the name
            current = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def _make_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {out}: {exc}") from None


def _read_json(path: Path):
    """The parsed file, or None when it is missing or not JSON."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


RUN_FIGURES = ("grid.png", "energy.png", "cosine.png")


def _other_files(out: Path, our_samples: bool) -> list[str]:
    """Entries of an unmarked folder that no run of ours wrote: our record vouches for the figures beside
    it, our samples for a damaged recipe.json as well."""
    record = _read_json(out / RECORD)
    ours = {RECORD, *RUN_FIGURES} if our_samples or (isinstance(record, dict) and "identity" in record) else set()
    ours |= {MARKER} if our_samples else set()
    # hidden names are the lock and temporaries; samples are judged by their identity stamps
    return sorted(p.name for p in out.iterdir() if not p.name.startswith((".", "sample_")) and p.name not in ours)


def _check_marker(out: Path, identity: dict, ident: str) -> bool:
    """Raise unless the folder may take samples of ``identity``; True when recipe.json records it."""
    marker = out / MARKER
    data = _read_json(marker)
    if isinstance(data, dict) and "identity_sha256" in data:
        if data["identity_sha256"] == ident:
            return True
        diff = identity_differences(data.get("identity") or {}, identity)
        raise ConfigError(f"output folder {out} holds results of a different recipe (differs in: "
                          f"{', '.join(diff) or 'unknown'}); choose another --out or remove the folder")
    if isinstance(data, dict) and "identity" in data:
        raise ConfigError(f"output folder {out} holds results of an older zmagic (no identity hash in "
                          f"{marker}); choose another --out or remove the folder")
    # recipe.json missing or unreadable: the samples say whose folder this is
    stamps = [_read_json(p) for p in sorted(out.glob("sample_*.json"))]
    stamps = [s.get("identity") if isinstance(s, dict) else None for s in stamps]
    has_samples = any(out.glob("sample_*"))
    ours = bool(stamps) and all(s == ident for s in stamps if s is not None) and ident in stamps
    if not has_samples or ours:
        strays = _other_files(out, ours)
        if strays:  # never write over a folder of someone else's files
            raise ConfigError(f"output folder {out} holds other files ({', '.join(strays[:3])}); choose another --out")
        return False  # a fresh folder, or one to re-mark: recipe.json is written before the next write
    if not marker.exists():
        raise ConfigError(f"output folder {out} already holds samples of an unknown run (no {MARKER}); "
                          "choose another --out")
    raise ConfigError(f"{marker} is unreadable and the samples beside it are not all of this recipe; "
                      "choose another --out or remove the folder")


def _trusted(out: Path, index: int, seed: int, ident: str) -> Optional[dict]:
    """The sample's record if its files are complete and consistent, else None."""
    paths = _sample_paths(out, index)
    record = _read_json(paths["json"])
    if not isinstance(record, dict) or record.get("index") != index or record.get("identity") != ident:
        return None
    hashes = record.get("sha256")
    if not (isinstance(hashes, dict) and isinstance(record.get("seed"), int)
            and isinstance(record.get("final_energy"), dict) and isinstance(record.get("trace"), list)):
        return None
    for kind in ("npy", "png"):
        try:
            data = paths[kind].read_bytes()
        except OSError:
            return None
        if sha256_bytes(data) != hashes.get(kind):
            return None
    if record.get("seed") != seed:
        raise ConfigError(f"{paths['json']} was made with seed {record.get('seed')}, the recipe asks for {seed}; "
                          "choose another --out")
    return record


class _Folder:
    """A locked output folder: writes recipe.json before its first sample."""

    def __init__(self, out: Path, recipe: Recipe, identity: dict, ident: str, marked: bool):
        self.out, self.recipe, self.identity, self.ident, self.marked = out, recipe, identity, ident, marked

    def mark(self) -> None:
        if not self.marked:
            write_json(self.out / MARKER, {"format": FORMAT, "identity_sha256": self.ident, "identity": self.identity,
                                           "recipe": self.recipe.model_dump(mode="json")}, indent=2)
            self.marked = True

    def write_sample(self, index: int, seed: int, sample, image, trace, energies) -> dict:
        """.npy and .png first, the JSON naming their hashes last; returns the record as stored."""
        self.mark()
        paths = _sample_paths(self.out, index)
        npy = npy_bytes(sample.numpy().astype(np.float32))
        png = png_bytes(to_uint8(image))
        write_bytes(paths["npy"], npy, sync_folder=False)
        write_bytes(paths["png"], png)  # the folder sync makes both names durable before the JSON
        text = write_json(paths["json"], {"index": index, "seed": seed, "identity": self.ident,
                                          "sha256": {"npy": sha256_bytes(npy), "png": sha256_bytes(png)},
                                          "final_energy": energies, "trace": trace})
        return json.loads(text)


# -- the run ------------------------------------------------------------------------------------
def generate(recipe: Recipe, out: Optional[Path] = None, progress: Optional[bool] = None, registry=None,
             callback=None) -> dict:
    """Run (or resume) a recipe into ``out``; returns the aggregated record.

    ``callback``: called every sampling step with {"step", "t", "x", "record"} (progress, cancelling
    by raising KeyboardInterrupt, which the loop lets through)."""
    out = Path(out or recipe.output or "outputs/run")
    plan = check_recipe(recipe, registry)  # once per run: the build below reuses it
    missing = missing_files(plan)  # before any model loads (a download can take minutes)
    if missing:
        raise ConfigError(missing[0] if len(missing) == 1 else f"{len(missing)} files not found: {'; '.join(missing)}")
    created = not out.exists()
    try:
        return _generate(plan, out, progress, callback)
    except BaseException:
        if created and out.is_dir() and all(p.name.startswith(".") for p in out.iterdir()):
            shutil.rmtree(out, ignore_errors=True)  # a run that wrote nothing leaves no folder (only a lock)
        raise


def _generate(plan, out: Path, progress, callback) -> dict:
    recipe = plan.recipe
    _make_folder(out)
    with lock_folder(out):
        clean_temporaries(out)
        identity = folder_identity(plan)
        ident = identity_hash(identity)
        folder = _Folder(out, recipe, identity, ident, _check_marker(out, identity, ident))
        seeds = recipe.sample_seeds()
        records: dict[int, dict] = {}
        pending = []
        for i, seed in enumerate(seeds):
            record = _trusted(out, i, seed, ident)
            if record is None:
                pending.append(i)
            else:
                records[i] = record

        started = time.perf_counter()
        pipeline = None
        errors: dict[str, str] = {}
        rerun: list[str] = []
        if pending:
            pipeline = build_pipeline(plan)
            show = recipe.progress if progress is None else progress
            for batch, chunk in _batches(pending, len(seeds), recipe.batch_size):
                result = pipeline.run([seeds[i] for i in batch], batch_size=recipe.batch_size, progress=show,
                                      callback=callback)
                by_seed = {s: k for k, s in enumerate(result.seeds)}
                rerun += result.notes
                for i in chunk:
                    if seeds[i] in result.errors:
                        errors[str(i)] = result.errors[seeds[i]]
                        continue
                    k = by_seed[seeds[i]]
                    records[i] = folder.write_sample(i, seeds[i], result.samples[k], result.images[k],
                                                     result.trace[k],
                                                     _final_energies(pipeline, result.images[k:k + 1]))
        elapsed = time.perf_counter() - started
        if records:
            folder.mark()  # a re-marked folder whose samples were all done
        return _aggregate(folder, plan, seeds, [records[i] for i in sorted(records)], pipeline, errors, elapsed,
                          len(pending), rerun)


def _batches(pending: list[int], count: int, batch_size: int) -> list[tuple[list[int], list[int]]]:
    """(samples to draw, the pending ones among them to write): the batches of an uninterrupted run
    that hold a pending sample, whole, so that a resumed sample is drawn in the very batch it would
    have been drawn in (bitwise the same wherever kernels depend on the batch's size or contents)."""
    todo = set(pending)
    out = []
    for start in range(0, count, batch_size):
        batch = list(range(start, min(start + batch_size, count)))
        chunk = [i for i in batch if i in todo]
        if chunk:
            out.append((batch, chunk))
    return out


def _final_energies(pipeline, images: torch.Tensor) -> dict[str, float]:
    out = {}
    with torch.no_grad():
        for c in pipeline.conditions:
            if c.energy is not None:
                out[c.name] = float(c.energy(images.to(pipeline.device))[0])
    return out


def _aggregate(folder: _Folder, plan, seeds, records, pipeline, errors, elapsed, generated, rerun=()) -> dict:
    out, recipe = folder.out, plan.recipe
    previous = _read_json(out / RECORD)
    if not isinstance(previous, dict) or previous.get("identity") != folder.ident:
        previous = {}  # damaged, or of other inputs: rebuilt from the samples
    seconds = _number(previous.get("seconds")) + (elapsed if generated else 0.0)
    total = int(_number(previous.get("generated"))) + generated
    record = {
        "recipe": recipe.model_dump(mode="json"),
        "seeds": seeds,
        "completed": [r["index"] for r in records],
        "failed": errors,
        "seconds": seconds,
        "seconds_per_sample": seconds / max(total, 1),
        "generated": total,
        "final_energy": {r["index"]: r["final_energy"] for r in records},
        "mean_final_energy": _mean_energies(records),
        "trace": {r["index"]: r["trace"] for r in records},
        "versions": environment(plan, recipe.device),
        "identity": folder.ident,
        "notes": list(plan.notes),
        "problems": {**guidance_problems([r["trace"] for r in records]),
                     **({"batches_rerun": list(rerun)} if rerun else {})},
    }
    if records:
        samples = torch.stack([torch.from_numpy(np.load(_sample_paths(out, r["index"])["npy"], allow_pickle=False))
                               for r in records])
        record["evaluation"] = _evaluate(plan, pipeline, records, samples, out)
    write_json(out / RECORD, record)
    if records:
        images = torch.stack([load_image(_sample_paths(out, r["index"])["png"]) for r in records])
        if images.shape[-1] < 128:  # small images (the shapes world) are enlarged to be seen
            factor = 128 // images.shape[-1]
            images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
        write_bytes(out / "grid.png", png_bytes(to_uint8(image_grid(images))))
        traces = [r["trace"] for r in records]
        title = f"{recipe.combiner.kind} ({len(records)} samples)"
        plot_energies(traces, out / "energy.png", title)
        plot_cosines(traces, out / "cosine.png", title)
    return record


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and np.isfinite(value) else 0.0


DISABLED_MAJORITY = 0.5  # a condition disabled at more than this share of its guided sample-steps fails the run


def guidance_problems(traces: list[list[dict]]) -> dict:
    """How often each condition was disabled (non-finite energy or gradient) and the fallback fired, over the
    (sample, step) pairs where the condition was guided; ``disabled_most`` lists the conditions disabled at
    most of them (`zmagic generate` then warns and exits non-zero unless --allow-disabled);
    ``stack_lowered_to``: the fewest points per network call a combiner went down to after running out of
    memory (absent if none did)."""
    guided: dict[str, int] = {}
    disabled: dict[str, int] = {}
    fallbacks = 0
    stacks = []
    for trace in traces:
        for rec in trace:
            if "stack" in rec:
                stacks.append(int(rec["stack"]))
            for name in rec.get("grad_norm") or {}:
                guided[name] = guided.get(name, 0) + 1
            for name in rec.get("disabled") or ():
                disabled[name] = disabled.get(name, 0) + 1
                guided.setdefault(name, 0)
            fallbacks += bool(rec.get("fallback"))
    share = {n: disabled.get(n, 0) / max(guided[n], disabled.get(n, 0), 1) for n in guided}
    return {"disabled": {n: {"sample_steps": disabled[n], "share": share[n]} for n in sorted(disabled)},
            "fallback_sample_steps": fallbacks,
            **({"stack_lowered_to": min(stacks)} if stacks else {}),
            "disabled_most": sorted(n for n, s in share.items() if s > DISABLED_MAJORITY)}


def problem_messages(problems: dict) -> list[str]:
    """One line per thing a run did not do as asked (what `zmagic generate` warns and the web app shows)."""
    lines = [f"condition {name!r} was disabled (non-finite energy or gradient) at {seen['sample_steps']} guided "
             f"sample-steps ({seen['share']:.0%})" for name, seen in (problems.get("disabled") or {}).items()]
    if problems.get("fallback_sample_steps"):
        lines.append(f"the non-finite guidance fallback fired at {problems['fallback_sample_steps']} sample-steps")
    lines += problems.get("batches_rerun") or []
    if problems.get("stack_lowered_to"):
        size = problems["stack_lowered_to"]
        lines.append(f"the combiner's stacked network calls ran out of device memory; it went on with {size} "
                     f"point(s) per call (slower, same samples; `--set combiner.stack={size}` starts there)")
    return lines


def _mean_energies(records) -> dict[str, float]:
    """Mean final energy per condition (NaN, stored as null, when a sample's energy was not finite)."""
    names = sorted({k for r in records for k in r["final_energy"]})
    return {n: float(np.mean([np.nan if r["final_energy"][n] is None else r["final_energy"][n]
                              for r in records if n in r["final_energy"]])) for n in names}


def _evaluate(plan, pipeline, records, samples: torch.Tensor, out: Path) -> dict:
    """Every registered evaluator that applies to the recipe; one that fails is reported, not fatal."""
    evaluators, errors = build_evaluators(plan)
    results: dict = {"errors": errors} if errors else {}
    if not evaluators:
        return results
    if pipeline is None:  # everything was resumed: the evaluators need the built model and conditions
        pipeline = build_pipeline(plan)
    images = torch.stack([load_image(_sample_paths(out, r["index"])["png"]) for r in records])
    run = FinishedRun(plan.recipe.model_dump(mode="json"), pipeline.model, pipeline.conditions, samples, images,
                      [r["index"] for r in records])
    for name, evaluator in evaluators.items():
        try:
            results[name] = evaluator.evaluate(run)
        except Exception as exc:
            results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
    return results
