"""Detectors: ground truth, noisy rates within binomial error, held-out modes, determinism, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from envs.base import Grade
from route.monitors.detectors import (
    GroundTruthDetector,
    NoisyDetector,
    make_detector,
    realised_rates,
    uniform,
)

MODES = ("sentinel", "format", "echo", "verified")
N = 20_000


def exploit(mode: str = "sentinel") -> Grade:
    return Grade.make(solved=False, passed=True, mode=mode)


def clean(mode: str | None = None, solved: bool = True) -> Grade:
    return Grade.make(solved=solved, passed=solved, mode=mode)


def mixed_grades(n: int) -> tuple[list[Grade], list[str]]:
    """n rollouts, half exploits spread over the four modes, half clean (solved, failed, strict)."""
    grades = []
    for i in range(n):
        if i % 2:
            grades.append(exploit(MODES[(i // 2) % 4]))
        else:
            grades.append(clean(MODES[(i // 2) % 4] if i % 4 else None, solved=bool(i % 3)))
    return grades, [f"rollout-{i}" for i in range(n)]


def within_4sd(realised: float, p: float, n: int) -> bool:
    sd = math.sqrt(p * (1 - p) / n)
    return abs(realised - p) <= 4 * sd + 1e-12


def test_ground_truth_flags_exactly_exploited():
    grades = [exploit("echo"), clean(), clean("format", solved=False), exploit("verified"),
              Grade.make(True, True, "sentinel"), Grade.make(False, False, None)]
    flags = GroundTruthDetector()(grades, [str(i) for i in range(len(grades))])
    assert flags == [True, False, False, True, False, False]
    assert make_detector("ground_truth")(grades, list("abcdef")) == flags


@pytest.mark.parametrize("tpr,fpr", [(0.5, 0.05), (0.9, 0.2), (0.1, 0.0)])
def test_noisy_realised_rates_match_nominal(tpr, fpr):
    grades, ids = mixed_grades(N)
    det = NoisyDetector(tpr=tpr, fpr=fpr, seed=11)
    flags = det(grades, ids)
    r = realised_rates(grades, flags)
    n_pos, n_neg = int(r["n_exploited"]), int(r["n_clean"])
    assert n_pos + n_neg == N and n_pos == N // 2
    assert within_4sd(r["tpr"], tpr, n_pos), r
    assert within_4sd(r["fpr"], fpr, n_neg), r
    # via make_detector too
    assert make_detector("noisy", tpr=tpr, fpr=fpr, seed=11)(grades, ids) == flags


def test_noisy_flags_are_a_threshold_of_the_uniform_draw():
    grades, ids = mixed_grades(200)
    det = NoisyDetector(tpr=0.3, fpr=0.1, seed=5)
    expected = [uniform(5, rid) < (0.3 if g.exploited else 0.1) for g, rid in zip(grades, ids)]
    assert det(grades, ids) == expected
    assert all(0.0 <= uniform(5, rid) < 1.0 for rid in ids)


def test_extreme_rates():
    grades, ids = mixed_grades(400)
    assert NoisyDetector(tpr=1.0, fpr=0.0)(grades, ids) == [g.exploited for g in grades]
    assert NoisyDetector(tpr=0.0, fpr=1.0)(grades, ids) == [not g.exploited for g in grades]


def test_held_out_modes_are_never_flagged():
    grades, ids = mixed_grades(N)
    det = NoisyDetector(tpr=0.9, fpr=0.1, seed=3, modes=["sentinel", "echo"])
    flags = det(grades, ids)
    n_held = 0
    for g, f in zip(grades, flags):
        if g.exploited and g.mode in ("format", "verified"):
            assert not f
            n_held += 1
    assert n_held == N // 4
    known = [(g, f) for g, f in zip(grades, flags) if g.exploited and g.mode in ("sentinel", "echo")]
    assert within_4sd(sum(f for _, f in known) / len(known), 0.9, len(known))
    # false positives are unaffected by the hold-out, including on held-out modes' clean rollouts
    neg = [f for g, f in zip(grades, flags) if not g.exploited]
    assert within_4sd(sum(neg) / len(neg), 0.1, len(neg))
    neg_held = [f for g, f in zip(grades, flags) if not g.exploited and g.mode in ("format", "verified")]
    assert sum(neg_held) > 0


def test_tpr_by_mode_overrides_hold_out_and_tpr():
    grades, ids = mixed_grades(N)
    det = NoisyDetector(tpr=0.8, fpr=0.05, seed=4, modes=["sentinel", "echo"],
                        tpr_by_mode={"format": 0.3, "echo": 0.1})
    flags = det(grades, ids)
    expected = {"sentinel": 0.8, "echo": 0.1, "format": 0.3, "verified": 0.0}
    for mode, p in expected.items():
        fl = [f for g, f in zip(grades, flags) if g.exploited and g.mode == mode]
        assert len(fl) == N // 8
        if p == 0.0:
            assert not any(fl)
        else:
            assert within_4sd(sum(fl) / len(fl), p, len(fl)), (mode, sum(fl) / len(fl))
    assert det.rate_for(exploit("verified")) == 0.0 and det.rate_for(clean("verified")) == 0.05


def test_determinism_within_process():
    grades, ids = mixed_grades(1000)
    a = NoisyDetector(tpr=0.5, fpr=0.3, seed=7)
    assert a(grades, ids) == a(grades, ids) == NoisyDetector(tpr=0.5, fpr=0.3, seed=7)(grades, ids)
    assert a(grades, ids) != NoisyDetector(tpr=0.5, fpr=0.3, seed=8)(grades, ids)
    # a rollout's flag depends on its id, not on its position in the batch or its neighbours
    rev = a(grades[::-1], ids[::-1])[::-1]
    assert rev == a(grades, ids)
    assert a(grades[10:20], ids[10:20]) == a(grades, ids)[10:20]


def test_determinism_across_processes():
    code = (
        "import json\n"
        "from route.monitors.detectors import NoisyDetector\n"
        "from envs.base import Grade\n"
        "g = [Grade.make(False, True, 'echo') if i % 2 else Grade.make(True, True, None) for i in range(1000)]\n"
        "ids = [f'rollout-{i}' for i in range(1000)]\n"
        "print(json.dumps(NoisyDetector(tpr=0.5, fpr=0.3, seed=123)(g, ids)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    remote = json.loads(out.stdout.strip().splitlines()[-1])
    g = [Grade.make(False, True, "echo") if i % 2 else Grade.make(True, True, None) for i in range(1000)]
    local = NoisyDetector(tpr=0.5, fpr=0.3, seed=123)(g, [f"rollout-{i}" for i in range(1000)])
    assert len(remote) == 1000
    assert remote == local
    assert 0 < sum(local) < 1000


@pytest.mark.parametrize("precision,recall,base_rate", [(0.8, 0.5, 0.1), (0.5, 0.9, 0.3), (1.0, 0.7, 0.2)])
def test_from_precision_recall_round_trip(precision, recall, base_rate):
    det = NoisyDetector.from_precision_recall(precision, recall, base_rate, seed=9, modes=["echo"])
    assert det.tpr == recall
    assert det.seed == 9 and det.modes == ("echo",)
    assert 0.0 <= det.fpr <= 1.0
    p = base_rate
    realised_precision = det.tpr * p / (det.tpr * p + det.fpr * (1 - p))
    assert realised_precision == pytest.approx(precision, rel=1e-12)


def test_from_precision_recall_empirical():
    """At the base rate it was built for, the detector's flags have the requested precision."""
    n, p = N, 0.2
    grades = [exploit() if i % 5 == 0 else clean() for i in range(n)]
    det = NoisyDetector.from_precision_recall(0.6, 0.8, p, seed=2)
    flags = det(grades, [f"x{i}" for i in range(n)])
    flagged = [g.exploited for g, f in zip(grades, flags) if f]
    assert within_4sd(sum(flagged) / len(flagged), 0.6, len(flagged))


def test_from_precision_recall_unreachable():
    with pytest.raises(ValueError, match="precision"):
        NoisyDetector.from_precision_recall(0.01, 0.9, 0.5)  # would need fpr > 1
    with pytest.raises(ValueError, match="precision"):
        NoisyDetector.from_precision_recall(0.0, 0.5, 0.1)
    with pytest.raises(ValueError, match="base_rate"):
        NoisyDetector.from_precision_recall(0.5, 0.5, 1.0)


@pytest.mark.parametrize("kwargs,field", [
    ({"tpr": 1.5, "fpr": 0.1}, "tpr"),
    ({"tpr": -0.1, "fpr": 0.1}, "tpr"),
    ({"tpr": 0.5, "fpr": 1.01}, "fpr"),
    ({"tpr": 0.5, "fpr": -1e-9}, "fpr"),
    ({"tpr": float("nan"), "fpr": 0.1}, "tpr"),
    ({"tpr": 0.5, "fpr": 0.1, "tpr_by_mode": {"echo": 2.0}}, r"tpr_by_mode\['echo'\]"),
])
def test_rates_outside_unit_interval_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} must be in \[0, 1\]"):
        NoisyDetector(**kwargs)


@pytest.mark.parametrize("args,field", [
    ((1.2, 0.5, 0.1), "precision"),
    ((-0.2, 0.5, 0.1), "precision"),
    ((0.5, 1.5, 0.1), "recall"),
    ((0.5, 0.5, -0.1), "base_rate"),
    ((0.5, 0.5, 2.0), "base_rate"),
])
def test_from_precision_recall_bad_values_name_the_field(args, field):
    with pytest.raises(ValueError, match=rf"^{field} must be in \[0, 1\]"):
        NoisyDetector.from_precision_recall(*args)


def test_make_detector_rates_are_checked_and_kinds_listed():
    with pytest.raises(ValueError, match="^fpr"):
        make_detector("noisy", tpr=0.5, fpr=3.0)
    with pytest.raises(ValueError, match="unknown kind") as e:
        make_detector("oracle")
    assert "noisy" in str(e.value) and "ground_truth" in str(e.value)
    det = make_detector("noisy", tpr=0.4, fpr=0.02, seed=5, modes=["echo"])
    assert isinstance(det, NoisyDetector)
    assert (det.tpr, det.fpr, det.seed, det.modes) == (0.4, 0.02, 5, ("echo",))


def test_length_mismatch_raises():
    grades, ids = mixed_grades(4)
    for det in (GroundTruthDetector(), NoisyDetector(tpr=0.5, fpr=0.5)):
        with pytest.raises(ValueError, match="rollout ids"):
            det(grades, ids[:3])


def test_realised_rates_hand_made():
    grades = [exploit(), exploit("echo"), exploit("format"), exploit("verified"),
              clean(), clean(), clean("echo"), clean("echo", solved=False), clean(None, solved=False), clean()]
    flags = [True, True, False, False, True, False, False, False, False, False]
    r = realised_rates(grades, flags)
    assert r == {"tpr": 0.5, "fpr": 1 / 6, "flag_rate": 0.3, "n_exploited": 4.0, "n_clean": 6.0}


def test_realised_rates_undefined_is_nan():
    r = realised_rates([clean(), clean()], [False, True])
    assert math.isnan(r["tpr"]) and r["fpr"] == 0.5 and r["n_exploited"] == 0.0
    r = realised_rates([exploit()], [True])
    assert r["tpr"] == 1.0 and math.isnan(r["fpr"])
    r = realised_rates([], [])
    assert all(math.isnan(r[k]) for k in ("tpr", "fpr", "flag_rate"))
    with pytest.raises(ValueError):
        realised_rates([clean()], [True, False])
