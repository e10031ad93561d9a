"""`zmagic eval DIR`: every metric an experiment's conditions call for, per variant, with a bootstrap
interval over rows; writes ``metrics.json``, ``report.md`` and ``figures/`` (``app/report.py``).

Where the numbers come from, per run folder (one variant, one row):

- the per-run evaluators (the ``register_evaluators`` hook; the runner stores their results in
  record.json under ``evaluation.<name>``).  An evaluator reports metrics in this form::

      {"metrics": {"id_distance": {"label": "ID distance", "better": "lower", "per_sample": [...],
                                   "independent": true, "network": "dlib ..."}},
       "note": "why something was skipped"}

  (``value`` instead of ``per_sample`` for a figure of the whole run).  The shapes world's exact
  evaluator (``models/shapes/evaluate.py``) has its own form, read by :func:`shapes_metrics`;
- the guide's own final energies (record.json ``final_energy``), labelled as the guide's: the
  guiding network judging itself, reported beside the independent metrics, never instead of them.

A row's value of a metric is the mean over its samples (or the run figure); a variant's value is the
mean over rows, with a percentile bootstrap interval over rows.  Set statistics (FID against a
reference folder, ``app/evaluation_fid.py``) are computed once per variant over all its images.
In the shapes world the exact conditional sampler (the oracle: the world reweighted by
prod_i p(c_i | k), no guidance, the rows' seeds) is evaluated the same way as a reference row.

An unfinished experiment (killed, or samples that failed) is evaluated over what each variant has;
the notes say what each lacks, and no variant is marked best on a metric the variants were measured
on over different (row, samples).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from zmagic_core.app.runner import RECORD, _read_json
from zmagic_core.contracts.components import FinishedRun
from zmagic_core.files.atomic import write_json

METRICS, REPORT, FIGURES = "metrics.json", "report.md", "figures"
ORACLE = "oracle"
GUIDE = "guide"


@dataclass
class Metric:
    key: str
    label: str
    evaluator: str
    better: str = "lower"          # lower | higher
    independent: bool = True       # False: the guiding network's own judgement
    network: str = ""


@dataclass
class RowResult:
    """One run folder's figures: metric key -> row value, plus notes and the samples' traces."""

    values: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    traces: list[list[dict]] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)

    def add(self, metric: Metric, value) -> None:
        self.metrics.setdefault(metric.key, metric)
        self.values[metric.key] = _mean(value) if isinstance(value, (list, tuple)) else _number(value)


def _number(value) -> float:
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else float("nan")


def _mean(values) -> float:
    v = np.array([_number(x) for x in values], dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


# -- per-run evaluations -> metrics ------------------------------------------------------------------
SHAPES_EVALUATOR = "shapes (exact: the world's p(c|k), not the guiding energies)"


def shapes_metrics(result: dict, row: RowResult) -> None:
    """The shapes world's exact evaluation (models/shapes/evaluate.py) as metrics."""
    samples, summary = result.get("samples") or [], result.get("summary") or {}
    row.add(Metric("joint_satisfaction", "joint satisfaction", SHAPES_EVALUATOR, "higher"),
            [s.get("joint") for s in samples])
    row.add(Metric("on_manifold", "on-manifold rate", SHAPES_EVALUATOR, "higher"),
            [s.get("on_manifold") for s in samples])
    if "tv_distance" in summary:
        row.add(Metric("tv_distance", "TV distance to the exact conditional", SHAPES_EVALUATOR, "lower"),
                summary["tv_distance"])
    elif "tv_to_target" in summary:
        row.add(Metric("tv_distance", "TV distance to the exact conditional (satisfying samples)",
                       SHAPES_EVALUATOR, "lower"), summary["tv_to_target"])
    for name in (summary.get("satisfaction") or {}):
        row.add(Metric(f"satisfied:{name}", f"satisfied: {name}", SHAPES_EVALUATOR, "higher"),
                [(s.get("satisfied") or {}).get(name) for s in samples])


def generic_metrics(name: str, result: dict, row: RowResult) -> None:
    """An evaluator's ``metrics`` (the form in the module docstring) and its ``note``."""
    if not isinstance(result, dict):
        return
    if result.get("note"):
        row.notes.append(f"{name}: {result['note']}")
    for key, m in (result.get("metrics") or {}).items():
        if not isinstance(m, dict):
            continue
        metric = Metric(key, m.get("label") or key, m.get("evaluator") or name, m.get("better", "lower"),
                        bool(m.get("independent", True)), m.get("network", ""))
        row.add(metric, m["per_sample"] if "per_sample" in m else m.get("value"))


def guide_metrics(final_energy: dict, kinds: dict[str, str], row: RowResult) -> None:
    """The guide's own final energies per condition (mean over the row's samples)."""
    names = sorted({n for e in final_energy.values() for n in (e or {})})
    for n in names:
        kind = kinds.get(n, n)
        row.add(Metric(f"guide:{n}", f"guide energy: {n}", f"{GUIDE}: {kind} energy (the guiding network itself)",
                       "lower", independent=False), [(e or {}).get(n) for e in final_energy.values()])


def condition_kinds(recipe: dict) -> dict[str, str]:
    out = {}
    for c in recipe.get("conditions") or []:
        out[c.get("name") or c.get("kind")] = c.get("kind")
    return out


def row_result(folder: Path, record: dict) -> RowResult:
    row = RowResult()
    evaluation = record.get("evaluation") or {}
    for name, result in evaluation.items():
        if name == "errors":
            row.notes += [f"{k}: failed: {v}" for k, v in (result or {}).items()]
        elif name == "shapes":
            shapes_metrics(result, row)
        else:
            generic_metrics(name, result, row)
    guide_metrics(record.get("final_energy") or {}, condition_kinds(record.get("recipe") or {}), row)
    row.traces = [t for _, t in sorted((record.get("trace") or {}).items(), key=lambda kv: int(kv[0]))]
    row.images = [folder / f"sample_{int(i):04d}.png" for i in record.get("completed") or []]
    failures: dict[str, int] = {}
    for message in (record.get("failed") or {}).values():
        failures[message] = failures.get(message, 0) + 1
    row.notes += [f"{n} sample(s) failed: {m}" for m, n in failures.items()]
    return row


# -- the oracle (shapes world) -------------------------------------------------------------------------
def oracle_row(plan, builder, seeds: list[int]) -> Optional[RowResult]:
    """Samples of the exact conditional model for a shapes-world row, evaluated like the variants."""
    from zmagic_core.app.runner import _final_energies
    from zmagic_core.method.combiners import SumCombiner
    from zmagic_core.models.shapes.evaluate import ShapesEvaluator, target_log_weights
    from zmagic_core.models.shapes.world import ShapesModel
    from zmagic_core.sampling.pipeline import Pipeline

    pipeline = builder.pipeline(plan)
    world = pipeline.model
    if not isinstance(world, ShapesModel):
        return None
    energies = [c.energy for c in pipeline.conditions if hasattr(c.energy, "log_likelihood")]
    joint = world.conditioned(target_log_weights(world, energies))
    import dataclasses

    watched = [dataclasses.replace(c, start=-1) for c in pipeline.conditions]  # energies traced, never guiding
    oracle = Pipeline(joint, pipeline.solver, SumCombiner(), watched, steps=plan.recipe.solver.steps,
                      device=pipeline.device)
    run = oracle.run(seeds, batch_size=plan.recipe.batch_size, progress=False)
    row = RowResult()
    recipe = plan.recipe.model_dump(mode="json")
    finished = FinishedRun(recipe, world, pipeline.conditions, run.samples, run.images, list(range(len(seeds))))
    shapes_metrics(ShapesEvaluator().evaluate(finished), row)
    final = {str(k): _final_energies(pipeline, run.images[k:k + 1]) for k in range(len(run.seeds))}
    guide_metrics(final, condition_kinds(recipe), row)
    row.traces = run.trace
    return row


# -- aggregation --------------------------------------------------------------------------------------
def bootstrap(values: list[float], resamples: int, confidence: float, seed: int) -> dict:
    """Mean over rows and a percentile bootstrap interval over rows (rows resampled with replacement);
    NaN rows (no value) are left out."""
    v = np.array(values, dtype=float)
    v = v[np.isfinite(v)]
    out: dict[str, Any] = {"value": float(v.mean()) if len(v) else None, "low": None, "high": None, "rows": int(len(v))}
    if len(v) >= 2 and resamples > 0:
        rng = np.random.default_rng(seed)
        means = v[rng.integers(0, len(v), size=(resamples, len(v)))].mean(1)
        alpha = (1 - confidence) / 2
        out["low"], out["high"] = float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))
    elif len(v) == 1:
        out["low"] = out["high"] = float(v[0])
    return out


def energy_curves(traces: list[list[dict]]) -> dict:
    """Per condition: timesteps, and the median and quartiles over samples of the energy per step."""
    if not traces:
        return {}
    ts = [r["t"] for r in traces[0]]
    names = sorted({k for tr in traces for r in tr for k in (r.get("energy") or {})})
    out = {}
    for n in names:
        values = np.array([[_number((r.get("energy") or {}).get(n)) for r in tr] for tr in traces
                           if len(tr) == len(ts)], dtype=float)
        if not len(values):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            q = np.nanpercentile(values, [25, 50, 75], axis=0)
        out[n] = {"t": ts, "median": q[1].tolist(), "q25": q[0].tolist(), "q75": q[2].tolist()}
    return out


def evaluate_experiment(out: Path, exp=None, builder=None, registry=None, recompute: bool = False,
                        log=print) -> dict:
    """Evaluate an experiment folder; writes metrics.json, report.md and figures/; returns the metrics."""
    from zmagic_core.app.experiment import Builder, aggregate_folder, load_experiment
    from zmagic_core.assembly.build import check_recipe

    out = Path(out)
    exp = exp or load_experiment(out)
    builder = builder or Builder()
    spec = exp.spec.evaluation
    metrics: dict[str, Metric] = {}
    per_row: dict[str, dict[str, dict[str, float]]] = {}   # variant -> metric -> row -> value
    notes: list[str] = []
    curves, images = {}, {}
    measured: dict[str, dict[str, tuple]] = {}   # variant -> row -> sample indices completed
    plans = {}

    def plan_of(variant, row):
        if (variant, row.index) not in plans:
            plans[(variant, row.index)] = check_recipe(exp.recipe(variant, row), registry)
        return plans[(variant, row.index)]

    for variant in exp.variants:
        traces, pngs = [], []
        for row in exp.rows:
            folder = exp.folder(out, variant, row)
            record = _read_json(folder / RECORD)
            if recompute or not isinstance(record, dict):
                if not folder.is_dir():
                    notes.append(f"{variant}/{row.key}: no run folder (not generated yet)")
                    continue
                record = aggregate_folder(exp, out, variant, row, plan_of(variant, row), builder, {}, 0.0, 0)
            result = row_result(folder, record)
            if record.get("completed"):
                measured.setdefault(variant, {})[row.key] = tuple(sorted(int(i) for i in record["completed"]))
            for key, value in result.values.items():
                metrics.setdefault(key, result.metrics[key])
                per_row.setdefault(variant, {}).setdefault(key, {})[row.key] = value
            notes += [f"{variant}/{row.key}: {n}" for n in result.notes]
            traces += result.traces
            pngs += result.images
        curves[variant], images[variant] = energy_curves(traces), pngs

    first = next(iter(exp.variants))
    if spec.oracle and (exp.base.get("model") or {}).get("kind", "shapes") == "shapes":
        traces = []
        for row in exp.rows:
            try:
                result = oracle_row(plan_of(first, row), builder, exp.seeds(row))
            except Exception as exc:  # noqa: BLE001 - a row whose conditions do not build: the others go on
                notes.append(f"{ORACLE}/{row.key}: not sampled: {' '.join(str(exc).split())}")
                continue
            if result is None:
                break
            for key, value in result.values.items():
                metrics.setdefault(key, result.metrics[key])
                per_row.setdefault(ORACLE, {}).setdefault(key, {})[row.key] = value
            traces += result.traces
        if traces:
            curves[ORACLE] = energy_curves(traces)

    if spec.fid is not None:
        from zmagic_core.app.evaluation_fid import FID_EVALUATOR, fid_for_variants

        fid, note = fid_for_variants(images, spec.fid, exp.recipe_dir if exp.path else out, log=log)
        if note:
            notes.append(f"fid: {note}")
        if fid:
            metrics["fid"] = Metric("fid", "FID", FID_EVALUATOR, "lower", True, "Inception-v3 pool3 (2048)")
            for variant, value in fid.items():
                per_row.setdefault(variant, {})["fid"] = {"(all rows)": value}

    summary: dict[str, dict[str, dict]] = {}
    for variant, by_metric in per_row.items():
        for key, rows in by_metric.items():
            if key == "fid":
                value = next(iter(rows.values()))
                summary.setdefault(variant, {})[key] = {"value": value, "low": None, "high": None,
                                                        "rows": len(measured.get(variant, {})),
                                                        "note": "set statistic: no interval"}
                continue
            values = [rows.get(r.key, float("nan")) for r in exp.rows]
            summary.setdefault(variant, {})[key] = bootstrap(values, spec.bootstrap, spec.confidence, spec.seed)
    coverage = {v: variant_coverage(exp, measured.get(v, {})) for v in exp.variants}
    for v, c in coverage.items():  # an unfinished run (killed, or failed samples): say what each variant lacks
        if c["missing_samples"]:
            rows = c["missing_rows"]
            shown = f" ({', '.join(rows[:5])}{' ...' if len(rows) > 5 else ''})" if rows else ""
            notes.append(f"{v}: incomplete: lacks {len(rows)} of {len(exp.rows)} rows{shown} and "
                         f"{c['missing_samples']} of {c['samples'] + c['missing_samples']} samples; "
                         "its numbers are over the rows and samples it has")
    unmatched = unmatched_metrics(per_row, measured, list(exp.variants))
    best = best_variants(summary, {k: m for k, m in metrics.items() if k not in unmatched}, list(exp.variants))
    result = {
        "experiment": exp.name,
        "variants": {v: {"label": exp.variants[v].label or v, **coverage[v]} for v in exp.variants},
        "unmatched": unmatched,
        "reference": {ORACLE: "exact conditional sampler (shapes world), the rows' seeds"} if ORACLE in per_row else {},
        "rows": len(exp.rows),
        "samples_per_row": exp.spec.samples_per_row,
        "bootstrap": {"resamples": spec.bootstrap, "confidence": spec.confidence, "over": "rows", "seed": spec.seed},
        "metrics": {k: {"label": m.label, "evaluator": m.evaluator, "better": m.better,
                        "independent": m.independent, "network": m.network} for k, m in metrics.items()},
        "summary": summary,
        "best": best,
        "per_row": per_row,
        "energy_curves": curves,
        "notes": sorted(set(notes)),
    }
    write_json(out / METRICS, result, indent=1)
    from zmagic_core.app.report import write_report

    write_report(out, result)
    log(f"wrote {out / METRICS}, {out / REPORT} and {out / FIGURES}/")
    return result


def variant_coverage(exp, measured: dict[str, tuple]) -> dict:
    """How much of the experiment a variant has: samples and rows done, rows and samples lacking."""
    samples = sum(len(v) for v in measured.values())
    expected = sum(len(exp.seeds(r)) for r in exp.rows)
    return {"samples": samples, "rows": len(measured),
            "missing_rows": [r.key for r in exp.rows if r.key not in measured], "missing_samples": expected - samples}


def unmatched_metrics(per_row: dict, measured: dict, variants: list[str]) -> list[str]:
    """Metrics on which the variants that have a value were measured over different (row, samples):
    their values are not comparable, so no variant is marked best on them."""
    out = []
    for key in dict.fromkeys(k for v in variants for k in per_row.get(v, {})):
        seen = set()
        for v in variants:
            rows = per_row.get(v, {}).get(key)
            if not rows:
                continue
            if key == "fid":  # a set statistic: over every sample the variant has
                keys = measured.get(v, {}).keys()
            else:
                keys = [r for r, x in rows.items() if math.isfinite(x)]
            seen.add(frozenset((r, measured.get(v, {}).get(r, ())) for r in keys))
        if len(seen) > 1:
            out.append(key)
    return out


def best_variants(summary: dict, metrics: dict[str, Metric], variants: list[str]) -> dict[str, list[str]]:
    """Per metric, the variants (not the reference rows) with the best value."""
    best = {}
    for key, metric in metrics.items():
        values = {v: (summary.get(v, {}).get(key) or {}).get("value") for v in variants}
        values = {v: x for v, x in values.items() if x is not None and math.isfinite(x)}
        if len(values) < 2:
            continue
        target = min(values.values()) if metric.better == "lower" else max(values.values())
        winners = [v for v, x in values.items() if math.isclose(x, target, rel_tol=1e-12, abs_tol=1e-12)]
        if len(winners) < len(values):  # all equal: nobody is best
            best[key] = winners
    return best
