"""The mode x slice gradient matrix of every SGTM strategy, with split and unsplit weights, on GPT-Neo and Llama/Qwen2.

Each cell says whether a slice (retain or forget; input-projection rows, output-projection
columns, output bias) gets a non-zero gradient from a batch in one mode, after the seed's
`adjust_gradients`. The tests count the cells they checked, so an empty loop cannot pass.
"""

import pytest
import torch

from route.masks import available_strategies
from route.models.sgtm import GPTNeoForCausalLMSGTM, LlamaForCausalLMSGTM, Qwen2ForCausalLMSGTM
from tests.tiny_sgtm import gpt_neo_config, ids, llama_config, summed_loss

STRATEGIES = ["parameter_masking", "parameter_masking_no_proj", "gradient_routing", "activation_masking"]
MODES = ["forget", "retain", "default"]


def expected_nonzero(strategy: str, mode: str, role: str, part: str) -> bool:
    """The issue's semantics, written out per cell."""
    if mode == "default":
        return True
    if mode == "retain":  # forget activations zeroed: forget slices get nothing, retain slices train
        return role == "retain"
    if role == "forget":  # forget rows always train the forget slices
        return True
    if part.startswith("in"):  # no strategy lets forget rows train retain rows of input projections
        return False
    return {"parameter_masking": False,  # output projections' retain columns and biases masked
            "parameter_masking_no_proj": True,  # output projections left alone
            "gradient_routing": True,  # detached activations still feed the output projection
            "activation_masking": part == "out_bias",  # zeroed retain activations: no column gradient
            }[strategy]


def build(arch: str, strategy: str, split: bool):
    torch.manual_seed(0)
    sgtm = dict(retain_mlp_dim=40, retain_attn_heads=2, masking_strategy=strategy, split_masked_weights=split)
    if arch == "gpt_neo":
        return GPTNeoForCausalLMSGTM(gpt_neo_config(**sgtm))
    if arch == "llama":
        return LlamaForCausalLMSGTM(llama_config(**sgtm))
    return Qwen2ForCausalLMSGTM(llama_config(qwen=True, **sgtm))


def test_registry_lists_the_four_strategies():
    assert set(STRATEGIES) <= set(available_strategies())


@pytest.mark.parametrize("arch", ["gpt_neo", "llama", "qwen2"])
@pytest.mark.parametrize("split", [True, False])
def test_gradient_matrix(arch, split):
    checked, parts_seen = 0, set()
    for strategy in STRATEGIES:
        model = build(arch, strategy, split)
        slices = model.sgtm_masks.slices()
        assert len(slices) > 0
        for mode in MODES:
            model.zero_grad(set_to_none=True)
            summed_loss(model, ids(), sgtm_mode=mode).backward()
            model.adjust_gradients(sgtm_mode=mode)
            for s in slices:
                grad = s.of(s.param.grad) if s.param.grad is not None else torch.zeros(0)
                assert grad.numel() > 0, f"{s.param_name} is empty: the test needs forget and retain units"
                got = bool(grad.abs().sum() > 0)
                want = expected_nonzero(strategy, mode, s.role, s.part)
                assert got == want, f"{arch} split={split} {strategy} {mode}: {s.param_name} [{s.role} {s.part}]"
                checked += 1
                parts_seen.add((s.role, s.part))
    layers, per_layer = 2, {"gpt_neo": 4 * 2 + 2 + 2 * 3, "llama": 5 * 2 + 2 * 2, "qwen2": 5 * 2 + 3 * 2 + 2 * 2}[arch]
    assert checked == len(STRATEGIES) * len(MODES) * layers * per_layer
    assert {("retain", "in_weight"), ("forget", "in_weight"), ("retain", "out_weight"),
            ("forget", "out_weight")} <= parts_seen


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("split", [True, False])
def test_per_row_modes_equal_separate_batches(strategy, split):
    model = build("gpt_neo", strategy, split)
    x = ids(n=5)
    modes = ["forget", "retain", "default", "forget", "retain"]
    model.zero_grad(set_to_none=True)
    summed_loss(model, x, sgtm_mode=modes).backward()
    mixed = {n: p.grad.clone() for n, p in model.named_parameters()}
    separate = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for mode in MODES:  # one batch per mode, masked by the seed's whole-batch rule
        rows = [i for i, m in enumerate(modes) if m == mode]
        model.zero_grad(set_to_none=True)
        summed_loss(model, x[rows], sgtm_mode=mode).backward()
        model.adjust_gradients(sgtm_mode=mode)
        for n, p in model.named_parameters():
            if p.grad is not None:
                separate[n] += p.grad
    assert len(mixed) > 0
    for n in mixed:
        torch.testing.assert_close(mixed[n], separate[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("strategy", ["parameter_masking", "parameter_masking_no_proj"])
def test_seed_post_backward_masking_equals_in_backward_masking(strategy):
    """The seed runs an ordinary forward and masks after backward; the gated forward masks inside it."""
    model = build("gpt_neo", strategy, split=True)
    x = ids()
    model.zero_grad(set_to_none=True)
    summed_loss(model, x, sgtm_mode=None).backward()
    model.adjust_gradients(sgtm_mode="forget")
    seed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    summed_loss(model, x, sgtm_mode="forget").backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n in seed:
        torch.testing.assert_close(ours[n], seed[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("arch", ["gpt_neo", "llama"])
def test_mask_embeddings_keeps_forget_rows_out_of_embeddings_and_tied_head(arch):
    torch.manual_seed(0)
    sgtm = dict(retain_mlp_dim=40, retain_attn_heads=2, sgtm_mask_embeddings=True, split_masked_weights=True)
    model = GPTNeoForCausalLMSGTM(gpt_neo_config(**sgtm)) if arch == "gpt_neo" else LlamaForCausalLMSGTM(
        llama_config(**sgtm))
    emb = [m for m in model.sgtm_masks.shared_modules if isinstance(m, torch.nn.Embedding)]
    assert emb and model.lm_head in model.sgtm_masks.shared_modules
    x = ids(n=3)
    summed_loss(model, x, sgtm_mode="forget").backward()
    for m in emb:
        assert m.weight.grad is None or torch.count_nonzero(m.weight.grad) == 0
    model.zero_grad(set_to_none=True)
    summed_loss(model, x, sgtm_mode=["forget", "default", "retain"]).backward()
    mixed = [m.weight.grad.clone() for m in emb]
    model.zero_grad(set_to_none=True)
    summed_loss(model, x[1:], sgtm_mode=["default", "retain"]).backward()
    for m, g in zip(emb, mixed):
        assert torch.count_nonzero(g) > 0
        torch.testing.assert_close(g, m.weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("split", [True, False])
def test_frozen_forget_rows_use_but_do_not_train_the_forget_units(split):
    model = build("llama", "parameter_masking", split)
    x = ids(n=3)
    masks = model.sgtm_masks
    with torch.no_grad():
        plain = model(input_ids=x).logits
        with masks.gate(["default"] * 3, frozen_forget=[True, True, True]):
            assert torch.equal(model(input_ids=x).logits, plain), "the forward still uses the forget units"
    model.zero_grad(set_to_none=True)
    with masks.gate(["default", "default", "forget"], frozen_forget=[True, False, False]):
        summed_loss(model, x).backward()
    mixed = {s.param_name + str(s.index): s.of(s.param.grad).clone() for s in masks.slices()}
    model.zero_grad(set_to_none=True)
    with masks.gate(["default", "forget"]):  # the frozen row contributes nothing to forget slices
        summed_loss(model, x[1:]).backward()
    checked = 0
    for s in masks.slices("forget"):
        torch.testing.assert_close(mixed[s.param_name + str(s.index)], s.of(s.param.grad), rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked == 2 * 7
