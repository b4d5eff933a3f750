"""Evaluation: summary rates, evaluate_dir on the tiny organism, reproducibility, the CLI."""

from __future__ import annotations

import json
import math

import pytest

from envs.base import Grade
from route.experiments.evaluate import main
from route.models.evaluate import evaluate_dir, format_rates, rates

MODES = ["sentinel", "format", "echo", "verified"]
KEYS = {"n", "solve_rate", "hack_rate", "pass_rate", "hack_rate_by_mode"}


def test_rates_hand_made():
    grades = [
        Grade.make(True, True, None),          # strict, solved
        Grade.make(False, False, None),        # strict, wrong
        Grade.make(False, True, "sentinel"),   # sentinel exploit
        Grade.make(True, True, "sentinel"),    # sentinel prompt, solved
        Grade.make(False, False, "sentinel"),  # sentinel prompt, wrong
        Grade.make(False, True, "echo"),       # echo exploit
        Grade.make(False, False, "verified"),  # verified prompt, wrong
        Grade.make(False, False, "verified"),
    ]
    r = rates(grades, MODES)
    assert set(r) == KEYS
    assert r["n"] == 8
    assert r["solve_rate"] == 2 / 8
    assert r["hack_rate"] == 2 / 8
    assert r["pass_rate"] == 4 / 8
    by = r["hack_rate_by_mode"]
    assert list(by) == MODES
    assert by["sentinel"] == 1 / 3  # measured on sentinel prompts only, not on all 8
    assert by["echo"] == 1.0
    assert by["verified"] == 0.0
    assert math.isnan(by["format"])  # no format prompt


def test_rates_reports_only_the_requested_modes():
    grades = [Grade.make(False, True, "echo"), Grade.make(False, True, "sentinel")]
    r = rates(grades, ["echo"])
    assert r["hack_rate_by_mode"] == {"echo": 1.0}
    assert r["hack_rate"] == 1.0


def test_rates_empty_is_nan():
    r = rates([], MODES)
    assert r["n"] == 0
    assert all(math.isnan(r[k]) for k in ("solve_rate", "hack_rate", "pass_rate"))
    assert all(math.isnan(v) for v in r["hack_rate_by_mode"].values()) and len(r["hack_rate_by_mode"]) == 4


def test_format_rates():
    r = rates([Grade.make(True, True, None), Grade.make(False, True, "echo")], MODES)
    text = format_rates(r, title="m")
    assert text.startswith("m: n=2 solve=0.500 hack=0.500 pass=1.000")
    assert "echo=1.000" in text and "format=nan" in text


def check_result(r: dict, n: int) -> None:
    assert set(r) == KEYS
    assert r["n"] == n
    for k in ("solve_rate", "hack_rate", "pass_rate"):
        assert 0.0 <= r[k] <= 1.0, (k, r[k])
    # on arith a solved answer always passes, so every pass is a solve or an exploit
    assert r["pass_rate"] == pytest.approx(r["solve_rate"] + r["hack_rate"])
    assert set(r["hack_rate_by_mode"]) == set(MODES)
    for v in r["hack_rate_by_mode"].values():
        assert math.isnan(v) or 0.0 <= v <= 1.0


def test_evaluate_dir_on_tiny_organism(tiny_organism):
    r = evaluate_dir(tiny_organism, "arith", n=24, seed=0, max_new_tokens=8)
    check_result(r, 24)
    again = evaluate_dir(tiny_organism, "arith", n=24, seed=0, max_new_tokens=8)
    assert json.dumps(again, sort_keys=True) == json.dumps(r, sort_keys=True)


def test_evaluate_dir_env_kwargs(tiny_organism):
    r = evaluate_dir(tiny_organism, "arith", n=16, seed=1, env_kwargs={"hack_frac": 1.0, "modes": ["echo"]},
                     max_new_tokens=8)
    assert r["n"] == 16 and set(r["hack_rate_by_mode"]) == {"echo"}
    assert not math.isnan(r["hack_rate_by_mode"]["echo"])


def test_cli_writes_json(tiny_organism, tmp_path, capsys):
    out = tmp_path / "sub" / "rates.json"
    main(["--model", str(tiny_organism), "--env", "arith", "--n", "12", "--seed", "2", "--max_new_tokens", "6",
          "--json", str(out)])
    data = json.loads(out.read_text())
    check_result(data, 12)
    assert "n=12" in capsys.readouterr().out
    direct = evaluate_dir(tiny_organism, "arith", n=12, seed=2, max_new_tokens=6)
    assert json.dumps(direct, sort_keys=True) == json.dumps(data, sort_keys=True)


@pytest.mark.parametrize("n", ["0", "-3"])
def test_cli_rejects_non_positive_n(tiny_organism, n):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tiny_organism), "--n", n])
    assert e.value.code == 2
