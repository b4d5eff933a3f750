"""route.experiments.report: runs grouped only when every config field but the seeds and the output location is equal,
labelled by what tells them apart; runs of one arm must share one base row."""

import json

import pytest

from route.experiments.report import arm_label, main, table

BASE = {"n": 8, "solve_rate": 0.3, "hack_rate": 0.1, "hack_rate_by_mode": {"sentinel": 0.1}}


def result(intervention, solve, hack, **config):
    rates = {"n": 8, "solve_rate": solve, "hack_rate": hack, "hack_rate_by_mode": {"sentinel": hack}}
    return {"config": {"target": "dual_lora", "intervention": intervention, "detector_tpr": 0.5, "detector_fpr": 0.05,
                       **config},
            "base": dict(BASE), "training": rates, "deployed": rates}


def test_table_groups_seeds_and_labels_non_default_settings(tmp_path, capsys):
    rs = [result("route", 0.5, 0.2), result("route", 0.7, 0.4), result("none", 0.4, 0.3),
          result("route", 0.6, 0.1, unflagged_mode="retain", generation_policy="deployed")]
    text = table(rs)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()[3:]}
    assert list(rows) == ["none (dual_lora, tpr 0.5, fpr 0.05)", "route (dual_lora, tpr 0.5, fpr 0.05)",
                          "route (dual_lora, tpr 0.5, fpr 0.05, unflagged_mode retain, generation_policy deployed)"]
    assert "| 2 | 0.600 (0.500-0.700) | 0.300 (0.200-0.400) |" in rows["route (dual_lora, tpr 0.5, fpr 0.05)"]
    assert arm_label(rs[0]["config"] | {"unflagged_mode": "default"}) == "route (dual_lora, tpr 0.5, fpr 0.05)"
    assert arm_label(rs[0]["config"] | {"flag_control": "random"}) == \
        "route (dual_lora, tpr 0.5, fpr 0.05, flag_control random)"
    for i, r in enumerate(rs):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "results.json").write_text(json.dumps(r))
    main([str(tmp_path / f"r{i}") for i in range(len(rs))])
    assert capsys.readouterr().out.strip() == text
    head = [c.strip() for c in text.splitlines()[0].strip("| ").split(" | ")]
    assert head[-1] == "deployed hack:sentinel", "a per-mode column says it is a hack rate and on which mode"


def _arm_rows(text):
    return [line for line in text.splitlines()[2:] if not line.startswith("| base")]


# one field each: a trainer setting, a detector setting, a target setting, the evaluation set, the model
@pytest.mark.parametrize("field,a,b", [("learning_rate", 1e-3, 1e-2), ("detector", "noisy", "ground_truth"),
                                       ("detector_modes", None, ["sentinel"]), ("keep_rank", 4, 8),
                                       ("max_steps", 100, 200), ("eval_seed", 0, 1), ("penalty", 1.0, 0.5)])
def test_runs_that_differ_in_one_field_are_separate_arms(field, a, b):
    rs = [result("route", 0.5, 0.2, seed=0, **{field: a}), result("route", 0.7, 0.4, seed=1, **{field: a}),
          result("route", 0.1, 0.9, seed=0, **{field: b})]
    rows = _arm_rows(table(rs))
    assert len(rows) == 2, rows
    assert {r.split(" | ")[1] for r in rows} == {"2", "1"}  # the two seeds of `a` together, `b` alone
    assert all(f"{field} " in r.split(" | ")[0] for r in rows), rows  # the label says what differs


def test_a_routing_setting_at_its_default_joins_runs_written_before_it_existed():
    rs = [result("route", 0.5, 0.2, seed=0), result("route", 0.7, 0.4, seed=1, routing="classic", route_weight=1.0),
          result("route", 0.1, 0.9, seed=0, routing="exclusive")]
    rows = _arm_rows(table(rs))
    assert len(rows) == 2 and {r.split(" | ")[1] for r in rows} == {"2", "1"}
    assert any("routing exclusive" in r for r in rows)


def test_seeds_output_dir_and_logging_do_not_split_an_arm():
    rs = [result("route", 0.5, 0.2, seed=s, detector_seed=s, output_dir=f"runs/{s}", absorption_metrics=s == 1,
                 disable_tqdm=s == 2, resume_from_checkpoint=f"runs/{s}/checkpoint-10" if s == 0 else None)
          for s in range(3)]  # seed 0 was interrupted and resumed by its sweep: the same arm
    for s, r in enumerate(rs):  # the base row's monitor entry depends on the detector seed: not a different base
        r["base"] = {**r["base"], "monitor": {"flag_rate": 0.1 * s}}
    rows = _arm_rows(table(rs))
    assert len(rows) == 1 and rows[0].split(" | ")[1] == "3"


def test_grouped_runs_must_share_one_base_row(capsys):
    rs = [result("route", 0.5, 0.2, seed=0), result("route", 0.7, 0.4, seed=1)]
    rs[1]["base"] = {**BASE, "solve_rate": 0.9}
    with pytest.raises(ValueError, match="different base rows"):
        table(rs)
    # arms that differ (here the model) may have their own base rows: one row each
    rs[1]["config"]["model_name_or_path"] = "other"
    lines = table(rs).splitlines()
    assert sum(line.startswith("| base") for line in lines) == 2
