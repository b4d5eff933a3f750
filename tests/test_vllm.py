"""vLLM rollouts with RoutedGRPOTrainer, on CPU, against a recording fake of the vLLM objects TRL calls.

The fake (tests/fake_vllm.py) replaces only what TRL imports from vLLM (`LLM`, `SamplingParams`, ...) and its
`VLLMClient`; TRL's own `VLLMGeneration` and `GRPOTrainer` code drives it. The fake engine is a transformers model
that takes the pushed weights and samples from them, so sampling log-probs come from exactly what was pushed.
The real engine (the CPU build) is tested in tests/test_vllm_engine.py; this file keeps what it cannot show: that the
calls come from TRL's own code, one sync per optimizer step under accumulation, the NCCL server client's protocol,
1000 syncs in bf16, TRL's stock PEFT merge, gated old log-probs, sleep mode, the main job end to end. Value checks
compare with the trainer's own forward (ablation hooks) and with the saved checkpoint in a fresh plain model.
"""

import contextlib
import copy
import inspect
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import GRPOTrainer
from trl.generation import vllm_generation as trl_vllm_generation
from trl.generation.vllm_generation import VLLMGeneration
from trl.trainer import grpo_trainer as trl_grpo_trainer

import envs
from route.masks import FORGET, RETAIN
from route.trainer.config import check_vllm_config
from route.trainer.parse import build_config
from route.trainer.trainer import RoutedGRPOTrainer
from route.vllm.serve import decode, encode
from route.vllm.sync import TargetWeightSync, vllm_name
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
    from transformers import AutoTokenizer

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


IDS = torch.tensor([[3, 9, 12, 5, 20, 7, 11], [4, 8, 15, 16, 23, 2, 6]])


def policy_logits(trainer, policy):
    """The generating policy's logits on `IDS` by the trainer's own forward (ablation hooks, no weight export)."""
    with torch.no_grad(), trainer.target.ablated() if policy == "deployed" else contextlib.nullcontext():
        return trainer.model(input_ids=IDS).logits


class PolicyForwards(TrainerCallback):
    """At every step start: the trainer's forward of the generating policy, and what the engine computes then."""

    def __init__(self, trainer, policy):
        self.trainer, self.policy, self.policy_logits, self.engine_logits = trainer, policy, [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.policy_logits.append(policy_logits(self.trainer, self.policy))
        with torch.no_grad():
            self.engine_logits.append(engine(self.trainer).model(input_ids=IDS).logits)


def assert_each_sync_serves_its_step(steps, final_engine_logits):
    """The engine after step k's sync (seen at step k+1's start, or at the end) computes step k's policy."""
    served = steps.engine_logits[1:] + [final_engine_logits]
    assert len(served) == len(steps.policy_logits) >= 2
    for k, (got, expected) in enumerate(zip(served, steps.policy_logits, strict=True)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"step {k}")
    assert not torch.allclose(steps.policy_logits[0], steps.policy_logits[-1], atol=1e-4), "training must move it"


def test_vllm_colocate_deployed_push_equals_saved_deployed_checkpoint(fake_vllm, tiny_organism, tmp_path):
    t = vllm_trainer(tiny_organism, tmp_path, "colocate", "deployed", detector=ParityDetector(), max_steps=2)
    perturb(t)
    steps = PolicyForwards(t, "deployed")
    t.add_callback(steps)
    t.train()
    eng = engine(t)
    # one sync per optimizer step, each pushing the weights of that step
    assert t.state.global_step == 2 and len(eng.syncs) == 2 and len(eng.calls_to("generate")) == 2
    with torch.no_grad():
        assert_each_sync_serves_its_step(steps, eng.model(input_ids=IDS).logits)

    t._generate(PROMPTS)  # a new global step: TRL syncs the trained weights
    assert len(eng.syncs) == 3
    pushed = eng.syncs[-1].tensors
    path = t.save_deployed()
    checkpoint = load_file(f"{path}/model.safetensors")
    assert set(pushed) <= set(checkpoint) and set(checkpoint) - set(pushed) <= {"lm_head.weight"}
    for name, tensor in pushed.items():
        assert tensor.dtype == checkpoint[name].dtype and torch.equal(tensor, checkpoint[name]), name
    fresh = AutoModelForCausalLM.from_pretrained(path).eval()  # the saved checkpoint in a fresh plain model
    with torch.no_grad():
        served, saved = eng.model(input_ids=IDS).logits, fresh(input_ids=IDS).logits
    torch.testing.assert_close(served, saved, rtol=0, atol=0)
    torch.testing.assert_close(served, policy_logits(t, "deployed"), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(served, policy_logits(t, "full"), atol=1e-3), "the quarantine must matter for this test"


def test_vllm_server_full_policy_pushes_merged_weights_with_quarantine(fake_vllm, tiny_organism, tmp_path):
    t = vllm_trainer(tiny_organism, tmp_path, "server", "full", detector=ParityDetector(), max_steps=2,
                     gradient_accumulation_steps=2, per_device_train_batch_size=4)
    perturb(t)
    steps = PolicyForwards(t, "full")
    t.add_callback(steps)
    t.train()
    eng = engine(t)
    assert len(eng.calls_to("init_communicator")) == 1
    # one sync per optimizer step (each generation covers both accumulation micro-steps)
    assert t.state.global_step == 2 and len(eng.syncs) == 2 and len(eng.calls_to("generate")) == 2
    metadata = t.vllm_generation._weight_metadata
    assert all(sync.metadata == metadata for sync in eng.syncs)  # TRL's cached metadata matches every later push
    with torch.no_grad():
        assert_each_sync_serves_its_step(steps, eng.model(input_ids=IDS).logits)

    t._generate(PROMPTS)
    pushed = eng.syncs[-1].tensors
    assert set(pushed) == set(eng.params) and "lm_head.weight" not in pushed  # tied: not pushed, as in TRL
    # the engine now computes the training policy: quarantine in place
    with torch.no_grad():
        served = eng.model(input_ids=IDS).logits
    torch.testing.assert_close(served, policy_logits(t, "full"), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(served, policy_logits(t, "deployed"), atol=1e-3)


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
    expected = syncs[0].tensors
    for sync in syncs[1:]:  # the same weights every time
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


def test_vllm_sleep_mode_level2_pushes_weights_again_before_each_generation(fake_vllm, tiny_organism, tmp_path):
    t = vllm_trainer(tiny_organism, tmp_path, "colocate", "deployed", vllm_enable_sleep_mode=True)
    eng = engine(t)
    assert eng.sleep_level == 2  # TRL puts the engine to sleep right after building it: weights discarded
    perturb(t, ("quarantine",), std=2.0)
    out = _scored(t, group_inputs(t, n_prompts=2))  # would raise if TRL generated or loaded while asleep
    assert eng.sleep_level == 2 and len(eng.syncs) == 1  # asleep again after the generation
    ratio = out["importance_sampling_ratio"].view(-1)  # sampled from the re-pushed deployed weights, not NaN
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-4)
    methods = [c.method for c in eng.calls if c.method not in ("load_weights", "reset_prefix_cache")]
    assert methods == ["LLM", "sleep(2)", "wake_up(weights)", "wake_up(kv_cache)", "generate", "sleep(2)"]

    t.vllm_generation.sync_weights()  # a sync outside generation wakes the weights first (TRL), then loads
    assert "weights" not in eng.sleeping and len(eng.syncs) == 2
    eng.sleep(1)  # level 1 keeps the weights: they come back on wake-up
    eng.wake_up()
    with torch.no_grad():
        torch.testing.assert_close(eng.model(input_ids=IDS).logits, policy_logits(t, "deployed"), rtol=1e-5, atol=1e-5)
    eng.sleep(2)
    eng.wake_up()
    assert all(p.isnan().all() for p in eng.params.values())  # level 2 does not


def test_vllm_http_weight_payload_checks_the_announced_metadata():
    meta = [("a.weight", "float32", [2, 3]), ("b.weight", "bfloat16", [4])]
    tensors = [("a.weight", torch.randn(2, 3)), ("b.weight", torch.randn(4).bfloat16())]
    out = decode(encode(meta, iter(tensors)))
    assert [n for n, _ in out] == ["a.weight", "b.weight"]
    assert all(x.dtype == y.dtype and torch.equal(x, y) for (_, x), (_, y) in zip(out, tensors, strict=True))
    with pytest.raises(ValueError, match="tensor 1 is .*announced"):
        encode(meta, iter([tensors[0], ("b.weight", torch.randn(5))]))
    with pytest.raises(ValueError, match="1 tensors streamed, 2 announced"):
        encode(meta, iter(tensors[:1]))
    with pytest.raises(ValueError, match="b.weight missing or not float32"):
        decode(encode(meta, iter(tensors)).replace('"bfloat16"', '"float32"'))


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
