"""route.experiments.sweep: grid expansion and indexing, malformed grids, resume, parallel cells, aggregation, end
to end."""

from __future__ import annotations

import csv
import json
import math
import os
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from route.experiments import sweep
from route.experiments.sweep import SweepError
from tests.tiny_run import TINY_RUN

TINY_BASE = dict(TINY_RUN)


def write_spec(path: Path, grid: dict, base: dict | None = None, **extra) -> Path:
    path.write_text(yaml.safe_dump({"base_config": None, "base": base or {}, "grid": grid, **extra}, sort_keys=False))
    return path


def test_grid_expansion_order_count_and_values(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path / "s.yaml", {"intervention": ["none", "route"],
                                                            "detector_tpr": [0.3, 0.8], "seed": [0, 1, 2]},
                                      base={"max_steps": 7}))
    cells = sweep.expand(spec, tmp_path / "out")
    assert len(cells) == 12
    assert [c.index for c in cells] == list(range(12))
    assert cells[0].overrides == {"intervention": "none", "detector_tpr": 0.3, "seed": 0}
    assert cells[1].overrides == {"intervention": "none", "detector_tpr": 0.3, "seed": 1}  # last field fastest
    assert cells[11].overrides == {"intervention": "route", "detector_tpr": 0.8, "seed": 2}
    assert len({c.name for c in cells}) == 12 and len({c.dir for c in cells}) == 12
    assert cells[5].values["max_steps"] == 7 and cells[5].values["output_dir"] == str(cells[5].dir)
    assert cells[5].dir.parent == (tmp_path / "out").resolve() / "cells"
    # stable: a second expansion, and adding a value, keep the existing names and order
    again = sweep.expand(spec, tmp_path / "out")
    assert [(c.index, c.name) for c in again] == [(c.index, c.name) for c in cells]
    spec["grid"]["seed"].append(3)
    grown = {c.name for c in sweep.expand(spec, tmp_path / "out")}
    assert {c.name for c in cells} < grown and len(grown) == 16


def test_mode_sets_in_the_grid(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path / "s.yaml", {"detector_modes": [None, ["sentinel", "format"]],
                                                            "intervention": ["route"]}, base=TINY_BASE))
    cells = sweep.expand(spec, tmp_path / "out")
    assert [c.name for c in cells] == ["known=all_intervention=route", "known=sentinel+format_intervention=route"]
    sweep.validate(cells)
    assert sweep.arm_label(cells[1].overrides, {}) == "route known=sentinel+format"
    spec["grid"]["detector_modes"].append(["sentinel", "typo"])
    with pytest.raises(SweepError, match=r"cell 2 .*detector_modes: unknown modes \['typo'\]; allowed values"):
        sweep.validate(sweep.expand(spec, tmp_path / "out"))


def test_tied_grid_key_pairs_seeds_across_arms(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path / "s.yaml", {"intervention": ["none", "route"],
                                                            "seed+detector_seed": [3, 4]}))
    cells = sweep.expand(spec, tmp_path / "out")
    assert [c.overrides for c in cells] == [
        {"intervention": i, "seed": s, "detector_seed": s} for i in ("none", "route") for s in (3, 4)]
    assert all(c.values["seed"] == c.values["detector_seed"] for c in cells) and len(cells) == 4
    assert cells[0].name == "intervention=none_seed+detector_seed=3"
    arms_grid = {"intervention+detector_tpr": [["none", 0.5], ["route", 0.3]]}
    arms = sweep.load_spec(write_spec(tmp_path / "a.yaml", arms_grid))
    assert [c.overrides for c in sweep.expand(arms, tmp_path / "out2")] == [
        {"intervention": "none", "detector_tpr": 0.5}, {"intervention": "route", "detector_tpr": 0.3}]


def test_base_config_is_layered_under_base_and_grid(tmp_path):
    (tmp_path / "b.yaml").write_text("max_steps: 5\neval_n: 99\nintervention: filter\n")
    spec = sweep.load_spec(write_spec(tmp_path / "s.yaml", {"seed": [0]}, base={"eval_n": 7},
                                      base_config="b.yaml"))
    (cell,) = sweep.expand(spec, tmp_path / "out")
    assert (cell.values["max_steps"], cell.values["eval_n"], cell.values["intervention"]) == (5, 7, "filter")


@pytest.mark.parametrize("grid,base,match", [
    ({"detector_tpx": [0.1]}, {}, r"unknown field 'detector_tpx'; did you mean \['detector_tpr'"),
    ({"detector_tpr": []}, {}, r"grid.detector_tpr is an empty list"),
    ({"detector_tpr": 0.5}, {}, r"grid.detector_tpr must be a list of values, got float"),
    ({"seed": [0, 0]}, {}, r"grid.seed lists a value twice"),
    ({"output_dir": ["a"]}, {}, r"'output_dir' is set by the sweep"),
    ({"seed": [0]}, {"seed": 1}, r"'seed' is in both base and grid"),
    ({"seed": [0]}, {"max_stepz": 1}, r"base: unknown field 'max_stepz'"),
    ({}, {}, r"grid must be a non-empty mapping"),
    ({"seed+detector_sed": [0]}, {}, r"unknown field 'detector_sed'"),
    ({"seed+detector_seed": [0]}, {"detector_seed": 1}, r"'detector_seed' is in both base and grid"),
    ({"seed+detector_seed": [0], "seed": [1]}, {}, r"grid names a field twice"),
])
def test_malformed_sweep_files(tmp_path, grid, base, match):
    with pytest.raises(SweepError, match=match):
        sweep.load_spec(write_spec(tmp_path / "s.yaml", grid, base=base))


def test_unknown_top_level_key(tmp_path):
    (tmp_path / "s.yaml").write_text("grid: {seed: [0]}\ngrids: {}\n")
    with pytest.raises(SweepError, match=r"unknown keys \['grids'\]"):
        sweep.load_spec(tmp_path / "s.yaml")


def test_invalid_cell_fails_before_any_cell_runs(tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", {"intervention": ["route", "erase"]}, base=TINY_BASE)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        sweep.main(["--config", str(spec), "--output_dir", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "cell 1 (intervention=erase)" in err and "allowed values: ['none', 'filter', 'penalty', 'route']" in err
    assert not out.exists(), "nothing may be written before every cell validates"


def test_missing_model_checkpoint_fails_up_front(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path / "s.yaml", {"seed": [0]},
                                      base={**TINY_BASE, "model_name_or_path": str(tmp_path / "nope")}))
    with pytest.raises(SweepError, match=r"cell 0 .*model_name_or_path: no such directory: .*nope"):
        sweep.validate(sweep.expand(spec, tmp_path / "out"))


def test_changed_config_in_existing_cell_dir_is_refused(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path / "s.yaml", {"seed": [0]}, base={**TINY_BASE}))
    (cell,) = sweep.expand(spec, tmp_path / "out")
    cell.dir.mkdir(parents=True)
    (cell.dir / "cell.yaml").write_text(yaml.safe_dump({**cell.values, "max_steps": 99}))
    with pytest.raises(SweepError, match=r"different config \(fields \['max_steps'\]\)"):
        sweep.validate([cell])


STUB = '''
import json, os, sys, time
from pathlib import Path
import yaml
cfg = yaml.safe_load(open(sys.argv[sys.argv.index("--config") + 1]))
out = Path(cfg["output_dir"])
(out / "started").write_text(str(os.getpid()))
(out / "argv.json").write_text(json.dumps(sys.argv[1:]))
if cfg.get("seed") == 13:
    sys.exit(3)
if cfg.get("seed") in (7, 8):
    time.sleep(60)
if os.environ.get("STUB_BARRIER"):  # wait until every cell of this run has started: proves they run in parallel
    deadline = time.time() + 20
    while len(list(out.parent.glob("*/started"))) < int(os.environ["STUB_BARRIER"]) and time.time() < deadline:
        time.sleep(0.05)
    assert time.time() < deadline, "cells did not run in parallel"
modes = {"sentinel": 0.2, "format": 0.4, "echo": 0.0, "verified": 0.6}
r = {"n": 16, "solve_rate": 0.5, "hack_rate": 0.3, "pass_rate": 0.8, "hack_rate_by_mode": modes}
config = {"detector_tpr": 0.5, "detector_fpr": 0.05, "intervention": "route", **cfg,
          "threads": os.environ.get("OMP_NUM_THREADS")}
results = {"config": config, "detector": {},
           "base": r, "training": r, "deployed": r}
(out / "results.json").write_text(json.dumps(results))
'''


@pytest.fixture
def stub_main_job(tmp_path, monkeypatch):
    """Cells run a stub instead of route.train_grpo: writes synthetic results.json (seed 13 fails)."""
    (tmp_path / "stubcell.py").write_text(textwrap.dedent(STUB))
    monkeypatch.setattr(sweep, "CELL_MODULE", "stubcell")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return tmp_path


def test_resume_skips_finished_cells_and_retries_failed(stub_main_job, tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path / "s.yaml", {"seed": [0, 1, 13, 2]}, base=TINY_BASE))
    cells = sweep.expand(spec, tmp_path / "out")
    cells[0].dir.mkdir(parents=True)
    (cells[0].dir / "results.json").write_text("{}")  # finished earlier
    cells[1].dir.mkdir(parents=True)
    (cells[1].dir / "cell.yaml").write_text(yaml.safe_dump(cells[1].values))  # interrupted: no results.json
    failed = sweep.run_cells(cells, workers=1, progress=False)
    assert [c.index for c in failed] == [2]
    assert not (cells[0].dir / "started").exists(), "a finished cell must not run again"
    assert all((c.dir / "started").exists() for c in cells[1:])
    assert [c.done for c in cells] == [True, True, False, True]
    assert "cell.yaml" in os.listdir(cells[2].dir) and (cells[2].dir / sweep.CONSOLE_LOG).exists()
    for c in cells[1:]:
        (c.dir / "started").unlink()
    assert [c.index for c in sweep.run_cells(cells, workers=2, progress=False)] == [2]
    assert [c.index for c in cells if (c.dir / "started").exists()] == [2], "only the failed cell reruns"


def test_an_interrupted_cell_resumes_from_its_last_complete_checkpoint(stub_main_job, tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path / "s.yaml", {"seed": [0, 1]}, base=TINY_BASE))
    cells = sweep.expand(spec, tmp_path / "out")
    run_dir = Path(cells[0].values["output_dir"])
    for step, complete in ((2, True), (10, True), (12, False)):  # checkpoint-12 was cut before its trainer state
        (run_dir / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (run_dir / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (run_dir / sweep.CONSOLE_LOG).write_text("the first attempt\n")
    assert sweep.resume_point(cells[0]) == run_dir / "checkpoint-10" and sweep.resume_point(cells[1]) is None
    assert sweep.run_cells(cells, workers=1, progress=False) == []
    argv = [json.loads((c.dir / "argv.json").read_text()) for c in cells]
    assert argv[0] == ["--config", str(cells[0].dir / "cell.yaml"), "--resume_from_checkpoint",
                       str(run_dir / "checkpoint-10")]
    assert argv[1] == ["--config", str(cells[1].dir / "cell.yaml")]  # a fresh cell starts from scratch
    console = (cells[0].dir / sweep.CONSOLE_LOG).read_text()
    assert console.startswith("the first attempt") and "resuming from" in console  # the first attempt's log is kept
    assert sweep.resume_point(cells[0]) is None  # finished: nothing to resume
    sweep.validate(cells)  # the resume flag is not part of the cell's config: a rerun's check still passes


def test_interrupt_stops_running_cells_and_keeps_finished_ones(stub_main_job, tmp_path):
    import signal
    import threading

    spec = sweep.load_spec(write_spec(tmp_path / "s.yaml", {"seed": [0, 7, 8, 1]}, base=TINY_BASE))
    cells = sweep.expand(spec, tmp_path / "out")
    started = lambda c: (c.dir / "started").exists()  # noqa: E731

    def interrupt_when_stuck():  # cell 0 finishes, cells 1 and 2 sleep, cell 3 waits: then Ctrl-C the sweep
        deadline = time.time() + 30
        while not (cells[0].done and started(cells[1]) and started(cells[2])) and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C

    # a shell's background job starts with SIGINT ignored; a terminal's Ctrl-C raises KeyboardInterrupt
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=interrupt_when_stuck, daemon=True).start()
    start = time.time()
    try:
        with pytest.raises(KeyboardInterrupt):
            sweep.run_cells(cells, workers=2, progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.time() - start < 40, "the sleeping cells were not terminated"
    for c in cells[1:3]:
        with pytest.raises(ProcessLookupError):
            os.kill(int((c.dir / "started").read_text()), 0)
    assert [c.done for c in cells] == [True, False, False, False]
    assert not started(cells[3]), "no cell may start after the interrupt"


def test_workers_run_cells_in_parallel_processes(stub_main_job, tmp_path, monkeypatch):
    monkeypatch.setenv("STUB_BARRIER", "2")
    spec = sweep.load_spec(write_spec(tmp_path / "s.yaml", {"seed": [0, 1]}, base=TINY_BASE))
    cells = sweep.expand(spec, tmp_path / "out")
    assert sweep.run_cells(cells, workers=2, threads=1, progress=False) == []
    pids = {(c.dir / "started").read_text() for c in cells}
    assert len(pids) == 2 and str(os.getpid()) not in pids
    assert {json.loads((c.dir / "results.json").read_text())["config"]["threads"] for c in cells} == {"1"}


def test_list_and_single_cell_cli(stub_main_job, tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", {"intervention": ["none", "route"], "seed": [0, 1]}, base=TINY_BASE)
    out = tmp_path / "out"
    assert sweep.main(["--config", str(spec), "--output_dir", str(out), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["0", "pending", "intervention=none_seed=0"]
    assert lines[3].split() == ["3", "pending", "intervention=route_seed=1"] and lines[4] == "4 cells, 0 done"
    assert sweep.main(["--config", str(spec), "--output_dir", str(out), "--cell", "2"]) == 0
    done = sorted(p.parent.name for p in (out / "cells").glob("*/results.json"))
    assert done == ["intervention=route_seed=0"]
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["status"] for r in rows] == ["pending", "pending", "done", "pending"]
    with pytest.raises(SystemExit, match="2"):
        sweep.main(["--config", str(spec), "--output_dir", str(out), "--cell", "4"])
    assert "--cell [4]: out of range; this sweep has cells 0..3" in capsys.readouterr().err


def _result(known: list[str] | None, by_mode: dict[str, float], solve: float, intervention: str, tpr: float,
            fpr: float) -> dict:
    r = {"n": 100, "solve_rate": solve, "hack_rate": sum(by_mode.values()) / 8, "pass_rate": 0.9,
         "hack_rate_by_mode": by_mode}
    base = {**r, "solve_rate": 0.6, "hack_rate": 0.1}
    return {"config": {"intervention": intervention, "target": "dual_lora", "detector_tpr": tpr,
                       "detector_fpr": fpr, "detector_modes": known, "seed": 0},
            "detector": {"realised_tpr": tpr, "realised_fpr": fpr}, "base": base, "training": r, "deployed": r,
            "train_seconds": 1.0}


def test_aggregate_on_synthetic_results(tmp_path):
    spec = sweep.load_spec(write_spec(tmp_path / "s.yaml", {"intervention": ["none", "route"],
                                                            "detector_tpr": [0.3, 0.8], "detector_fpr": [0.1]}))
    out = tmp_path / "out"
    cells = sweep.expand(spec, out)
    sweep.write_manifest(out, cells, spec)
    by_mode = {"sentinel": 0.1, "format": 0.3, "echo": 0.0, "verified": 0.8}
    for c in cells[:3]:  # cell 3 unfinished
        c.dir.mkdir(parents=True)
        res = _result(["sentinel", "format"], by_mode, 0.5 + c.index / 10, c.overrides["intervention"],
                      c.overrides["detector_tpr"], 0.1)
        (c.dir / "results.json").write_text(json.dumps(res))
    assert sweep.main(["--output_dir", str(out), "--aggregate"]) == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [r["index"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["status"] for r in rows] == ["done", "done", "done", "pending"]
    r0 = rows[0]
    assert r0["arm"] == "none" and rows[2]["arm"] == "route"
    assert math.isclose(float(r0["deployed_hack_known"]), 0.2)  # mean of sentinel, format
    assert math.isclose(float(r0["deployed_hack_held_out"]), 0.4)  # mean of echo, verified
    assert r0["known_modes"] == "sentinel+format" and r0["held_out_modes"] == "echo+verified"
    assert float(rows[1]["deployed_solve_rate"]) == 0.6 and rows[3]["deployed_hack_rate"] == ""
    assert (out / "sweep_heatmap.png").stat().st_size > 10_000 and (out / "sweep_tradeoff.png").stat().st_size > 10_000
    # all modes known: the held-out column is empty, not zero
    row = sweep.cell_row(cells[0], _result(None, by_mode, 0.5, "none", 0.3, 0.1))
    assert math.isnan(row["deployed_hack_held_out"]) and math.isclose(row["deployed_hack_known"], 0.3)


def test_end_to_end_two_cell_sweep(tiny_organism, tmp_path):
    spec = write_spec(tmp_path / "s.yaml", {"intervention": ["none", "route"]},
                      base={**TINY_BASE, "model_name_or_path": str(tiny_organism), "detector_fpr": 0.5})
    out = tmp_path / "out"
    assert sweep.main(["--config", str(spec), "--output_dir", str(out), "--in_process"]) == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["intervention"], r["status"]) for r in rows] == [("none", "done"), ("route", "done")]
    for r in rows:
        cell = out / "cells" / r["cell"]
        result = json.loads((cell / "results.json").read_text())  # the table's numbers are the cell's own
        assert float(r["deployed_hack_rate"]) == pytest.approx(result["deployed"]["hack_rate"])
        assert float(r["base_solve_rate"]) == pytest.approx(result["base"]["solve_rate"])
        assert (cell / "deployed" / "config.json").exists()
        assert yaml.safe_load((cell / "cell.yaml").read_text())["max_steps"] == 1
        assert "train: step 1/1 (100%)" in (cell / "train.log").read_text(), "the cell's progress in its train.log"
    assert (out / "sweep_heatmap.png").exists() and (out / "sweep_tradeoff.png").exists()
    mtimes = {p: p.stat().st_mtime for p in out.glob("cells/*/results.json")}
    assert sweep.main(["--config", str(spec), "--output_dir", str(out), "--in_process"]) == 0
    assert {p: p.stat().st_mtime for p in out.glob("cells/*/results.json")} == mtimes, "rerun must skip done cells"
