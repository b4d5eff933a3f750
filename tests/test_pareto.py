"""Pareto figures: points per arm and setting, seed spread, detectable / undetectable split, files written."""

from __future__ import annotations

import csv
import json

import pytest

from route.experiments.pareto import load_results, main, points, summarise, write_pareto


def policy(solve, hack, det=None, und=None):
    r = {"n": 100, "solve_rate": solve, "hack_rate": hack, "pass_rate": solve + hack, "hack_rate_by_mode": {}}
    if det is not None:
        r["by_part"] = {"detectable": {"hack_rate": det}, "undetectable": {"hack_rate": und}}
    return r


def result(env, intervention, seed, deployed, training=None, **cfg):
    base = policy(0.5, 0.1, 0.1, 0.1) if env == "sort" else policy(0.5, 0.1)
    return {
        "config": {
            "env": env,
            "intervention": intervention,
            "seed": seed,
            "monitor": "prompt",
            "penalty": 1.0,
            "detector_tpr": 0.9,
            **cfg,
        },
        "base": base,
        "deployed": deployed,
        "training": training or deployed,
    }


RESULTS = [
    result("sort", "penalty", 0, policy(0.6, 0.2, 0.0, 0.4)),
    result("sort", "penalty", 1, policy(0.8, 0.3, 0.1, 0.5)),
    result("sort", "penalty", 0, policy(0.7, 0.1, 0.0, 0.2), penalty=3.0),
    result("sort", "route", 0, policy(0.6, 0.05, 0.05, 0.05), training=policy(0.4, 0.5, 0.5, 0.5)),
    result("arith", "none", 0, policy(0.5, 0.4), monitor="plain"),
]


def test_points_and_summary_group_seeds_and_settings():
    pts = points(RESULTS)
    route = [p for p in pts if p["arm"].startswith("route")]
    assert sorted(p["setting"] for p in route) == [0.0, 1.0]  # deployed and training policy: the scale
    rows = summarise(pts)
    pen = [r for r in rows if r["env"] == "sort" and r["arm"] == "penalty (prompt monitor)"]
    assert [(r["setting"], r["n_seeds"]) for r in pen] == [(1.0, 2), (3.0, 1)]
    one = pen[0]
    assert one["solve_mean"] == pytest.approx(0.7) and (one["solve_min"], one["solve_max"]) == (0.6, 0.8)
    assert one["hack_undetectable_mean"] == pytest.approx(0.45) and one["hack_detectable_max"] == 0.1
    base = [r for r in rows if r["env"] == "sort" and r["arm"] == "base"]
    assert len(base) == 1 and base[0]["n_seeds"] == 4 and base[0]["hack_undetectable_mean"] == pytest.approx(0.1)
    assert [r["arm"] for r in rows if r["env"] == "arith"] == ["base", "none"]


def test_each_organism_has_its_own_base_point():
    """Runs from several organisms of one environment: one base point per organism, never their mean."""
    runs = [result("sort", "penalty", s, policy(0.6, 0.2, 0.0, 0.4), organism_seed=o) for o in (0, 1) for s in (0, 1)]
    runs[2]["base"] = runs[3]["base"] = policy(0.2, 0.3, 0.2, 0.4)
    base = {r["arm"]: r for r in summarise(points(runs)) if r["arm"].startswith("base")}
    assert sorted(base) == ["base organism_seed=0", "base organism_seed=1"]
    b0 = base["base organism_seed=0"]
    assert (b0["solve_mean"], b0["n_seeds"]) == (pytest.approx(0.5), 2)
    b1 = base["base organism_seed=1"]
    assert (b1["solve_mean"], b1["n_seeds"]) == (pytest.approx(0.2), 2)


def test_write_pareto_per_environment(tmp_path):
    per_env = write_pareto(RESULTS, tmp_path)
    assert set(per_env) == {"sort", "arith"}
    for env in ("sort", "arith"):
        png = tmp_path / env / "pareto.png"
        assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
        with open(tmp_path / env / "pareto.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(per_env[env]) and {"hack_detectable_mean", "hack_undetectable_mean"} <= set(rows[0])
    with open(tmp_path / "arith" / "pareto.csv") as f:
        assert all(r["hack_undetectable_mean"] == "" for r in csv.DictReader(f))  # no split: left empty


def test_cli_reads_directories_and_rejects_missing_paths(tmp_path, capsys):
    for i, r in enumerate(RESULTS[:2]):
        (tmp_path / f"run{i}").mkdir()
        (tmp_path / f"run{i}" / "results.json").write_text(json.dumps(r))
    assert len(load_results([str(tmp_path)])) == 2
    assert main([str(tmp_path), "--output_dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "sort" / "pareto.png").is_file()
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing")])
    assert "no such file or directory" in capsys.readouterr().err


def test_runs_differing_in_another_field_are_separate_curves():
    other = result("sort", "penalty", 0, policy(0.2, 0.5, 0.5, 0.5), learning_rate=0.003)
    runs = [{**r, "config": {**r["config"], "learning_rate": 0.001}} for r in RESULTS[:3]] + [other]
    arms = {p["arm"] for p in points(runs) if p["arm"].startswith("penalty")}
    assert arms == {"penalty (prompt monitor) learning_rate=0.001", "penalty (prompt monitor) learning_rate=0.003"}
    assert {p["arm"] for p in points(RESULTS) if p["env"] == "sort"} == {
        "base",
        "penalty (prompt monitor)",
        "route (prompt monitor)",
    }


def test_results_without_what_a_point_needs_are_skipped(tmp_path):
    partial = {"config": {"intervention": "none"}, "base": {}, "deployed": {}}
    assert write_pareto([partial], tmp_path) == {}
    assert set(write_pareto([partial, *RESULTS], tmp_path)) == {"sort", "arith"}


def test_route_gets_one_point_at_the_picked_scales_and_the_rule_fields_split_no_curve():
    runs = []
    for seed, (scale, hack) in enumerate(((0.5, 0.2), (0.25, 0.1))):  # each seed picked its own scale
        r = result("sort", "route", seed, policy(0.6, 0.05, 0.05, 0.05), training=policy(0.4, 0.5, 0.5, 0.5),
                   scale_grid=[0.0, 0.25, 0.5, 1.0] if seed else [0.0, 0.5, 1.0], val_n=256 + seed)
        r["deploy_scale"] = {"picked": scale}
        r["deployed_at_scale"] = policy(0.55, hack, hack, hack)
        runs.append(r)
    other = result("sort", "penalty", 0, policy(0.6, 0.2, 0.0, 0.4), route_weight=2.0)  # varies within route only
    pts = [p for p in points([*runs, other]) if p["arm"] != "base"]
    assert {p["arm"] for p in pts} == {"route (prompt monitor)", "penalty (prompt monitor)"}
    rows = [r for r in summarise(pts) if r["arm"].startswith("route")]
    assert [(r["setting"], r["n_seeds"]) for r in rows] == [(0.0, 2), ("picked", 2), (1.0, 2)]
    assert rows[1]["hack_mean"] == pytest.approx(0.15) and rows[1]["hack_undetectable_max"] == 0.2


def test_a_picked_point_on_top_of_scale_0_is_dropped():
    runs = []
    for seed in (0, 1):
        r = result("sort", "route", seed, policy(0.6, 0.05, 0.05, 0.05), training=policy(0.4, 0.5, 0.5, 0.5))
        r["deploy_scale"] = {"picked": 0.0}
        r["deployed_at_scale"] = r["deployed"]
        runs.append(r)
    assert sorted(p["setting"] for p in points(runs) if p["arm"] != "base") == [0.0, 0.0, 1.0, 1.0]
    runs[1]["deploy_scale"] = {"picked": 0.5}  # one seed picked another scale: the point is kept, over both seeds
    assert sum(p["setting"] == "picked" for p in points(runs)) == 2


def test_equal_values_over_three_seeds_draw(tmp_path):
    """Three seeds with the same rates: the mean rounds an ulp above them (0.1 x 3), and the figure still draws."""
    runs = [result("sort", "penalty", s, policy(0.1, 0.1, 0.1, 0.1)) for s in (0, 1, 2)]
    rows = [r for r in summarise(points(runs)) if r["arm"] != "base"]
    assert len(rows) == 1 and rows[0]["solve_min"] <= rows[0]["solve_mean"] <= rows[0]["solve_max"]
    write_pareto(runs, tmp_path)
    assert (tmp_path / "sort" / "pareto.png").stat().st_size > 5000
