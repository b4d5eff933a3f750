"""vLLM rollouts with RoutedGRPOTrainer, on CPU, against a recording fake of the vLLM objects TRL calls.

The fake (tests/fake_vllm.py) replaces only what TRL imports from vLLM (`LLM`, `SamplingParams`, ...) and its
`VLLMClient`; TRL's own `VLLMGeneration` and `GRPOTrainer` code drives it. The fake engine is a transformers model
that takes the pushed weights and samples from them, so sampling log-probs come from exactly what was pushed.
A real vLLM run needs a GPU (configs/vllm_qwen.yaml).
"""

import contextlib
import copy
import inspect
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.generation import vllm_generation as trl_vllm_generation
from trl.generation.vllm_generation import VLLMGeneration
from trl.trainer import grpo_trainer as trl_grpo_trainer

import envs
from route.cli import build_config
from route.masks import DEFAULT, FORGET, RETAIN
from route.targets import available_targets
from route.trainer import RoutedGRPOTrainer
from route.vllm_sync import TargetWeightSync, check_vllm_config, vllm_name
from tests.fake_vllm import install_fake_vllm
from tests.test_trainer import TINY, ParityDetector, group_inputs, make_trainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TRL_VLLM_FILE = trl_vllm_generation.__file__
TRL_GRPO_FILE = trl_grpo_trainer.__file__
PROMPTS = ["mul 123*4 g=exact>", "mul 56*7 g=quick>"] * 4


@pytest.fixture
def fake_vllm(monkeypatch, tiny_organism):
    return install_fake_vllm(monkeypatch, server_model=tiny_organism)


def length_reward(completions, **kwargs):
    """A reward with spread on the tiny organism (which never solves), so that training steps move the weights."""
    return [float(len(c)) for c in completions]


def vllm_trainer(model_dir, tmp_path, mode="colocate", policy="deployed", detector=None, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = build_config(output_dir=str(tmp_path / "run"), use_vllm=True, vllm_mode=mode,
                          generation_policy=policy, **{**TINY, **overrides})
    env = envs.make_env(config.env, **config.env_kwargs)
    return RoutedGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=config, env=env,
                             detector=detector, reward_funcs=[length_reward],
                             processing_class=AutoTokenizer.from_pretrained(model_dir),
                             train_dataset=env.dataset(config.train_size, seed=0, split="train"))


def engine(trainer):
    vg = trainer.vllm_generation
    return vg.llm.engine if vg.mode == "colocate" else vg.vllm_client.engine


def perturb(trainer, groups=("keep", "quarantine"), std=0.3, seed=0):
    """Add noise to the target's parameter groups (generic over targets)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for group in groups:
            for p in trainer.target.param_groups()[group]:
                p.add_(torch.randn_like(p) * std)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_tensors(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _scored(trainer, inputs):
    engine(trainer).generator.manual_seed(0)
    torch.manual_seed(0)
    trainer.model.train()
    return trainer._generate_and_score_completions(inputs)


def _completion_logps(trainer, out, modes=None):
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    with trainer.target.gate(modes) if modes is not None else contextlib.nullcontext():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask,
                                                                 out["completion_ids"].size(1))
    return logps


class RowDetector:
    """Flags the rollouts at the given in-batch indices."""

    def __init__(self, rows=()):
        self.rows = set(rows)

    def __call__(self, grades, rollout_ids):
        return [int(rid.rsplit("|r", 1)[1]) in self.rows for rid in rollout_ids]


class PolicySnapshots(TrainerCallback):
    """The generating policy's weights at the start of every optimizer step (what that step's sync must push)."""

    def __init__(self, trainer):
        self.trainer, self.weights = trainer, []

    def on_step_begin(self, args, state, control, **kwargs):
        self.weights.append(self.trainer.weight_sync.state_dict())


def test_vllm_colocate_deployed_push_equals_saved_deployed_checkpoint(fake_vllm, tiny_organism, tmp_path):
    t = vllm_trainer(tiny_organism, tmp_path, "colocate", "deployed", detector=ParityDetector(), max_steps=2)
    perturb(t)
    steps = PolicySnapshots(t)
    t.add_callback(steps)
    t.train()
    eng = engine(t)
    # one sync per optimizer step, each pushing the weights of that step
    assert t.state.global_step == 2 and len(eng.syncs) == 2 and len(eng.calls_to("generate")) == 2
    for sync, expected in zip(eng.syncs, steps.weights, strict=True):
        assert_same_tensors(sync.tensors, expected)
    assert any(not torch.equal(eng.syncs[0].tensors[k], eng.syncs[1].tensors[k]) for k in eng.syncs[0].tensors)

    t._generate(PROMPTS)  # a new global step: TRL syncs the trained weights
    assert len(eng.syncs) == 3
    pushed = eng.syncs[-1].tensors
    checkpoint = load_file(f"{t.save_deployed()}/model.safetensors")
    assert set(pushed) == set(checkpoint)
    for name, tensor in pushed.items():
        assert tensor.dtype == checkpoint[name].dtype and torch.equal(tensor, checkpoint[name]), name
    full = t.target.merged_state_dict(quarantine=True)
    assert any(not torch.equal(pushed[k], full[k]) for k in pushed), "the quarantine must matter for this test"


def test_vllm_server_full_policy_pushes_merged_weights_with_quarantine(fake_vllm, tiny_organism, tmp_path):
    t = vllm_trainer(tiny_organism, tmp_path, "server", "full", detector=ParityDetector(), max_steps=2,
                     gradient_accumulation_steps=2, per_device_train_batch_size=4)
    perturb(t)
    steps = PolicySnapshots(t)
    t.add_callback(steps)
    t.train()
    eng = engine(t)
    assert len(eng.calls_to("init_communicator")) == 1
    # one sync per optimizer step (each generation covers both accumulation micro-steps)
    assert t.state.global_step == 2 and len(eng.syncs) == 2 and len(eng.calls_to("generate")) == 2
    metadata = t.vllm_generation._weight_metadata
    for sync, expected in zip(eng.syncs, steps.weights, strict=True):
        assert sync.metadata == metadata  # TRL's cached metadata matches every later push
        assert_same_tensors(sync.tensors, expected)

    t._generate(PROMPTS)
    pushed = eng.syncs[-1].tensors
    full = t.target.merged_state_dict(quarantine=True)
    assert set(full) - set(pushed) == {"lm_head.weight"}  # tied to the embeddings: not pushed, as in TRL
    assert_same_tensors(pushed, {k: v for k, v in full.items() if k in pushed})
    deployed = t.target.deployed_state_dict()
    assert any(not torch.equal(pushed[k], deployed[k]) for k in pushed)
    # the engine now computes the training policy: quarantine in place
    ids = torch.tensor([[3, 9, 12, 5, 20, 7, 11]])
    with torch.no_grad():
        torch.testing.assert_close(eng.model(input_ids=ids).logits, t.model(input_ids=ids).logits)


def test_vllm_weights_match_trl_stock_peft_merge(fake_vllm, tiny_organism, tmp_path):
    """Names, order, dtypes as TRL's own PEFT path; full = PEFT's merge; deployed drops the quarantine."""
    t = vllm_trainer(tiny_organism, tmp_path, "colocate", "deployed")
    perturb(t)
    stock_vg = copy.copy(t.vllm_generation)
    del stock_vg._iter_named_params  # back to TRL's class method: merge_adapter() in place, yield, unmerge
    stock_vg.model = copy.deepcopy(t.model)
    before = snapshot(stock_vg.model)
    stock = {n: p.clone() for n, p in VLLMGeneration._iter_named_params(stock_vg)}
    assert any(not torch.equal(p, before[n]) for n, p in stock_vg.model.named_parameters()), \
        "TRL's in-place merge/unmerge moves the base weights (why the sync is replaced)"

    deployed = t.weight_sync.state_dict()
    full = TargetWeightSync(t.target, "full").state_dict()
    assert list(deployed) == list(full) == list(stock)
    for name, tensor in stock.items():
        assert full[name].dtype == tensor.dtype and full[name].shape == tensor.shape
        torch.testing.assert_close(full[name], tensor, rtol=0, atol=1e-6)
    assert any(not torch.allclose(deployed[n], stock[n], atol=1e-3) for n in stock), \
        "TRL's stock sync would push the quarantine under generation_policy: deployed"


@pytest.mark.parametrize("mode,policy,dtype", [("colocate", "deployed", torch.float32),
                                               ("server", "full", torch.bfloat16)])
def test_vllm_1000_syncs_leave_weights_bit_identical(fake_vllm, tiny_organism, tmp_path, mode, policy, dtype):
    t = vllm_trainer(tiny_organism, tmp_path, mode, policy)
    perturb(t)
    t.model.to(dtype)  # in bf16 an in-place merge/unmerge would round the base weights on every cycle
    before = snapshot(t.model)
    groups = t.target.param_groups()
    assert groups["keep"] and groups["quarantine"] and len(before) > len(groups["keep"]) + len(groups["quarantine"])
    for _ in range(1000):
        t.vllm_generation.sync_weights()
    after = snapshot(t.model)
    assert_same_tensors(after, before)  # base, kept and quarantine weights
    syncs = engine(t).syncs
    assert len(syncs) == 1000
    expected = t.weight_sync.state_dict()
    for sync in syncs:
        assert_same_tensors(sync.tensors, expected)
    # merged in fp32 and cast once to the weight's dtype
    name, layer = t.target.layers[0]
    merged = layer.get_base_layer().weight.float()
    for adapter in ("keep", "quarantine") if policy == "full" else ("keep",):
        merged = merged + (layer.lora_B[adapter].weight.float() @ layer.lora_A[adapter].weight.float()) \
            * layer.scaling[adapter]
    pushed = expected[f"{vllm_name(name)}.weight"]
    assert pushed.dtype == dtype and torch.equal(pushed, merged.to(dtype))


def test_vllm_full_policy_importance_sampling_and_gated_old_logps(fake_vllm, tiny_organism, tmp_path):
    t = vllm_trainer(tiny_organism, tmp_path, "colocate", "full", detector=ParityDetector(),
                     intervention="route", unflagged_mode="retain", retain_fraction=0.5)
    perturb(t, ("quarantine",), std=2.0)
    out = _scored(t, group_inputs(t, n_prompts=2))
    modes = out["routing_modes"]
    assert (modes == FORGET).any() and (modes == RETAIN).any()
    ratio = out["importance_sampling_ratio"].view(-1)  # vLLM (training policy) vs the trainer's ungated forward
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-4)
    cm = out["completion_mask"].bool()
    with torch.no_grad():
        gated, ungated = _completion_logps(t, out, modes), _completion_logps(t, out)
    torch.testing.assert_close(out["old_per_token_logps"][cm], gated[cm])
    retain = (modes == RETAIN).view(-1, 1) & cm
    assert not torch.allclose(gated[retain], ungated[retain])


@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_vllm_engine_is_called_by_trl_own_code(fake_vllm, tiny_organism, tmp_path, mode):
    t = vllm_trainer(tiny_organism, tmp_path, mode, "deployed")
    vg = t.vllm_generation
    # TRL's objects and methods, with only the weight source replaced on this instance
    assert type(vg) is VLLMGeneration and "sync_weights" not in vars(vg) and "generate" not in vars(vg)
    assert vg._iter_named_params == t.weight_sync.named_params
    for name in ("_generate_single_turn", "_prepare_inputs"):
        assert getattr(RoutedGRPOTrainer, name) is getattr(GRPOTrainer, name), name
    # training_step only wraps TRL's (svf gradient edits after the backward); TRL's step counting still runs
    assert "super().training_step(" in inspect.getsource(RoutedGRPOTrainer.training_step)
    t.model.train()
    t._generate(PROMPTS)
    eng = engine(t)
    pushes = ["load_weights"] if mode == "colocate" else ["update_named_params"]
    expected = {m: (TRL_VLLM_FILE, "sync_weights") for m in (*pushes, "reset_prefix_cache")}
    expected["generate"] = (TRL_VLLM_FILE, "generate")
    expected["LLM" if mode == "colocate" else "init_communicator"] = (TRL_VLLM_FILE, "_init_vllm")
    for method, caller in expected.items():
        calls = eng.calls_to(method)
        assert calls, method
        for call in calls:
            assert call.frames[0] == caller, (method, call.frames)
    for method in (*pushes, "generate"):
        assert all(c.frames[1] == (TRL_GRPO_FILE, "_generate_single_turn") for c in eng.calls_to(method)), method
    assert len(eng.syncs) == 1 and set(eng.syncs[0].tensors) == set(t.weight_sync.state_dict())


@pytest.mark.parametrize("target", ["dual_lora", "sgtm"])
def test_vllm_importance_sampling_keeps_forget_rollouts_with_deployed_policy(fake_vllm, tiny_organism, tmp_path,
                                                                             monkeypatch, target):
    t = vllm_trainer(tiny_organism, tmp_path, "colocate", "deployed", detector=RowDetector(), target=target,
                     intervention="route", unflagged_mode="retain", retain_fraction=0.5)
    perturb(t, ("quarantine",), std=2.0)  # a large quarantine
    inputs = group_inputs(t, n_prompts=4)
    assert t.args.vllm_importance_sampling_mode == "sequence_mask" and t.args.vllm_importance_sampling_clip_max == 3.0

    # scored against the training policy (TRL's default), the rollouts the quarantine makes > 3x likelier than the
    # deployed policy that sampled them are dropped by the IS mask: the worst case is that the detector flags them
    with monkeypatch.context() as m:
        m.setattr(RoutedGRPOTrainer, "_scores_as_deployed", property(lambda self: False))
        naive = _scored(t, inputs)
    dropped = (naive["importance_sampling_ratio"].view(-1) == 0).nonzero().view(-1).tolist()
    assert len(dropped) >= 2, "the quarantine must be large enough to trip TRL's IS mask"

    t.detector = RowDetector(dropped)
    out = _scored(t, inputs)  # same seeds and deployed weights: the same rollouts
    assert torch.equal(out["completion_ids"], naive["completion_ids"])
    modes = out["routing_modes"]
    forget = modes == FORGET
    assert forget.nonzero().view(-1).tolist() == dropped and (modes == RETAIN).any() and (modes == DEFAULT).any()

    # vLLM's sampling log-probs vs the trainer's forward of the policy that sampled (deployed): no row is dropped
    ratio = out["importance_sampling_ratio"].view(-1)
    assert (ratio[forget] > 0).all()
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-4)

    # the PPO ratio's old log-probs are under the training forward's per-row gate
    cm = out["completion_mask"].bool()
    with torch.no_grad():
        gated = _completion_logps(t, out, modes)
    torch.testing.assert_close(out["old_per_token_logps"][cm], gated[cm])


def test_vllm_config_errors(tiny_organism, tmp_path, monkeypatch):
    base = dict(TINY, output_dir=str(tmp_path / "cfg"), use_vllm=True)
    with pytest.raises(ValueError, match="vllm_mode: invalid value 'remote'.*allowed values"):
        make_trainer(tiny_organism, tmp_path, use_vllm=True, vllm_mode="remote")
    with pytest.raises(ValueError, match="off_policy_mask_threshold"):
        check_vllm_config(build_config(**base, generation_policy="deployed", off_policy_mask_threshold=0.5))
    check_vllm_config(build_config(**base, generation_policy="full", off_policy_mask_threshold=0.5))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP"):
        check_vllm_config(build_config(**base))

    class DeployedOnly:
        model = torch.nn.Linear(2, 3)

        def __init__(self):
            self.rows = 3

        def deployed_state_dict(self):
            self.rows += 1
            return {"weight": torch.zeros(self.rows, 2)}

    with pytest.raises(ValueError, match="generation_policy"):
        TargetWeightSync(DeployedOnly(), "ablated")
    sync = TargetWeightSync(DeployedOnly(), "deployed")
    assert [n for n, _ in sync.named_params()] == ["weight"]
    with pytest.raises(RuntimeError, match="changed between syncs"):
        list(sync.named_params())


@pytest.mark.parametrize("policy", ["deployed", "full"])
@pytest.mark.parametrize("target", available_targets())
def test_vllm_engine_computes_the_generating_policy_for_every_target(fake_vllm, tiny_organism, tmp_path, target,
                                                                     policy):
    sizes = {"svf": dict(svf_reserve_axes=[0, 1], svf_cache_dir=str(tmp_path / "svd"))}.get(target, {})
    t = vllm_trainer(tiny_organism, tmp_path, "colocate", policy, target=target, **sizes)
    perturb(t)  # move every trainable part, so that both the kept part and the quarantine matter
    before = snapshot(t.model)
    t.model.train()
    t._generate(PROMPTS)
    for _ in range(20):
        t.vllm_generation.sync_weights()
    assert_same_tensors(snapshot(t.model), before)
    eng = engine(t)
    assert len(eng.syncs) == 21 and all(s.meta == eng.syncs[0].meta for s in eng.syncs)
    ids = torch.tensor([[3, 9, 12, 5, 20, 7, 11]])
    with torch.no_grad():
        with t.target.ablated():
            deployed = t.model(input_ids=ids).logits
        full = t.model(input_ids=ids).logits
        served = eng.model(input_ids=ids).logits
    assert not torch.allclose(deployed, full, atol=1e-3), "the quarantine must matter for this test"
    torch.testing.assert_close(served, deployed if policy == "deployed" else full, rtol=1e-5, atol=1e-5)
    if policy == "deployed":
        checkpoint = load_file(f"{t.save_deployed()}/model.safetensors")
        assert set(checkpoint) == set(eng.syncs[-1].tensors)
        assert all(torch.equal(checkpoint[k], v) for k, v in eng.syncs[-1].tensors.items())


def test_vllm_qwen_config_and_accelerate_zero2_config(monkeypatch):
    import yaml

    from route.train_grpo import parse_config

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    config = parse_config(["--config", str(CONFIGS / "vllm_qwen.yaml"), "--bf16", "false"])  # no GPU here
    assert config.use_vllm and config.vllm_mode == "colocate" and config.generation_policy == "deployed"
    assert config.model_name_or_path.startswith("Qwen/") and config.env == "coding"
    assert config.vllm_importance_sampling_correction and config.vllm_importance_sampling_mode == "sequence_mask"
    check_vllm_config(config)
    with pytest.raises(ValueError, match="vllm_mode"):
        check_vllm_config(parse_config(["--config", str(CONFIGS / "vllm_qwen.yaml"), "--bf16", "false",
                                        "--vllm_mode", "remote"]))
    accel = yaml.safe_load((CONFIGS / "accelerate_zero2.yaml").read_text())
    assert accel["distributed_type"] == "DEEPSPEED" and accel["deepspeed_config"]["zero_stage"] == 2
    assert accel["mixed_precision"] == "bf16" and "optimizer" not in accel["deepspeed_config"]


def test_vllm_main_job_runs_with_vllm(fake_vllm, tiny_organism, tmp_path):
    """`route/train_grpo.py` end to end with `use_vllm` (the fake engine): results.json and the deployed model."""
    import json

    from route.train_grpo import parse_config, run

    out = tmp_path / "job"
    config = parse_config(["--model_name_or_path", str(tiny_organism), "--output_dir", str(out), "--use_vllm", "true",
                           "--generation_policy", "deployed", "--max_steps", "1", "--eval_n", "4",
                           "--per_device_train_batch_size", "8", "--num_generations", "4",
                           "--max_completion_length", "8", "--keep_rank", "2", "--quarantine_rank", "2",
                           "--train_size", "64", "--logging_steps", "1", "--disable_tqdm", "true"])
    results = run(config)
    (llm,) = fake_vllm.LLM.instances
    assert len(llm.engine.syncs) == 1 and len(llm.engine.calls_to("generate")) == 1
    saved = json.loads((out / "results.json").read_text())
    assert saved["deployed"]["n"] == 4 and saved["config"]["use_vllm"] is True and results["training"]["n"] == 4
    assert (out / "deployed" / "model.safetensors").exists()
