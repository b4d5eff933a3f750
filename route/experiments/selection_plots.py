"""The selection's headline as a figure: route's deployed hack and solve ratios against every penalty strength.

    route select runs/result5 --monitor_weight 4.706 --output_dir runs/result5/select   # also writes ratios.png

One row per (organism, lambda) and per pooled comparison of an environment (over its organisms), each a point
estimate with its 95% bootstrap interval: left the hack ratio (route / penalty, log scale; the goal's 0.25 and
parity marked), right the solve ratio (0.95 marked). The selected and the best-in-hindsight lambda are labelled.
An interval that runs to infinity (a penalty that shipped no hack on some resample) is drawn to the panel's edge.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from route.utils.io import save_figure

HACK_LIM = (1e-2, 20.0)  # log axis; ratios outside are drawn at the edge
SOLVE_LIM = (0.0, 2.0)


def ratio_rows(summary: dict[str, Any], env: str) -> list[tuple[str, list, list]]:
    """(label, hack [mean, lo, hi], solve [mean, lo, hi]) per organism and lambda of `env`, then its pooled rows."""
    rows = []
    for name, rep in sorted(summary.get("organisms", {}).items()):
        if name.split(", ")[0] != env or not rep.get("against"):  # "sort" is not "sort_named"
            continue
        org = name.split(", ", 1)[1] if ", " in name else name
        for label, r in rep["against"].items():
            if label.endswith("(ablated)"):
                continue
            tags = [k for k in ("selected", "best") if rep.get(k) == label]
            rows.append((f"{org}: / {label}" + (f" ({', '.join(tags)})" if tags else ""), r["hack"], r["solve"]))
    for label, r in summary.get("pooled", {}).get(env, {}).items():
        if isinstance(r, dict) and "hack_ratio" in r and label in ("selected", "best"):
            rows.append((f"over organisms: / {label}", r["hack_ratio"], r["solve_ratio"]))
    return rows


def _clip(v: float | None, lo: float, hi: float) -> float:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return float("nan")
    return min(max(v, lo), hi)


def plot_ratios(summary: dict[str, Any], path: Path) -> bool:
    """Write the figure (one block of rows per environment); False when no environment has organism reports."""
    envs = sorted({n.split(", ")[0] for n, rep in summary.get("organisms", {}).items() if rep.get("against")})
    blocks = [(env, ratio_rows(summary, env)) for env in envs]
    blocks = [(env, rows) for env, rows in blocks if rows]
    if not blocks:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = sum(len(rows) for _, rows in blocks)
    fig, axes = plt.subplots(len(blocks), 2, figsize=(12, 0.32 * n + 1.2 * len(blocks) + 0.8), squeeze=False,
                             layout="constrained", height_ratios=[len(rows) for _, rows in blocks])
    for (env, rows), (ax_h, ax_s) in zip(blocks, axes):
        ys = list(range(len(rows)))[::-1]
        for y, (label, hack, solve) in zip(ys, rows):
            pooled = label.startswith("over organisms")
            color = "black" if pooled else ("tab:red" if "selected" in label else "tab:blue")
            for ax, (m, lo, hi), (a, b) in ((ax_h, hack, HACK_LIM), (ax_s, solve, SOLVE_LIM)):
                mc, loc, hic = (_clip(v, a, b) for v in (m, lo, hi))
                if not math.isnan(mc):
                    err = [[max(mc - loc, 0.0)], [max(hic - mc, 0.0)]]
                    ax.errorbar([mc], [y], xerr=err, fmt="D" if pooled else "o", color=color, capsize=2, ms=5)
        for ax in (ax_h, ax_s):
            ax.set_yticks(ys, [r[0] for r in rows], fontsize=7)
            ax.grid(alpha=0.3, axis="x")
        ax_h.set_xscale("log")
        ax_h.set_xlim(*HACK_LIM)
        ax_h.axvline(1.0, color="0.4", lw=1)
        ax_h.axvline(0.25, color="tab:green", lw=1, ls="--")
        ax_h.set_title(f"{env}: deployed hack, route / penalty (goal <= 0.25 selected, <= 1 best)", fontsize=9)
        ax_s.set_xlim(*SOLVE_LIM)
        ax_s.axvline(1.0, color="0.4", lw=1)
        ax_s.axvline(0.95, color="tab:green", lw=1, ls="--")
        ax_s.set_title(f"{env}: deployed solve, route / penalty (goal >= 0.95)", fontsize=9)
    fig.suptitle("route (its selected configuration, at the rule's scale) against every penalty lambda; red: the "
                 "selected lambda, black: over organisms; 95% bootstrap intervals", fontsize=9)
    save_figure(fig, path, dpi=120)
    return True
