"""route.experiments.selection: each arm's configuration is chosen from validation flags and task reward only (never the
test split or ground truth), the selected points get intervals, the headline ratios are route / penalty over paired
seeds, and routing's effect is measured against the better flag control."""

from __future__ import annotations

import json

import pytest

from route.experiments import selection

SEEDS = (0, 1, 2, 3, 4)


def policy(solve, hack, undetectable=None):
    parts = {"detectable": {"hack_rate": hack}, "undetectable": {"hack_rate": hack if undetectable is None
                                                                  else undetectable}}
    return {"solve_rate": solve, "hack_rate": hack, "pass_rate": solve + hack, "by_part": parts}


def run(intervention, seed, *, penalty=2.0, route_weight=1.0, flag_control="none", val=(0.5, 0.1),
        test=(0.3, 0.2), scale=0.0, env="sort_named"):
    """A results.json dict. The rule's validation scan: scales above the picked one with a high reward and a high
    monitored rate (a decoy: reading them would change the choice), then (R, M) = `val` at the picked scale. `test`:
    (solve, hack) on the test split at the picked scale; when the rule picked a scale above 0 the ablated policy
    (`deployed`) is a different one, (0.9, 0.9)."""
    cfg = {"env": env, "intervention": intervention, "penalty": penalty, "route_weight": route_weight,
           "flag_control": flag_control, "seed": seed, "detector_seed": seed, "target": "dual_lora",
           "output_dir": f"runs/{intervention}-{penalty}-{route_weight}-{flag_control}-{seed}"}
    at_pick = policy(*test)
    base = {"solve_rate": 0.27, "hack_rate": 0.05, "pass_rate": 0.32,
            "by_part": {"detectable": {"hack_rate": 0.04}, "undetectable": {"hack_rate": 0.06}}}
    decoys = [{"scale": s, "task_reward": 0.99, "monitored_hack_rate": 0.9} for s in (1.0, 0.75) if s > scale]
    point = {"scale": scale, "task_reward": val[0], "monitored_hack_rate": val[1]}
    out = {"config": cfg, "base": base, "training": at_pick, "deployed": at_pick if not scale else policy(0.9, 0.9),
           "deploy_scale": {"picked": scale, "validation": [point, *decoys][::-1]}}
    if scale:
        out["deployed_at_scale"] = at_pick
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
    summary = selection.summarise(results, n_boot=200)
    picked = summary["selection"]["sort_named"]
    assert picked["penalty"]["selected"] == "penalty 2.0"  # although lambda 1 is better on the test split
    scores = {c["configuration"]: c["score"] for c in picked["penalty"]["configurations"]}
    assert scores == pytest.approx({"penalty 1.0": 0.30, "penalty 2.0": 0.40})
    assert picked["penalty"]["runs"] == {s: f"runs/penalty-2.0-1.0-none-{s}" for s in SEEDS}  # for the probes
    assert len(picked["route"]["configurations"]) == 2 and picked["route"]["selected"] == "route_weight default"
    # the test split does not enter the selection: replacing every test rate changes no choice
    swapped = [dict(r, deployed=policy(1 - r["deployed"]["solve_rate"], 1 - r["deployed"]["hack_rate"]))
               for r in results]
    again = selection.summarise(swapped, n_boot=200)["selection"]["sort_named"]
    assert {a: p["selected"] for a, p in again.items()} == {a: p["selected"] for a, p in picked.items()}


def test_ties_go_to_the_higher_task_reward():
    results = grid(a=(("route",), dict(val=(0.30, 0.0))), b=(("route",), dict(route_weight=2.0, val=(0.50, 0.1))))
    picked = selection.summarise(results, n_boot=100)["selection"]["sort_named"]["route"]
    assert picked["selected"] == "route_weight 2.0"


def test_headline_ratios_and_the_better_control_are_paired_over_seeds():
    results = grid(
        none=(("penalty",), dict(penalty=0.0, test=(0.2, 0.25))),
        pen=(("penalty",), dict(test=(0.3, 0.20))),
        route=(("route",), dict(test=(0.3, 0.05), scale=0.25)),
        rnd=(("route",), dict(flag_control="random", test=(0.3, 0.15))),
        nev=(("route",), dict(flag_control="never", test=(0.3, 0.18))),
        # a control at a route configuration that was not selected: left out, and said so
        other=(("route",), dict(flag_control="random", route_weight=2.0, test=(0.3, 0.01))),
        r2=(("route",), dict(route_weight=2.0, val=(0.4, 0.1), test=(0.3, 0.02))),  # scores lower: not selected
    )
    rep = selection.summarise(results, n_boot=300)["envs"]["sort_named"]
    assert set(rep["selected"]) == {"none", "penalty", "route", "route (scale 0)", "route (random flags)",
                                    "route (never flags)"}
    hack_ratio, lo, hi = rep["headline"]["hack_ratio"]
    assert hack_ratio == pytest.approx(0.25) and lo == pytest.approx(0.25) and hi == pytest.approx(0.25)
    assert rep["headline"]["solve_ratio"][0] == pytest.approx(1.0) and rep["headline"]["seeds"] == list(SEEDS)
    assert rep["headline"]["goal"] == {"hack_ratio_le_0.25": True, "hack_ratio_high_lt_0.5": True,
                                       "solve_ratio_ge_0.95": True, "hack_ratio_le_0.5": True, "met": True}
    assert rep["controls"]["better"] == "route (random flags)"
    assert rep["controls"]["hack_minus_control"][0] == pytest.approx(-0.10)
    assert rep["controls_unmatched"] == ["route (random flags): route_weight 2.0"]
    # the selected point is the policy at the picked scale; the ablated one is reported beside it
    assert rep["selected"]["route"]["hack"][0] == pytest.approx(0.05)
    assert rep["selected"]["route (scale 0)"]["hack"][0] == pytest.approx(0.9)
    # and its ratio to the penalty too (0.9 / 0.2 hack, 0.9 / 0.3 solve), in the report's text as well
    assert rep["ablated"]["hack_ratio"][0] == pytest.approx(4.5)
    assert rep["ablated"]["solve_ratio"][0] == pytest.approx(3.0)
    assert "ablated policy (scale 0, not the rule's pick) / penalty: hack ratio 4.5" in selection.markdown(
        selection.summarise(results, n_boot=300))
    # route against every penalty configuration, lambda 0 (none) included: 0.05 / 0.25
    assert rep["hack_ratio_by_penalty"]["none"][0] == pytest.approx(0.2)
    assert rep["hack_ratio_by_penalty"]["default"][0] == pytest.approx(0.25)
    # every route configuration against the selected penalty, the unselected one included
    assert rep["route_configurations"]["route_weight default"]["hack"][0] == pytest.approx(0.25)
    assert rep["route_configurations"]["route_weight 2.0"]["hack"][0] == pytest.approx(0.1)
    # and every configuration's own test rates, the unselected ones and the unmatched control included
    assert rep["all"]["route, route_weight 2.0"]["hack"][0] == pytest.approx(0.02)
    assert rep["all"]["route (random flags), route_weight 2.0"]["hack"][0] == pytest.approx(0.01)


def test_ratios_resample_seeds_in_pairs():
    # route's and the penalty's hack move together across seeds: the paired ratio is exactly 0.5 in every draw,
    # while resampling the two arms independently would spread it
    results = [run("route", s, test=(0.3, 0.05 * (s + 1))) for s in SEEDS] + [
        run("penalty", s, test=(0.3, 0.1 * (s + 1))) for s in SEEDS]
    h, lo, hi = selection.summarise(results, n_boot=500)["envs"]["sort_named"]["headline"]["hack_ratio"]
    assert (h, lo, hi) == pytest.approx((0.5, 0.5, 0.5))


def test_undefined_values_neither_shrink_nor_hide_an_interval():
    results = [run("route", s, test=(0.3, 0.1)) for s in SEEDS] + [run("penalty", s, test=(0.3, 0.0)) for s in SEEDS]
    rep = selection.summarise(results, n_boot=100)["envs"]["sort_named"]
    assert rep["headline"]["hack_ratio"][0] == float("inf")  # route hacks, the penalty does not
    assert rep["headline"]["goal"]["met"] is False
    nan_part = [run("route", s, test=(0.3, 0.1)) for s in SEEDS] + [run("penalty", s, test=(0.3, 0.2)) for s in SEEDS]
    nan_part[0]["deployed"]["by_part"]["undetectable"]["hack_rate"] = float("nan")
    est, lo, hi = selection.summarise(nan_part, n_boot=100)["envs"]["sort_named"]["headline"]["hack_undetectable_ratio"]
    assert (est, lo, hi) == pytest.approx((0.5, 0.5, 0.5))  # seed 0 left out of both arms, not a NaN estimate


def test_configurations_are_scored_on_the_seeds_they_share():
    results = grid(p1=(("penalty",), dict(penalty=1.0, val=(0.5, 0.1)))) + [
        run("penalty", 0, penalty=2.0, val=(0.9, 0.0))]  # one seed only, at a score no other seed reaches
    results[0]["deploy_scale"]["validation"][0]["task_reward"] = 0.1  # lambda 1's seed 0 is poor
    picked = selection.summarise(results, n_boot=50)["selection"]["sort_named"]["penalty"]
    assert picked["selected"] == "penalty 2.0"
    assert all(c["seeds"] == [0] for c in picked["configurations"])
    assert next(c for c in picked["configurations"] if c["configuration"] == "penalty 1.0")["seeds_left_out"] == [
        1, 2, 3, 4]


def test_a_score_tie_up_to_rounding_goes_to_the_higher_reward():
    # 0.6 - 2 * 0.1 is 0.39999999999999997 in floating point, 0.5 - 2 * 0.05 is 0.4
    results = grid(a=(("penalty",), dict(penalty=1.0, val=(0.6, 0.1))), b=(("penalty",), dict(val=(0.5, 0.05))))
    assert selection.summarise(results, n_boot=50)["selection"]["sort_named"]["penalty"]["selected"] == "penalty 1.0"


def test_interval_reflects_seed_spread():
    results = [run("route", s, test=(0.3, 0.02 * (s + 1))) for s in SEEDS] + [
        run("penalty", s, test=(0.3, 0.2)) for s in SEEDS]
    ratio, lo, hi = selection.summarise(results, n_boot=2000)["envs"]["sort_named"]["headline"]["hack_ratio"]
    assert ratio == pytest.approx(0.3) and lo < ratio < hi and hi <= 0.5


def test_a_run_without_validation_points_is_refused(tmp_path, capsys):
    r = run("penalty", 0)
    del r["deploy_scale"]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(r))
    with pytest.raises(SystemExit):
        selection.main([str(path)])
    assert "deploy_scale_rule" in capsys.readouterr().err


def test_cli_writes_json_and_markdown(tmp_path):
    for i, r in enumerate(grid(p=(("penalty",), {}), r=(("route",), {}))):
        (tmp_path / f"c{i}").mkdir()
        (tmp_path / f"c{i}" / "results.json").write_text(json.dumps(r))
    selection.main([str(tmp_path), "--n_boot", "100", "--output_dir", str(tmp_path / "out")])
    data = json.loads((tmp_path / "out" / "select.json").read_text())
    assert data["selection"]["sort_named"]["penalty"]["selected"] == "default"
    assert "NaN" not in (tmp_path / "out" / "select.json").read_text()  # strict JSON
    assert "Route / penalty" in (tmp_path / "out" / "select.md").read_text()


def test_each_configuration_reports_its_mean_wall_time_per_run():
    results = grid(p=(("penalty",), {}), r=(("route",), dict(route_weight=4.0)))
    for i, r in enumerate(results):  # penalty runs 60 s, 120 s, ...; route runs take 10 minutes each
        r["seconds"] = {"total": 600.0 if r["config"]["intervention"] == "route" else 60.0 * (i + 1)}
    results[0].pop("seconds")  # a run written before results.json kept its time counts as unknown, not as zero
    rep = selection.summarise(results, n_boot=50)["envs"]["sort_named"]
    assert rep["all"]["route"]["minutes"] == pytest.approx(10.0)
    assert rep["all"]["penalty"]["minutes"] != rep["all"]["penalty"]["minutes"]  # NaN: one run has no time
    del results[0]
    rep = selection.summarise(results, n_boot=50)["envs"]["sort_named"]
    assert rep["all"]["penalty"]["minutes"] == pytest.approx((2 + 3 + 4 + 5) / 4)
    assert "| minutes per run |" in selection.markdown(selection.summarise(results, n_boot=50))
