"""Threads are chosen, never inherited: plain `python`, each entry point's `--threads` or field, ROUTE_THREADS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from route.utils.threads import THREAD_VARS, configure_threads

ROOT = Path(__file__).resolve().parent.parent
SENTINEL = "stop after the threads were set"


class Stop(Exception):
    pass


@pytest.fixture
def clean_threads(monkeypatch):
    """No thread variable set (a user's plain shell); torch's count and the variables restored afterwards."""
    before = torch.get_num_threads()
    saved = {v: os.environ.get(v) for v in THREAD_VARS}
    for v in THREAD_VARS:
        monkeypatch.delenv(v, raising=False)
    yield
    for v, value in saved.items():
        if value is None:
            os.environ.pop(v, None)
        else:
            os.environ[v] = value
    torch.set_num_threads(before)


def plain_python(code: str, **env: str) -> list[str]:
    """Run `code` in a fresh interpreter whose environment sets no thread variable (plus `env`)."""
    base = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_plain_python_import_chooses_one_thread_and_route_threads_overrides():
    # torch imported first (its default: one per core), then route: the library's choice wins
    assert plain_python("import torch, route, os; print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])") == [
        "1",
        "1",
    ]
    # ROUTE_THREADS read by `import route`, before torch is imported (torch then reads OMP_NUM_THREADS)
    code = "import route, torch, os; print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])"
    assert plain_python(code, ROUTE_THREADS="2") == ["2", "2"]
    assert plain_python(code, OMP_NUM_THREADS="2") == ["2", "2"]


def test_configure_threads_precedence_and_export(clean_threads, monkeypatch):
    assert configure_threads() == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    os.environ.pop("ROUTE_THREADS")
    assert configure_threads() == 2 and torch.get_num_threads() == 2
    monkeypatch.setenv("ROUTE_THREADS", "1")
    assert configure_threads() == 1 and torch.get_num_threads() == 1
    assert configure_threads(2) == 2 and torch.get_num_threads() == 2
    assert {v: os.environ[v] for v in THREAD_VARS} == dict.fromkeys(THREAD_VARS, "2"), "children must agree"
    with pytest.raises(ValueError, match="ROUTE_THREADS"):
        monkeypatch.setenv("ROUTE_THREADS", "0")
        configure_threads()


def test_no_module_sets_torch_threads_behind_route_threads():
    """Every entry point goes through route.utils.threads; a direct torch.set_num_threads would ignore ROUTE_THREADS."""
    files = sorted((ROOT / "route").rglob("*.py"))
    assert len(files) > 30
    offenders = [
        f.relative_to(ROOT).as_posix() for f in files if f.name != "threads.py" and "set_num_threads(" in f.read_text()
    ]
    assert not offenders, f"use route.utils.threads.configure_threads instead of torch.set_num_threads in {offenders}"


def _stop(*args, **kwargs):
    raise Stop(SENTINEL)


def _organism(tmp_path, monkeypatch, extra):
    import route.models.organism as organism

    monkeypatch.setattr(organism, "build_organism", _stop)
    organism.main(["--output_dir", str(tmp_path / "org"), "--evaluate", "0", *extra])


def _sgtm(tmp_path, monkeypatch, extra):
    import route.models.sgtm.pretrain as pretrain

    monkeypatch.setattr(pretrain, "check_sizes", _stop)
    pretrain.main(["--output_dir", str(tmp_path / "sgtm"), *extra])


def _tiered(tmp_path, monkeypatch, extra):
    import route.models.tiered.pretrain as pretrain

    monkeypatch.setattr(pretrain, "build_data", _stop)
    pretrain.main(["--output_dir", str(tmp_path / "tiered"), *extra])


def _probes(tmp_path, monkeypatch, extra):
    import route.models.tiered.probes as probes

    monkeypatch.setattr(probes, "run_extract", _stop)
    probes.main(["extract", "--run_dir", str(tmp_path), *extra])


def _heads_train(tmp_path, monkeypatch, extra):
    import route.models.heads.train as train

    monkeypatch.setattr(train, "run", _stop)
    train.main(["--output_dir", str(tmp_path / "heads"), *extra])


def _heads_evaluate(tmp_path, monkeypatch, extra):
    import route.models.heads.evaluate as evaluate

    (tmp_path / "results.json").write_text("{}")
    monkeypatch.setattr(evaluate, "sweep", _stop)
    evaluate.main(["--run", str(tmp_path), *extra])


ENTRY_POINTS = {
    "route.models.organism": _organism,
    "route.models.sgtm.pretrain": _sgtm,
    "route.models.tiered.pretrain": _tiered,
    "route.models.tiered.probes": _probes,
    "route.models.heads.train": _heads_train,
    "route.models.heads.evaluate": _heads_evaluate,
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_entry_point_threads_follow_flag_then_route_threads_then_one(entry, clean_threads, tmp_path, monkeypatch):
    call = ENTRY_POINTS[entry]
    seen = []
    for extra, env, want in (
        ([], {}, 1),
        ([], {"ROUTE_THREADS": "2"}, 2),
        (["--threads", "2"], {}, 2),
        (["--threads", "1"], {"ROUTE_THREADS": "2"}, 1),
    ):
        for v in THREAD_VARS:
            os.environ.pop(v, None)
        os.environ.update(env)
        torch.set_num_threads(2 if want == 1 else 1)  # a count the entry point must change
        with pytest.raises(Stop, match=SENTINEL):
            call(tmp_path, monkeypatch, extra)
        seen.append((torch.get_num_threads(), os.environ["OMP_NUM_THREADS"]))
        assert seen[-1] == (want, str(want)), f"{entry} {extra} {env}: threads {seen[-1]}, want {want}"
    assert len(seen) == 4


def test_sweep_cells_inherit_the_chosen_threads_not_one_per_core(clean_threads, tmp_path, monkeypatch):
    import route.experiments.sweep as sweep
    from route.experiments.sweep_spec import Cell

    envs = []

    class FakeProc:
        def __init__(self, cmd, env, **kwargs):
            envs.append(env)

        def wait(self):
            return 0

    monkeypatch.setattr(sweep.subprocess, "Popen", FakeProc)
    cells = [Cell(i, f"c{i}", {}, {"seed": i}, tmp_path / f"c{i}") for i in range(2)]
    for c in cells:
        c.dir.mkdir()
    sweep.run_cells(cells, workers=1, progress=False)
    monkeypatch.setenv("ROUTE_THREADS", "2")
    sweep.run_cells(cells[:1], workers=1, progress=False)
    sweep.run_cells(cells[:1], workers=1, threads=1, progress=False)
    assert [{v: e[v] for v in THREAD_VARS} for e in envs] == [
        dict.fromkeys(THREAD_VARS, n) for n in ("1", "1", "2", "1")
    ]
