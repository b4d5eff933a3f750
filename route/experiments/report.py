"""Aggregate `results.json` files into a markdown table: mean and spread over seeds per arm.

    route report runs/table/*/results.json

An arm is one configuration: runs are grouped only when every config field other than the seeds (`SEED_FIELDS`:
`seed`, `detector_seed`, `data_seed`) and where the run was written (`output_dir`, `logging_dir`, `run_name`) is
equal, so runs that differ in a learning rate, a detector mode or a rank are separate rows, labelled with the fields
that tell them apart. `eval_seed` is not a seed here: it picks the held-out prompts, so runs with different
evaluation sets are never averaged. Runs grouped into one arm must share one base row (same model, same held-out
prompts), else the table is refused. For each policy (training, deployed) the table shows mean solve and hack rates
with their min-max spread across seeds, and the per-mode deployed hack rates (column `deployed hack:<mode>`: the hack
rate on the prompts whose grader has that loophole); one base row per distinct base.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from route.trainer.rollout import EMA_DEFAULTS
from route.utils.errors import ArgumentParser, check_paths, cli


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
                "erase_one_sided": False, "quarantine_lr_ratio": 1.0, "flag_control": "none",
                "routing": "classic", "route_weight": 1.0, "route_clamp": None, "split_moments": False,
                "rollout_quarantine_scale": None, "coherence_fraction": 0.0, "organism_seed": 0, **EMA_DEFAULTS}


def arm_label(config: dict) -> str:
    """`intervention (target, tpr, fpr[, non-default routing settings])`."""
    extra = [f"{k} {config[k]}" for k, default in ARM_SETTINGS.items() if config.get(k, default) != default]
    return (f"{config['intervention']} ({config['target']}, tpr {config.get('detector_tpr')}, "
            f"fpr {config.get('detector_fpr')}{''.join(', ' + e for e in extra)})")


# Fields that vary between seeds of one arm, or only say where a run was written or resumed from (an interrupted
# sweep cell resumes from its last checkpoint): ignored when grouping.
SEED_FIELDS = ("seed", "detector_seed", "data_seed")
LOCATION_FIELDS = ("output_dir", "logging_dir", "run_name", "resume_from_checkpoint")
# Fields that change what a run logs or shows, not what it trains: runs that differ only in them are one arm.
LOGGING_FIELDS = ("absorption_metrics", "disable_tqdm", "logging_steps", "report_to")


def arm_key(config: dict) -> tuple:
    """What makes two runs the same arm: every config field except the seeds and the output location; a routing
    setting at its default counts as absent, so runs written before the setting existed join their arm."""
    skip = set(SEED_FIELDS) | set(LOCATION_FIELDS) | set(LOGGING_FIELDS)
    return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in config.items() if k not in skip
                        and not (k in ARM_SETTINGS and v == ARM_SETTINGS[k])))


BASE_RATES = ("n", "solve_rate", "hack_rate", "pass_rate", "hack_rate_by_mode")


def base_key(result: dict) -> str:
    """The base model's rates of a run (not its monitor's flags, which depend on the detector seed)."""
    return json.dumps({k: result["base"].get(k) for k in BASE_RATES}, sort_keys=True)


def group_arms(results: list[dict]) -> dict[tuple, list[dict]]:
    """Runs grouped by `arm_key`; ValueError when the runs of one arm do not share one base row."""
    arms: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        arms[arm_key(r["config"])].append(r)
    for rs in arms.values():
        bases = {base_key(r) for r in rs}
        if len(bases) > 1:
            raise ValueError(f"report: the runs of arm {arm_label(rs[0]['config'])!r} have {len(bases)} different "
                             "base rows (different models or held-out prompts); they cannot be averaged")
    return arms


def arm_labels(arms: dict[tuple, list[dict]]) -> dict[tuple, str]:
    """`arm_label`, plus `field value` for every other field that differs between arms of the same label."""
    plain = {key: arm_label(rs[0]["config"]) for key, rs in arms.items()}
    out = {}
    for key, label in plain.items():
        same = [k for k, lab in plain.items() if lab == label]
        if len(same) == 1:
            out[key] = label
            continue
        configs = [dict(k) for k in same]
        fields = sorted({f for c in configs for f in c} - set(ARM_SETTINGS)
                        - {"intervention", "target", "detector_tpr", "detector_fpr"})
        differing = [f for f in fields if len({c.get(f) for c in configs}) > 1]
        mine = dict(key)
        extra = ", ".join(f"{f} {json.loads(mine[f]) if f in mine else None}" for f in differing)
        out[key] = f"{label[:-1]}, {extra})"
    return out


def table(results: list[dict]) -> str:
    arms = group_arms(results)
    labels = arm_labels(arms)
    modes = list(results[0]["base"]["hack_rate_by_mode"])
    head = ["arm", "seeds", "training solve", "training hack", "deployed solve", "deployed hack",
            *(f"deployed hack:{m}" for m in modes)]  # the hack rate on that loophole's own prompts
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    bases = list(dict.fromkeys(base_key(rs[0]) for rs in arms.values()))
    for i, text in enumerate(bases):
        base = json.loads(text)
        name = "base organism" if len(bases) == 1 else f"base {i + 1} ({', '.join(labels[k] for k, rs in arms.items() if base_key(rs[0]) == text)})"  # noqa: E501
        lines.append(f"| {name} | - | " + f"{base['solve_rate']:.3f} | {base['hack_rate']:.3f} | - | - | "
                     + " | ".join(f"{base['hack_rate_by_mode'][m]:.3f}" for m in modes) + " |")
    order = {"none": 0, "filter": 1, "penalty": 2, "route": 3, "erase": 4}

    def sort_key(item):
        rs = item[1]
        return order.get(rs[0]["config"]["intervention"], 9), rs[0]["config"]["target"], labels[item[0]]

    for key, rs in sorted(arms.items(), key=sort_key):
        row = [labels[key], str(len(rs))]
        for policy in ("training", "deployed"):
            row += [_cell([r[policy]["solve_rate"] for r in rs]), _cell([r[policy]["hack_rate"] for r in rs])]
        row += [f"{statistics.fmean(r['deployed']['hack_rate_by_mode'][m] for r in rs):.3f}" for m in modes]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


@cli("route report")
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="route report", description="Markdown table of results.json files (mean, min-max "
                            "over seeds).")
    parser.add_argument("results", nargs="+", help="results.json files or run directories")
    args = parser.parse_args(argv)
    check_paths("results", args.results)
    print(table(load(args.results)))


if __name__ == "__main__":
    main()
