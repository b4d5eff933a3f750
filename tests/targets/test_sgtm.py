"""The `sgtm` target: the model's own reserved units as the quarantine, behind the Target interface."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from route.masks.optim import build_optimizer
from route.models.organism import build_model, build_tokenizer, tiny_config
from route.targets import Target, make_target
from tests.fp import assert_close_net64
from tests.targets.helpers import logits, sampled_with_logits, teacher_forced
from tests.test_trainer import make_trainer
from tests.tiny_sgtm import ids, llama_config, one_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture(params=["organism", "gqa"])
def target(request):
    torch.manual_seed(0)
    if request.param == "organism":  # the CPU organism's architecture (1 KV head for 2 heads)
        model = build_model(tiny_config(init_range=0.2), build_tokenizer())
        return make_target("sgtm", model, forget_mlp_frac=0.25)
    model = LlamaForCausalLM(llama_config())  # 4 heads over 2 KV heads: reserve one KV group
    return make_target("sgtm", model, forget_mlp_frac=0.25, forget_heads=2)


def loss(t, x, modes):
    with t.gate(modes):
        out = t.model(input_ids=x).logits.float()
    return torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1),
                                             reduction="sum")


def test_interface_and_groups(target):
    assert isinstance(target, Target)
    groups = target.param_groups()
    assert groups["keep"] and groups["quarantine"] and groups["shared"]
    n_all = sum(p.numel() for p in target.model.parameters())
    assert sum(p.numel() for g in groups.values() for p in g) == n_all, "full-parameter: every weight trains"


def test_forward_unchanged_under_forget_and_default_and_retain_rows_are_deployed(target):
    """Bit for bit: every row runs the same matmuls (same calls, same shapes) as the ungated forward; a forget or
    default row's activations are multiplied by exact 1.0s, and a retain row's forget activations are zeroed exactly as
    the ablated forward zeroes every row's."""
    x = ids()
    full = logits(target, x)
    for modes in (["forget"] * 4, ["default"] * 4, ["forget", "default", "forget", "default"]):
        assert torch.equal(logits(target, x, target.gate(modes)), full)
    deployed = logits(target, x, target.ablated())
    mixed = logits(target, x, target.gate(["retain", "default", "retain", "forget"]))
    assert torch.equal(mixed[[0, 2]], deployed[[0, 2]]) and torch.equal(mixed[[1, 3]], full[[1, 3]])
    assert not torch.allclose(deployed, full), "the quarantine must matter for this test to mean anything"


def test_per_row_modes_in_one_batch_equal_separate_batches(target):
    """One gated backward against one backward per row: other summation orders, float64 (tests/fp.py)."""
    target.model.double()
    x = ids()
    modes = ["forget", "retain", "default", "forget"]
    target.model.zero_grad(set_to_none=True)
    loss(target, x, modes).backward()
    mixed = {n: p.grad.clone() for n, p in target.model.named_parameters()}
    separate = {n: torch.zeros_like(p) for n, p in target.model.named_parameters()}
    for i, m in enumerate(modes):
        target.model.zero_grad(set_to_none=True)
        loss(target, x[i: i + 1], [m]).backward()
        for n, p in target.model.named_parameters():
            if p.grad is not None:
                separate[n] += p.grad
    assert len(mixed) > 0
    for n in mixed:
        assert_close_net64(mixed[n], separate[n], msg=n)


@pytest.mark.parametrize("mode,moves", [
    ("forget", {"quarantine"}), ("retain", {"keep", "shared"}), ("default", {"keep", "quarantine", "shared"})])
def test_optimizer_step_invariants(target, mode, moves):
    groups = target.param_groups()
    opt = build_optimizer(groups, lr=1e-2, weight_decay=0.1)
    loss(target, ids(), ["default"] * 4).backward()  # momentum in every parameter first
    opt.step()
    opt.zero_grad(set_to_none=True)
    before = {k: [p.detach().clone() for p in v] for k, v in groups.items()}
    loss(target, ids(seed=3), [mode] * 4).backward()
    opt.step()
    for name, params in groups.items():
        changed = [not torch.equal(p.detach(), b) for p, b in zip(params, before[name])]
        if name in moves:
            assert any(changed), f"{mode}: {name} did not move"
        else:
            assert not any(changed), f"{mode}: {name} moved"


@pytest.mark.parametrize("trainable", [False, True])
def test_ablate_removes_only_the_quarantine(target, trainable):
    x = ids()
    deployed = logits(target, x, target.ablated())
    keep_before = [p.detach().clone() for p in target.param_groups()["keep"] + target.param_groups()["shared"]]
    quarantine = target.param_groups()["quarantine"]
    target.ablate(trainable=trainable)
    # bit for bit: the same matmuls, every product with a forget unit exactly 0 either way (zeroed weight or activation)
    assert torch.equal(logits(target, x), deployed)
    after = target.param_groups()
    assert all(torch.equal(p.detach(), b) for p, b in zip(after["keep"] + after["shared"], keep_before))
    assert all(p.requires_grad == trainable for p in quarantine)
    assert (len(after["quarantine"]) > 0) == trainable


def test_deployed_checkpoint_matches_ablated_forward_and_generation(tmp_path):
    """The export zeroes the forget units and merges split weights by copying: the checkpoint holds the deployed
    policy's weights exactly (float32 values, exact in float64 too). Its forward then differs from the target's only in
    summation order (split vs whole matmuls), compared in float64 (tests/fp.py); generation as in test_dual_lora."""
    torch.manual_seed(0)
    tok = build_tokenizer()
    target = make_target("sgtm", build_model(tiny_config(init_range=0.2), tok), forget_mlp_frac=0.25)
    with torch.no_grad():  # make the quarantine matter
        for s in target.masks.slices("forget"):
            s.of(s.param.data).normal_(0, 0.3)
    target.model.double()
    before = {n: p.detach().clone() for n, p in target.model.named_parameters()}
    target.save_deployed(str(tmp_path / "deployed"), tokenizer=tok)
    assert all(torch.equal(p, before[n]) for n, p in target.model.named_parameters()), "export touched weights"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "deployed")
    assert type(plain).__name__ == "LlamaForCausalLM"
    plain.double()
    assert all(torch.equal(v, target.deployed_state_dict()[k]) for k, v in plain.state_dict().items()), "exact export"
    x = ids()
    assert_close_net64(plain(input_ids=x).logits, logits(target, x, target.ablated()))
    plain.load_state_dict(target.merged_state_dict(quarantine=True))
    assert_close_net64(plain(input_ids=x).logits, logits(target, x))
    prompt = tok(["mul 123*4 g=exact>"] * 2, return_tensors="pt")["input_ids"]
    kw = dict(do_sample=True, max_new_tokens=6, top_k=0, pad_token_id=tok.pad_token_id)
    plain.load_state_dict(target.deployed_state_dict())
    torch.manual_seed(3)
    ours, ours_logits = sampled_with_logits(target.model, prompt, target.ablated(), **kw)
    assert_close_net64(ours_logits, teacher_forced(plain, ours, prompt.shape[1]), rounded_to=torch.float32)
    torch.manual_seed(3)
    theirs, theirs_logits = sampled_with_logits(plain, prompt, **kw)
    assert_close_net64(theirs_logits, teacher_forced(target.model, theirs, prompt.shape[1], target.ablated()),
                       rounded_to=torch.float32)
    assert ours_logits.shape[1] == 6


def test_bad_sizes_name_the_field():
    model = LlamaForCausalLM(llama_config())
    with pytest.raises(ValueError, match=r"sgtm_forget_heads.*allowed values: \[0, 2, 4\]"):
        make_target("sgtm", model, forget_heads=1)
    with pytest.raises(ValueError, match="quarantine is empty"):
        make_target("sgtm", model, forget_mlp_frac=0.0, forget_heads=0)
    with pytest.raises(ValueError, match="sgtm_strategy.*allowed values"):
        make_target("sgtm", model, strategy="erase")


def test_three_step_routed_grpo_run(tiny_organism, tmp_path):
    t = make_trainer(tiny_organism, tmp_path, target="sgtm", intervention="route", detector_fpr=0.5,
                     sgtm_forget_mlp_frac=0.25)
    assert type(t.target).__name__ == "SGTMTarget"
    t.train()
    assert t.state.global_step == 3
    logged = [h for h in t.state.log_history if "routing/flag_rate" in h]
    assert len(logged) == 3 and sum(h["routing/frac_forget"] for h in logged) > 0
    assert "grad_norm/quarantine" in logged[-1] and "grad_norm/keep" in logged[-1]
    t.save_deployed()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "deployed")
    x = ids(n=2, length=6)
    torch.testing.assert_close(plain(input_ids=x).logits, logits(t.target, x, t.target.ablated()),
                               rtol=1e-5, atol=1e-5)


def test_vllm_weight_source_pushes_plain_names(target):
    from route.vllm.sync import TargetWeightSync

    names = {n for n, _ in target.model.named_parameters()}
    assert any(n.endswith("_forget") for n in names), "the target's own parameters are split"
    for policy in ("deployed", "full"):
        pushed = TargetWeightSync(target, policy).state_dict()
        reference = LlamaForCausalLM(target.model.config).state_dict()
        assert set(pushed) <= set(reference) and "model.layers.0.mlp.down_proj.weight" in pushed
        assert all(pushed[k].shape == reference[k].shape for k in pushed)
