"""The result's relearn probes (docs/protocol.md): their commands from a selection, and their outputs per arm.

`probe_commands` turns `route.experiments.selection`'s choice into one `route.experiments.relearn` command per
environment and method over the selected runs of every arm (labels `ENV/ARM/sSEED`); `relearn_arms`, `relearn_markdown`
and `plot_relearn_arms` read the probes' `relearn_summary.json` / `relearn.csv` back and group them per arm. `route
select --relearn` and `--probe_commands` call these. Not from a paper.
"""

from __future__ import annotations

import json
import shlex
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from route.experiments.compare import bootstrap, fmt
from route.experiments.relearn import picked_scale
from route.utils.io import save_figure


def relearn_arms(dirs: Sequence[str | Path], n_boot: int = 10_000) -> dict[str, Any]:
    """Relearn probes (route relearn output directories whose checkpoints are labelled `ENV/ARM/sSEED`) grouped per
    method, environment and arm: the mean over seeds of the hack rate at the start, at the end and over the probe
    (with bootstrap intervals), and each seed's steps to the threshold (None: not reached). The reference row
    (`reference (...)`) is kept per directory's environment under the arm name `base organism`."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for d in map(Path, dirs):
        path = d / "relearn_summary.json"
        if not path.exists():
            raise ValueError(f"--relearn: {d} has no relearn_summary.json (a route relearn --output_dir)")
        rows = json.loads(path.read_text())
        envs = {r["label"].split("/")[0] for r in rows if r["label"].count("/") == 2}
        for r in rows:
            parts = r["label"].split("/")
            if len(parts) == 3:
                env, arm = parts[0], parts[1]
            elif r.get("reference") and len(envs) == 1:
                env, arm = next(iter(envs)), "base organism"
            else:
                continue
            out[r["method"]][env][arm].append(r)
    table: dict[str, Any] = {}
    for method, per_env in out.items():
        for env, arms in per_env.items():
            for arm, rows in arms.items():
                table.setdefault(method, {}).setdefault(env, {})[arm] = {
                    "n": len(rows), "threshold": rows[0]["threshold"],
                    "steps_to_threshold": [r["steps_to_threshold"] for r in rows],
                    **{k: bootstrap([r[k] for r in rows], n_boot)
                       for k in ("hack_rate_start", "hack_rate_end", "mean_hack_rate", "solve_rate_end")}}
    return table


def plot_relearn_arms(dirs: Sequence[str | Path], path: Path) -> Path | None:
    """One panel per (method, environment): each arm's hack rate over the probe's steps, mean over seeds (the
    probes' relearn.csv, labels `ENV/ARM/sSEED`; the reference dashed). None when no curve is found."""
    import csv

    curves: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for d in map(Path, dirs):
        for row in csv.DictReader((d / "relearn.csv").open()) if (d / "relearn.csv").exists() else []:
            parts = row["label"].split("/")
            env, arm = (parts[0], parts[1]) if len(parts) == 3 else (d.name.rsplit("_", 1)[0], "base organism")
            curves[(row["method"], env)][arm][int(row["step"])].append(float(row["hack_rate"]))
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), squeeze=False, figsize=(4.2 * len(curves), 3.6), layout="constrained")
    for ax, ((method, env), arms) in zip(axes[0], sorted(curves.items())):
        for arm, by_step in arms.items():
            steps = sorted(by_step)
            ax.plot(steps, [sum(by_step[t]) / len(by_step[t]) for t in steps], marker="o", label=arm,
                    ls="--" if arm == "base organism" else "-", color="black" if arm == "base organism" else None)
        ax.set_title(f"{env}, {method.upper()}")
        ax.set_xlabel("probe step")
        ax.set_ylabel("hack rate (test prompts)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Relearn probes from each arm's deployed model: mean over seeds")
    return save_figure(fig, path, dpi=120)


def relearn_markdown(table: dict[str, Any]) -> str:
    lines = []
    for method, per_env in table.items():
        for env, arms in per_env.items():
            thr = next(iter(arms.values()))["threshold"]
            lines += [f"Relearn probe, {method.upper()}, {env} (mean over seeds, 95% bootstrap interval; steps to a "
                      f"hack rate of {thr:g} per seed, - = not reached):", "",
                      "| arm | n | hack at start | hack at end | mean hack over the probe | solve at end | steps |",
                      "|---" * 7 + "|"]
            for arm, r in arms.items():
                steps = ", ".join("-" if s is None else str(s) for s in r["steps_to_threshold"])
                lines.append(f"| {arm} | {r['n']} | {fmt(r['hack_rate_start'])} | {fmt(r['hack_rate_end'])} | "
                             f"{fmt(r['mean_hack_rate'])} | {fmt(r['solve_rate_end'])} | {steps} |")
            lines.append("")
    return "\n".join(lines)


PROBE_ARMS = ("none", "penalty", "filter", "route")


def probe_commands(summary: dict[str, Any], output_dir: str, steps: int = 40, every: int = 10, eval_n: int = 128,
                   threshold: float = 0.15) -> list[str]:
    """The protocol's relearn probes (docs/protocol.md): per environment and method, one `route.experiments.relearn`
    command over the selected runs of every arm (labels `ENV/ARM/sSEED`), the environment's organism as the reference
    and the `none` run's config. Runs are read from the selection's `runs` (their results.json for the organism). A run
    directory is probed from the policy at its picked scale; when a selected route run's rule picked a scale above 0,
    route's ablated policies (`deployed/`) are probed too, as arm `route@0`."""
    lines = []
    for env, arms in summary["selection"].items():
        ckpts = [(f"{env}/{arm}/s{seed}", d) for arm in PROBE_ARMS if arm in arms
                 for seed, d in sorted(arms[arm]["runs"].items(), key=lambda kv: int(kv[0]))]
        route = [(lab, d) for lab, d in ckpts if lab.split("/")[1] == "route"]
        if any(picked_scale(Path(d)) > 0 for _, d in route):
            ckpts += [(lab.replace("/route/", "/route@0/"), str(Path(d) / "deployed")) for lab, d in route]
        if not ckpts or "none" not in arms:
            raise ValueError(f"probe commands: {env} needs a none arm and selected runs")
        none_dir = Path(next(iter(arms["none"]["runs"].values())))
        organism = json.loads((none_dir / "results.json").read_text())["model"]
        for method, extra in (("grpo", ""), ("sft", " --sft_n 64")):
            lines.append(
                f"route relearn --method {method}{extra} --steps {steps} --every {every} --eval_n {eval_n} "
                f"--threshold {threshold} --config {shlex.quote(str(none_dir / 'cell.yaml'))} "
                f"--reference {shlex.quote(organism)} --checkpoints {' '.join(shlex.quote(str(d)) for _, d in ckpts)} "
                f"--labels {' '.join(lab for lab, _ in ckpts)} "
                f"--output_dir {shlex.quote(str(Path(output_dir) / f'{env}_{method}'))}")
    return lines
