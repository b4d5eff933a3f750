"""Detector sweeps: a grid of routed-GRPO runs over detector TPR x FPR, known/held-out modes, interventions, seeds.

    python -m route.sweep --config configs/sweep_default.yaml --output_dir runs/sweep --workers 2
    python -m route.sweep --config configs/sweep_default.yaml --output_dir runs/sweep --list
    python -m route.sweep --config configs/sweep_default.yaml --output_dir runs/sweep --cell 3   # one cell
    python -m route.sweep --output_dir runs/sweep --aggregate                                  # tables + figures

A sweep file has `base_config:` (a RoutedGRPOConfig YAML layered first; default configs/default.yaml,
`null` for none), `base:` (fields shared by all cells) and `grid:` (field -> list of values). Cells are
the product of the grid in file order, the last field varying fastest; a cell's index is its position.
Each cell is one run of the main job (`python -m route.train_grpo --config cell.yaml`, in its own
process) in `DIR/cells/<name>/`. A cell is finished when its `results.json` exists (the main job
writes it atomically, last), so an interrupted sweep loses no finished cell and a rerun skips them.
Every cell's config is parsed with `RoutedGRPOConfig` before any cell runs.

Outputs: `DIR/sweep.json` (the cells), `DIR/sweep.csv` (one row per cell, deployed hack rate on the
detector's known modes and on held-out modes in separate columns), `DIR/sweep_heatmap.png` and
`DIR/sweep_tradeoff.png` (see `route.sweep_plots`), and per environment `DIR/pareto/<env>/pareto.png` and
`pareto.csv` (see `route.pareto`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import difflib
import io
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from route.io import write_json_atomic

DEFAULT_BASE_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
CELL_MODULE = "route.train_grpo"  # the main job; each cell runs `python -m CELL_MODULE --config cell.yaml`
SPEC_KEYS = ("base_config", "base", "grid", "output_dir", "description")
RESERVED = ("output_dir",)  # set by the sweep for every cell
ALIASES = {"detector_tpr": "tpr", "detector_fpr": "fpr", "detector_modes": "known"}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class SweepError(ValueError):
    """A malformed sweep file, an invalid cell config or a conflicting output directory."""


@dataclass
class Cell:
    index: int
    name: str
    overrides: dict[str, Any]  # this cell's grid values
    values: dict[str, Any]  # the full config mapping written to cell.yaml
    dir: Path

    @property
    def done(self) -> bool:
        return (self.dir / "results.json").exists()


# ---------------------------------------------------------------------------------------------- the sweep file
def config_fields() -> list[str]:
    from route.config import RoutedGRPOConfig

    return [f.name for f in dataclasses.fields(RoutedGRPOConfig) if f.init]


def _check_field(where: str, name: Any, fields: list[str]) -> None:
    if not isinstance(name, str) or name not in fields:
        close = difflib.get_close_matches(str(name), fields, n=3)
        hint = f"; did you mean {close}?" if close else "; see route.train_grpo --help"
        raise SweepError(f"{where}: unknown field {name!r}{hint}")
    if name in RESERVED:
        raise SweepError(f"{where}: field {name!r} is set by the sweep for each cell; remove it")


def load_spec(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a sweep file; returns {base_config, base, grid, output_dir} with the base config resolved."""
    path = Path(path)
    if not path.exists():
        raise SweepError(f"sweep file {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise SweepError(f"sweep file {path}: must be a YAML mapping with keys {list(SPEC_KEYS)}")
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise SweepError(f"sweep file {path}: unknown keys {unknown}; allowed keys: {list(SPEC_KEYS)}")
    fields = config_fields()
    base = spec.get("base") or {}
    if not isinstance(base, dict):
        raise SweepError(f"sweep file {path}: base must be a mapping of config fields, got {type(base).__name__}")
    for name in base:
        _check_field(f"{path}: base", name, fields)
    grid = spec.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"sweep file {path}: grid must be a non-empty mapping of field -> list of values")
    for name, values in grid.items():
        _check_field(f"{path}: grid", name, fields)
        if not isinstance(values, list):
            raise SweepError(f"{path}: grid.{name} must be a list of values, got {type(values).__name__} "
                             f"{values!r}; write [{values!r}] for a single value")
        if not values:
            raise SweepError(f"{path}: grid.{name} is an empty list; give at least one value")
        keys = [json.dumps(v, sort_keys=True) for v in values]
        if len(set(keys)) != len(keys):
            raise SweepError(f"{path}: grid.{name} lists a value twice: {values}")
        if name in base:
            raise SweepError(f"{path}: field {name!r} is in both base and grid; keep it in one place")
    base_config = spec.get("base_config", str(DEFAULT_BASE_CONFIG))
    defaults: dict[str, Any] = {}
    if base_config is not None:
        bc = Path(base_config)
        if not bc.is_absolute() and (path.parent / bc).exists():  # relative to the sweep file, else to the cwd
            bc = path.parent / bc
        if not bc.exists():
            raise SweepError(f"sweep file {path}: base_config {base_config} does not exist")
        defaults = yaml.safe_load(bc.read_text()) or {}
        if not isinstance(defaults, dict):
            raise SweepError(f"base_config {bc}: must be a YAML mapping of config fields")
        base_config = str(bc.resolve())
    return {"base_config": base_config, "defaults": defaults, "base": base, "grid": grid,
            "output_dir": spec.get("output_dir")}


def _fmt(name: str, value: Any) -> str:
    if value is None:
        return "all" if name == "detector_modes" else "none"
    if isinstance(value, (list, tuple)):
        return "+".join(_fmt(name, v) for v in value)
    if isinstance(value, dict):
        return "+".join(f"{k}-{_fmt(name, v)}" for k, v in value.items())
    return str(value)


def cell_name(overrides: dict[str, Any]) -> str:
    """A directory name from a cell's grid values: stable when values are added to the grid."""
    name = "_".join(f"{ALIASES.get(k, k)}={_fmt(k, v)}" for k, v in overrides.items())
    name = re.sub(r"[^A-Za-z0-9._=+-]", "-", name)
    if len(name) > 180:
        import hashlib

        name = f"{name[:160]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name


def expand(spec: dict[str, Any], output_dir: str | os.PathLike) -> list[Cell]:
    """The grid's cells in a stable order: itertools.product over fields in file order."""
    root = Path(output_dir).resolve() / "cells"
    names = list(spec["grid"])
    cells, seen = [], set()
    for i, combo in enumerate(itertools.product(*(spec["grid"][n] for n in names))):
        overrides = dict(zip(names, combo))
        name = cell_name(overrides)
        if name in seen:  # distinct values that format alike
            name = f"{name}-{i}"
        seen.add(name)
        values = {**spec["defaults"], **spec["base"], **overrides, "output_dir": str(root / name)}
        cells.append(Cell(i, name, overrides, values, root / name))
    return cells


# ---------------------------------------------------------------------------------------------- validation
def _dump(values: dict[str, Any]) -> str:
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=None)


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _check_model(where: str, model: Any) -> None:
    """A local model path must be a causal-LM checkpoint with a tokenizer; Hub ids ("name", "org/name") pass."""
    if model is None:
        return
    p = Path(str(model)).expanduser()
    looks_local = p.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") > 1
    if looks_local:
        from route.relearn import check_checkpoint

        try:
            check_checkpoint(p)
        except ValueError as e:
            raise SweepError(f"{where}: model_name_or_path: {e}") from None


def validate(cells: Sequence[Cell]) -> None:
    """Parse every cell's config exactly as the main job will; raise SweepError naming the cell and the problem."""
    from route.config import parse_config

    with tempfile.TemporaryDirectory() as tmp:
        for cell in cells:
            where = f"cell {cell.index} ({cell.name})"
            path = Path(tmp) / f"{cell.index}.yaml"
            path.write_text(_dump(cell.values))
            err = io.StringIO()
            try:
                from contextlib import redirect_stderr

                with redirect_stderr(err):
                    parse_config(["--config", str(path)])
            except SystemExit:
                raise SweepError(f"{where}: invalid config: {err.getvalue().strip().splitlines()[-1:]}") from None
            except Exception as e:  # noqa: BLE001 - re-raised with the cell named
                raise SweepError(f"{where}: {e}") from None
            _check_model(where, cell.values.get("model_name_or_path"))
            old = cell.dir / "cell.yaml"
            if old.exists():
                prev = yaml.safe_load(old.read_text()) or {}
                diff = sorted(k for k in set(prev) | set(cell.values)
                              if k != "output_dir" and prev.get(k) != cell.values.get(k))
                if diff:
                    raise SweepError(f"{where}: {cell.dir} holds a run with a different config (fields {diff}); "
                                     "use another --output_dir or delete that cell directory")


def write_manifest(output_dir: Path, cells: Sequence[Cell], spec: dict[str, Any]) -> None:
    write_json_atomic(output_dir / "sweep.json", {
        "base_config": spec["base_config"], "base": spec["base"], "grid": spec["grid"],
        "cells": [{"index": c.index, "name": c.name, "overrides": c.overrides} for c in cells]})


def manifest_cells(output_dir: Path) -> list[Cell]:
    """The cells recorded in DIR/sweep.json (or, without it, every DIR/cells/*/cell.yaml)."""
    root = output_dir.resolve() / "cells"
    manifest = output_dir / "sweep.json"
    if manifest.exists():
        data = json.loads(manifest.read_text())
        return [Cell(c["index"], c["name"], c["overrides"], {}, root / c["name"]) for c in data["cells"]]
    dirs = sorted(p.parent for p in root.glob("*/cell.yaml"))
    if not dirs:
        raise SweepError(f"{output_dir}: no sweep.json and no cells/*/cell.yaml; run the sweep first")
    return [Cell(i, d.name, {}, {}, d) for i, d in enumerate(dirs)]


# ---------------------------------------------------------------------------------------------- running
_LIVE: set[subprocess.Popen] = set()  # the cell processes this sweep started and that still run
_LIVE_LOCK = threading.Lock()
_STOP = threading.Event()  # set on interrupt: no new cell starts


def run_cell(cell: Cell, threads: int | None = None, in_process: bool = False) -> int:
    """Run one cell through the main job; returns its exit code (0 on success). Output goes to train.log."""
    cfg = cell.dir / "cell.yaml"
    _write_text_atomic(cfg, _dump(cell.values))
    if in_process:
        from route.train_grpo import parse_config, run

        run(parse_config(["--config", str(cfg)]))
        return 0
    env = dict(os.environ)
    if threads:
        env.update({v: str(threads) for v in THREAD_VARS})
    with open(cell.dir / "train.log", "w") as log:
        with _LIVE_LOCK:
            if _STOP.is_set():
                return -1
            proc = subprocess.Popen([sys.executable, "-m", CELL_MODULE, "--config", str(cfg)],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
            _LIVE.add(proc)
        try:
            return proc.wait()
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)


def _stop_all() -> None:
    with _LIVE_LOCK:
        _STOP.set()
        for proc in list(_LIVE):  # only the processes this sweep started, by their handle
            proc.terminate()


def run_cells(cells: Sequence[Cell], workers: int = 1, threads: int | None = None, in_process: bool = False,
              progress: bool = True) -> list[Cell]:
    """Run the unfinished cells, `workers` at a time; returns the cells that failed (their train.log says why).

    On an interrupt (Ctrl-C, SIGTERM) no new cell starts and running cells are terminated; finished cells
    keep their results.json, so a rerun continues where this one stopped.
    """
    from tqdm.auto import tqdm

    if workers < 1:
        raise SweepError(f"--workers must be >= 1, got {workers}")
    todo = [c for c in cells if not c.done]
    threads = threads or max(1, (os.cpu_count() or 1) // min(workers, max(1, len(todo))))
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
def _mean(values: list[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def arm_label(overrides: dict[str, Any], cfg: dict[str, Any]) -> str:
    """What a cell compares besides detector quality and seed: its intervention and other grid values."""
    parts = [f"{ALIASES.get(k, k)}={_fmt(k, v)}" for k, v in overrides.items()
             if k not in ("detector_tpr", "detector_fpr", "seed", "detector_seed", "intervention")]
    return " ".join([str(overrides.get("intervention", cfg.get("intervention"))), *parts])


def cell_row(cell: Cell, results: dict[str, Any] | None) -> dict[str, Any]:
    """One sweep.csv row: the cell's grid values, its config and the base/training/deployed rates."""
    row: dict[str, Any] = {"index": cell.index, "cell": cell.name, "status": "done" if results else "pending"}
    row.update({k: _fmt(k, v) if isinstance(v, (list, dict)) or v is None else v for k, v in cell.overrides.items()})
    if not results:
        return row
    cfg, det = results["config"], results.get("detector", {})
    modes = list(results["deployed"]["hack_rate_by_mode"])
    known = cfg.get("detector_modes") or modes
    held_out = [m for m in modes if m not in known]
    row.update({"arm": arm_label(cell.overrides, cfg), "target": cfg.get("target"),
                "intervention": cfg.get("intervention"),
                "detector_tpr": cfg.get("detector_tpr"), "detector_fpr": cfg.get("detector_fpr"),
                "known_modes": "+".join(known), "held_out_modes": "+".join(held_out), "seed": cfg.get("seed"),
                "realised_tpr": det.get("realised_tpr"), "realised_fpr": det.get("realised_fpr")})
    for policy in ("base", "training", "deployed"):
        r = results[policy]
        row[f"{policy}_solve_rate"] = r["solve_rate"]
        row[f"{policy}_hack_rate"] = r["hack_rate"]
        row[f"{policy}_hack_known"] = _mean([r["hack_rate_by_mode"].get(m) for m in known])
        row[f"{policy}_hack_held_out"] = _mean([r["hack_rate_by_mode"].get(m) for m in held_out])
    for m in modes:
        row[f"deployed_hack_{m}"] = results["deployed"]["hack_rate_by_mode"][m]
    row["train_seconds"] = results.get("train_seconds")
    return row


def collect(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    rows = []
    for cell in manifest_cells(Path(output_dir)):
        path = cell.dir / "results.json"
        rows.append(cell_row(cell, json.loads(path.read_text()) if path.exists() else None))
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    _write_text_atomic(path, buf.getvalue())


def aggregate(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Write DIR/sweep.csv and the figures from the finished cells; returns the rows."""
    from route.sweep_plots import plot_heatmap, plot_tradeoff

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
    """DIR/pareto/<env>/pareto.{csv,png} from the finished cells (route.pareto)."""
    from route.pareto import write_pareto

    finished = [json.loads((c.dir / "results.json").read_text()) for c in manifest_cells(output_dir) if c.done]
    write_pareto(finished, output_dir / "pareto")


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Grid of routed-GRPO runs (detector tpr x fpr, modes, "
                                                 "interventions, seeds), aggregated into sweep.csv and figures.")
    parser.add_argument("--config", help="sweep YAML with base_config, base and grid (e.g. configs/sweep_default.yaml)")
    parser.add_argument("--output_dir", help="sweep directory (default: the sweep file's output_dir)")
    parser.add_argument("--workers", type=int, default=1, help="cells run in parallel, one process each")
    parser.add_argument("--threads", type=int, help="torch/OpenMP threads per cell (default: cores // workers)")
    parser.add_argument("--list", action="store_true", help="print the cells with their index and status, then exit")
    parser.add_argument("--cell", type=int, nargs="+", metavar="I", help="run only these cells (job arrays)")
    parser.add_argument("--aggregate", action="store_true", help="only re-aggregate sweep.csv and the figures")
    parser.add_argument("--in_process", action="store_true", help="run cells in this process, one after another")
    args = parser.parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM (e.g. a scheduler) stops cells cleanly
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _main(args)
    except SweepError as e:
        parser.exit(2, f"route.sweep: error: {e}\n")
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
        print(f"cell {c.index} ({c.name}) failed; see {c.dir / 'train.log'}", file=sys.stderr)
    rows = aggregate(output_dir)
    print(f"{sum(r['status'] == 'done' for r in rows)}/{len(rows)} cells done -> {output_dir}/sweep.csv")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
