"""Alignment heads: alpha = 0 is the base bitwise, decoding with a KV cache, save/load, base switching."""

from __future__ import annotations

import pytest
import torch

from route.models.heads import (
    AlignedCausalLM,
    ConstantBiasForCausalLM,
    IAVForCausalLM,
    MAVForCausalLM,
    build_head,
    positions_from_mask,
)
from route.models.heads.mav import resolve_layers
from route.models.organism import build_model, build_tokenizer, tiny_config
from tests.fp import assert_close_net64, assert_greedy_tokens, greedy_tolerance

KINDS = ["iav", "mav", "bias"]


def tiny_base(hidden: int = 32, layers: int = 3, seed: int = 0, tie: bool = True):
    tok = build_tokenizer()
    model = build_model(tiny_config(hidden_size=hidden, num_layers=layers, seed=seed), tok)
    if not tie:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model.eval()


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 40, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, :1] = 0
    return ids, mask


def perturb(model: AlignedCausalLM, scale: float = 0.5) -> None:
    """Stand-in for training: move every head parameter."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.head_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def base_logits(base, ids, mask):
    with torch.no_grad():
        return base(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits


@pytest.mark.parametrize("kind", KINDS)
def test_init_and_alpha_zero_are_the_base_bitwise(kind):
    base = tiny_base()
    ids, mask = batch()
    ref = base_logits(base, ids, mask)
    model = build_head(kind, base).eval()
    assert torch.equal(model(ids, attention_mask=mask, alpha=1.0).logits, ref)  # zero-initialised head
    assert torch.equal(model(ids, attention_mask=mask, alpha=2.0).logits, ref)
    perturb(model)
    assert torch.equal(model(ids, attention_mask=mask, alpha=0.0).logits, ref)
    assert not torch.allclose(model(ids, attention_mask=mask, alpha=1.0).logits, ref)
    assert all(not p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_logits_are_base_plus_alpha_times_alignment(kind):
    model = build_head(kind, tiny_base()).eval()
    perturb(model)
    ids, mask = batch()
    one = model(ids, attention_mask=mask, alpha=1.0)
    two = model(ids, attention_mask=mask, alpha=2.0)
    torch.testing.assert_close(two.logits, one.base_logits + 2.0 * one.alignment)
    torch.testing.assert_close(two.logits - one.logits, one.alignment)


def record_steps(model) -> list[torch.Tensor]:
    """From now on, every cached decoding step's own logits are appended to the returned list."""
    recorded, step_of = [], model.decode_step

    def recording(alpha):
        step = step_of(alpha)

        def run(*args):
            logits, past = step(*args)
            recorded.append(logits)
            return logits, past

        return run

    model.decode_step = recording
    return recorded


@pytest.mark.parametrize("kind", ["iav", "mav"])
def test_cached_decoding_matches_full_forward(kind):
    """Each decoded token is an argmax of a full (no-cache) forward over the sequence so far, left padding included.
    The cached and the full forward sum in different orders: float64, and a token within 2 tol of the maximum counts
    (a near-tie, tests/fp.py)."""
    model = build_head(kind, tiny_base()).eval().double()
    perturb(model, 0.2)
    ids, mask = batch()
    recorded = record_steps(model)
    out = model.generate(ids, mask, alpha=1.5, max_new_tokens=6, eos_token_id=None)
    assert out.shape == (3, 15) and len(recorded) == 6
    full_mask = torch.cat([mask, torch.ones(3, 6, dtype=torch.long)], dim=1)
    with torch.no_grad():
        full = model(out, attention_mask=full_mask, alpha=1.5).logits
    assert_close_net64(torch.stack(recorded, dim=1), full[:, 8:-1])
    assert_greedy_tokens(out[:, 9:], full[:, 8:-1], greedy_tolerance(full))


def test_alpha_zero_generation_equals_the_base_generate():
    """alpha = 0 decodes the base model: each step's logits are the base's full forward's (float64, tests/fp.py), every
    token ours decodes is their argmax (up to a near-tie), and so is every token of the base's own `generate`;
    where no step of ours is a near-tie the two decodings must be the same tokens."""
    base = tiny_base().double()
    model = MAVForCausalLM(base).eval()
    perturb(model)
    ids, mask = batch()
    recorded = record_steps(model)
    ours = model.generate(ids, mask, alpha=0.0, max_new_tokens=7, eos_token_id=None)
    theirs = base.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False, eos_token_id=None, min_new_tokens=7
    )
    full_mask = torch.cat([mask, torch.ones(3, 7, dtype=torch.long)], dim=1)
    assert_close_net64(torch.stack(recorded, dim=1), base_logits(base, ours, full_mask)[:, 8:-1])
    margins = []
    for seq in (ours, theirs):
        full = base_logits(base, seq, full_mask)
        margins.append(assert_greedy_tokens(seq[:, 9:], full[:, 8:-1], tol := greedy_tolerance(full)))
    if margins[0] > 2 * tol:
        assert torch.equal(ours, theirs)
    moved = model.generate(ids, mask, alpha=3.0, max_new_tokens=7, eos_token_id=None)
    assert not torch.equal(moved, ours)


@pytest.mark.parametrize("kind", KINDS)
def test_one_base_forward_per_generated_token(kind):
    base = tiny_base()
    model = build_head(kind, base).eval()
    calls, lengths = [], []
    base.model.register_forward_hook(
        lambda m, args, kwargs, out: lengths.append(out.last_hidden_state.shape[1]), with_kwargs=True
    )
    base.register_forward_pre_hook(lambda m, a: calls.append(1))
    ids, mask = batch()
    model.generate(ids, mask, alpha=1.0, max_new_tokens=5, eos_token_id=None)
    assert len(calls) == 5
    assert lengths == [9, 1, 1, 1, 1]  # the prompt once, then one token per step from the KV cache


def test_iav_base_head_frozen_unless_asked():
    frozen = IAVForCausalLM(tiny_base(tie=False))
    assert [id(p) for p in frozen.head_parameters()] == [id(frozen.align_head.weight)]
    assert all(not p.requires_grad for p in frozen.base.parameters())
    trained = IAVForCausalLM(tiny_base(tie=False), train_base_head=True)
    assert {id(p) for p in trained.head_parameters()} == {
        id(trained.align_head.weight),
        id(trained.base.lm_head.weight),
    }
    ids, mask = batch()
    out = trained(ids, attention_mask=mask)
    out.logits.sum().backward()
    assert trained.base.lm_head.weight.grad is not None
    assert torch.equal(out.logits.detach(), base_logits(trained.base, ids, mask))
    with pytest.raises(ValueError, match="train_base_head"):
        IAVForCausalLM(tiny_base(tie=True), train_base_head=True)


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_round_trip(kind, tmp_path):
    base_dir = tmp_path / "base"
    base = tiny_base()
    base.save_pretrained(base_dir)
    model = build_head(kind, base, **({"layers": [0, 2], "fusion_width": 16} if kind == "mav" else {})).eval()
    perturb(model)
    model.save_pretrained(tmp_path / "head", base_name_or_path=str(base_dir))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "head" / "head.safetensors"))
    assert saved and not any(k.startswith("base.") for k in saved)  # the head only, not the base
    loaded = AlignedCausalLM.from_pretrained(tmp_path / "head").eval()  # base reloaded from its recorded path
    assert type(loaded) is type(model)
    ids, mask = batch()
    assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    with pytest.raises(ValueError, match="not"):
        (IAVForCausalLM if kind != "iav" else ConstantBiasForCausalLM).from_pretrained(tmp_path / "head")


def test_mav_moves_to_a_base_of_another_width_and_refuses_another_vocabulary(tmp_path):
    from route.models.heads.train import HeadsTrainConfig, make_trainer

    model = MAVForCausalLM(tiny_base(hidden=32, layers=3), fusion_width=24, dropout=0.0)
    cfg = HeadsTrainConfig(head="mav", n_train=24, steps=3, batch_size=4, learning_rate=5e-2, progress=False)
    make_trainer(model, build_tokenizer(), cfg, tmp_path / "work").train()  # a trained head, not a fresh one
    model.eval()
    model.save_pretrained(tmp_path / "head", base_name_or_path="unused")
    wide = tiny_base(hidden=48, layers=4, seed=3)
    moved = MAVForCausalLM.from_pretrained(tmp_path / "head", base=wide).eval()
    assert moved.layer_ids == [0, 2, 3]  # auto re-resolved on the new base: first, middle, last
    for name, p in model.named_parameters():
        if not name.startswith("base."):
            assert torch.equal(p, dict(moved.named_parameters())[name])
    ids, mask = batch()
    out = moved(ids, attention_mask=mask)
    assert out.logits.shape == (3, 9, model.vocab_size) and out.alignment.abs().sum() > 0
    assert moved.generate(ids, mask, alpha=1.0, max_new_tokens=3, eos_token_id=None).shape == (3, 12)
    other = tiny_base(hidden=48)
    other.resize_token_embeddings(model.vocab_size + 5)
    with pytest.raises(ValueError, match="vocabulary mismatch.*46.*51"):
        MAVForCausalLM.from_pretrained(tmp_path / "head", base=other)


def test_mav_layers_and_settings_validation():
    assert resolve_layers("auto", 12) == [0, 6, 11]
    assert resolve_layers("uniform", 10, num_layers=4) == [0, 3, 6, 9]
    assert resolve_layers([1, -1], 5) == [1, 4]
    with pytest.raises(ValueError, match="layers: index 7"):
        resolve_layers([7], 5)
    with pytest.raises(ValueError, match="layers: invalid value 'all'"):
        MAVForCausalLM(tiny_base(), layers="all")
    with pytest.raises(ValueError, match="dropout"):
        MAVForCausalLM(tiny_base(), dropout=1.5)
    with pytest.raises(ValueError, match="head: invalid value 'lora'"):
        build_head("lora", tiny_base())
    model = MAVForCausalLM(tiny_base(layers=3), layers="uniform", num_layers=3, fusion_width=8)
    assert model.layer_ids == [0, 1, 2] and model.fuse.in_features == 24


def test_mav_dropout_is_active_in_training_and_the_base_stays_in_eval():
    model = MAVForCausalLM(tiny_base(), dropout=0.5)
    perturb(model)
    model.train()
    assert not model.base.training and model.drop.training
    ids, mask = batch()
    a = model(ids, attention_mask=mask).alignment
    b = model(ids, attention_mask=mask).alignment
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(ids, attention_mask=mask).alignment, model(ids, attention_mask=mask).alignment)


def test_two_heads_share_one_base_forward():
    """A kept and a quarantine head over one base: one base forward, each head's alignment from its outputs."""
    base = tiny_base()
    kept, quarantine = IAVForCausalLM(base).eval(), MAVForCausalLM(base, fusion_width=8).eval()
    perturb(kept)
    perturb(quarantine)
    ids, mask = batch()
    z_base, hidden, _ = kept.base_forward(ids, mask)
    a_k, a_q = kept.alignment(hidden, z_base), quarantine.alignment(hidden, z_base)
    torch.testing.assert_close(z_base + a_k, kept(ids, attention_mask=mask).logits)
    torch.testing.assert_close(z_base + 0.5 * a_q, quarantine(ids, attention_mask=mask, alpha=0.5).logits)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_heads_wrap_other_architectures(arch):
    """Not only Llama: learned absolute positions (GPT-2) and Qwen2 decode from the cache like a full forward."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        base = GPT2LMHeadModel(GPT2Config(vocab_size=46, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    else:
        base = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=46,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                intermediate_size=64,
            )
        )
    base.eval()
    ids, mask = batch()
    for kind in ("iav", "mav"):
        model = build_head(kind, base).eval()
        assert torch.equal(model(ids, attention_mask=mask).logits, base_logits(base, ids, mask))
        perturb(model, 0.2)
        model.double()
        out = model.generate(ids, mask, alpha=1.0, max_new_tokens=4, eos_token_id=None)
        full_mask = torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], dim=1)
        with torch.no_grad():
            full = model(out, attention_mask=full_mask).logits
        assert_greedy_tokens(out[:, 9:], full[:, 8:-1], greedy_tolerance(full))  # up to a near-tie (tests/fp.py)
        model.float()
