"""Detector sweeps: a grid of routed-GRPO runs over detector TPR x FPR, known/held-out modes, interventions, seeds.

    route sweep --config configs/sweep_default.yaml --output_dir runs/sweep --workers 2
    route sweep --config configs/sweep_default.yaml --output_dir runs/sweep --list
    route sweep --config configs/sweep_default.yaml --output_dir runs/sweep --cell 3   # one cell
    route sweep --output_dir runs/sweep --aggregate                                  # tables + figures

A sweep file has `base_config:` (a RoutedGRPOConfig YAML layered first; default configs/default.yaml,
`null` for none), `base:` (fields shared by all cells) and `grid:` (field -> list of values). Cells are
the product of the grid in file order, the last field varying fastest; a cell's index is its position.
Each cell is one run of the main job (`python -m route.train_grpo --config cell.yaml`, in its own
process) in `DIR/cells/<name>/`, which gets the run's files (`train.log`: progress and every logged step, so
`tail -f` follows the cell; `metrics.jsonl`; `results.json`; `deployed/`) and `console.log` (the process's raw
output: bars, warnings, a traceback). A cell is finished when its `results.json` exists (the main job
writes it atomically, last), so an interrupted sweep loses no finished cell and a rerun skips them; an
unfinished cell with checkpoints (`save_steps`) resumes from its last complete one (`resume_point`).
Every cell's config is parsed with `RoutedGRPOConfig` before any cell runs.

Outputs: `DIR/sweep.json` (the cells), `DIR/sweep.csv` (one row per cell, deployed hack rate on the
detector's known modes and on held-out modes in separate columns), `DIR/sweep_heatmap.png` and
`DIR/sweep_tradeoff.png` (see `route.experiments.sweep_plots`), and per environment `DIR/pareto/<env>/pareto.png` and
`pareto.csv` (see `route.experiments.pareto`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from route.experiments.compare import known_and_held_out, policy_stats
from route.experiments.sweep_spec import (  # noqa: F401 - the sweep file's API, also used from here
    ALIASES,
    Cell,
    SweepError,
    config_fields,
    dump_yaml,
    expand,
    fmt_value,
    load_spec,
    manifest_cells,
    validate,
    write_manifest,
)
from route.utils.errors import ArgumentParser, at_least, check_paths, cli
from route.utils.io import write_csv, write_text_atomic
from route.utils.threads import THREAD_VARS, THREADS_DEFAULT, chosen_threads

CELL_MODULE = "route.train_grpo"  # the main job; each cell runs `python -m CELL_MODULE --config cell.yaml`
CONSOLE_LOG = "console.log"  # a cell process's stdout and stderr; the main job itself writes train.log

# ---------------------------------------------------------------------------------------------- running
_LIVE: set[subprocess.Popen] = set()  # the cell processes this sweep started and that still run
_LIVE_LOCK = threading.Lock()
_STOP = threading.Event()  # set on interrupt: no new cell starts


def run_cell(cell: Cell, threads: int | None = None, in_process: bool = False) -> int:
    """Run one cell through the main job; returns its exit code (0 on success).

    The main job writes the cell's `train.log` (progress lines, every logged step; `tail -f` it) and
    `metrics.jsonl`; the process's raw console output (bars, warnings, a traceback) goes to `console.log`."""
    cfg = cell.dir / "cell.yaml"
    write_text_atomic(cfg, dump_yaml(cell.values))
    argv = ["--config", str(cfg)]
    resume = resume_point(cell)  # an interrupted cell continues from its last checkpoint (save_steps)
    if resume is not None:
        argv += ["--resume_from_checkpoint", str(resume)]
    if in_process:
        from route.train_grpo import parse_config, run

        run(parse_config(argv))
        return 0
    env = dict(os.environ)
    if threads:
        env.update({v: str(threads) for v in THREAD_VARS})
    with open(cell.dir / CONSOLE_LOG, "a" if resume else "w") as log:
        if resume is not None:
            log.write(f"\nsweep: resuming from {resume}\n")
            log.flush()
        with _LIVE_LOCK:
            if _STOP.is_set():
                return -1
            proc = subprocess.Popen([sys.executable, "-m", CELL_MODULE, *argv],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            _LIVE.add(proc)
        try:
            return proc.wait()
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)


def resume_point(cell: Cell) -> Path | None:
    """The cell's last complete checkpoint (`checkpoint-N` holding its `trainer_state.json`, which the trainer writes
    after the weights and optimizer), when the cell is unfinished and its config does not name one; else None."""
    if cell.done or cell.values.get("resume_from_checkpoint"):
        return None
    run_dir = Path(cell.values.get("output_dir", cell.dir))
    steps = [(int(p.name[len("checkpoint-"):]), p) for p in run_dir.glob("checkpoint-*")
             if p.name[len("checkpoint-"):].isdigit() and (p / "trainer_state.json").is_file()]
    return max(steps)[1] if steps else None


def _stop_all() -> None:
    with _LIVE_LOCK:
        _STOP.set()
        for proc in list(_LIVE):  # only the processes this sweep started, by their handle
            proc.terminate()


def run_cells(cells: Sequence[Cell], workers: int = 1, threads: int | None = None, in_process: bool = False,
              progress: bool = True) -> list[Cell]:
    """Run the unfinished cells, `workers` at a time; returns the cells that failed (their console.log says why).

    On an interrupt (Ctrl-C, SIGTERM) no new cell starts and running cells are terminated; finished cells
    keep their results.json, so a rerun continues where this one stopped.
    """
    from tqdm.auto import tqdm

    if workers < 1:
        raise SweepError(f"--workers must be >= 1, got {workers}")
    todo = [c for c in cells if not c.done]
    threads = threads or chosen_threads()  # per cell; never one per core (cells share the machine)
    failed: list[Cell] = []
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="sweep cells", unit="cell",
               disable=not progress)
    _STOP.clear()
    pool = None
    try:
        if in_process or workers == 1:
            for cell in todo:
                bar.set_postfix_str(cell.name)
                try:
                    rc = run_cell(cell, threads, in_process)
                except Exception as e:  # noqa: BLE001 - one failed cell must not stop the sweep
                    print(f"cell {cell.index} ({cell.name}) failed: {e!r}", file=sys.stderr)
                    rc = 1
                if rc or not cell.done:
                    failed.append(cell)
                bar.update(1)
        else:
            pool = ThreadPoolExecutor(max_workers=workers)
            futures = {pool.submit(run_cell, c, threads): c for c in todo}
            for fut in as_completed(futures):
                cell = futures[fut]
                if fut.result() != 0 or not cell.done:
                    failed.append(cell)
                bar.update(1)
                bar.set_postfix(failed=len(failed))
    except BaseException:
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        _stop_all()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        bar.close()
    return sorted(failed, key=lambda c: c.index)


# ---------------------------------------------------------------------------------------------- aggregation
def arm_label(overrides: dict[str, Any], cfg: dict[str, Any]) -> str:
    """What a cell compares besides detector quality and seed: its intervention and other grid values."""
    parts = [f"{ALIASES.get(k, k)}={fmt_value(k, v)}" for k, v in overrides.items()
             if k not in ("detector_tpr", "detector_fpr", "seed", "detector_seed", "intervention")]
    return " ".join([str(overrides.get("intervention", cfg.get("intervention"))), *parts])


def cell_row(cell: Cell, results: dict[str, Any] | None) -> dict[str, Any]:
    """One sweep.csv row: the cell's grid values, its config and the base/training/deployed rates."""
    row: dict[str, Any] = {"index": cell.index, "cell": cell.name, "status": "done" if results else "pending"}
    row.update({k: fmt_value(k, v) if isinstance(v, (list, dict)) or v is None else v
                for k, v in cell.overrides.items()})
    if not results:
        return row
    cfg, det = results["config"], results.get("detector", {})
    modes = list(results["deployed"]["hack_rate_by_mode"])
    known, held_out = known_and_held_out(results)
    row.update({"arm": arm_label(cell.overrides, cfg), "target": cfg.get("target"),
                "intervention": cfg.get("intervention"),
                "detector_tpr": cfg.get("detector_tpr"), "detector_fpr": cfg.get("detector_fpr"),
                "known_modes": "+".join(known), "held_out_modes": "+".join(held_out), "seed": cfg.get("seed"),
                "realised_tpr": det.get("realised_tpr"), "realised_fpr": det.get("realised_fpr")})
    for policy in ("base", "training", "deployed"):
        stats = policy_stats(results, policy)
        row[f"{policy}_solve_rate"] = stats["solve"]
        row[f"{policy}_hack_rate"] = stats["hack"]
        row[f"{policy}_hack_known"] = stats["hack_known"]
        row[f"{policy}_hack_held_out"] = stats["hack_held_out"]
    for m in modes:
        row[f"deployed_hack_{m}"] = results["deployed"]["hack_rate_by_mode"][m]
    row["train_seconds"] = results.get("train_seconds")  # training alone; total_seconds: the whole run
    row["total_seconds"] = results.get("total_seconds")
    return row


def collect(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    rows = []
    for cell in manifest_cells(Path(output_dir)):
        path = cell.dir / "results.json"
        rows.append(cell_row(cell, json.loads(path.read_text()) if path.exists() else None))
    return rows


def aggregate(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Write DIR/sweep.csv and the figures from the finished cells; returns the rows."""
    from route.experiments.sweep_plots import plot_heatmap, plot_tradeoff

    output_dir = Path(output_dir)
    rows = collect(output_dir)
    write_csv(output_dir / "sweep.csv", rows)
    done = [r for r in rows if r["status"] == "done"]
    if done:
        plot_heatmap(done, output_dir / "sweep_heatmap.png")
        plot_tradeoff(done, output_dir / "sweep_tradeoff.png")
        write_pareto_figures(output_dir)
    return rows


def write_pareto_figures(output_dir: Path) -> None:
    """DIR/pareto/<env>/pareto.{csv,png} from the finished cells (route.experiments.pareto)."""
    from route.experiments.pareto import write_pareto

    finished = [json.loads((c.dir / "results.json").read_text()) for c in manifest_cells(output_dir) if c.done]
    write_pareto(finished, output_dir / "pareto")


# ---------------------------------------------------------------------------------------------- CLI
@cli("route sweep")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="route sweep", description="Grid of routed-GRPO runs (detector tpr x fpr, modes, "
                            "interventions, seeds), aggregated into sweep.csv and figures.")
    parser.add_argument("--config", metavar="FILE.yaml", help="sweep YAML with base_config, base and grid (e.g. "
                        "configs/sweep_default.yaml; required except with --aggregate)")
    parser.add_argument("--output_dir", help="sweep directory (default: the sweep file's output_dir)")
    parser.add_argument("--workers", type=int, default=1, help="cells run in parallel, one process each")
    parser.add_argument("--threads", type=int, help=f"threads per cell (default: {THREADS_DEFAULT})")
    parser.add_argument("--list", action="store_true", help="print the cells with their index and status, then exit")
    parser.add_argument("--cell", type=int, nargs="+", metavar="I", help="run only these cells (job arrays)")
    parser.add_argument("--aggregate", action="store_true", help="only re-aggregate sweep.csv and the figures")
    parser.add_argument("--in_process", action="store_true", help="run cells in this process, one after another")
    args = parser.parse_args(argv)
    at_least("--workers", args.workers)
    at_least("--threads", args.threads)
    if args.config is not None:
        check_paths("--config", args.config, "file")
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM (e.g. a scheduler) stops cells cleanly
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _main(args)  # a SweepError (a ValueError) is printed by `cli` as one line
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    if args.aggregate and not args.config:
        if not args.output_dir:
            raise SweepError("--aggregate needs --output_dir (or --config with an output_dir)")
        rows = aggregate(args.output_dir)
        print(f"{sum(r['status'] == 'done' for r in rows)}/{len(rows)} cells done -> {args.output_dir}/sweep.csv")
        return 0
    if not args.config:
        raise SweepError("--config is required (except with --aggregate)")
    spec = load_spec(args.config)
    output_dir = Path(args.output_dir or spec["output_dir"] or "")
    if not str(args.output_dir or spec["output_dir"] or ""):
        raise SweepError("--output_dir is required (or output_dir: in the sweep file)")
    cells = expand(spec, output_dir)
    if args.cell:
        bad = [i for i in args.cell if not 0 <= i < len(cells)]
        if bad:
            raise SweepError(f"--cell {bad}: out of range; this sweep has cells 0..{len(cells) - 1}")
    if args.list:
        for c in cells:
            print(f"{c.index:4d}  {'done   ' if c.done else 'pending'}  {c.name}")
        print(f"{len(cells)} cells, {sum(c.done for c in cells)} done")
        return 0
    validate(cells)
    write_manifest(output_dir, cells, spec)
    if args.aggregate:
        aggregate(output_dir)
        return 0
    chosen = [cells[i] for i in args.cell] if args.cell else cells
    failed = run_cells(chosen, workers=args.workers, threads=args.threads, in_process=args.in_process)
    for c in failed:
        print(f"cell {c.index} ({c.name}) failed; see {c.dir / CONSOLE_LOG}", file=sys.stderr)
    rows = aggregate(output_dir)
    print(f"{sum(r['status'] == 'done' for r in rows)}/{len(rows)} cells done -> {output_dir}/sweep.csv")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
