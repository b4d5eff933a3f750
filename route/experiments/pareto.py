"""Pareto figures across environments: deployed solve against deployed hack, split by the monitor's part.

    route pareto runs/sweep                      # a sweep directory (its cells' results.json)
    route pareto runs/a/results.json runs/b/results.json --output_dir runs/pareto

Writes, per environment, `<env>/pareto.csv` and `<env>/pareto.png`. Each arm (intervention, plus the
monitor when it is not `plain`) is a curve over its own setting: `penalty` over the penalty lambda,
`route` over the quarantine scale (0 = the deployed policy, 1 = the training policy, both measured by
every run, and `picked`, the scale each run's deployment rule picked, one point over the seeds whatever each
picked), `filter` and `none` over the detector TPR. Runs that differ only in their seed are one point:
the mean, with the seed spread (min-max) as error bars; runs that differ in any other config field (e.g. a
learning rate) are separate curves, labelled with that field. Three panels: every test prompt, the detectable
part and the undetectable part (environments without a detectability split get the first panel only).
The base organism is the star.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from route.utils.errors import ArgumentParser, check_paths, cli
from route.utils.io import save_figure, write_json_atomic

SETTINGS = {"penalty": "penalty", "filter": "detector_tpr", "none": "detector_tpr"}  # route: quarantine scale
PANELS = (("all", "all test prompts"), ("detectable", "detectable part"), ("undetectable", "undetectable part"))
STATS = ("solve", "hack", "hack_detectable", "hack_undetectable")
BASE_FIELDS = ("env_kwargs", "organism_seed", "model_name_or_path")  # what the base model is, beside the env
PICKED = "picked"  # route's setting for the policy at the scale its deployment rule picked (drawn between 0 and 1)


def part_stats(r: dict[str, Any]) -> dict[str, float]:
    """Solve, hack, and hack on the detectable and the undetectable part (NaN without that split) of one policy."""
    parts = r.get("by_part", {})
    nan = float("nan")
    return {
        "solve": r["solve_rate"],
        "hack": r["hack_rate"],
        "hack_detectable": parts.get("detectable", {}).get("hack_rate", nan),
        "hack_undetectable": parts.get("undetectable", {}).get("hack_rate", nan),
    }


IGNORED = (
    "seed",
    "detector_seed",
    "output_dir",
    "logging_dir",
    "run_name",
    "env",
    "intervention",
    "monitor",
    "scale_grid",  # which scales the deployment rule may pick: not a different training run
    "val_n",
    "deploy_scale_rule",
    "absorption_metrics",
    "logging_steps",
    *SETTINGS.values(),
)


def varying_fields(results: Sequence[dict[str, Any]]) -> list[str]:
    """Config fields (besides seeds, names, the arm and its setting) whose values differ between runs."""
    keys = sorted({k for r in results for k in r["config"]} - set(IGNORED))
    return [k for k in keys if len({json.dumps(r["config"].get(k), sort_keys=True) for r in results}) > 1]


def arm_of(cfg: dict[str, Any], extra: Sequence[str] = ()) -> str:
    """The curve a run belongs to: intervention, monitor (unless plain) and any other field that varies."""
    monitor = cfg.get("monitor", "plain")
    label = cfg["intervention"] + ("" if monitor in (None, "plain") else f" ({monitor} monitor)")
    return " ".join([label, *(f"{k}={json.dumps(cfg.get(k), sort_keys=True)}" for k in extra)])


def points(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per (env, arm, setting, seed) from results.json dicts; route gives two (scale 0 and 1), and a third
    (`picked`) when the run's deployment rule picked a scale."""
    out = []
    for res in results:
        cfg = res["config"]
        same_env = [r for r in results if r["config"]["env"] == cfg["env"]]
        extra = varying_fields([r for r in same_env if r["config"]["intervention"] == cfg["intervention"]])
        env, arm = cfg["env"], arm_of(cfg, extra)
        base_extra = [k for k in extra if k in BASE_FIELDS]  # the base model's rates depend on these only
        out.append(
            {
                "env": env,
                "arm": " ".join(["base", *(f"{k}={json.dumps(cfg.get(k), sort_keys=True)}" for k in base_extra)]),
                "setting_name": "",
                "setting": "",
                "seed": cfg.get("seed"),
                **part_stats(res["base"]),
            }
        )
        if cfg["intervention"] == "route":
            # the scale the deployment rule picked, per run: one point over all seeds, whatever each picked
            scaled = [(PICKED, "deployed_at_scale")] if "deployed_at_scale" in res else []
            for scale, policy in ((0.0, "deployed"), *scaled, (1.0, "training")):
                out.append(
                    {
                        "env": env,
                        "arm": arm,
                        "setting_name": "quarantine scale",
                        "setting": scale,
                        "seed": cfg.get("seed"),
                        "picked_scale": res["deploy_scale"].get("picked") if scale == PICKED else None,
                        **part_stats(res[policy]),
                    }
                )
        else:
            name = SETTINGS.get(cfg["intervention"], "")
            out.append(
                {
                    "env": env,
                    "arm": arm,
                    "setting_name": name,
                    "setting": cfg.get(name, ""),
                    "seed": cfg.get("seed"),
                    **part_stats(res["deployed"]),
                }
            )
    # a curve whose runs all picked scale 0 has its picked point on top of its scale-0 point: drop the duplicate
    all_zero = defaultdict(lambda: True)
    for p in out:
        if p["setting"] == PICKED:
            all_zero[(p["env"], p["arm"])] &= p["picked_scale"] == 0.0
    return [p for p in out if not (p["setting"] == PICKED and all_zero[(p["env"], p["arm"])])]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not math.isnan(v)


def summarise(pts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, min and max over seeds of every stat, per (env, arm, setting); base pooled per base model."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in pts:
        groups[(p["env"], p["arm"], p["setting_name"], p["setting"])].append(p)
    rows = []
    for (env, arm, name, setting), ps in groups.items():
        row = {"env": env, "arm": arm, "setting_name": name, "setting": setting, "n_seeds": len(ps)}
        for s in STATS:
            vals = [p[s] for p in ps if _finite(p[s])]
            lo, hi = (min(vals), max(vals)) if vals else (float("nan"), float("nan"))
            # the mean of equal values can round an ulp outside them (3 x 0.1): keep it inside, error bars >= 0
            row[f"{s}_mean"] = min(max(sum(vals) / len(vals), lo), hi) if vals else float("nan")
            row[f"{s}_min"], row[f"{s}_max"] = lo, hi
        rows.append(row)
    order = {"base": 0, "none": 1, "filter": 2, "penalty": 3, "route": 4}
    return sorted(
        rows,
        key=lambda r: (
            r["env"],
            order.get(r["arm"].split()[0], 9),
            r["arm"],
            float(r["setting"]) if _finite(r["setting"]) else 0.5 if r["setting"] == PICKED else -1.0,
        ),
    )


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    from route.utils.io import write_text_atomic

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    write_text_atomic(path, buf.getvalue())


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Solve (y) against hack (x) per panel; one curve per arm through its settings, seed spread as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in rows if not r["arm"].startswith("base")))
    panels = [
        (k, lab) for k, lab in PANELS if any(_finite(r[f"{'hack' if k == 'all' else 'hack_' + k}_mean"]) for r in rows)
    ]
    fig, axes = plt.subplots(
        1, len(panels), squeeze=False, figsize=(0.8 + 4.4 * len(panels), 4.3 + 0.15 * len(arms)),
        layout="constrained"
    )
    colors = plt.get_cmap("tab10")
    for ax, (key, label) in zip(axes[0], panels):
        h = "hack" if key == "all" else f"hack_{key}"
        for j, arm in enumerate(arms):
            rs = [r for r in rows if r["arm"] == arm and _finite(r[f"{h}_mean"])]
            if not rs:
                continue
            x, y = [r[f"{h}_mean"] for r in rs], [r["solve_mean"] for r in rs]
            xerr = [[a - r[f"{h}_min"] for a, r in zip(x, rs)], [r[f"{h}_max"] - a for a, r in zip(x, rs)]]
            yerr = [[a - r["solve_min"] for a, r in zip(y, rs)], [r["solve_max"] - a for a, r in zip(y, rs)]]
            over = f" over {rs[0]['setting_name']}" if rs[0]["setting_name"] else ""
            ax.errorbar(
                x, y, xerr=xerr, yerr=yerr, marker="o", color=colors(j % 10), label=arm + over, capsize=2, lw=1.2
            )
            for r, a, b in zip(rs, x, y):
                if r["setting_name"]:
                    ax.annotate(
                        f"{r['setting']:g}" if _finite(r["setting"]) else str(r["setting"]),
                        (a, b),
                        xytext=(4, 3),
                        textcoords="offset points",
                        fontsize=7,
                        color="0.3",
                    )
        for r in rows:
            if r["arm"].startswith("base") and _finite(r[f"{h}_mean"]):
                ax.scatter(
                    [r[f"{h}_mean"]],
                    [r["solve_mean"]],
                    marker="*",
                    s=200,
                    color="gold",
                    edgecolor="black",
                    zorder=5,
                    label=r["arm"].replace("base", "base organism", 1),
                )
                if r["arm"] != "base":  # several base models (organisms): name each star
                    ax.annotate(r["arm"].removeprefix("base "), (r[f"{h}_mean"], r["solve_mean"]), xytext=(6, -9),
                                textcoords="offset points", fontsize=7, color="0.2")
        ax.set_xlabel(f"deployed hack rate ({label})")
        ax.set_ylabel("deployed solve rate")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)), fontsize=7)
    fig.suptitle(f"{title}: each arm over its setting (labels), mean and seed range; upper left is better")
    return save_figure(fig, path, dpi=130)


def usable(result: dict[str, Any]) -> bool:
    """Whether a results.json dict has what a point needs (a run of the main job; not a partial or foreign file)."""
    cfg = result.get("config", {})
    policies = ("base", "deployed", "training") if cfg.get("intervention") == "route" else ("base", "deployed")
    return bool(cfg.get("env") and cfg.get("intervention")) and all(
        isinstance(result.get(p), dict) and "solve_rate" in result[p] for p in policies
    )


def write_pareto(results: Sequence[dict[str, Any]], output_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Write `<env>/pareto.csv` and `<env>/pareto.png` under `output_dir`; returns the rows per env."""
    output_dir = Path(output_dir)
    results = [r for r in results if usable(r)]
    if not results:
        return {}
    rows = summarise(points(results))
    per_env: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        per_env[r["env"]].append(r)
    for env, env_rows in per_env.items():
        (output_dir / env).mkdir(parents=True, exist_ok=True)
        write_csv(output_dir / env / "pareto.csv", env_rows)
        plot(env_rows, output_dir / env / "pareto.png", env)
    write_json_atomic(output_dir / "pareto.json", per_env)
    return dict(per_env)


def load_results(paths: Sequence[str]) -> list[dict[str, Any]]:
    """results.json files; a directory stands for every results.json below it."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("results.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"route pareto: no such file or directory: {p}")
    if not files:
        raise ValueError(f"route pareto: no results.json under {list(paths)}")
    return [json.loads(f.read_text()) for f in files]


@cli("route pareto")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="route pareto",
        description="Per-environment Pareto figures and CSVs (deployed solve vs hack, "
        "split into the detectable and undetectable parts).",
    )
    parser.add_argument("paths", nargs="+", help="results.json files or directories (e.g. a sweep directory)")
    parser.add_argument(
        "--output_dir",
        help="where to write <env>/pareto.{csv,png} (default: the first directory given, else the current directory)",
    )
    args = parser.parse_args(argv)
    check_paths("paths", args.paths)
    results = load_results(args.paths)
    out = args.output_dir or next((p for p in args.paths if Path(p).is_dir()), ".")
    for env, rows in write_pareto(results, out).items():
        print(f"{env}: {len(rows)} points -> {Path(out) / env / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
