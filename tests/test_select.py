"""route.select: each arm's configuration is chosen from validation flags and task reward only (never the test split
or ground truth), the selected points get intervals, the headline ratios are route / penalty over paired seeds, and
routing's effect is measured against the better flag control."""

from __future__ import annotations

import json

import pytest

from route import select

SEEDS = (0, 1, 2, 3, 4)


def run(intervention, seed, *, penalty=2.0, route_weight=1.0, flag_control="none", val=(0.5, 0.1),
        test=(0.3, 0.2), scale=0.0, env="sort_named"):
    """A results.json dict: validation point (R, M) at the picked scale; test (solve, hack) of the deployed policy,
    split evenly between the parts."""
    cfg = {"env": env, "intervention": intervention, "penalty": penalty, "route_weight": route_weight,
           "flag_control": flag_control, "seed": seed, "detector_seed": seed, "target": "dual_lora",
           "output_dir": f"runs/{intervention}-{penalty}-{route_weight}-{flag_control}-{seed}"}
    solve, hack = test
    parts = {"detectable": {"hack_rate": hack}, "undetectable": {"hack_rate": hack}}
    policy = {"solve_rate": solve, "hack_rate": hack, "pass_rate": solve + hack, "by_part": parts}
    base = {"solve_rate": 0.27, "hack_rate": 0.05, "pass_rate": 0.32,
            "by_part": {"detectable": {"hack_rate": 0.04}, "undetectable": {"hack_rate": 0.06}}}
    point = {"scale": scale, "task_reward": val[0], "monitored_hack_rate": val[1]}
    out = {"config": cfg, "base": base, "training": policy, "deployed": policy,
           "deploy_scale": {"picked": scale, "validation": [point]}}
    if scale:
        out["deployed_at_scale"] = policy
    return out


def grid(**arms):
    return [run(*spec[0], seed=s, **spec[1]) for spec in arms.values() for s in SEEDS]


def test_selection_reads_validation_only_and_scores_reward_minus_twice_the_monitored_rate():
    results = grid(
        # lambda 1: higher reward but flagged more: 0.60 - 2 * 0.15 = 0.30 < lambda 2's 0.50 - 2 * 0.05 = 0.40
        p1=(("penalty",), dict(penalty=1.0, val=(0.60, 0.15), test=(0.9, 0.0))),
        p2=(("penalty",), dict(penalty=2.0, val=(0.50, 0.05), test=(0.1, 0.9))),
        r1=(("route",), dict(route_weight=1.0, val=(0.40, 0.05), test=(0.3, 0.3))),
        r2=(("route",), dict(route_weight=2.0, val=(0.40, 0.05), test=(0.3, 0.1))),  # a tie: same score and R
    )
    summary = select.summarise(results, n_boot=200)
    picked = summary["selection"]["sort_named"]
    assert picked["penalty"]["selected"] == "penalty 2.0"  # although lambda 1 is better on the test split
    scores = {c["configuration"]: c["score"] for c in picked["penalty"]["configurations"]}
    assert scores == pytest.approx({"penalty 1.0": 0.30, "penalty 2.0": 0.40})
    assert picked["penalty"]["runs"] == {s: f"runs/penalty-2.0-1.0-none-{s}" for s in SEEDS}  # for the probes
    assert len(picked["route"]["configurations"]) == 2 and picked["route"]["selected"] == "route_weight default"
    # the test split does not enter the selection: swapping every test rate changes no choice
    swapped = [dict(r, deployed={**r["deployed"], "solve_rate": r["deployed"]["hack_rate"]}) for r in results]
    again = select.summarise(swapped, n_boot=200)["selection"]["sort_named"]
    assert {a: p["selected"] for a, p in again.items()} == {a: p["selected"] for a, p in picked.items()}


def test_ties_go_to_the_higher_task_reward():
    results = grid(a=(("route",), dict(val=(0.30, 0.0))), b=(("route",), dict(route_weight=2.0, val=(0.50, 0.1))))
    assert select.summarise(results, n_boot=100)["selection"]["sort_named"]["route"]["selected"] == "route_weight 2.0"


def test_headline_ratios_and_the_better_control_are_paired_over_seeds():
    results = grid(
        none=(("penalty",), dict(penalty=0.0, test=(0.2, 0.25))),
        pen=(("penalty",), dict(test=(0.3, 0.20))),
        route=(("route",), dict(test=(0.3, 0.05), scale=0.25)),
        rnd=(("route",), dict(flag_control="random", test=(0.3, 0.15))),
        nev=(("route",), dict(flag_control="never", test=(0.3, 0.18))),
    )
    rep = select.summarise(results, n_boot=300)["envs"]["sort_named"]
    assert set(rep["selected"]) == {"none", "penalty", "route", "route (random flags)", "route (never flags)"}
    hack_ratio, lo, hi = rep["headline"]["hack_ratio"]
    assert hack_ratio == pytest.approx(0.25) and lo == pytest.approx(0.25) and hi == pytest.approx(0.25)
    assert rep["headline"]["solve_ratio"][0] == pytest.approx(1.0)
    assert rep["controls"]["better"] == "route (random flags)"
    assert rep["controls"]["hack_minus_control"][0] == pytest.approx(-0.10)
    assert rep["selected"]["route"]["hack"][0] == pytest.approx(0.05)  # deployed at the picked scale


def test_interval_reflects_seed_spread():
    results = [run("route", s, test=(0.3, 0.02 * (s + 1))) for s in SEEDS] + [
        run("penalty", s, test=(0.3, 0.2)) for s in SEEDS]
    ratio, lo, hi = select.summarise(results, n_boot=2000)["envs"]["sort_named"]["headline"]["hack_ratio"]
    assert ratio == pytest.approx(0.3) and lo < ratio < hi and hi <= 0.5


def test_a_run_without_validation_points_is_refused(tmp_path, capsys):
    r = run("penalty", 0)
    del r["deploy_scale"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(r))
    with pytest.raises(SystemExit):
        select.main([str(path)])
    assert "deploy_scale_rule" in capsys.readouterr().err


def test_cli_writes_json_and_markdown(tmp_path):
    for i, r in enumerate(grid(p=(("penalty",), {}), r=(("route",), {}))):
        (tmp_path / f"c{i}").mkdir()
        (tmp_path / f"c{i}" / "results.json").write_text(json.dumps(r))
    select.main([str(tmp_path), "--n_boot", "100", "--output_dir", str(tmp_path / "out")])
    data = json.loads((tmp_path / "out" / "select.json").read_text())
    assert data["selection"]["sort_named"]["penalty"]["selected"] == "default"
    assert "Route / penalty" in (tmp_path / "out" / "select.md").read_text()


def test_relearn_probes_are_grouped_per_arm(tmp_path):
    out = tmp_path / "probe"
    out.mkdir()
    rows = [{"label": f"sort_named/{arm}/s{s}", "method": "grpo", "reference": False, "threshold": 0.15,
             "hack_rate_start": start, "hack_rate_end": start + 0.1, "mean_hack_rate": start + 0.05,
             "solve_rate_end": 0.3, "steps_to_threshold": steps}
            for arm, start, steps in (("route", 0.0, None), ("none", 0.2, 0)) for s in SEEDS]
    rows.append({**rows[0], "label": "reference (base organism)", "reference": True, "hack_rate_start": 0.05,
                 "steps_to_threshold": 30})
    (out / "relearn_summary.json").write_text(json.dumps(rows))
    table = select.relearn_arms([out], n_boot=100)["grpo"]["sort_named"]
    assert set(table) == {"route", "none", "base organism"}
    assert table["route"]["n"] == 5 and table["route"]["steps_to_threshold"] == [None] * 5
    assert table["none"]["mean_hack_rate"][0] == pytest.approx(0.25)
    assert table["base organism"]["steps_to_threshold"] == [30]
    assert "| route | 5 |" in select.relearn_markdown(select.relearn_arms([out], n_boot=100))
    with pytest.raises(ValueError, match="--relearn"):
        select.relearn_arms([tmp_path])
