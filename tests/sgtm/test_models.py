"""The SGTM model API (GPT-Neo with the seed's names; the Llama family): equivalences, conversion, splits."""

import pytest
import torch
from transformers import GPTNeoForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM
from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoBlock

from route.masks import SplitLinearOut
from route.masks.optim import build_optimizer
from route.models.sgtm import (
    GPTNeoBlockSGTM,
    GPTNeoForCausalLMSGTM,
    GPTNeoModelSGTM,
    LlamaForCausalLMSGTM,
    Qwen2ForCausalLMSGTM,
)
from tests.fp import assert_close_net64, assert_greedy_tokens, greedy_tolerance
from tests.tiny_sgtm import gpt_neo_config, ids, llama_config, summed_loss

SIZES = dict(retain_mlp_dim=40, retain_attn_heads=2)
FAMILIES = [
    ("gpt_neo", GPTNeoForCausalLM, GPTNeoForCausalLMSGTM, gpt_neo_config),
    ("llama", LlamaForCausalLM, LlamaForCausalLMSGTM, llama_config),
    ("qwen2", Qwen2ForCausalLM, Qwen2ForCausalLMSGTM, lambda **k: llama_config(qwen=True, **k)),
]


def logits(model, x, mode=None):
    with torch.no_grad():
        return model(input_ids=x, **({} if mode is None else {"sgtm_mode": mode})).logits


def test_config_fields_masked_layers_and_block_types():
    model = GPTNeoForCausalLMSGTM(gpt_neo_config(**SIZES, masked_layers=[1], split_masked_weights=True))
    assert isinstance(model.transformer, GPTNeoModelSGTM)
    assert model.transformer.masked_layers == [1] and model.config.masked_layers == [1]
    assert type(model.transformer.h[0]) is GPTNeoBlock and isinstance(model.transformer.h[1], GPTNeoBlockSGTM)
    att = model.transformer.h[1].attn.attention
    assert isinstance(att.q_proj, SplitLinearOut) and att.q_proj.retain_dim == 2 * 8
    assert isinstance(model.transformer.h[1].mlp.c_fc, SplitLinearOut)
    assert type(att.out_proj).__name__ == "GatedLinear", "output projections are not split (as in the seed)"
    defaults = GPTNeoForCausalLMSGTM(gpt_neo_config())
    assert defaults.config.retain_mlp_dim == 64 and defaults.config.retain_attn_heads == 4
    assert defaults.config.masking_strategy == "parameter_masking" and defaults.masked_layers == [0, 1]


@pytest.mark.parametrize("name,vanilla_cls,sgtm_cls,config", FAMILIES)
def test_same_seed_same_weights_and_vanilla_forward(name, vanilla_cls, sgtm_cls, config):
    torch.manual_seed(0)
    vanilla = vanilla_cls(config())
    torch.manual_seed(0)
    model = sgtm_cls(config(**SIZES, split_masked_weights=True))
    state, ref = model.to_vanilla_state_dict(), vanilla.state_dict()
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
    x = ids()
    assert torch.equal(logits(model, x), logits(vanilla, x))
    assert torch.equal(logits(model, x, "default"), logits(vanilla, x))


@pytest.mark.parametrize("name,vanilla_cls,sgtm_cls,config", FAMILIES)
@pytest.mark.parametrize("strategy", ["parameter_masking", "gradient_routing", "activation_masking"])
def test_retain_units_covering_everything_is_vanilla_in_every_mode(name, vanilla_cls, sgtm_cls, config, strategy):
    torch.manual_seed(0)
    vanilla = vanilla_cls(config())
    torch.manual_seed(0)
    full = dict(retain_mlp_dim=64, retain_attn_heads=4)
    model = sgtm_cls(config(**full, masking_strategy=strategy, split_masked_weights=True))
    model.double(), vanilla.double()  # the gradients of split parameters are compared summed apart: float64
    x = ids()
    modes = ["retain", "default", ["retain", "default", "retain", "default"]]
    if strategy != "activation_masking":  # which zeroes the retain units (here: all of them) on forget rows
        modes += ["forget", ["forget", "retain", "default", "retain"]]
    for mode in modes:  # no forget unit: the same matmuls on the same weights as the vanilla model, bit for bit
        assert torch.equal(logits(model, x, mode), logits(vanilla, x))
    for mode in ("retain", "default"):  # and the same gradients: nothing is forget
        model.zero_grad(set_to_none=True)
        vanilla.zero_grad(set_to_none=True)
        summed_loss(model, x, mode).backward()
        summed_loss(vanilla, x).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert grads and all(g is not None for g in grads.values())
        for n, p in vanilla.named_parameters():
            merged = grads.get(n)
            if merged is None:  # a split weight: concatenate its parts' gradients
                parts = [grads[k] for k in (f"{n}_retain", f"{n}_forget") if k in grads]
                merged = torch.cat(parts, dim=0)
            assert_close_net64(merged, p.grad, msg=n)


@pytest.mark.parametrize("name,vanilla_cls,sgtm_cls,config", FAMILIES)
def test_forward_equivalences(name, vanilla_cls, sgtm_cls, config):
    """Between modes, bit for bit: every mode runs the same matmuls on the whole weight (split parameters are
    concatenated), a mode only zeroes (or multiplies by exact 1.0s) per-row activations. Against the vanilla model with
    the forget units zeroed: other operations on the forget units (zero weights instead of zeroed activations), in
    float64 (tests/fp.py)."""
    x = ids()
    for strategy in ("parameter_masking", "parameter_masking_no_proj", "gradient_routing", "activation_masking"):
        torch.manual_seed(0)
        model = sgtm_cls(config(**SIZES, masking_strategy=strategy)).double()
        full = logits(model, x)
        retain = logits(model, x, "retain")
        forget = logits(model, x, "forget")
        assert not torch.allclose(retain, full), "the forget units must matter for this test to mean anything"
        if strategy == "activation_masking":
            assert not torch.allclose(forget, full)
        else:  # parameter masking and gradient routing leave the forward value alone
            assert torch.equal(forget, full)
        mixed = logits(model, x, ["retain", "forget", "default", "retain"])
        assert torch.equal(logits(model, x, torch.tensor([1, 0, 2, 1])), mixed), "mode codes as a tensor"
        assert torch.equal(mixed[[0, 3]], retain[[0, 3]]) and torch.equal(mixed[1], forget[1])  # per row, same ops
        with torch.no_grad(), model.sgtm_masks.ablated():
            assert torch.equal(model(input_ids=x).logits, retain), "retain mode is the ablated forward"
        ablated_vanilla = model.to_vanilla(ablate=True)
        assert type(ablated_vanilla) is vanilla_cls
        assert_close_net64(logits(ablated_vanilla.double(), x), retain)


@pytest.mark.parametrize("name,vanilla_cls,sgtm_cls,config", FAMILIES)
def test_state_dicts_convert_to_and_from_vanilla(name, vanilla_cls, sgtm_cls, config, tmp_path):
    torch.manual_seed(1)
    vanilla = vanilla_cls(config())
    model = sgtm_cls.from_vanilla(vanilla, **SIZES, split_masked_weights=True)
    x = ids()
    assert torch.equal(logits(model, x), logits(vanilla, x))
    back = model.to_vanilla()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in vanilla.state_dict().items())
    model.save_pretrained(tmp_path / "sgtm")
    reloaded = sgtm_cls.from_pretrained(tmp_path / "sgtm")
    assert reloaded.config.retain_mlp_dim == 40 and reloaded.config.split_masked_weights
    assert torch.equal(logits(reloaded, x, "retain"), logits(model, x, "retain"))
    with pytest.raises(ValueError, match="allowed values"):
        sgtm_cls.from_vanilla(vanilla, retain_dims=3)


def test_named_parameters_split_and_optimizer_groups():
    torch.manual_seed(0)
    model = GPTNeoForCausalLMSGTM(gpt_neo_config(**SIZES, split_masked_weights=True))
    split = {s: dict(model.named_parameters_split(sgtm_split=s)) for s in ("forget", "retain", "joint")}
    assert all(n.endswith("_forget") for n in split["forget"]) and all(n.endswith("_retain") for n in split["retain"])
    assert len(split["forget"]) == len(split["retain"]) == 2 * (3 + 2)  # q, k, v, c_fc weight + c_fc bias per layer
    names = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted([n for s in split.values() for n in s])
    opt = build_optimizer({"keep": list(split["retain"].values()), "quarantine": list(split["forget"].values()),
                           "shared": list(split["joint"].values())}, lr=1e-2, weight_decay=0.1)
    x = ids()
    summed_loss(model, x, "default").backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    for mode, frozen in (("forget", "retain"), ("retain", "forget")):
        before = {n: p.detach().clone() for n, p in split[frozen].items()}
        summed_loss(model, x, mode).backward()
        model.adjust_gradients(sgtm_mode=mode)
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert all(torch.equal(p.detach(), before[n]) for n, p in split[frozen].items()), f"{mode} moved {frozen}"
    unsplit = GPTNeoForCausalLMSGTM(gpt_neo_config(**SIZES))
    with pytest.raises(ValueError, match="split_masked_weights"):
        list(unsplit.named_parameters_split("forget"))
    with pytest.raises(ValueError, match="allowed values"):
        list(model.named_parameters_split("quarantine"))


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="masking_strategy.*allowed values"):
        GPTNeoForCausalLMSGTM(gpt_neo_config(masking_strategy="erase"))
    with pytest.raises(ValueError, match="retain_mlp_dim"):
        GPTNeoForCausalLMSGTM(gpt_neo_config(retain_mlp_dim=65))
    with pytest.raises(ValueError, match="retain_attn_heads"):
        LlamaForCausalLMSGTM(llama_config(retain_attn_heads=1))  # KV groups of 2
    with pytest.raises(ValueError, match="masked_layers"):
        GPTNeoForCausalLMSGTM(gpt_neo_config(masked_layers=[2]))
    with pytest.raises(ValueError, match="sgtm_mode.*allowed values"):
        GPTNeoForCausalLMSGTM(gpt_neo_config())(input_ids=ids(), sgtm_mode="hack")


def test_generate_accepts_sgtm_mode():
    """Greedy decoding in retain mode is the ablated vanilla model's: each token an argmax of its full forward (up to a
    near-tie, float64, tests/fp.py), and the same tokens where no step is a near-tie."""
    torch.manual_seed(0)
    model = GPTNeoForCausalLMSGTM(gpt_neo_config(**SIZES)).eval().double()
    x = ids(n=2, length=4)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    retain = model.generate(input_ids=x, sgtm_mode="retain", **kw)
    vanilla = model.to_vanilla(ablate=True).double().eval()
    ablated = vanilla.generate(input_ids=x, **kw)
    assert retain.shape == ablated.shape == (2, 9)
    margins = []
    for seq in (retain, ablated):
        full = logits(vanilla, seq)
        margins.append(assert_greedy_tokens(seq[:, 4:], full[:, 3:-1], tol := greedy_tolerance(full)))
    if margins[0] > 2 * tol:
        assert torch.equal(retain, ablated)
