"""route.experiments.compare: bootstrap intervals, paired differences to a reference arm, known/held-out split,
curves."""

from __future__ import annotations

import json
import math

import pytest

from route.experiments import compare

MODES = ("sentinel", "format", "echo", "verified")


def result(intervention: str, seed: int, hack: dict[str, float], solve: float, control: str = "none") -> dict:
    base = {"n": 100, "solve_rate": 0.6, "hack_rate": 0.1, "hack_rate_by_mode": dict.fromkeys(MODES, 0.1)}
    dep = {"n": 100, "solve_rate": solve, "hack_rate": sum(hack.values()) / 8, "hack_rate_by_mode": hack}
    cfg = {"intervention": intervention, "target": "dual_lora", "detector_tpr": 0.5, "detector_fpr": 0.05,
           "detector_modes": ["sentinel", "format"], "seed": seed, "detector_seed": seed, "flag_control": control,
           "output_dir": f"runs/{intervention}_{control}_{seed}"}
    return {"config": cfg, "base": base, "training": dep, "deployed": dep}


def test_bootstrap_interval_brackets_the_mean_and_shrinks_to_a_point():
    mean, lo, hi = compare.bootstrap([0.1, 0.2, 0.3, 0.4, 0.5], n_boot=2000)
    assert math.isclose(mean, 0.3) and 0.1 <= lo < mean < hi <= 0.5
    assert compare.bootstrap([0.2] * 4) == (0.2, 0.2, 0.2)
    assert all(math.isnan(v) for v in compare.bootstrap([float("nan")]))


def test_paired_differences_to_the_reference_arm():
    runs = []
    for seed in range(5):
        held = 0.1 * seed  # a seed effect shared by both arms: pairing removes it
        runs.append(result("none", seed, {"sentinel": 0.8, "format": 0.9, "echo": 0.0, "verified": 0.5 + held}, 0.5))
        runs.append(result("route", seed, {"sentinel": 0.3, "format": 0.5, "echo": 0.0, "verified": 0.3 + held}, 0.6))
    summary = compare.compare(runs, reference="none (dual_lora, tpr 0.5, fpr 0.05)", n_boot=2000)
    arms = summary["arms"]
    assert len(arms) == 2
    route = next(v for k, v in arms.items() if k.startswith("route"))
    assert route["seeds"] == [0, 1, 2, 3, 4]
    known = route["deployed"]["hack_known"]
    assert math.isclose(known[0], 0.4) and known[1] == known[2] == pytest.approx(0.4)
    d = route["deployed_minus_reference"]
    # the held-out difference is -0.2 on every seed: a paired interval of zero width despite the seed spread
    assert d["hack_held_out"] == pytest.approx((-0.1, -0.1, -0.1))  # mean of (echo 0, verified -0.2)
    assert d["solve"] == pytest.approx((0.1, 0.1, 0.1))
    assert route["deployed"]["hack_held_out"][2] > route["deployed"]["hack_held_out"][1]  # unpaired: a real spread
    text = compare.markdown(summary)
    assert "arm minus `none (dual_lora, tpr 0.5, fpr 0.05)`" in text and "-0.100 (-0.100 to -0.100)" in text


def test_unknown_reference_names_the_arms():
    runs = [result("none", 0, dict.fromkeys(MODES, 0.1), 0.5)]
    with pytest.raises(ValueError, match=r"--reference: no arm 'route'; arms: \['none"):
        compare.compare(runs, reference="route")


def test_cli_writes_table_json_and_curves(tmp_path, capsys):
    for i, (iv, control) in enumerate([("route", "none"), ("route", "random")]):
        for seed in (0, 1):
            d = tmp_path / f"{iv}_{control}_{seed}"
            d.mkdir()
            (d / "results.json").write_text(json.dumps(result(iv, seed, dict.fromkeys(MODES, 0.2 + i / 10), 0.5,
                                                              control)))
            lines = [{"step": s, "absorption/missed_hack": 0.1 * s + i, "loss": 1.0} for s in (1, 2)]
            (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    compare.main([str(tmp_path), "--output_dir", str(tmp_path / "out"), "--n_boot", "200"])
    out = capsys.readouterr().out
    assert "| route (dual_lora, tpr 0.5, fpr 0.05, flag_control random) |" in out
    assert "| route (dual_lora, tpr 0.5, fpr 0.05) |" in out
    assert (tmp_path / "out" / "compare.md").read_text().startswith("**deployed**")
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert len(saved["arms"]) == 2
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
    data = compare.curves({"a": [tmp_path / "route_random_0", tmp_path / "route_random_1"]}, ["absorption/"])
    assert data == {"absorption/missed_hack": {"a": [(1, pytest.approx(1.1)), (2, pytest.approx(1.2))]}}


def test_late_shares_average_each_runs_last_steps_then_the_seeds(tmp_path):
    dirs = []
    for seed, late_value in enumerate([0.6, 0.8]):
        d = tmp_path / f"s{seed}"
        d.mkdir()
        rows = [{"step": s, "absorption/missed_hack": 0.1 if s <= 20 else late_value, "absorption/clean": 0.5}
                for s in (10, 20, 30)]
        rows.append({"step": 30, "train_loss": 1.0})  # the summary row carries no share
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        dirs.append(d)
    empty = tmp_path / "none"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"step": 30, "train_loss": 1.0}) + "\n")
    shares = compare.late_shares({"route": dirs, "none": [empty]}, late=1 / 3, n_boot=500)
    assert set(shares) == {"route"}, "an arm that logged no share has no row"
    mean, lo, hi = shares["route"]["absorption/missed_hack"]
    assert math.isclose(mean, 0.7) and 0.6 <= lo <= hi <= 0.8  # only step 30 (> 2/3 of 30) counts
    assert shares["route"]["absorption/clean"][0] == 0.5
    assert all(math.isnan(v) for v in shares["route"]["absorption/missed_hack/held_out"])
    text = compare.shares_markdown(shares, 1 / 3)
    assert "| route | 0.700" in text and "missed hack/held out" in text
