"""`zmagic generate`: run a recipe into a folder of PNGs, per-sample records and plots.

A folder belongs to one recipe (recorded in recipe.json).  Running again resumes: samples whose
PNG, record and array are all present are skipped.  A folder holding another recipe's results
is never overwritten.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from zmagic_core.contracts.errors import ConfigError, InputError
from zmagic_core.files.images import image_grid, load_image, save_image
from zmagic_core.app.plots import plot_cosines, plot_energies
from zmagic_core.assembly.build import build_evaluators, build_pipeline, check_recipe
from zmagic_core.assembly.recipe import Recipe, recipe_identity
from zmagic_core.contracts.components import FinishedRun


def _sample_paths(out: Path, index: int) -> dict[str, Path]:
    stem = out / f"sample_{index:04d}"
    return {"png": stem.with_suffix(".png"), "json": stem.with_suffix(".json"), "npy": stem.with_suffix(".npy")}


def _claim_folder(out: Path, recipe: Recipe) -> None:
    """Create the folder, or check that it holds results of this same recipe."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output folder {out}: {exc}") from None
    identity = recipe_identity(recipe)
    marker = out / "recipe.json"
    if marker.exists():
        previous = json.loads(marker.read_text()).get("identity")
        if previous != identity:
            diff = _diff_keys(previous or {}, identity)
            raise ConfigError(f"output folder {out} holds results of a different recipe (differs in: "
                              f"{', '.join(diff) or 'unknown'}); choose another --out or remove the folder")
    elif any(out.glob("sample_*.png")):
        raise ConfigError(f"output folder {out} already holds samples of an unknown run; choose another --out")
    marker.write_text(json.dumps({"identity": identity, "recipe": recipe.model_dump(mode="json")}, indent=2))


def _diff_keys(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def generate(recipe: Recipe, out: Optional[Path] = None, progress: Optional[bool] = None, registry=None) -> dict:
    """Run (or resume) a recipe into ``out``; returns the aggregated record."""
    out = Path(out or recipe.output or "outputs/run")
    plan = check_recipe(recipe, registry)  # once per run: the build below reuses it
    _claim_folder(out, recipe)
    seeds = recipe.sample_seeds()
    pending = []
    for i, seed in enumerate(seeds):
        paths = _sample_paths(out, i)
        if all(p.exists() for p in paths.values()):
            stored = json.loads(paths["json"].read_text()).get("seed")
            if stored != seed:
                raise ConfigError(f"{paths['json']} was made with seed {stored}, the recipe asks for {seed}; "
                                  "choose another --out")
        else:
            pending.append(i)

    started = time.perf_counter()
    pipeline = None
    errors: dict[str, str] = {}
    if pending:
        pipeline = build_pipeline(plan)
        show = recipe.progress if progress is None else progress
        for start in range(0, len(pending), recipe.batch_size):
            chunk = pending[start:start + recipe.batch_size]
            result = pipeline.run([seeds[i] for i in chunk], batch_size=recipe.batch_size, progress=show)
            by_seed = {s: k for k, s in enumerate(result.seeds)}
            for i in chunk:
                if seeds[i] in result.errors:
                    errors[str(i)] = result.errors[seeds[i]]
                    continue
                k = by_seed[seeds[i]]
                _write_sample(out, i, seeds[i], result.samples[k], result.images[k], result.trace[k],
                              _final_energies(pipeline, result.images[k:k + 1]))
    elapsed = time.perf_counter() - started
    return _aggregate(out, plan, seeds, pipeline, errors, elapsed, len(pending))


def _final_energies(pipeline, images: torch.Tensor) -> dict[str, float]:
    out = {}
    with torch.no_grad():
        for c in pipeline.conditions:
            if c.energy is not None:
                out[c.name] = float(c.energy(images.to(pipeline.device))[0])
    return out


def _write_sample(out: Path, index: int, seed: int, sample, image, trace, energies) -> None:
    paths = _sample_paths(out, index)
    np.save(paths["npy"], sample.numpy().astype(np.float32), allow_pickle=False)
    save_image(image, paths["png"])
    paths["json"].write_text(json.dumps({"index": index, "seed": seed, "final_energy": energies,
                                         "trace": trace}))


def _aggregate(out: Path, plan, seeds, pipeline, errors, elapsed, generated) -> dict:
    recipe = plan.recipe
    records, samples = [], []
    for i in range(len(seeds)):
        paths = _sample_paths(out, i)
        if all(p.exists() for p in paths.values()):
            records.append(json.loads(paths["json"].read_text()))
            samples.append(torch.from_numpy(np.load(paths["npy"], allow_pickle=False)))
    previous = {}
    record_path = out / "record.json"
    if record_path.exists():
        previous = json.loads(record_path.read_text())
    seconds = previous.get("seconds", 0.0) + (elapsed if generated else 0.0)
    record = {
        "recipe": recipe.model_dump(mode="json"),
        "seeds": seeds,
        "completed": [r["index"] for r in records],
        "failed": errors,
        "seconds": seconds,
        "seconds_per_sample": seconds / max(previous.get("generated", 0) + generated, 1),
        "generated": previous.get("generated", 0) + generated,
        "final_energy": {r["index"]: r["final_energy"] for r in records},
        "mean_final_energy": _mean_energies(records),
        "trace": {r["index"]: r["trace"] for r in records},
    }
    if samples:
        record["evaluation"] = _evaluate(plan, pipeline, records, torch.stack(samples), out)
    record_path.write_text(json.dumps(record))
    if samples:
        images = torch.stack([load_image(_sample_paths(out, r["index"])["png"]) for r in records])
        if images.shape[-1] < 128:  # small images (the shapes world) are enlarged to be seen
            factor = 128 // images.shape[-1]
            images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
        save_image(image_grid(images), out / "grid.png")
        traces = [r["trace"] for r in records]
        title = f"{recipe.combiner.kind} ({len(records)} samples)"
        plot_energies(traces, out / "energy.png", title)
        plot_cosines(traces, out / "cosine.png", title)
    return record


def _mean_energies(records) -> dict[str, float]:
    names = sorted({k for r in records for k in r["final_energy"]})
    return {n: float(np.mean([r["final_energy"][n] for r in records if n in r["final_energy"]])) for n in names}


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
