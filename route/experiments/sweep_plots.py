"""Figures of a detector sweep (matplotlib, Agg backend), from the rows of `route.experiments.sweep.collect`.

- `plot_heatmap`: deployed hack rate over detector TPR (x) x FPR (y), one column per arm (intervention
  and any other grid value besides tpr, fpr and seed; seeds averaged), one row per measure: all test
  prompts, prompts whose loophole the detector knows, prompts with a held-out loophole (rows without data
  are left out; the per-mode rows average each mode's rate on its own prompts).
- `plot_tradeoff`: deployed hack rate against deployed solve rate, one point per cell, coloured by arm,
  with the base organism as a reference.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from route.utils.io import save_figure

MEASURES = (("deployed_hack_rate", "all prompts"), ("deployed_hack_known", "known-mode prompts"),
            ("deployed_hack_held_out", "held-out-mode prompts"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not math.isnan(v)


def _arms(rows: list[dict[str, Any]]) -> list[str]:
    order = {"none": 0, "filter": 1, "penalty": 2, "route": 3}
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    return sorted(arms, key=lambda a: (order.get(a.split()[0], 9), arms.index(a)))


def plot_heatmap(rows: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Deployed hack rate over tpr x fpr per arm (mean over seeds), with the value written in each cell."""
    plt = _plt()
    rows = [r for r in rows if _finite(r.get("detector_tpr")) and _finite(r.get("detector_fpr"))]
    if not rows:
        return None
    arms = _arms(rows)
    tprs = sorted({float(r["detector_tpr"]) for r in rows})
    fprs = sorted({float(r["detector_fpr"]) for r in rows})
    measures = [(k, lab) for k, lab in MEASURES if any(_finite(r.get(k)) for r in rows)]
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        for key, _ in measures:
            if _finite(r.get(key)):
                cells[(key, r["arm"], float(r["detector_tpr"]), float(r["detector_fpr"]))].append(r[key])
    fig, axes = plt.subplots(len(measures), len(arms), squeeze=False, constrained_layout=True,
                             figsize=(2.2 + 2.6 * len(arms), 0.6 + 2.4 * len(measures)))
    for i, (key, label) in enumerate(measures):
        vmax = max([max(v) for k, v in cells.items() if k[0] == key] + [0.05])  # one colour scale per row
        for j, arm in enumerate(arms):
            ax = axes[i][j]
            grid = [[_avg(cells.get((key, arm, t, f))) for t in tprs] for f in fprs]
            im = ax.imshow(grid, origin="lower", cmap="Reds", vmin=0.0, vmax=vmax, aspect="auto")
            for yi, row in enumerate(grid):
                for xi, v in enumerate(row):
                    text = "n/a" if math.isnan(v) else f"{v:.2f}"
                    ax.text(xi, yi, text, ha="center", va="center", fontsize=9,
                            color="white" if not math.isnan(v) and v > 0.6 * vmax else "black")
            ax.set_xticks(range(len(tprs)), [f"{t:g}" for t in tprs])
            ax.set_yticks(range(len(fprs)), [f"{f:g}" for f in fprs])
            if i == len(measures) - 1:
                ax.set_xlabel("detector TPR")
            if j == 0:
                ax.set_ylabel(f"{label}\ndetector FPR")
            if i == 0:
                ax.set_title(arm)
        fig.colorbar(im, ax=list(axes[i]), label=f"deployed hack rate\n({label})", shrink=0.9)
    fig.suptitle("Deployed (ablated) policy: hack rate on test prompts by detector quality")
    return save_figure(fig, path, dpi=130)


def _avg(values: list[float] | None) -> float:
    return sum(values) / len(values) if values else float("nan")


def plot_tradeoff(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Deployed hack rate against deployed solve rate, one point per cell (one panel per measure)."""
    plt = _plt()
    arms = _arms(rows)
    measures = [(k, lab) for k, lab in MEASURES if any(_finite(r.get(k)) for r in rows)]
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(measures), squeeze=False, constrained_layout=True,
                             figsize=(0.6 + 4.4 * len(measures), 4.2))
    base = rows[0]
    base_keys = {"deployed_hack_rate": "base_hack_rate", "deployed_hack_known": "base_hack_known",
                 "deployed_hack_held_out": "base_hack_held_out"}
    for ax, (key, label) in zip(axes[0], measures):
        for j, arm in enumerate(arms):
            pts = [r for r in rows if r["arm"] == arm and _finite(r.get(key))]
            ax.scatter([r["deployed_solve_rate"] for r in pts], [r[key] for r in pts], s=46, color=colors(j % 10),
                       label=arm, edgecolor="black", linewidth=0.5, zorder=3)
            for r in pts:
                ax.annotate(f"{float(r['detector_tpr']):g}/{float(r['detector_fpr']):g}",
                            (r["deployed_solve_rate"], r[key]), xytext=(4, 3), textcoords="offset points",
                            fontsize=7, color="0.3")
        if _finite(base.get(base_keys[key])):
            ax.scatter([base["base_solve_rate"]], [base[base_keys[key]]], marker="*", s=180, color="gold",
                       edgecolor="black", label="base organism", zorder=4)
        ax.set_xlabel("deployed solve rate")
        ax.set_ylabel(f"deployed hack rate ({label})")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, title="intervention", title_fontsize=8)
    fig.suptitle("Deployed policy, one point per cell (labels: detector TPR/FPR); lower right is better")
    return save_figure(fig, path, dpi=130)
