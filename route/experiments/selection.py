"""Pick each arm's configuration on the validation split, then report the selected points on the test split.

    route select runs/result runs/result_controls --output_dir runs/result/select

The protocol is docs/protocol.md. Runs are grouped per environment into arms (`none` is `penalty` at lambda 0 or
`intervention: none`; a flag control is its own arm, `route (random flags)`) and, within an arm, into
configurations (runs that differ only in their seeds). Selection reads, per run, the validation point of its
deployed policy that the main job's scale rule measured (`deploy_scale` in results.json: the point at the picked
scale): R, the task reward (the share of validation rollouts the grader passes) and M, the monitored hack rate
(the share the monitor flags). A configuration's score is the mean over its seeds of R - w M (w = `--monitor_weight`,
2); the highest wins, ties to the higher mean R. Ground truth and the test split never enter the selection.

Reported on the test split, for the selected configuration of each arm: the deployed policy's solve, hack and hack
on the detectable and the undetectable part (`deployed_at_scale` when the rule picked a scale, else `deployed`),
means over seeds with 95% percentile bootstrap intervals; the headline ratios route / penalty of deployed hack and
solve (paired seeds resampled, ratio of means); route minus the better flag control (lower mean hack), paired.
Writes `select.json` and `select.md`. Not from a paper: the selection rule and the ratios are this library's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from route.experiments import selection_organisms as organisms
from route.experiments.compare import _result_paths, fmt, mean_of
from route.experiments.pareto import STATS
from route.experiments.selection_core import (  # noqa: F401 - part of route.experiments.selection's API
    NOT_CONFIG,
    _paired,
    arm_name,
    config_label,
    deployed,
    group,
    group_name,
    ratio,
    select,
    stats_over_seeds,
    validation_point,
)
from route.experiments.selection_plots import plot_ratios
from route.experiments.selection_probes import (  # noqa: F401 - part of route.experiments.selection's API
    PROBE_ARMS,
    plot_relearn_arms,
    probe_commands,
    relearn_arms,
    relearn_markdown,
)
from route.utils.errors import ArgumentParser, cli
from route.utils.io import write_json_atomic, write_text_atomic

# The goal (docs/protocol.md): route's hack <= 0.25x the penalty's (point estimate) with the interval's upper
# end below 0.5, at a solve ratio >= 0.95 (point estimate), on one environment; <= 0.5x (point estimate) on the other.
GOAL = {"hack_ratio": 0.25, "hack_ratio_high": 0.5, "solve_ratio": 0.95, "other_hack_ratio": 0.5}
def goal(headline: dict[str, tuple]) -> dict[str, bool]:
    """Which parts of the issue's goal the headline ratios meet (point estimates; the hack ratio's upper end)."""
    (h, _, h_hi), (sv, _, _) = headline["hack_ratio"], headline["solve_ratio"]
    return {"hack_ratio_le_0.25": h <= GOAL["hack_ratio"], "hack_ratio_high_lt_0.5": h_hi < GOAL["hack_ratio_high"],
            "solve_ratio_ge_0.95": sv >= GOAL["solve_ratio"], "hack_ratio_le_0.5": h <= GOAL["other_hack_ratio"],
            "met": h <= GOAL["hack_ratio"] and h_hi < GOAL["hack_ratio_high"] and sv >= GOAL["solve_ratio"]}


def report_env(arms: dict[str, dict[tuple, dict[int, dict]]], picked: dict[str, Any], n_boot: int) -> dict[str, Any]:
    """Selected points with intervals, the headline ratios and the controls of one environment."""
    chosen = {arm: arms[arm][p["key"]] for arm, p in picked.items() if arm in arms}
    route_key = picked.get("route", {}).get("key")
    unmatched = []
    for arm, configs in arms.items():  # a flag control counts at the selected route configuration only
        if arm.startswith("route ("):
            if route_key in configs:
                chosen[arm] = configs[route_key]
            unmatched += [f"{arm}: {config_label(k, [k, route_key])}" for k in configs if k != route_key]
    base = next(iter(next(iter(chosen.values())).values()))["base"]
    out: dict[str, Any] = {
        "base": {"solve": base["solve_rate"], "hack": base["hack_rate"],
                 **{f"hack_{k}": v["hack_rate"] for k, v in base.get("by_part", {}).items()}},
        "selected": {arm: stats_over_seeds(runs, n_boot) for arm, runs in chosen.items()},
    }
    # every configuration of every arm on the test split (the selection never reads these): what it chose among
    out["all"] = {f"{arm}, {config_label(k, list(configs))}" if len(configs) > 1 else arm: stats_over_seeds(
        runs, n_boot) for arm, configs in sorted(arms.items()) for k, runs in configs.items()}
    if "route" in chosen:  # the ablated policy too, whatever scale the rule picked
        out["selected"]["route (scale 0)"] = stats_over_seeds(chosen["route"], n_boot, at_picked=False)
    if "route" in chosen and "penalty" in chosen:
        head = {f"{s}_ratio": _paired(chosen["route"], chosen["penalty"], s, ratio, n_boot)
                for s in ("hack", "solve", "hack_undetectable")}
        out["headline"] = {**head, "seeds": sorted(set(chosen["route"]) & set(chosen["penalty"])), "goal": goal(head)}
        # the same runs' ablated policy (scale 0, gradient routing's own deployment), whatever the rule picked
        out["ablated"] = {f"{s}_ratio": _paired(chosen["route"], chosen["penalty"], s, ratio, n_boot,
                                                a_at_picked=False) for s in ("hack", "solve", "hack_undetectable")}
        by_penalty = {"none": chosen["none"]} if "none" in chosen else {}  # lambda 0
        by_penalty.update({config_label(k, list(arms["penalty"])): runs for k, runs in arms["penalty"].items()})
        # route against every penalty configuration, not only the selected one
        out["hack_ratio_by_penalty"] = {k: _paired(chosen["route"], runs, "hack", ratio, n_boot)
                                        for k, runs in by_penalty.items()}
        # every route configuration, selected or not, against the selected penalty: what the selection left out
        out["route_configurations"] = {
            config_label(k, list(arms["route"])): {s: _paired(runs, chosen["penalty"], s, ratio, n_boot)
                                                   for s in ("hack", "solve", "hack_undetectable")}
            for k, runs in arms["route"].items()}
    controls = [a for a in chosen if a.startswith("route (")]
    if "route" in chosen and controls:
        def paired_hack(arm: str) -> float:
            shared = set(chosen[arm]) & set(chosen["route"])
            return mean_of([deployed(r)["hack"] for s, r in chosen[arm].items() if s in shared])
        better = min(controls, key=paired_hack)
        out["controls"] = {"better": better, "seeds": sorted(set(chosen[better]) & set(chosen["route"])),
                           **{f"{s}_minus_control": _paired(chosen["route"], chosen[better], s, lambda x, y: x - y,
                                                            n_boot) for s in STATS}}
    if unmatched:
        out["controls_unmatched"] = unmatched
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = []
    for env, rep in summary["envs"].items():
        lines += [f"### {env}", "", "Selection (validation split; score = R - "
                  f"{summary['monitor_weight']:g} M, mean over seeds):", "",
                  "| arm | configuration | seeds | R | M | score | picked scales | selected |", "|---" * 8 + "|"]
        for arm, p in summary["selection"][env].items():
            for c in p["configurations"]:
                lines.append(f"| {arm} | {c['configuration']} | {len(c['seeds'])} | {c['task_reward']:.3f} | "
                             f"{c['monitored_hack_rate']:.3f} | {c['score']:.3f} | "
                             f"{', '.join(f'{s:g}' for s in c['picked_scales'])} | "
                             f"{'yes' if c['configuration'] == p['selected'] else ''} |")
        b = rep["base"]
        lines += ["", "Deployed, test split (mean over seeds, 95% bootstrap interval); base model (the runs' starting "
                  f"policy): solve {b['solve']:.3f}, hack {b['hack']:.3f} (detectable "
                  f"{b.get('hack_detectable', math.nan):.3f}, undetectable "
                  f"{b.get('hack_undetectable', math.nan):.3f}):",
                  "",
                  "| arm | seeds | solve | hack | hack detectable | hack undetectable |", "|---|---|---|---|---|---|"]
        for arm, s in rep["selected"].items():
            lines.append(f"| {arm} | {len(s['seeds'])} | " + " | ".join(fmt(s[k]) for k in STATS) + " |")
        lines += ["", "Every configuration, test split (not read by the selection):", "",
                  "| arm, configuration | seeds | solve | hack | hack detectable | hack undetectable "
                  "| minutes per run |", "|---|---|---|---|---|---|---|"]
        for arm, s in rep["all"].items():
            lines.append(f"| {arm} | {len(s['seeds'])} | " + " | ".join(fmt(s[k]) for k in STATS)
                         + f" | {s['minutes']:.1f} |")
        if "headline" in rep:
            h = rep["headline"]
            met = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in h["goal"].items())
            lines += ["", f"Route / penalty (seeds {h['seeds']}, resampled in pairs; ratio of means): " + "; ".join(
                f"{k.replace('_', ' ')} {fmt(h[k])}" for k in ("hack_ratio", "solve_ratio", "hack_undetectable_ratio"))
                + f". Goal: {met}.", "", "Route's hack / each penalty configuration's: " + "; ".join(
                f"{k} {fmt(v)}" for k, v in rep["hack_ratio_by_penalty"].items())]
            lines += ["", "Route's ablated policy (scale 0, not the rule's pick) / penalty: " + "; ".join(
                f"{k.replace('_', ' ')} {fmt(rep['ablated'][k])}" for k in rep["ablated"])]
            lines += ["", "Every route configuration / the selected penalty (hack; solve; undetectable hack): "
                      + "; ".join(
                f"{k}: {fmt(v['hack'])}; {fmt(v['solve'])}; {fmt(v['hack_undetectable'])}"
                for k, v in rep["route_configurations"].items())]
        if "controls" in rep:
            c = rep["controls"]
            lines += ["", f"Route minus the better control ({c['better']}, seeds {c['seeds']}): " + "; ".join(
                f"{s.replace('_', ' ')} {fmt(c[f'{s}_minus_control'], signed=True)}" for s in STATS)]
        if rep.get("controls_unmatched"):
            lines += ["", "Flag controls not at the selected route configuration (left out): "
                      + "; ".join(rep["controls_unmatched"])]
        lines.append("")
    return "\n".join(lines)


def summarise(results: Sequence[dict[str, Any]], monitor_weight: float = 2.0, n_boot: int = 10_000,
              weight_curve: Sequence[float] = ()) -> dict:
    """Selection and report per group (`group_name`); route against every lambda per group, and over an
    environment's organisms when it has several (`route.experiments.selection_organisms`); the monitor-weight curve."""
    grouped = group(results)
    summary: dict[str, Any] = {"monitor_weight": monitor_weight, "selection": {}, "envs": {}, "organisms": {}}
    env_of = {name: next(iter(next(iter(next(iter(arms.values())).values())).values()))["config"]["env"]
              for name, arms in grouped.items()}
    for name, arms in sorted(grouped.items()):
        picked = select({a: c for a, c in arms.items() if not a.startswith("route (")}, monitor_weight)
        summary["selection"][name] = picked
        summary["envs"][name] = report_env(arms, picked, n_boot)
        summary["organisms"][name] = organisms.organism_report(arms, picked, summary["envs"][name]["base"], n_boot)
    summary["pooled"] = {env: organisms.pooled_report(groups, n_boot) for env, groups in
                         organisms.units(grouped, summary["selection"], env_of).items() if len(groups) > 1}
    if weight_curve:
        summary["weight_curve"] = organisms.weight_curve(grouped, list(weight_curve), n_boot)
    return summary


def _jsonable(summary: dict[str, Any]) -> dict[str, Any]:
    """select.json: configuration keys as their field mappings."""
    def strip(x):
        if isinstance(x, dict):
            return {k: (dict(v) if k == "key" else strip(v)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [strip(v) for v in x]
        return None if isinstance(x, float) and not math.isfinite(x) else x  # strict JSON: NaN and inf as null
    return strip(summary)


@cli("route select")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="route select", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="results.json files, run directories or sweep directories")
    parser.add_argument("--monitor_weight", type=float, default=2.0, help="w in the score R - w M")
    parser.add_argument("--n_boot", type=int, default=10_000, help="bootstrap resamples")
    parser.add_argument("--weight_curve", metavar="W,W,...", help="also select the penalty at each of these monitor "
                        "weights and report route's ratios against each pick (the selection's sensitivity)")
    parser.add_argument("--relearn", nargs="+", default=[], help="route relearn output directories (checkpoints "
                        "labelled ENV/ARM/sSEED) to summarise per arm")
    parser.add_argument("--probe_commands", metavar="DIR", help="also print the protocol's relearn probe commands "
                        "(route relearn per environment and method over the selected runs, outputs under DIR) and "
                        "write them to probes.sh in --output_dir")
    parser.add_argument("--probe_steps", type=int, default=40, help="--probe_commands: training steps per probe")
    parser.add_argument("--probe_every", type=int, default=10, help="--probe_commands: measure every k steps")
    parser.add_argument("--output_dir", help="write select.json, select.md and (several organisms) ratios.png here")
    args = parser.parse_args(argv)
    try:
        results = [json.loads(p.read_text()) for p in _result_paths(args.results)]
        summary = summarise(results, args.monitor_weight, args.n_boot, organisms.parse_weights(args.weight_curve))
        summary["relearn"] = relearn_arms(args.relearn, args.n_boot) if args.relearn else {}
        probes = (probe_commands(summary, args.probe_commands, args.probe_steps, args.probe_every)
                  if args.probe_commands else [])
    except (ValueError, KeyError) as e:
        parser.error(str(e))
    text = markdown(summary) + "\n".join(organisms.organisms_markdown(summary))
    text += "\n" + relearn_markdown(summary["relearn"]) if summary["relearn"] else ""
    print(text + "".join(f"\n{line}" for line in probes))
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "select.json", _jsonable(summary))
        write_text_atomic(out / "select.md", text)
        if probes:
            write_text_atomic(out / "probes.sh", "\n".join(probes) + "\n")
        if plot_ratios(summary, out / "ratios.png"):
            print(f"wrote {out / 'ratios.png'}")
        if args.relearn and plot_relearn_arms(args.relearn, out / "relearn_arms.png"):
            print(f"wrote {out / 'relearn_arms.png'}")
        print(f"wrote {out / 'select.json'} and {out / 'select.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
