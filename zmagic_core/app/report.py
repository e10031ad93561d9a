"""An experiment's report: ``report.md`` (variants x metrics, best marked, which evaluator produced
each number) and ``figures/`` (a bar chart with intervals per metric; energy per step per variant,
the paper's Figure 3), from the dict that ``app/evaluation.py`` writes to metrics.json."""
from __future__ import annotations

import io
import math
import re
from pathlib import Path

from zmagic_core.files.atomic import write_bytes, write_text

REFERENCE_LABEL = {"oracle": "oracle (exact conditional, reference)"}


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    a = abs(x)
    if a != 0 and (a >= 1e4 or a < 1e-3):
        return f"{x:.3g}"
    return f"{x:.3f}" if a < 100 else f"{x:.1f}"


def _cell(entry: dict | None) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    text = _fmt(entry["value"])
    if entry.get("low") is not None and entry.get("high") is not None and entry["low"] != entry["high"]:
        text += f" [{_fmt(entry['low'])}, {_fmt(entry['high'])}]"
    return text


def slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("_") or "metric"


def ordered_metrics(result: dict) -> list[str]:
    """Independent metrics first (in the order they came), then the guide's own energies."""
    keys = list(result["metrics"])
    return [k for k in keys if result["metrics"][k]["independent"]] + \
        [k for k in keys if not result["metrics"][k]["independent"]]


def table_rows(result: dict) -> list[list[str]]:
    """The table as cells: a header, then one row per variant, then the reference rows."""
    keys = ordered_metrics(result)
    arrows = {"lower": "↓", "higher": "↑"}
    header = ["variant"] + [f"{result['metrics'][k]['label']} {arrows.get(result['metrics'][k]['better'], '')}"
                            for k in keys]
    rows = [header]
    for variant, info in result["variants"].items():
        cells = [(info.get("label") or variant) + _incomplete(info, result["rows"])]
        for k in keys:
            cell = _cell(result["summary"].get(variant, {}).get(k))
            if variant in result["best"].get(k, []):
                cell = f"**{cell}** \\*"
            cells.append(cell)
        rows.append(cells)
    for ref in result.get("reference", {}):
        rows.append([REFERENCE_LABEL.get(ref, ref)] + [_cell(result["summary"].get(ref, {}).get(k)) for k in keys])
    return rows


def _incomplete(info: dict, rows: int) -> str:
    """' (incomplete: 11/12 rows, 22/24 samples)' for a variant that lacks rows or samples, else ''."""
    missing = info.get("missing_samples") or 0
    if not missing:
        return ""
    return f" (incomplete: {info['rows']}/{rows} rows, {info['samples']}/{info['samples'] + missing} samples)"


def _esc(text: str) -> str:
    return str(text).replace("|", "\\|")


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_esc(c) for c in rows[0]) + " |", "|" + "|".join(["---"] * len(rows[0])) + "|"]
    lines += ["| " + " | ".join(_esc(c) for c in r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _unmatched_text(result: dict) -> str:
    """The header's sentence on variants that lack rows or samples (an unfinished run), else ''."""
    incomplete = [v for v, info in result["variants"].items() if info.get("missing_samples")]
    keys = ordered_metrics(result)
    unmatched = [k for k in keys if k in result.get("unmatched", [])]
    text = (f" Not every variant has every row and sample ({', '.join(incomplete)}: see Notes); each number is "
            "over the rows and samples its variant has." if incomplete else "")
    if unmatched:
        which = "any metric" if unmatched == keys else ", ".join(result["metrics"][k]["label"] for k in unmatched)
        text += f" No best is marked on {which}: the variants were measured over different rows or samples."
    return text


def write_report(out: Path, result: dict) -> list[str]:
    """report.md and figures/ under ``out``; returns the figure paths written (relative to ``out``)."""
    out = Path(out)
    figures = write_figures(out, result)
    boot = result["bootstrap"]
    lines = [f"# Experiment: {result['experiment']}", "",
             f"{len(result['variants'])} variants x {result['rows']} rows x {result['samples_per_row']} samples "
             f"per row. Each number is the mean over rows of the row's mean over its samples, with a "
             f"{boot['confidence']:.0%} percentile bootstrap interval over rows ({boot['resamples']} resamples) "
             "in brackets. Best variant per metric in **bold** with \\*."
             + (" The reference row is not a variant: it is what the metrics give for exact samples."
                if result.get("reference") else "") + _unmatched_text(result), "",
             markdown_table(table_rows(result)), "", "## Which evaluator produced each number", "",
             "| metric | evaluator | better | independent of the guide |", "|---|---|---|---|"]
    for k in ordered_metrics(result):
        m = result["metrics"][k]
        who = m["evaluator"] + (f" ({m['network']})" if m.get("network") else "")
        lines.append(f"| {_esc(m['label'])} | {_esc(who)} | {m['better']} | "
                     f"{'yes' if m['independent'] else 'no: the guiding network judging itself'} |")
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    write_text(out / "report.md", "\n".join(lines) + "\n")
    return figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    write_bytes(path, buf.getvalue())


def write_figures(out: Path, result: dict) -> list[str]:
    plt = _plt()
    folder = out / "figures"
    folder.mkdir(exist_ok=True)
    written = []
    names = list(result["variants"]) + list(result.get("reference", {}))
    for key in ordered_metrics(result):
        m = result["metrics"][key]
        shown = [(n, result["summary"].get(n, {}).get(key)) for n in names]
        shown = [(n, e) for n, e in shown if e and e.get("value") is not None]
        if not shown:
            continue
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(shown), 3))
        values = [e["value"] for _, e in shown]
        low = [e["value"] - e["low"] if e.get("low") is not None else 0.0 for _, e in shown]
        high = [e["high"] - e["value"] if e.get("high") is not None else 0.0 for _, e in shown]
        colors = ["0.6" if n in result.get("reference", {}) else f"C{i}" for i, (n, _) in enumerate(shown)]
        ax.bar(range(len(shown)), values, yerr=[low, high], capsize=4, color=colors)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels([result["variants"].get(n, {}).get("label", n) for n, _ in shown], rotation=20,
                           fontsize=8)
        ax.set_title(f"{m['label']} ({m['better']} is better)", fontsize=9)
        fig.tight_layout()
        name = f"figures/metric_{slug(key)}.png"
        _save(fig, out / name)
        plt.close(fig)
        written.append(name)
    curves = result.get("energy_curves") or {}
    conditions = sorted({c for per in curves.values() for c in per})
    if conditions:
        fig, axes = plt.subplots(1, len(conditions), figsize=(4 * len(conditions), 3), squeeze=False)
        for ax, cond in zip(axes[0], conditions):
            for i, name in enumerate(names):
                curve = (curves.get(name) or {}).get(cond)
                if not curve:
                    continue
                style = "--" if name in result.get("reference", {}) else "-"
                color = "0.4" if name in result.get("reference", {}) else f"C{i}"
                ax.plot(curve["t"], curve["median"], style, color=color,
                        label=result["variants"].get(name, {}).get("label", name))
                ax.fill_between(curve["t"], curve["q25"], curve["q75"], color=color, alpha=0.12)
            ax.set_title(f"energy: {cond}", fontsize=9)
            ax.set_xlabel("timestep t")
            ax.invert_xaxis()
            ax.legend(fontsize=7)
        fig.suptitle("energy per step: median over samples, quartile band (paper Figure 3)", fontsize=9)
        fig.tight_layout()
        _save(fig, out / "figures/energy.png")
        plt.close(fig)
        written.append("figures/energy.png")
    return written
