"""route.report: arms grouped by target, intervention, detector and non-default routing settings."""

import json

from route.report import arm_label, main, table


def result(intervention, solve, hack, **config):
    rates = {"n": 8, "solve_rate": solve, "hack_rate": hack, "hack_rate_by_mode": {"sentinel": hack}}
    return {"config": {"target": "dual_lora", "intervention": intervention, "detector_tpr": 0.5, "detector_fpr": 0.05,
                       **config},
            "base": rates, "training": rates, "deployed": rates}


def test_table_groups_seeds_and_labels_non_default_settings(tmp_path, capsys):
    rs = [result("route", 0.5, 0.2), result("route", 0.7, 0.4), result("none", 0.4, 0.3),
          result("route", 0.6, 0.1, unflagged_mode="retain", generation_policy="deployed")]
    text = table(rs)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()[3:]}
    assert list(rows) == ["none (dual_lora, tpr 0.5, fpr 0.05)", "route (dual_lora, tpr 0.5, fpr 0.05)",
                          "route (dual_lora, tpr 0.5, fpr 0.05, unflagged_mode retain, generation_policy deployed)"]
    assert "| 2 | 0.600 (0.500-0.700) | 0.300 (0.200-0.400) |" in rows["route (dual_lora, tpr 0.5, fpr 0.05)"]
    assert arm_label(rs[0]["config"] | {"unflagged_mode": "default"}) == "route (dual_lora, tpr 0.5, fpr 0.05)"
    for i, r in enumerate(rs):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "results.json").write_text(json.dumps(r))
    main([str(tmp_path / f"r{i}") for i in range(len(rs))])
    assert capsys.readouterr().out.strip() == text
