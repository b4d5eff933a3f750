"""Paired-seed comparison of arms: means with 95% bootstrap intervals, and each arm's difference to a reference.

    route compare runs/absorption/cells --reference "route" --output_dir runs/absorption/compare

Arms are grouped as in `route.experiments.report` (every config field except the seeds and the output location); runs of
different arms that share a seed are paired (the same organism, prompts, detector draws and adapter init). For
each arm and policy the table gives the mean over seeds of solve, hack, hack on the monitor's known modes and on
its held-out modes (mean of the per-mode rates, as in `sweep.csv`), each with a percentile bootstrap interval over
seeds. `--reference` names the arm every other arm is compared with: the mean over shared seeds of (arm -
reference) with a paired bootstrap interval, so "route beats the control" reads as an interval below zero.

With 5 seeds a bootstrap interval is rough (it cannot be wider than the seeds' range); it is reported as what it
is, a resampling of the seeds we ran, not a population claim. Curves: every metric named in `--curves` (the
absorption shares by default) in each run's `metrics.jsonl`, averaged over seeds per arm, one panel per metric (PNG).
Late shares: each run's mean of the absorption shares over the last `--late` of its logged steps, then the mean over
seeds with a bootstrap interval (the table that says where missed hacks' gradient ended up, per arm).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from route.experiments.report import arm_labels, group_arms, load
from route.utils.io import save_figure, write_json_atomic, write_text_atomic

STATS = ("solve", "hack", "hack_known", "hack_held_out")


def mean_of(values: Sequence[float | None]) -> float:
    """Mean of the finite values; NaN when there is none."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def known_and_held_out(result: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The monitor's known modes (`detector_modes`, all when unset) and the held-out rest."""
    modes = list(result["base"]["hack_rate_by_mode"])
    known = result["config"].get("detector_modes") or modes
    return [m for m in modes if m in known], [m for m in modes if m not in known]


def policy_stats(result: dict[str, Any], policy: str) -> dict[str, float]:
    """Solve, hack, and the mean per-mode hack rate on known and on held-out modes of one policy of one run."""
    r = result[policy]
    known, held_out = known_and_held_out(result)
    by_mode = r["hack_rate_by_mode"]
    return {"solve": r["solve_rate"], "hack": r["hack_rate"], "hack_known": mean_of([by_mode[m] for m in known]),
            "hack_held_out": mean_of([by_mode[m] for m in held_out])}


def bootstrap(values: Sequence[float], n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple:
    """(mean, low, high): the percentile bootstrap interval of the mean of `values` (NaNs dropped)."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan"), float("nan")
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(vals, k=len(vals))) / len(vals) for _ in range(n_boot))
    tail = (1 - level) / 2
    return sum(vals) / len(vals), means[int(tail * n_boot)], means[min(n_boot - 1, int((1 - tail) * n_boot))]


def fmt(ci: tuple, signed: bool = False) -> str:
    mean, lo, hi = ci
    if math.isnan(mean):
        return "-"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(mean)} ({f.format(lo)} to {f.format(hi)})" if signed else f"{mean:.3f} ({lo:.3f}-{hi:.3f})"


def compare(results: list[dict[str, Any]], policies: Sequence[str] = ("deployed",), reference: str | None = None,
            n_boot: int = 10_000) -> dict[str, Any]:
    """Per arm and policy: bootstrap intervals of every stat; with `reference`, paired differences to that arm."""
    arms = group_arms(results)
    labels = arm_labels(arms)
    by_label = {labels[k]: {r["config"]["seed"]: r for r in rs} for k, rs in arms.items()}
    if reference is not None and reference not in by_label:
        raise ValueError(f"--reference: no arm {reference!r}; arms: {sorted(by_label)}")
    out: dict[str, Any] = {"arms": {}, "reference": reference, "policies": list(policies)}
    for label, runs in by_label.items():
        entry: dict[str, Any] = {"seeds": sorted(runs)}
        for policy in policies:
            stats = {s: [policy_stats(r, policy)[s] for r in runs.values() if policy in r] for s in STATS}
            entry[policy] = {s: bootstrap(v, n_boot) for s, v in stats.items()}
            if reference is not None and label != reference:
                ref = by_label[reference]
                shared = sorted(set(runs) & set(ref))
                diffs = {s: [policy_stats(runs[sd], policy)[s] - policy_stats(ref[sd], policy)[s] for sd in shared
                             if policy in runs[sd] and policy in ref[sd]] for s in STATS}
                entry[f"{policy}_minus_reference"] = {s: bootstrap(v, n_boot) for s, v in diffs.items()}
        out["arms"][label] = entry
    return out


def markdown(summary: dict[str, Any]) -> str:
    """One table per policy: the arm's intervals, then its paired difference to the reference."""
    lines = []
    for policy in summary["policies"]:
        head = ["arm", "seeds", *(f"{policy} {s.replace('_', ' ')}" for s in STATS)]
        lines += [f"**{policy}** (mean over seeds, 95% bootstrap interval)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, entry in summary["arms"].items():
            lines.append(f"| {label} | {len(entry['seeds'])} | "
                         + " | ".join(fmt(entry[policy][s]) for s in STATS) + " |")
        ref = summary["reference"]
        if ref is not None:
            lines += ["", f"**{policy}, arm minus `{ref}`** (paired over shared seeds)", "",
                      "| " + " | ".join(["arm", *STATS]) + " |", "|" + "---|" * (len(STATS) + 1)]
            for label, entry in summary["arms"].items():
                if label != ref:
                    d = entry[f"{policy}_minus_reference"]
                    lines.append(f"| {label} | " + " | ".join(fmt(d[s], signed=True) for s in STATS) + " |")
        lines.append("")
    return "\n".join(lines)


CURVES = ("absorption/missed_hack", "absorption/missed_hack/known", "absorption/missed_hack/held_out",
          "absorption/clean", "absorption/flagged_hack", "env/hack_rate")


def curves(run_dirs: dict[str, list[Path]], metrics: Sequence[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """metric -> arm -> [(step, mean over seeds)] for every `metrics.jsonl` key in `metrics` (or starting with one
    that ends in `/`)."""
    acc: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for arm, dirs in run_dirs.items():
        for d in dirs:
            path = d / "metrics.jsonl"
            if not path.exists():
                continue
            for line in path.read_text().splitlines():
                row = json.loads(line)
                for k, v in row.items():
                    wanted = k in metrics or any(m.endswith("/") and k.startswith(m) for m in metrics)
                    if wanted and isinstance(v, (int, float)) and not math.isnan(v):
                        acc[k][arm][int(row["step"])].append(float(v))
    return {k: {arm: sorted((s, sum(v) / len(v)) for s, v in steps.items()) for arm, steps in arms.items()}
            for k, arms in acc.items()}


SHARES = ("absorption/missed_hack", "absorption/missed_hack/known", "absorption/missed_hack/held_out",
          "absorption/clean")


def late_shares(run_dirs: dict[str, list[Path]], metrics: Sequence[str] = SHARES, late: float = 1 / 3,
                n_boot: int = 10_000) -> dict[str, dict[str, tuple]]:
    """arm -> metric -> bootstrap interval over runs of each run's mean over its last `late` share of logged steps
    (steps above (1 - late) x its last step). Arms whose runs logged none of `metrics` are left out."""
    out: dict[str, dict[str, tuple]] = {}
    for arm, dirs in run_dirs.items():
        per_run: dict[str, list[float]] = defaultdict(list)
        for d in dirs:
            path = d / "metrics.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
            if not rows:
                continue
            start = (1 - late) * max(int(r["step"]) for r in rows)
            for m in metrics:
                vals = [float(r[m]) for r in rows if int(r["step"]) > start and isinstance(r.get(m), (int, float))
                        and not math.isnan(r[m])]
                if vals:
                    per_run[m].append(sum(vals) / len(vals))
        if per_run:
            out[arm] = {m: bootstrap(per_run[m], n_boot) for m in metrics}
    return out


def shares_markdown(shares: dict[str, dict[str, tuple]], late: float) -> str:
    if not shares:
        return ""
    head = ["arm", *(m.removeprefix("absorption/").replace("_", " ") for m in SHARES)]
    lines = [f"**absorption shares, last {late:.2g} of training** (quarantine's share of each kind of row's squared "
             "gradient norm; mean over seeds, 95% bootstrap interval)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [f"| {arm} | " + " | ".join(fmt(v[m]) for m in SHARES) + " |" for arm, v in shares.items()]
    return "\n".join(lines + [""])


def plot_curves(data: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> Path | None:
    if not data:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(data)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    arms = sorted({arm for curves in data.values() for arm in curves})
    colors = {arm: plt.get_cmap("tab10" if len(arms) <= 10 else "tab20")(i) for i, arm in enumerate(arms)}
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows + 0.25 * len(arms)), squeeze=False,
                             layout="constrained")
    for ax, name in zip(axes.flat, names):
        for arm, pts in sorted(data[name].items()):  # one colour per arm in every panel
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors[arm], label=arm)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colors[arm]) for arm in arms]
    fig.legend(handles, arms, loc="outside lower center", fontsize=7, ncol=1 if len(arms) > 4 else len(arms))
    return save_figure(fig, path, dpi=110)


def _result_paths(inputs: Sequence[str]) -> list[Path]:
    paths = []
    for p in map(Path, inputs):
        if p.is_file():
            paths.append(p)
        elif (p / "results.json").exists():
            paths.append(p / "results.json")
        elif p.is_dir():
            paths += sorted(p.glob("**/results.json"))
        else:
            raise ValueError(f"results: {p} is neither a results.json nor a directory")
    if not paths:
        raise ValueError(f"results: no results.json under {list(inputs)}")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.json files, run directories or directories above them")
    parser.add_argument("--reference", default=None, help="arm label every other arm is compared with (paired)")
    parser.add_argument("--policies", nargs="+", default=["deployed"], help="policies (keys of results.json)")
    parser.add_argument("--curves", nargs="+", default=list(CURVES), help="metrics.jsonl keys plotted over training "
                        "(a key ending in / takes every key under it)")
    parser.add_argument("--n_boot", type=int, default=10_000, help="bootstrap resamples")
    parser.add_argument("--late", type=float, default=1 / 3, help="share of training (the last) the absorption-share "
                        "table averages over")
    parser.add_argument("--output_dir", default=None, help="write compare.md, compare.json and curves.png here")
    args = parser.parse_args(argv)
    try:
        paths = _result_paths(args.results)
        results = load(paths)
        summary = compare(results, args.policies, args.reference, args.n_boot)
        if not 0 < args.late <= 1:
            raise ValueError(f"--late: must be in (0, 1], got {args.late}")
    except ValueError as e:
        parser.error(str(e))
    arms = group_arms(results)
    labels = arm_labels(arms)
    label_of = {id(r): labels[k] for k, rs in arms.items() for r in rs}
    dirs: dict[str, list[Path]] = defaultdict(list)
    for path, res in zip(paths, results):
        dirs[label_of[id(res)]].append(path.parent)
    summary["late_shares"] = late_shares(dirs, late=args.late, n_boot=args.n_boot)
    text = markdown(summary) + "\n" + shares_markdown(summary["late_shares"], args.late)
    print(text)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "compare.md", text)
        write_json_atomic(out / "compare.json", summary)
        png = plot_curves(curves(dirs, args.curves), out / "curves.png")
        print(f"wrote {out / 'compare.md'}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
