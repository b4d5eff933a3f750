"""The trainer's routing invariants, end to end: the real RoutedGRPOTrainer on the tiny organism, with TRL's own
shuffle and micro-batch split (steps_per_generation 2, gradient accumulation 2), checked on the weights after
`optimizer.step()`. Also the TRL options: beta > 0 on every target (the KL reference is the base model) and every
supported loss_type."""

import hashlib

import pytest
import torch
from trl import GRPOTrainer

import envs
from route.masks import FORGET, RETAIN
from route.trainer.parse import build_config
from route.trainer.trainer import RoutedGRPOTrainer

SPLIT = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, learning_rate=2e-2, beta=0.0,
             per_device_train_batch_size=8, num_generations=4, steps_per_generation=2,
             gradient_accumulation_steps=2, max_completion_length=6, max_steps=2, logging_steps=1,
             save_strategy="no", report_to="none", disable_tqdm=True, train_size=32, keep_rank=2,
             quarantine_rank=2, seed=0, weight_decay=0.1)
TARGETS = {"dual_lora": {}, "svf": dict(target="svf", svf_reserve_axes=[0, 1]), "sgtm": dict(target="sgtm"),
           "dual_mlp": dict(target="dual_mlp", dual_mlp_keep_units=4, dual_mlp_quarantine_units=4)}


class AllFlagged:
    def __call__(self, grades, rollout_ids):
        return [True] * len(grades)


class TextDetector:
    """Flags a rollout by a hash of its (prompt, completion) text: row-independent, so a misaligned routing column
    is caught by recomputing the flag from the tokens the loss sees."""

    @staticmethod
    def flag(prompt: str, completion: str) -> bool:
        return hashlib.sha256(f"{prompt}\x00{completion}".encode()).digest()[0] % 2 == 1

    def __init__(self):
        self.rows: list[tuple[str, str]] = []  # (prompt, completion) of the batch being graded, set by GradeSpy

    def __call__(self, grades, rollout_ids):
        assert len(self.rows) == len(grades)
        return [self.flag(p, c) for p, c in self.rows]


def varied_reward(prompts, completions, **columns):
    """A reward that varies within every group (the organism rarely passes in 6 tokens, and equal rewards give zero
    advantages, hence no gradient and nothing to test)."""
    return [hashlib.sha256(str(c).encode()).digest()[0] / 255 for c in completions]


def make(model_dir, tmp_path, detector=None, trainer_cls=RoutedGRPOTrainer, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = build_config(output_dir=str(tmp_path / "run"), **{**SPLIT, **overrides})
    env = envs.make_env(config.env)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return trainer_cls(model=AutoModelForCausalLM.from_pretrained(model_dir), args=config, env=env,
                       detector=detector, processing_class=tok, reward_funcs=[varied_reward],
                       train_dataset=env.dataset(config.train_size, seed=0, split="train"))


def snapshot(trainer, group):
    params = trainer.target.param_groups()[group]
    assert params, f"no {group} parameters"
    return [p.detach().clone() for p in params]


def same(trainer, group, before):
    return all(torch.equal(p, b) for p, b in zip(trainer.target.param_groups()[group], before, strict=True))


@pytest.mark.parametrize("target", list(TARGETS))
def test_a_fully_flagged_route_run_leaves_the_kept_part_bit_identical(target, tiny_organism, tmp_path):
    t = make(tiny_organism, tmp_path, detector=AllFlagged(), intervention="route", **TARGETS[target])
    keep, quarantine = snapshot(t, "keep"), snapshot(t, "quarantine")
    t.train()
    assert t.state.global_step == 2
    assert same(t, "keep", keep), "a forget-only run moved the kept parameters"
    assert not same(t, "quarantine", quarantine), "the quarantine did not train (the test would prove nothing)"


@pytest.mark.parametrize("intervention,loss_type", [("none", "grpo"), ("filter", "dr_grpo"), ("penalty", "bnpo"),
                                                    ("penalty", "dapo")])
def test_baselines_never_move_the_quarantine(intervention, loss_type, tiny_organism, tmp_path):
    t = make(tiny_organism, tmp_path, intervention=intervention, loss_type=loss_type, detector_fpr=0.5)
    keep, quarantine = snapshot(t, "keep"), snapshot(t, "quarantine")
    t.train()
    flags = [h["routing/flag_rate"] for h in t.state.log_history if "routing/flag_rate" in h]
    assert len(flags) == 2 and sum(flags) > 0  # flagged rollouts existed
    assert same(t, "quarantine", quarantine), f"{intervention} moved the quarantine"
    assert not same(t, "keep", keep), "the kept adapter did not train (the test would prove nothing)"


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "vespo", "luspo"])
def test_every_loss_type_keeps_forget_rows_out_of_the_kept_adapter(loss_type, tiny_organism, tmp_path):
    extra = {"importance_sampling_level": "sequence"} if loss_type == "luspo" else {}  # TRL requires it for luspo
    t = make(tiny_organism, tmp_path, detector=AllFlagged(), intervention="route", loss_type=loss_type, **extra)
    keep, quarantine = snapshot(t, "keep"), snapshot(t, "quarantine")
    t.train()
    assert same(t, "keep", keep) and not same(t, "quarantine", quarantine)


class CheckedTrainer(RoutedGRPOTrainer):
    """Records, for every micro-batch the loss sees, whether each row's routing columns match its own text."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checked: list[tuple[bool, int, int]] = []  # (expected flag, routing flag, routing mode) per row
        self.micro_batches = 0
        env, detector = self.env, self.detector
        grade = env.grade

        def spy(prompts, completions, **columns):
            detector.rows = [(p, c) for p, c in zip(prompts, completions, strict=True)]
            return grade(prompts, completions, **columns)

        env.grade = spy

    def _compute_loss(self, model, inputs):
        tok = self.processing_class
        prompts = tok.batch_decode(inputs["prompt_ids"], skip_special_tokens=True)
        completions = tok.batch_decode(inputs["completion_ids"], skip_special_tokens=True)
        for p, c, f, m in zip(prompts, completions, inputs["routing_flags"].tolist(),
                              inputs["routing_modes"].tolist(), strict=True):
            self.checked.append((TextDetector.flag(p, c), f, m))
        self.micro_batches += 1
        return super()._compute_loss(model, inputs)


def test_routing_columns_stay_with_their_rows_through_the_shuffle_and_split(tiny_organism, tmp_path):
    t = make(tiny_organism, tmp_path, detector=TextDetector(), trainer_cls=CheckedTrainer, intervention="route",
             unflagged_mode="retain")
    t.train()
    assert t.micro_batches == 4 and len(t.checked) == 32  # 2 steps x 2 micro-batches x 8 rows
    expected = [(flag, flag, FORGET if flag else RETAIN) for flag, _, _ in t.checked]
    assert t.checked == expected
    assert 0 < sum(f for f, _, _ in t.checked) < 32  # both kinds of rows, so a misalignment would show


def randomize_quarantine(trainer, std=0.5):
    with torch.no_grad():
        for p in trainer.target.param_groups()["quarantine"]:
            p.normal_(0, std, generator=torch.Generator().manual_seed(p.numel()))


@pytest.mark.parametrize("policy", ["full", "deployed"])
def test_generation_policy_samples_from_the_named_policy(policy, tiny_organism, tmp_path):
    t = make(tiny_organism, tmp_path, generation_policy=policy, max_completion_length=8)
    randomize_quarantine(t)
    prompts = [r["prompt"] for r in t.env.rows(8, seed=3, split="train")]

    def sample(fn):
        torch.manual_seed(1)
        return fn(prompts)[1]  # completion ids

    got = sample(t._generate)
    with t.target.ablated():
        deployed = sample(lambda ps: GRPOTrainer._generate(t, ps))
    full = sample(lambda ps: GRPOTrainer._generate(t, ps))
    assert deployed != full, "full and deployed sample alike: the quarantine does not matter here"
    assert got == (full if policy == "full" else deployed)


@pytest.mark.parametrize("target", list(TARGETS))
def test_kl_reference_is_the_base_model(target, tiny_organism, tmp_path):
    """beta > 0: TRL's reference log-probs are the base model's (adapters disabled, or a frozen copy for sgtm),
    not the trained or deployed policy's; a routed run with beta > 0 trains and keeps the forget-only invariant."""
    from transformers import AutoModelForCausalLM

    t = make(tiny_organism, tmp_path, detector=AllFlagged(), beta=0.2, **TARGETS[target])
    randomize_quarantine(t, std=0.2)
    with torch.no_grad():
        for p in t.target.param_groups()["keep"]:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    rows = t.env.rows(2, seed=5, split="train")
    t.model.train()
    torch.manual_seed(0)
    out = t._generate_and_score_completions([dict(r) for r in rows for _ in range(4)])
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    k = out["completion_ids"].size(1)
    plain = AutoModelForCausalLM.from_pretrained(tiny_organism)
    with torch.no_grad():
        logits = plain(input_ids=ids, attention_mask=mask).logits[:, -k - 1:-1] / t.args.temperature
        base = logits.log_softmax(-1).gather(-1, out["completion_ids"].unsqueeze(-1)).squeeze(-1)
        with t.target.ablated():
            deployed, _, _ = t._get_per_token_logps_and_entropies(t.model, ids, mask, k)
    cm = out["completion_mask"].bool()
    torch.testing.assert_close(out["ref_per_token_logps"][cm], base[cm], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out["ref_per_token_logps"][cm], deployed[cm], atol=1e-3)

    t2 = make(tiny_organism, tmp_path / "train", detector=AllFlagged(), beta=0.2, **TARGETS[target])
    keep = snapshot(t2, "keep")
    t2.train()
    kl = [h["kl"] for h in t2.state.log_history if "kl" in h]
    assert len(kl) == 2 and all(v == v for v in kl)
    assert same(t2, "keep", keep)
