"""Accuracy-vs-rounds plots (like the paper's Figure 4), written as PNG with matplotlib's Agg backend."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_run(records: list[dict], path: str | Path, pivot: int | None = None, title: str = "") -> Path:
    """Test accuracy against rounds for one run; a dashed vertical line marks the pivot.

    Args:
        records: metrics records (``round`` and ``accuracy``; rounds without evaluation skipped).
        path: PNG to write.
        pivot: first ZO round (not drawn when None, 0, or past the last round).
    """
    plt = _plt()
    pts = [(r["round"] + 1, 100 * r["accuracy"]) for r in records if r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    if pts:
        x, y = zip(*pts)
        ax.plot(x, y, lw=1.5)
    last = max((r["round"] + 1 for r in records), default=0)
    if pivot and 0 < pivot < last:
        ax.axvline(pivot, color="k", ls="--", lw=1, label=f"pivot (round {pivot})")
        ax.legend(loc="lower right")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_experiment(curves: dict[str, list[list[dict]]], path: str | Path, pivot: int | None = None,
                    title: str = "") -> Path:
    """Mean test accuracy (band: +-1 std over seeds) against rounds for several methods.

    Args:
        curves: method label -> one metrics record list per seed.
        path: PNG to write.
        pivot: round marked with a dashed line (the warm-up's end).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    last = 0
    for label, runs in curves.items():
        series = []
        for recs in runs:
            series.append({r["round"] + 1: 100 * r["accuracy"] for r in recs
                           if r.get("accuracy") is not None})
            last = max(last, max((r["round"] + 1 for r in recs), default=0))
        xs = sorted(set.intersection(*(set(s) for s in series))) if series else []
        if not xs:
            continue
        arr = np.array([[s[x] for x in xs] for s in series])
        mean, std = arr.mean(0), arr.std(0)
        ax.plot(xs, mean, lw=1.5, label=f"{label} (n={len(series)})")
        if len(series) > 1:
            ax.fill_between(xs, mean - std, mean + std, alpha=0.2)
    if pivot and 0 < pivot < last:
        ax.axvline(pivot, color="k", ls="--", lw=1, label=f"pivot (round {pivot})")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
