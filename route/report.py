"""Aggregate `results.json` files into a markdown table: mean and spread over seeds per arm.

    python -m route.report runs/table/*/results.json

An arm is (target, intervention, detector tpr/fpr). For each policy (training, deployed) the
table shows mean solve and hack rates with their min-max spread across seeds, and the
per-mode deployed hack rates.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path


def load(paths: Iterable[str | Path]) -> list[dict]:
    out = []
    for p in paths:
        p = Path(p)
        p = p / "results.json" if p.is_dir() else p
        out.append(json.loads(p.read_text()))
    if not out:
        raise ValueError("report: no results.json given")
    return out


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


# Routing settings that change what an arm is, with their defaults: a run that departs from one is labelled with it.
ARM_SETTINGS = {"unflagged_mode": "default", "generation_policy": "full", "route_score": "none",
                "erase_one_sided": False, "quarantine_lr_ratio": 1.0}


def arm_label(config: dict) -> str:
    """`intervention (target, tpr, fpr[, non-default routing settings])`."""
    extra = [f"{k} {config[k]}" for k, default in ARM_SETTINGS.items() if config.get(k, default) != default]
    return (f"{config['intervention']} ({config['target']}, tpr {config.get('detector_tpr')}, "
            f"fpr {config.get('detector_fpr')}{''.join(', ' + e for e in extra)})")


def table(results: list[dict]) -> str:
    arms: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        c = r["config"]
        arms[(c["intervention"], c["target"], arm_label(c))].append(r)
    modes = list(results[0]["base"]["hack_rate_by_mode"])
    head = ["arm", "seeds", "training solve", "training hack", "deployed solve", "deployed hack",
            *(f"deployed {m}" for m in modes)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = results[0]["base"]
    lines.append("| base organism | - | " + f"{base['solve_rate']:.3f} | {base['hack_rate']:.3f} | - | - | "
                 + " | ".join(f"{base['hack_rate_by_mode'][m]:.3f}" for m in modes) + " |")
    order = {"none": 0, "filter": 1, "penalty": 2, "route": 3, "erase": 4}
    for (_, _, label), rs in sorted(arms.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1:])):
        row = [label, str(len(rs))]
        for policy in ("training", "deployed"):
            row += [_cell([r[policy]["solve_rate"] for r in rs]), _cell([r[policy]["hack_rate"] for r in rs])]
        row += [f"{statistics.fmean(r['deployed']['hack_rate_by_mode'][m] for r in rs):.3f}" for m in modes]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Markdown table of results.json files (mean, min-max over seeds).")
    parser.add_argument("results", nargs="+", help="results.json files or run directories")
    args = parser.parse_args(argv)
    print(table(load(args.results)))


if __name__ == "__main__":
    main()
