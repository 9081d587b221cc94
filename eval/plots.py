"""PNG plots (matplotlib, Agg): accuracy and reference NLL per method, and expert-usage shift heatmaps."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grouped_bars(runs: Sequence[dict[str, Any]], value: Any, ylabel: str, title: str, path: Path) -> None:
    plt = _plt()
    tasks = sorted({r["task"] for r in runs})
    methods = sorted({r["method"] for r in runs})
    by = {(r["task"], r["method"]): r for r in runs}
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(tasks) + 1), 3.6))
    for j, m in enumerate(methods):
        xs, ys, lo, hi = [], [], [], []
        for i, t in enumerate(tasks):
            iv = value(by[(t, m)]) if (t, m) in by else None
            if iv is None:
                continue
            xs.append(i + (j - (len(methods) - 1) / 2) * width)
            ys.append(iv["value"])
            lo.append(max(0.0, iv["value"] - iv["low"]))
            hi.append(max(0.0, iv["high"] - iv["value"]))
        if xs:
            ax.bar(xs, ys, width=width, yerr=[lo, hi], capsize=2, label=m)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _heatmap(run: dict[str, Any], path: Path) -> None:
    import numpy as np

    plt = _plt()
    shift = np.array(run["routing"]["shift"], dtype=float)
    vmax = float(np.abs(shift).max()) or 1e-9
    fig, ax = plt.subplots(figsize=(max(4.0, 0.28 * shift.shape[1] + 2), max(2.5, 0.35 * shift.shape[0] + 1.2)))
    im = ax.imshow(shift, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    ax.set_yticks(range(shift.shape[0]), [str(x) for x in run["routing"]["layers"]])
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_title(f"{run['task']} / {run['method']}: expert usage, rerouted - base")
    fig.colorbar(im, ax=ax, label="share of selections")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(runs: Sequence[dict[str, Any]], plot_dir: Path) -> list[Path]:
    """Write ``accuracy.png``, ``ref_nll.png`` and one ``routing_shift_<task>_<method>.png`` per rerouted run."""
    if not runs:
        return []
    plot_dir.mkdir(parents=True, exist_ok=True)
    made = []
    acc = [r for r in runs if r.get("metrics")]
    if acc:
        p = plot_dir / "accuracy.png"
        _grouped_bars(acc, lambda r: r["metrics"]["accuracy"], "accuracy (95% Wilson)", "Accuracy per method", p)
        made.append(p)
    nll = [r for r in runs if r.get("ref_nll")]
    if nll:
        p = plot_dir / "ref_nll.png"
        _grouped_bars(
            nll, lambda r: r["ref_nll"]["value"], "nats/token (95% bootstrap)", "Reference NLL given the prompt", p
        )
        made.append(p)
    for r in runs:
        if r.get("routing"):
            name = re.sub(r"[^A-Za-z0-9_.+=-]", "_", f"routing_shift_{r['task']}_{r['method']}")
            p = plot_dir / f"{name}.png"
            _heatmap(r, p)
            made.append(p)
    return made
