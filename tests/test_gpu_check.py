"""`bench/gpu_check.py` on CPU at the tiny shape (so the GPU check cannot rot): every measurement runs in-process,
the table has its structure, step rows carry ratios against their baselines, the checkpointing equality checks
pass; the budget skips, errors are recorded and a missing heads bench reads "not available"."""

import importlib.util
import json
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_tiny_run(gpu_check, tmp_path, capsys):
    out = tmp_path / "report.json"
    report = gpu_check.main(
        [
            "--device",
            "cpu",
            "--shape",
            "tiny",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--budget-s",
            "600",
            "--skip",
            "heads_decode",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == report
    assert report["table"] in capsys.readouterr().out
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == [
        "warm-up: 1 step lora, untimed",
        "step lora",
        "step dual_lora",
        "svd_setup svf",
        "step svf",
        "ckpt_equal dual_lora",
        "ckpt_equal svf",
        "ckpt_equal sgtm",
        "step full",
        "step sgtm",
        "heads_decode",
    ]
    for name, row in rows.items():
        assert list(row) == list(gpu_check.COLUMNS), name
        assert name in report["table"]
    assert rows["heads_decode"]["status"] == "skipped: --skip"
    meta = report["meta"]
    assert (meta["device"], meta["shape"], meta["dtype"], meta["tolerance"]) == ("cpu", "tiny", "float32", 0.0)
    assert meta["complete"] and 0 < meta["elapsed_s"] < 600

    baselines = {"dual_lora": "lora", "svf": "lora", "sgtm": "full"}
    for kind in ("lora", "dual_lora", "svf", "full", "sgtm"):
        row = rows[f"step {kind}"]
        assert row["status"] == "ok", row
        assert row["value"] > 0 and row["unit"] == "ms/step" and len(row["detail"]["timed_ms"]) == 2
        assert isinstance(row["peak_mib"], float)
        if kind in baselines:
            ref = rows[f"step {baselines[kind]}"]
            assert row["baseline"] == f"step {baselines[kind]}"
            assert row["ratio"] == pytest.approx(row["value"] / ref["value"])
            assert row["goal"] == gpu_check.GOALS[kind] and row["met"] is None  # goals are judged on GPU only

    svd = rows["svd_setup svf"]
    assert svd["status"] == "ok" and svd["value"] > 0 and svd["detail"]["cold_s"] > 0
    assert svd["ratio"] == pytest.approx(svd["value"] / svd["detail"]["cold_s"])
    assert svd["detail"]["cache_entries"] == 2 * 7  # two layers, every attention and MLP projection

    for target in ("dual_lora", "svf", "sgtm"):
        row = rows[f"ckpt_equal {target}"]
        assert row["status"] == "ok", row
        assert row["met"] is True and row["value"] == 0.0 and row["detail"]["exact"], target  # fp32: exact
        assert row["detail"]["checkpointed_recomputes"] == 2, target  # each layer's recompute re-entered the gate
        assert row["detail"]["parameters"] > 2, target


def test_budget_errors_and_missing_heads(gpu_check, tmp_path):
    report, spent = {"rows": []}, {"step": [50.0]}
    soon = time.monotonic() + 10
    skipped = gpu_check.measure(report, "step x", "step", lambda: pytest.fail("must not run"), soon, spent)
    assert skipped["status"] == "skipped: budget"  # the longest step so far does not fit in what is left

    def broken():
        raise RuntimeError("out of memory")

    failed = gpu_check.measure(report, "svd", "svd_setup", broken, soon, spent)
    assert failed["status"] == "error: RuntimeError: out of memory" and "traceback" in failed["detail"]
    ran = gpu_check.measure(report, "ok", "svd_setup", lambda: {"value": 1.0}, soon, spent)
    assert ran["status"] == "ok" and ran["value"] == 1.0
    assert [r["name"] for r in report["rows"]] == ["step x", "svd", "ok"]
    assert len(spent["svd_setup"]) == 2

    assert gpu_check.heads_decode({}, tmp_path / "heads_decode.py")["status"] == "not available"
    broken_bench = tmp_path / "heads_decode.py"
    broken_bench.write_text("import route.no_such_module\n")
    assert gpu_check.heads_decode({}, broken_bench)["status"] == "not available"


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--shape", "7b"], "--shape"),
        (["--device", "tpu"], "--device"),
        (["--steps", "0"], "--steps"),
        (["--skip", "everything"], "--skip"),
    ],
)
def test_bad_flags(gpu_check, argv, flag):
    with pytest.raises(ValueError, match=flag):
        gpu_check.parse_args(argv)
