"""The paper's two diagnostic figures from a run's trace (matplotlib, written as PNG, atomically)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from zmagic_core.files.atomic import write_bytes


def _save(fig, path: Path) -> None:
    """Render the figure to PNG bytes, then write them atomically (no half-written plot ever)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_bytes(path, buf.getvalue())


def _series(traces: list[list[dict]], group: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-step values (samples x steps) of every key under ``group`` in the trace records."""
    if not traces:
        return np.zeros(0), {}
    ts = np.array([r["t"] for r in traces[0]])
    keys = sorted({k for tr in traces for r in tr for k in (r.get(group) or {})})
    out = {}
    for k in keys:
        out[k] = np.array([[r.get(group, {}).get(k, np.nan) for r in tr] for tr in traces], dtype=float)
    return ts, out


def _band(ax, ts, values, label):
    import warnings

    with warnings.catch_warnings():  # steps where a condition is outside its window are all-NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(values, 0)
        lo, hi = np.nanpercentile(values, 25, 0), np.nanpercentile(values, 75, 0)
    (line,) = ax.plot(ts, mean, label=label)
    ax.fill_between(ts, lo, hi, color=line.get_color(), alpha=0.2)


def plot_energies(traces, path: Path, title: str = "") -> None:
    """Energy of every condition over the sampling steps (paper Figure 3): mean and quartiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts, series = _series(traces, "energy")
    fig, axes = plt.subplots(1, max(len(series), 1), figsize=(4 * max(len(series), 1), 3), squeeze=False)
    for ax, (name, values) in zip(axes[0], series.items()):
        _band(ax, ts, values, name)
        ax.set_title(f"energy: {name}")
        ax.set_xlabel("timestep t")
        ax.invert_xaxis()
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_cosines(traces, path: Path, title: str = "") -> None:
    """Cosine between the conditions' gradients over the steps (paper Figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts, series = _series(traces, "cosine")
    extra = {k: np.array([[r.get(k, np.nan) for r in tr] for tr in traces], dtype=float)
             for k in sorted({k for tr in traces for r in tr for k in r if k.startswith("cos(")})}
    fig, ax = plt.subplots(figsize=(5, 3))
    for name, values in {**series, **extra}.items():
        _band(ax, ts, values, name)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("cosine")
    ax.invert_xaxis()
    if series or extra:
        ax.legend(fontsize=7)
    ax.set_title(title or "gradient cosine")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
