"""SGTMMasks: ablation touches only forget slices, optimizer-step invariants, merged state dicts, errors."""

import pytest
import torch
from transformers import LlamaForCausalLM

from route.masks import SGTMMasks, apply_masks, get_strategy
from route.masks.optim import build_optimizer
from route.models.sgtm import GPTNeoForCausalLMSGTM
from tests.fp import assert_close_net64
from tests.tiny_sgtm import gpt_neo_config, ids, llama_config, summed_loss


def masked_llama(split_out=True, strategy="parameter_masking", **sizes):
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config())
    apply_masks(model, **(sizes or dict(forget_mlp_dim=16, forget_attn_heads=2)), split=True, split_out=split_out)
    return model, SGTMMasks(model, strategy)


def train_a_little(model, masks, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        with masks.gate(["default"] * 4):
            summed_loss(model, ids()).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("split", [True, False])
def test_ablation_touches_only_forget_slices_and_equals_the_ablated_forward(trainable, split):
    torch.manual_seed(0)
    model = GPTNeoForCausalLMSGTM(gpt_neo_config(retain_mlp_dim=40, retain_attn_heads=2, split_masked_weights=split))
    masks = model.sgtm_masks
    train_a_little(model, masks)
    x = ids()
    with torch.no_grad(), masks.ablated():
        ablated_before = model(input_ids=x).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    forget = [(s.param_name, s.index) for s in masks.slices("forget")]
    masks.ablate(trainable=trainable)  # the core's default: the deployed function is kept (the RL target's ablation)
    changed = 0
    for n, p in model.named_parameters():
        untouched = torch.ones_like(p, dtype=torch.bool)
        for name, index in forget:
            if name == n:
                untouched[index] = False
        assert torch.equal(p.detach()[untouched], before[n][untouched]), f"{n}: ablation touched a non-forget slice"
        changed += int(not torch.equal(p.detach(), before[n]))
    assert changed > 0
    for s in masks.slices("forget"):
        values = s.of(s.param.data)
        if trainable and s.part == "in_weight":
            retain = next(r for r in masks.slices("retain") if r.module == s.module and r.part == s.part)
            std, ref = values.std().item(), retain.of(retain.param.data).std().item()
            assert 0.5 * ref < std < 1.5 * ref, "re-init at the retain slice's std"
        else:
            assert torch.count_nonzero(values) == 0, s.param_name
        if not s.index:
            assert s.param.requires_grad == trainable
    with torch.no_grad():  # bit for bit: the same matmuls, each product with a forget unit exactly 0 either way
        assert torch.equal(model(input_ids=x).logits, ablated_before)


@pytest.mark.parametrize("strategy", ["parameter_masking", "gradient_routing", "activation_masking"])
@pytest.mark.parametrize("mode,keep_moves,quar_moves", [
    ("forget", False, True), ("retain", True, False), ("default", True, True)])
def test_optimizer_step_invariants(strategy, mode, keep_moves, quar_moves):
    model, masks = masked_llama(strategy=strategy)
    model.model.embed_tokens.weight.requires_grad_(False)  # shared parameters are exercised in the target's tests
    for n, p in model.named_parameters():
        if "norm" in n:
            p.requires_grad_(False)
    groups = masks.param_groups()
    assert groups["keep"] and groups["quarantine"] and not groups["shared"]
    opt = build_optimizer(groups, lr=1e-2, weight_decay=0.1)
    # a first default step gives every parameter AdamW momentum: the trap is that it keeps moving them
    with masks.gate(["default"] * 4):
        summed_loss(model, ids()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    keep_before = [p.detach().clone() for p in groups["keep"]]
    quar_before = [p.detach().clone() for p in groups["quarantine"]]
    with masks.gate([mode] * 4):
        summed_loss(model, ids(seed=2)).backward()
    opt.step()
    keep_changed = [not torch.equal(p.detach(), b) for p, b in zip(groups["keep"], keep_before)]
    quar_changed = [not torch.equal(p.detach(), b) for p, b in zip(groups["quarantine"], quar_before)]
    if strategy == "gradient_routing" and mode == "forget":
        # gradient routing trains the output projections' retain columns from forget rows (the seed's semantics)
        inputs = {id(s.param) for s in masks.slices("retain") if s.part.startswith("in")}
        keep_changed = [c for p, c in zip(groups["keep"], keep_changed) if id(p) in inputs]
    assert any(keep_changed) == keep_moves and any(quar_changed) == quar_moves
    assert (all(keep_changed) or not keep_moves) and (all(quar_changed) or not quar_moves)


def test_unsplit_output_projections_cannot_be_grouped():
    model, masks = masked_llama(split_out=False)
    with pytest.raises(ValueError, match="split"):
        masks.param_groups()
    assert masks.param_groups(mixed="shared")["shared"]


def test_merged_state_dict_is_vanilla_and_out_of_place():
    """The merge copies split weights and zeroes forget slices (no arithmetic): the plain model holds the masked model's
    weights exactly (float32 values, so float64 loses nothing) and computes the same function, with zero weights where
    the masked model zeroes activations: compared in float64 (tests/fp.py)."""
    model, masks = masked_llama()
    train_a_little(model, masks)
    model.double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = ids()
    plain = LlamaForCausalLM(llama_config()).double()
    plain.load_state_dict(masks.merged_state_dict(ablate=True))
    with torch.no_grad(), masks.ablated():
        assert_close_net64(plain(input_ids=x).logits, model(input_ids=x).logits)
    plain.load_state_dict(masks.merged_state_dict(ablate=False))
    with torch.no_grad():
        assert_close_net64(plain(input_ids=x).logits, model(input_ids=x).logits)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert masks.merged_state_dict(dtype=torch.bfloat16)["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="masking_strategy.*allowed values"):
        get_strategy("erase")
    model = LlamaForCausalLM(llama_config())
    with pytest.raises(ValueError, match=r"retain_attn_heads.*allowed values: \[0, 2, 4\]"):
        apply_masks(model, retain_attn_heads=3)
    with pytest.raises(ValueError, match="forget_mlp_dim"):
        apply_masks(model, forget_mlp_dim=65)
    with pytest.raises(ValueError, match="masked_layers"):
        apply_masks(model, masked_layers=[5])
    with pytest.raises(ValueError, match="no masked layer"):
        SGTMMasks(LlamaForCausalLM(llama_config()))
