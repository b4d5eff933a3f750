"""What a run records on disk besides its results: `metrics.jsonl`, `train.log`, and where its time went.

- `MetricsFile` (a TrainerCallback) appends one JSON line per `Trainer.log` call to `<output_dir>/metrics.jsonl`:
  every metric the trainer logs (`routing/*`, `env/*`, `grad_norm/*`, loss, reward, ...) plus `step`, `epoch`,
  `time` (Unix seconds) and `elapsed_s` (seconds since this process started training). Each line is flushed and
  fsynced as it is written. When training starts at step k (0 for a fresh run, the checkpoint's step on resume),
  lines after step k, end-of-training summaries and a torn last line are dropped first, so a resumed run neither
  duplicates nor loses a logged step. Non-finite values are written as null (strict JSON).
- `run_log(output_dir)` sends the `route.run` logger to the console (through `tqdm.write`, so bars stay intact)
  and to `<output_dir>/train.log` (plain lines, no carriage returns). Records logged with `extra=FILE_ONLY` go to
  the file only: `ProgressLines` writes the training progress there every ~5% of the steps, and `StepLines` every
  logged step as `key=value` text, so `tail -f train.log` follows a run that has no terminal (a sweep cell).
- `Phases` adds up wall-clock seconds per phase (the main job: setup, organism, evaluation, training, deploy) and
  the total.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from route.utils.io import write_text_atomic

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
LOGGER = "route.run"
FILE_ONLY = {"file_only": True}  # `logger.info(msg, extra=FILE_ONLY)`: train.log only, not the console
SUMMARY_KEYS = ("train_runtime",)  # present only in the end-of-training log line

log = logging.getLogger(LOGGER)


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The parsed lines of a metrics.jsonl (a torn or unparseable line is skipped)."""
    rows = []
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if isinstance(row, dict):
                    rows.append(row)
    return rows


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Keep the lines of `path` logged at or before `step` (summaries dropped); returns how many were kept."""
    path = Path(path)
    if not path.exists():
        return 0
    keep = [
        r
        for r in read_metrics(path)
        if isinstance(r.get("step"), int) and r["step"] <= step and not any(k in r for k in SUMMARY_KEYS)
    ]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
    return len(keep)


class MetricsFile(TrainerCallback):
    """Appends every logged dict to `<output_dir>/metrics.jsonl`, one line per log (main process only)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / METRICS_FILE
        self.start = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.path, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = time.time()
        row = {
            "step": state.global_step,
            "epoch": state.epoch,
            "time": round(now, 3),
            "elapsed_s": round(now - self.start, 3),
            **{k: _finite(v) for k, v in logs.items()},
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class StepLines(TrainerCallback):
    """Every logged dict as one `step N/M | key=value ...` line in train.log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            kind = "summary" if any(k in logs for k in SUMMARY_KEYS) else "metrics"
            text = " ".join(f"{k}={_fmt(v)}" for k, v in logs.items())
            log.info("train %s: step %d/%d | %s", kind, state.global_step, state.max_steps, text, extra=FILE_ONLY)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class ProgressLines(TrainerCallback):
    """A line-based progress bar in train.log: `train: step 40/300 (13%) | 0.25 s/step | 0:10 elapsed, eta 1:05`,
    every `every` steps (default: about 20 lines per run) and at the last step."""

    def __init__(self, every: int | None = None):
        self.every = every
        self.start, self.first = time.time(), 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.first = time.time(), state.global_step
        if state.is_world_process_zero:
            log.info("train: step %d/%d, starting", state.global_step, state.max_steps, extra=FILE_ONLY)

    def on_step_end(self, args, state, control, **kwargs):
        step, total = state.global_step, state.max_steps
        every = self.every or max(1, round(total / 20))
        if not state.is_world_process_zero or (step % every and step != total):
            return
        elapsed = time.time() - self.start
        per = elapsed / max(1, step - self.first)
        log.info(
            "train: step %d/%d (%d%%) | %.2f s/step | %s elapsed, eta %s",
            step,
            total,
            100 * step // max(1, total),
            per,
            _clock(elapsed),
            _clock(per * (total - step)),
            extra=FILE_ONLY,
        )


class _Console(logging.Handler):
    """Console lines through `tqdm.write` (a running bar is redrawn below them); FILE_ONLY records skipped."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "file_only", False):
            return
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


def is_main_process() -> bool:
    """Rank 0 of a launched job (or a plain process); decided from the environment, before accelerate starts."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def run_log(output_dir: str | os.PathLike | None, append: bool = False, console: bool = True) -> Iterator[Path | None]:
    """Route the `route.run` logger to the console and to `<output_dir>/train.log` (main process only) while the
    block runs; yields the log file's path. `append` continues an earlier log (a resumed run); else it is replaced.
    An exception leaving the block is written to the file with its traceback."""
    path = None
    handlers: list[logging.Handler] = []
    if is_main_process():
        if console:
            handlers.append(_Console())
        if output_dir is not None:
            path = Path(output_dir) / LOG_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            file = logging.FileHandler(path, mode="a" if append else "w")
            file.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            handlers.append(file)
    level, propagate = log.level, log.propagate
    log.setLevel(logging.INFO)
    log.propagate = False  # the caller's root handlers would print every line a second time
    for h in handlers:
        log.addHandler(h)
    try:
        yield path
    except BaseException as e:
        log.error("run failed: %s: %s", type(e).__name__, e, exc_info=True, extra=FILE_ONLY)
        raise
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        log.setLevel(level)
        log.propagate = propagate


class Phases:
    """Wall-clock seconds per named phase: `with phases("training"): ...`; `summary()` adds the total."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    def summary(self) -> dict[str, float]:
        """`{phase: seconds, ..., "total": seconds since construction}`, rounded to 0.1 s."""
        return {
            **{k: round(v, 1) for k, v in self.seconds.items()},
            "total": round(time.perf_counter() - self.start, 1),
        }


__all__ = [
    "FILE_ONLY",
    "LOG_FILE",
    "METRICS_FILE",
    "MetricsFile",
    "Phases",
    "ProgressLines",
    "StepLines",
    "is_main_process",
    "read_metrics",
    "run_log",
    "truncate_metrics",
]
