"""Every command line reports a user error as one line on stderr naming the flag, exit status 2, no traceback; `--debug`
and ROUTE_DEBUG=1 bring the traceback back; bugs keep theirs. In-process: `main(argv)` with stderr captured."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from route.cli import COMMANDS
from route.utils.errors import cli, looks_local, pop_debug

ROOT = Path(__file__).resolve().parent.parent
NOPE = "/nonexistent/route-test/nope"

# (module, argv, text the one line must contain: the flag or field)
PROGS = {module: f"route {name}" for name, (module, _) in COMMANDS.items()}  # what a command's errors start with
CASES = [
    ("route.train_grpo", ["--target", "lora"], "--target"),
    ("route.train_grpo", ["--config", "nope.yaml"], "--config"),
    ("route.train_grpo", ["--max_steps", "0"], "max_steps"),
    ("route.train_grpo", ["--model_name_or_path", "./nope"], "model_name_or_path"),
    ("route.train_grpo", ["--intervention", "erasee"], "--intervention"),
    ("route.train_grpo", ["--detector_tpr", "2"], "detector_tpr"),
    ("route.train_grpo", ["--bogus_flag", "1"], "--bogus_flag"),
    ("route.experiments.evaluate", ["--model", NOPE], "--model"),
    ("route.experiments.evaluate", ["--model", "runs/nope"], "--model"),  # runs/ exists: a local path, not a Hub id
    ("route.experiments.evaluate", ["--model", NOPE, "--n", "0"], "--n"),
    ("route.experiments.evaluate", ["--model", NOPE, "--env", "nope"], "--env"),
    ("route.experiments.relearn", ["--checkpoints", NOPE, "--output_dir", "x"], "--checkpoints"),
    ("route.experiments.relearn", ["--checkpoints", NOPE, "--output_dir", "x", "--steps", "0"], "--steps"),
    ("route.experiments.relearn", ["--checkpoints", NOPE, "--output_dir", "x", "--config", "nope.yaml"], "--config"),
    ("route.experiments.relearn", ["--checkpoints", NOPE], "--output_dir"),
    ("route.experiments.sweep", ["--config", "nope.yaml"], "--config"),
    ("route.experiments.sweep", ["--workers", "0"], "--workers"),
    ("route.experiments.report", [NOPE], "results"),
    ("route.experiments.pareto", [NOPE], "paths"),
    ("route.experiments.selection", [NOPE], "results"),
    ("route.experiments.selection", [NOPE, "--n_boot", "x"], "--n_boot"),
    ("route.models.organism", ["--output_dir", "x", "--env", "nope"], "--env"),
    ("route.models.organism", ["--output_dir", "x", "--steps", "0"], "--steps"),
    ("route.experiments.vhack", ["--out", "x.pt", "--k", "0"], "--k"),
    ("route.experiments.vhack", ["--out", "x.pt", "--model", NOPE], "--model"),
    ("route.models.heads.train", ["--config", "nope.yaml"], "--config"),
    ("route.models.heads.train", ["--head", "nope"], "--head"),
    ("route.models.heads.evaluate", ["--run", NOPE], "--run"),
    ("route.models.sgtm.pretrain", ["--config", "nope.yaml"], "--config"),
    ("route.models.sgtm.pretrain", ["--architecture", "nope"], "--architecture"),
    ("route.models.sgtm.pretrain", ["--no_such_field", "1"], "--no_such_field"),
    ("route.models.tiered.pretrain", ["--config", "nope.yaml"], "--config"),
    ("route.models.tiered.pretrain", ["--layout", "nope"], "--layout"),
    ("route.models.tiered.probes", ["extract", "--run_dir", NOPE], "--run_dir"),
    ("route.models.tiered.probes", ["leak", "--draws", "0"], "--draws"),
    ("route.models.tiered.keygen", ["--out", "k.json"], "num_layers"),
    ("route.models.tiered.keygen", ["--out", "k.json", "--model", "./nope"], "--model"),
    ("route.vllm.serve", ["--tensor_parallel_size", "two"], "--tensor_parallel_size"),
    ("route.models.pretrained", ["nope-135m"], "model"),
    ("route.models.pretrained", [f"{NOPE}.gguf"], "model"),
    ("route.train_grpo", ["--model_name_or_path", f"{NOPE}.gguf"], "model_name_or_path"),
    ("bench.absorption_overhead", ["--steps", "x"], "--steps"),
    ("bench.absorption_overhead", ["--steps", "3", "--warmup", "2"], "--steps"),
    ("bench.coding_throughput", ["--n", "many"], "--n"),
    ("bench.gpu_check", ["--budget-s", "long"], "--budget-s"),
    ("bench.heads_decode", ["--dtype", "float8"], "--dtype"),
    ("bench.routing_overhead", ["--steps", "x"], "--steps"),
    ("bench.routing_overhead", ["--steps", "2", "--warmup", "2"], "--warmup"),
    ("bench.svf_overhead", ["--bogus"], "--bogus"),
    ("bench.vllm_rollouts", ["--reps", "x"], "--reps"),
    ("bench.vllm_rollouts", ["--prompts", "0"], "--prompts"),
]


def _run(module: str, argv: list[str], capsys) -> tuple[int, str]:
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ROUTE_DEBUG", raising=False)
    return tmp_path


@pytest.mark.parametrize(("module", "argv", "flag"), CASES, ids=[f"{m}:{' '.join(a)}" for m, a, _ in CASES])
def test_user_error_is_one_line(module, argv, flag, workdir, capsys):
    code, err = _run(module, argv, capsys)
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{PROGS.get(module, module)}: error: "), lines[0]
    assert flag in lines[0]
    assert "Traceback" not in err
    assert not list(workdir.glob("x*")) and not (workdir / "k.json").exists()  # failed before any work


def test_table_covers_every_command_line():
    """Every `@cli(...)` main in the package has a row (a new command line must add its bad inputs)."""
    decorated = set()  # the modules that hold one
    for path in [*(ROOT / "route").rglob("*.py"), *(ROOT / "bench").glob("*.py")]:
        if re.search(r'^@cli\("[\w. -]+"\)', path.read_text(), re.M):
            decorated.add(".".join(path.relative_to(ROOT).with_suffix("").parts))
    assert len(decorated) >= 21
    assert decorated == {m for m, _, _ in CASES}


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how, workdir, monkeypatch):
    from route.experiments.evaluate import main

    argv = ["--model", NOPE, "--n", "0"]
    if how == "flag":
        argv.append("--debug")
    else:
        monkeypatch.setenv("ROUTE_DEBUG", "1")
    with pytest.raises(ValueError, match="--n: must be >= 1"):
        main(argv)


def test_debug_shows_the_traceback_of_the_main_job(workdir):
    from route.train_grpo import main

    with pytest.raises(ValueError, match="max_steps"):
        main(["--debug", "--max_steps", "0"])
    with pytest.raises(ValueError, match="invalid choice"):  # argparse's own errors too
        main(["--target", "lora", "--debug"])


def test_bugs_keep_their_traceback():
    import torch

    @cli("route.fake")
    def broken(argv):
        raise RuntimeError("an internal bug")

    @cli("route.fake")
    def torch_value_error(argv):  # a ValueError from inside torch is a shape bug, not the user's input
        torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))

    @cli("route.fake")
    def unpacking(argv):  # a ValueError of the runtime, not a deliberate check
        a, b = argv

    with pytest.raises(RuntimeError, match="internal bug"):
        broken([])
    with pytest.raises(ValueError, match="unpack"):
        unpacking(["1", "2", "3"])
    with pytest.raises(ValueError):
        torch_value_error([])


def test_pop_debug_leaves_the_trainers_debug_option(monkeypatch):
    monkeypatch.delenv("ROUTE_DEBUG", raising=False)
    assert pop_debug(["--debug", "--seed", "1"]) == (True, ["--seed", "1"])
    assert pop_debug(["--debug", "underflow_overflow"]) == (False, ["--debug", "underflow_overflow"])
    assert pop_debug(["--seed", "1"]) == (False, ["--seed", "1"])
    monkeypatch.setenv("ROUTE_DEBUG", "0")
    assert pop_debug([])[0] is False
    monkeypatch.setenv("ROUTE_DEBUG", "1")
    assert pop_debug([])[0] is True


def test_local_paths_and_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert looks_local("runs/nope") and looks_local("./x") and looks_local("/x") and looks_local("a/b/c")
    assert not looks_local("Qwen/Qwen2.5-0.5B") and not looks_local("gpt2")


@pytest.fixture
def hub(monkeypatch):
    """The Hub lookup of `check_model_path(hub=True)`, answered in-process (nothing is downloaded): set `answer` to
    the exception `model_info` raises (None: the model exists); `calls` counts lookups."""
    import huggingface_hub
    from huggingface_hub import constants

    from route.models import paths

    state = {"answer": None, "calls": 0}

    def model_info(repo_id, timeout=None):
        state["calls"] += 1
        if state["answer"] is not None:
            raise state["answer"]
        return object()

    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    paths._check_hub_model.cache_clear()
    yield state
    paths._check_hub_model.cache_clear()


def test_unknown_or_unreachable_hub_model_is_one_line(hub, workdir, capsys):
    import httpx
    from huggingface_hub.errors import RepositoryNotFoundError

    from route.experiments.evaluate import main

    for answer, text in (
        (httpx.ConnectError("Name or service not known"), "the Hub cannot be reached"),
        (
            RepositoryNotFoundError(
                "404", response=httpx.Response(404, request=httpx.Request("GET", "https://hub/api/models/org/nope"))
            ),
            "nor a model on the Hub",
        ),
    ):
        hub["answer"] = answer
        code, err = _run("route.experiments.evaluate", ["--model", "org/nope"], capsys)
        assert code == 2 and len(err.splitlines()) == 1
        assert err.startswith("route evaluate: error: --model: org/nope") and text in err
    assert hub["calls"] == 2
    hub["answer"] = httpx.ConnectError("down")
    with pytest.raises(ValueError, match="cannot be reached"):
        main(["--model", "org/nope", "--debug"])


def test_hub_lookup_only_where_asked(hub, monkeypatch):
    from huggingface_hub import constants

    from route.models.paths import check_model_path
    from route.utils.errors import UsageError

    check_model_path("model_name_or_path", "org/model")  # the library's check (validate_run): no network
    assert hub["calls"] == 0
    check_model_path("--model", "org/model", hub=True)
    check_model_path("--model", "org/model", hub=True)  # a found model is looked up once
    assert hub["calls"] == 1
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline: the cache decides, as the loader does
    check_model_path("--model", "org/other", hub=True)
    assert hub["calls"] == 1
    with pytest.raises(UsageError, match="--model: no such directory: ./nope"):
        check_model_path("--model", "./nope", hub=True)
    assert hub["calls"] == 1
