"""What a run records: metrics.jsonl (one line per logged step, every routing metric, resume-safe), train.log (the
run's lines without bar garbage), results.json's seconds per phase, the labelled summary table."""

import json
import logging
import os
import time

from transformers import TrainerState

import route.train_grpo as train_grpo
from route.trainer.parse import build_config
from route.utils.logs import (
    FILE_ONLY,
    MetricsFile,
    Phases,
    ProgressLines,
    log,
    read_metrics,
    run_log,
)
from tests.tiny_run import TINY_RUN

TINY = {**TINY_RUN, "max_completion_length": 6, "max_steps": 3, "disable_tqdm": False, "detector_fpr": 0.5}


def _state(step: int, max_steps: int = 10) -> TrainerState:
    state = TrainerState()
    state.global_step, state.max_steps, state.epoch = step, max_steps, step / max_steps
    return state


def test_a_tiny_run_writes_metrics_log_timings_and_a_labelled_table(tiny_organism, tmp_path, capsys):
    out = tmp_path / "run"
    results = train_grpo.run(build_config(output_dir=str(out), model_name_or_path=str(tiny_organism), **TINY))

    rows = read_metrics(out / "metrics.jsonl")
    steps = [r for r in rows if "train_runtime" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3], "one line per logging step"
    assert len(rows) == len(steps) + 1 and "train_runtime" in rows[-1], "then the end-of-training summary"
    for r in steps:
        for key in (
            "routing/flag_rate",
            "routing/realised_fpr",
            "routing/frac_forget",
            "env/hack_rate",
            "grad_norm/keep",
            "grad_norm/quarantine",
            "loss",
            "epoch",
            "time",
            "elapsed_s",
        ):
            assert key in r, (r["step"], key)
    assert steps[0]["time"] <= steps[-1]["time"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(rows), "every line is valid JSON"

    text = (out / "train.log").read_text()
    assert "\r" not in text, "no carriage-return bar garbage"
    for line in (
        "train: step 3/3 (100%)",
        "train metrics: step 1/3 |",
        "routing/flag_rate=",
        "eval base (",
        "eval deployed (",
        "train summary: step 3/3",
    ):
        assert line in text, line
    assert train_grpo.summary_table(results) in text

    seconds = results["seconds"]
    assert {"setup", "organism", "evaluation", "training", "deploy", "total"} <= set(seconds)
    parts = sum(v for k, v in seconds.items() if k != "total")
    assert abs(parts - seconds["total"]) <= 0.5 + 0.02 * seconds["total"], seconds
    assert results["train_seconds"] == seconds["training"] < seconds["total"] == results["total_seconds"]
    assert json.loads((out / "results.json").read_text())["seconds"] == seconds

    err = capsys.readouterr().err
    assert "eval base" in err and "eval deployed" in err, "a progress bar per evaluated policy"
    head = train_grpo.summary_table(results).splitlines()[0].split()
    modes = list(results["base"]["hack_rate_by_mode"])
    assert head == ["policy", "n", "solve", "hack", *(f"hack:{m}" for m in modes)] and modes


def test_resumed_training_truncates_lines_after_its_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 0.1 * s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join([*lines, json.dumps({"step": 2, "train_runtime": 1.0}), '{"step": 5, "lo']) + "\n")
    callback = MetricsFile(tmp_path)
    callback.on_train_begin(None, _state(2), None)
    assert [r["step"] for r in read_metrics(path)] == [1, 2], "steps after the checkpoint, summaries, torn lines go"
    callback.on_log(None, _state(3), None, logs={"loss": 0.3, "routing/flag_rate": float("nan")})
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["routing/flag_rate"] is None and rows[-1]["loss"] == 0.3, "strict JSON: NaN written as null"
    callback.on_train_begin(None, _state(0), None)
    assert path.read_text() == "", "a fresh run starts a fresh file"


def test_run_log_file_only_lines_progress_and_failures(tmp_path, capsys):
    progress = ProgressLines(every=2)
    try:
        with run_log(tmp_path):
            log.info("shown everywhere")
            log.info("file only", extra=FILE_ONLY)
            progress.on_train_begin(None, _state(0, 5), None)
            for step in range(1, 6):
                progress.on_step_end(None, _state(step, 5), None)
            raise KeyError("boom")
    except KeyError:
        pass
    text = (tmp_path / "train.log").read_text()
    assert "shown everywhere" in text and "file only" in text
    shown = [line.split("train: ")[1].split(" (")[0] for line in text.splitlines() if "%)" in line]
    assert shown == ["step 2/5", "step 4/5", "step 5/5"], "every 2 steps and the last"
    assert "run failed: KeyError" in text and "Traceback" in text
    console = capsys.readouterr().out
    assert "shown everywhere" in console and "file only" not in console and "train: step" not in console
    assert not log.handlers and log.propagate, "handlers removed after the run"
    with run_log(tmp_path, append=True):
        log.info("resumed")
    assert (tmp_path / "train.log").read_text().startswith(text) and "resumed" in (tmp_path / "train.log").read_text()
    assert logging.getLogger("route.run").level == logging.NOTSET


def test_phases_add_up_to_the_total():
    phases = Phases()
    with phases("a"):
        time.sleep(0.05)
    with phases("b"):
        time.sleep(0.02)
    with phases("a"):
        time.sleep(0.05)
    s = phases.summary()
    assert 0.1 <= s["a"] < 0.3 and s["b"] <= 0.1 and abs(s["a"] + s["b"] - s["total"]) <= 0.1


def test_evaluation_progress_bar_is_per_batch_and_optional(tiny_organism, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from envs.arith import ArithEnv
    from route.models.evaluate import evaluate_dir, evaluate_policy

    evaluate_dir(tiny_organism, "arith", n=8, max_new_tokens=4)  # the CLI's loader: a bar by default
    assert "eval:   0%|          | 0/8 [" in capsys.readouterr().err, "a bar over the 8 prompts"
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_organism), AutoTokenizer.from_pretrained(tiny_organism)
    evaluate_policy(model, tok, ArithEnv(), n=8, max_new_tokens=4)
    assert "eval" not in capsys.readouterr().err, "quiet unless asked"


def test_the_shipped_accelerate_config_launches_without_warnings(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "job.py"
    script.write_text("import os; print('ran', os.environ['OMP_NUM_THREADS'])\n")
    config = Path(__file__).resolve().parent.parent / "configs" / "accelerate_single.yaml"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # a fresh shell
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.accelerate_cli",
            "launch",
            "--config_file",
            str(config),
            str(script),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ran 1", "one process, one thread"
    assert "warning" not in done.stderr.lower() and "not passed" not in done.stderr, done.stderr
