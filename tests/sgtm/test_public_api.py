"""The GPT-Neo SGTM model has the public SGTM model's parameters, and its trainable ablation re-initialises
every forget slice at the retain slices' scale for every strategy and weight layout.

Source of the public layout: the SGTM seed (shared/seeds/003_c626c86c2334fa62.txt) fixes the class
names (`GPTNeoForCausalLMSGTM` on `GPTNeoModelSGTM` / `GPTNeoBlockSGTM`, i.e. transformers' GPT-Neo module
tree) and says that `split_masked_weights=True` keeps retain and forget weights "in separate parameters" via
`SplitLinearOut` (q/k/v and the MLP input projection); the issue that filed this work (issue 15) adds that
the public model's `lm_head` carries a bias. The expected names below are built from those facts only.
"""

import pytest
import torch

from route.masks import available_strategies
from route.models.sgtm import GPTNeoForCausalLMSGTM
from tests.tiny_sgtm import gpt_neo_config, ids, randomize

SIZES = dict(retain_mlp_dim=40, retain_attn_heads=2)


def public_layout(num_layers: int, split: bool) -> dict[str, list[str]]:
    """Parameter names of the public model by split (tied lm_head.weight is the embedding, listed once)."""
    joint = [
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
        "lm_head.bias",
    ]
    forget, retain = [], []
    for i in range(num_layers):
        h = f"transformer.h.{i}."
        joint += [
            h + "ln_1.weight",
            h + "ln_1.bias",
            h + "ln_2.weight",
            h + "ln_2.bias",
            h + "attn.attention.out_proj.weight",
            h + "attn.attention.out_proj.bias",
            h + "mlp.c_proj.weight",
            h + "mlp.c_proj.bias",
        ]
        split_params = [h + f"attn.attention.{x}_proj.weight" for x in "qkv"] + [
            h + "mlp.c_fc.weight",
            h + "mlp.c_fc.bias",
        ]
        if split:
            for n in split_params:
                stem, leaf = n.rsplit(".", 1)
                forget.append(f"{stem}.{leaf}_forget")
                retain.append(f"{stem}.{leaf}_retain")
        else:
            joint += split_params
    return {"forget": forget, "retain": retain, "joint": joint}


def test_parameters_match_the_public_model_layout():
    model = GPTNeoForCausalLMSGTM(gpt_neo_config(**SIZES, split_masked_weights=True))
    expected = public_layout(2, split=True)
    for split, names in expected.items():
        got = [n for n, _ in model.named_parameters_split(sgtm_split=split)]
        assert sorted(got) == sorted(names), split
    assert len(expected["joint"]) == 5 + 2 * 8 and len(expected["forget"]) == 2 * 5
    assert sorted(n for n, _ in model.named_parameters()) == sorted(n for v in expected.values() for n in v)
    counts = {s: sum(p.numel() for _, p in model.named_parameters_split(s)) for s in expected}
    assert (
        counts["joint"] - sum(p.numel() for n, p in model.named_parameters_split("joint") if n != "lm_head.bias")
        == model.config.vocab_size
    ), "the head bias is counted in the joint split"
    unsplit = GPTNeoForCausalLMSGTM(gpt_neo_config(**SIZES))
    assert sorted(n for n, _ in unsplit.named_parameters()) == sorted(public_layout(2, split=False)["joint"])


def test_head_bias_starts_at_zero_and_blocks_vanilla_export_once_trained():
    torch.manual_seed(0)
    model = GPTNeoForCausalLMSGTM(gpt_neo_config(**SIZES))
    assert model.lm_head.bias is not None and not model.lm_head.bias.any()
    x = ids()
    torch.testing.assert_close(model.to_vanilla()(input_ids=x).logits, model(input_ids=x).logits)
    with torch.no_grad():
        model.lm_head.bias.add_(0.5)
    with pytest.raises(ValueError, match="lm_head_bias=False"):
        model.to_vanilla()
    plain = GPTNeoForCausalLMSGTM(gpt_neo_config(**SIZES, lm_head_bias=False))
    assert plain.lm_head.bias is None and "lm_head.bias" not in dict(plain.named_parameters())


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("strategy", available_strategies())
def test_trainable_ablation_redraws_every_forget_slice_at_the_retain_scale(strategy, split):
    torch.manual_seed(0)
    model = GPTNeoForCausalLMSGTM(gpt_neo_config(**SIZES, masking_strategy=strategy, split_masked_weights=split))
    randomize(model, seed=1, std=0.3)
    with torch.no_grad():  # forget slices far off the retain scale, so a slice left alone fails the scale check
        for s in model.sgtm_masks.slices("forget"):
            s.of(s.param.data).mul_(10.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = model.sgtm_masks
    retain = {(s.module, s.part): s for s in masks.slices("retain")}
    model.ablate(trainable=True)
    parts = set()
    for s in masks.slices("forget"):
        new, old = s.of(s.param.data), s.of(before[s.param_name])
        ref = retain[(s.module, s.part)]
        ref_std = ref.of(ref.param.data).std().item()
        assert not torch.equal(new, old), f"{s.param_name} [{s.part}] was not re-initialised"
        assert 0.6 * ref_std < new.std().item() < 1.6 * ref_std, f"{s.param_name} [{s.part}] off the retain scale"
        assert abs(new.mean().item()) < 0.5 * ref_std
        assert s.param.requires_grad
        parts.add(s.part)
    assert parts == {"in_weight", "in_bias", "out_weight"}, "every kind of forget slice was checked"
    for s in masks.slices("retain"):
        assert torch.equal(s.of(s.param.data), s.of(before[s.param_name])), f"{s.param_name}: retain slice moved"
    forget_names = {s.param_name for s in masks.slices("forget")}
    for n, p in model.named_parameters():
        if n not in forget_names:
            assert torch.equal(p.detach(), before[n]), f"{n} moved"
