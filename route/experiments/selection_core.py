"""The selection's core, shared by `route.experiments.selection` (the command and its report) and
`route.experiments.selection_organisms` (per organism): arms and configurations of results, the validation point,
the pick (`select`), and paired-seed statistics (`_paired`, `ratio`)."""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from route.experiments.compare import bootstrap, mean_of
from route.experiments.pareto import STATS, part_stats
from route.experiments.report import SEED_FIELDS, arm_key, base_key

NOT_CONFIG = ("flag_control", "resume_from_checkpoint", "organism_seed", *SEED_FIELDS)  # left out of a configuration


def arm_name(config: dict[str, Any]) -> str:
    """none / penalty / filter / route, and `route (random flags)` for a flag control."""
    iv = config["intervention"]
    if iv == "none" or (iv == "penalty" and not config.get("penalty")):
        return "none"
    control = config.get("flag_control", "none")
    return iv if control in (None, "none") else f"{iv} ({control} flags)"


def validation_point(result: dict[str, Any]) -> dict[str, float]:
    """{"scale", "task_reward", "monitored_hack_rate"} of the run's deployed policy on the validation split."""
    pick = result.get("deploy_scale")
    where = result["config"].get("output_dir", "a run")
    if not pick or not pick.get("validation"):
        raise ValueError(f"{where}: results.json has no validation point; run with deploy_scale_rule: monitor")
    points = {p["scale"]: p for p in pick["validation"]}
    point = points.get(pick["picked"])
    if point is None and result["config"]["intervention"] != "route" and len(points) == 1:
        point = next(iter(points.values()))  # the quarantine is unused: every scale is the same policy
    if point is None or "task_reward" not in point:
        raise ValueError(f"{where}: no validation point with a task reward at the picked scale {pick['picked']}")
    return {"scale": pick["picked"], "task_reward": point["task_reward"],
            "monitored_hack_rate": point["monitored_hack_rate"]}


def deployed(result: dict[str, Any], at_picked: bool = True) -> dict[str, float]:
    """Test-split stats of the deployed policy: at the scale the rule picked (when it picked one), else scale 0."""
    return part_stats((result.get("deployed_at_scale") if at_picked else None) or result["deployed"])


def stats_over_seeds(runs: dict[int, dict], n_boot: int, at_picked: bool = True) -> dict[str, Any]:
    """{"seeds", stat: (mean, low, high)} of the deployed policy over a configuration's runs (bootstrap over seeds),
    and "minutes": the mean wall time of a run (`seconds.total` of results.json; NaN when a run has none)."""
    minutes = [r.get("seconds", {}).get("total", math.nan) / 60 for r in runs.values()]
    return {"seeds": sorted(runs), "minutes": sum(minutes) / len(minutes),
            **{s: bootstrap([deployed(r, at_picked)[s] for r in runs.values()], n_boot) for s in STATS}}


def config_label(key: tuple, keys: Sequence[tuple]) -> str:
    """The fields that tell this configuration from the others of its arm (`penalty 2.0`), or `default`."""
    mine, others = dict(key), [dict(k) for k in keys]
    fields = sorted({f for c in others for f in c})
    differing = [f for f in fields if len({c.get(f) for c in others}) > 1]
    return ", ".join(f"{f} {json.loads(mine[f]) if f in mine else 'default'}" for f in differing) or "default"


def group_name(config: dict[str, Any], organisms: dict[str, set]) -> str:
    """The environment, and `env, organism S` when its runs start from more than one organism (`organism_seed`)."""
    env = config["env"]
    return env if len(organisms[env]) == 1 else f"{env}, organism {config.get('organism_seed', 0)}"


def group(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[tuple, dict[int, dict]]]]:
    """group (`group_name`) -> arm -> configuration key -> seed -> result; ValueError on two runs of one
    configuration and seed."""
    out: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    organisms: dict[str, set] = defaultdict(set)
    for r in results:
        organisms[r["config"]["env"]].add(r["config"].get("organism_seed", 0))
    for r in results:
        cfg = r["config"]
        key = tuple(kv for kv in arm_key(cfg) if kv[0] not in NOT_CONFIG)
        runs = out[group_name(cfg, organisms)][arm_name(cfg)][key]
        if cfg["seed"] in runs:
            raise ValueError(f"two runs of one configuration with seed {cfg['seed']}: {cfg.get('output_dir')} and "
                             f"{runs[cfg['seed']]['config'].get('output_dir')}")
        runs[cfg["seed"]] = r
    for env, arms in out.items():
        bases = {base_key(r) for configs in arms.values() for runs in configs.values() for r in runs.values()}
        if len(bases) > 1:
            raise ValueError(f"{env}: the runs have {len(bases)} different base rows (different organisms or test "
                             "prompts); they cannot be compared")
    return out


def select(arms: dict[str, dict[tuple, dict[int, dict]]], monitor_weight: float = 2.0) -> dict[str, Any]:
    """Per arm: every configuration's validation score and the selected one (its key under "key")."""
    out: dict[str, Any] = {}
    for arm, configs in arms.items():
        keys = list(configs)
        shared = sorted(set.intersection(*(set(runs) for runs in configs.values())))  # score on the same seeds
        scored = []
        for key, runs in configs.items():
            pts = [validation_point(runs[seed]) for seed in shared]
            r_mean = mean_of([p["task_reward"] for p in pts])
            m_mean = mean_of([p["monitored_hack_rate"] for p in pts])
            scored.append({"configuration": config_label(key, keys), "seeds": shared,
                           "seeds_left_out": sorted(set(runs) - set(shared)),
                           "score": round(r_mean - monitor_weight * m_mean, 9), "task_reward": r_mean,
                           "monitored_hack_rate": m_mean, "picked_scales": [p["scale"] for p in pts], "key": key})
        best = max(scored, key=lambda s: (s["score"], s["task_reward"]))
        runs = {seed: r["config"].get("output_dir") for seed, r in sorted(configs[best["key"]].items())}
        out[arm] = {"configurations": scored, "selected": best["configuration"], "key": best["key"], "runs": runs}
    return out


def _paired(a: dict[int, dict], b: dict[int, dict], stat: str, fn, n_boot: int, seed: int = 0,
            a_at_picked: bool = True) -> tuple:
    """(estimate, low, high) of fn(mean of a's stat, mean of b's stat) over the seeds both have (a seed where either
    stat is NaN is left out), seeds resampled in pairs; draws where fn is undefined (0 / 0) are dropped. `a` at the
    picked scale, or at scale 0 when not `a_at_picked`."""
    seeds = [s for s in sorted(set(a) & set(b))
             if not math.isnan(deployed(a[s], a_at_picked)[stat]) and not math.isnan(deployed(b[s])[stat])]
    if not seeds:
        return float("nan"), float("nan"), float("nan")
    xa = {s: deployed(a[s], a_at_picked)[stat] for s in seeds}
    xb = {s: deployed(b[s])[stat] for s in seeds}

    def value(sample):
        return fn(sum(xa[s] for s in sample) / len(sample), sum(xb[s] for s in sample) / len(sample))

    rng = random.Random(seed)
    draws = sorted(v for v in (value(rng.choices(seeds, k=len(seeds))) for _ in range(n_boot)) if not math.isnan(v))
    if not draws:
        return value(seeds), float("nan"), float("nan")
    return value(seeds), draws[int(0.025 * len(draws))], draws[min(len(draws) - 1, int(0.975 * len(draws)))]


def ratio(x: float, y: float) -> float:
    """x / y; infinite when only y is 0 (route hacks, the penalty does not), undefined (NaN) when both are."""
    if y > 0:
        return x / y
    return float("inf") if x > 0 else float("nan")
