"""Gradient functions, swap_gradients, masked optimizer steps and the two-pass step, on randomised models.
Optimizer invariants are checked on the weights after `optimizer.step()`."""

import copy

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2ForCausalLM

from route.models.tiered import (
    PermutationKey,
    apply_key,
    keyed_masks,
    mask_keyed_gradients,
    mask_public_gradients,
    masked_step,
    public_masks,
    scale_public_gradients,
    swap_gradients,
    unapply_key,
)
from route.models.tiered.train import lm_loss, two_pass_step
from tests.fp import UNIT_ROUNDOFF, gamma
from tests.tiny_sgtm import ids, llama_config, randomize

KEY = PermutationKey.from_dict(
    {
        "attn_heads": [[[0, 1], [1, 0]]],
        "mlp_cols": [[[0, 3], [1, 60]], [[1, 5], [0, 7]]],
        "attn_out_heads": [[[0, 0], [1, 1]]],
        "mlp_up_cols": [[[0, 9], [1, 9]]],
        "mlp_down_cols": [[[1, 20], [0, 21]]],
    }
)


def qwen(seed=0):
    torch.manual_seed(seed)
    return randomize(Qwen2ForCausalLM(llama_config(qwen=True)), seed=seed, std=0.1)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_masking_and_scaling_hit_exactly_the_keyed_or_public_entries():
    model = qwen()
    masks = keyed_masks(model, KEY)
    by_name = {n: masks.get(p) for n, p in model.named_parameters()}
    assert sum(m is not None for m in by_name.values()) >= 14 and by_name["model.embed_tokens.weight"] is None
    assert by_name["model.layers.0.self_attn.o_proj.weight"].all(), "two head fields cover this projection"
    lm_loss(model, ids()).backward()
    g = grads(model)
    assert len(g) == len(by_name)
    scale_public_gradients(model, KEY, 0.5)
    for n, p in model.named_parameters():
        m = by_name[n]
        expected = g[n] * 0.5 if m is None else torch.where(m, g[n], g[n] * 0.5)
        assert torch.equal(p.grad, expected), f"{n}: public entries scaled once, keyed ones left alone"
    model.zero_grad(set_to_none=True)
    lm_loss(model, ids()).backward()
    mask_keyed_gradients(model, KEY)
    for n, p in model.named_parameters():
        m = by_name[n]
        if m is not None and m.all():
            assert p.grad is None, f"{n}: wholly keyed, its gradient is dropped"
        else:
            assert torch.equal(p.grad, g[n] if m is None else g[n].masked_fill(m, 0)), n
    model.zero_grad(set_to_none=True)
    lm_loss(model, ids()).backward()
    mask_public_gradients(model, KEY)
    for n, p in model.named_parameters():
        m = by_name[n]
        if m is None:
            assert p.grad is None, f"{n}: wholly public, its gradient is dropped (so optimizers skip it)"
        else:
            assert torch.equal(p.grad, g[n].masked_fill(~m, 0)), n


def test_a_slot_in_two_fields_is_refused_so_no_gradient_is_scaled_twice():
    model = qwen()
    twice = PermutationKey.from_dict({"mlp_cols": [[[0, 3], [1, 4]]], "mlp_down_cols": [[[0, 3], [1, 8]]]})
    with pytest.raises(ValueError, match="used twice"):
        scale_public_gradients(model, twice)


def test_gradients_must_follow_the_weights_after_a_public_layout_backward():
    """SGD on a gradient computed in the public layout: stepping in the keyed layout gives the public-layout step
    only when the gradients were swapped with the weights."""
    model = qwen()
    reference = copy.deepcopy(model)
    lm_loss(reference, ids()).backward()  # e.g. a KL term: an unmasked gradient in the public layout
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    assert any(not torch.equal(a, b) for a, b in zip(weights(reference).values(), weights(model).values()))
    for swap in (True, False):
        m = copy.deepcopy(model)
        lm_loss(m, ids()).backward()
        apply_key(m, KEY)
        if swap:
            swap_gradients(m, KEY)
        torch.optim.SGD(m.parameters(), lr=0.1).step()
        unapply_key(m, KEY)
        same = all(torch.equal(a, b) for a, b in zip(weights(m).values(), weights(reference).values()))
        assert same == swap


def test_masked_steps_never_move_what_a_pass_must_not_touch():
    model = qwen()
    masks = keyed_masks(model, KEY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    lm_loss(model, ids(seed=1)).backward()  # a first full step: every entry gets momentum
    opt.step()
    opt.zero_grad(set_to_none=True)
    trap = copy.deepcopy(model)  # the trap: zero gradients, plain step
    trap_opt = torch.optim.AdamW(trap.parameters(), lr=1e-2, weight_decay=0.1)
    trap_opt.load_state_dict(opt.state_dict())
    lm_loss(trap, ids(seed=2)).backward()
    mask_keyed_gradients(trap, KEY)
    before = weights(trap)
    trap_opt.step()
    trap_masks = keyed_masks(trap, KEY)
    assert any(
        not torch.equal(p.detach()[m], before[n][m])
        for n, p in trap.named_parameters()
        if (m := trap_masks.get(p)) is not None
    ), "AdamW moves zero-gradient entries (what masked_step fixes)"
    for frozen_name in ("keyed", "public"):
        frozen = masks if frozen_name == "keyed" else public_masks(model, masks)
        before = weights(model)
        lm_loss(model, ids(seed=3)).backward()
        (mask_keyed_gradients if frozen_name == "keyed" else mask_public_gradients)(model, KEY, masks)
        masked_step(opt, frozen)
        opt.zero_grad(set_to_none=True)
        moved_any = False
        for n, p in model.named_parameters():
            f = frozen.get(p)
            if f is None or not f.any():
                moved_any |= not torch.equal(p.detach(), before[n])
                continue
            assert torch.equal(p.detach()[f], before[n][f]), f"{frozen_name} pass moved frozen entries of {n}"
            moved_any |= not torch.equal(p.detach()[~f], before[n][~f])
        assert moved_any, f"the {frozen_name}-frozen step moved nothing"


def test_two_pass_step_updates_keyed_entries_from_the_keyed_pass_and_public_ones_from_the_mean():
    model = qwen()
    pub, key_batch = ids(seed=4), ids(seed=5)
    masks = keyed_masks(model, KEY)
    g_public = copy.deepcopy(model)
    lm_loss(g_public, pub).backward()
    g_keyed = apply_key(copy.deepcopy(model), KEY)
    lm_loss(g_keyed, key_batch).backward()
    unapply_key(g_keyed, KEY)
    swap_gradients(g_keyed, KEY)  # the keyed pass's gradient, moved back to the public layout
    before = weights(model)
    two_pass_step(model, KEY, torch.optim.SGD(model.parameters(), lr=1.0), pub, key_batch, masks=masks, grad_clip=None)
    after = weights(model)
    for (n, p), gp, gk in zip(model.named_parameters(), g_public.parameters(), g_keyed.parameters(), strict=True):
        m = masks.get(p)
        expected = (gp.grad + gk.grad) * 0.5 if m is None else torch.where(m, gk.grad, (gp.grad + gk.grad) * 0.5)
        torch.testing.assert_close(before[n] - after[n], expected, rtol=1e-5, atol=1e-7, msg=n)


def _llama():
    torch.manual_seed(0)
    return randomize(LlamaForCausalLM(llama_config()), seed=6, std=0.1)


def _layout_runs(steps: int, grad_clip: float | None) -> dict:
    runs = {}
    for layout in ("public", "keyed"):
        model = _llama()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        norms = [
            two_pass_step(model, KEY, opt, ids(seed=10 + s), ids(seed=20 + s), grad_clip=grad_clip, layout=layout)[
                "grad_norm"
            ]
            for s in range(steps)
        ]
        runs[layout] = (model, opt, norms)
    return runs


def test_stepping_in_either_layout_gives_the_same_weights_for_a_fixed_key():
    """Without clipping both layouts run the same floating-point operations on the same values: the two passes are the
    same computation, gradients and weights move between layouts by copies, and AdamW is elementwise (on CPU one tensor
    at a time). Every keyed parameter's size is a multiple of 64, so no entry moves between a kernel's vectorised body
    and its scalar tail. So three steps agree bit for bit, while the runs keep AdamW's moments in different layouts."""
    runs = _layout_runs(3, grad_clip=None)
    (public, opt_p, norms), (keyed, opt_k, _) = runs["public"], runs["keyed"]
    masks = keyed_masks(public, KEY)
    assert all(p.numel() % 64 == 0 for p in masks)
    start, decay = weights(_llama()), (1 - 1e-2 * 0.1) ** 3
    assert all(n > 0.1 for n in norms), "every step had a gradient"
    assert all(not torch.allclose(a, start[n] * decay) for n, a in weights(public).items()), "more than weight decay"
    for (n, a), b in zip(weights(public).items(), keyed.parameters(), strict=True):
        assert torch.equal(a, b), n
    moments = [
        torch.equal(opt_p.state[p]["exp_avg"], opt_k.state[q]["exp_avg"])
        for p, q in zip(public.parameters(), keyed.parameters(), strict=True)
        if p in masks
    ]
    assert len(moments) >= 8 and not all(moments), "the keyed run keeps its moments in the keyed layout"
    with pytest.raises(ValueError, match="layout.*allowed values"):
        two_pass_step(LlamaForCausalLM(llama_config()), KEY, None, ids(), ids(), layout="C2")


def test_clipping_in_either_layout_differs_only_by_the_norms_summation_order():
    """With clipping, the clip norm sums every gradient entry's square in an order that follows the layout, so the two
    norms may differ: by at most 2 gamma(N) of the norm, N the number of terms (tests/fp.py), halved by the square
    root. One AdamW step then moves a weight by lr * c g / (c |g| + eps) for a clip coefficient c; its derivative in c
    is at most lr / (4 c), so the weights differ by at most lr / 4 times the coefficients' relative difference (plus
    the last-bit rounding of the update itself, 8 u of the weight). Compared after one step, before later steps could
    magnify it (Adam's update is sign-like for gradients near eps)."""
    runs = _layout_runs(1, grad_clip=0.5)
    (public, _, [n_p]), (keyed, _, [n_k]) = runs["public"], runs["keyed"]
    terms = sum(p.numel() for p in public.parameters()) + len(list(public.parameters()))
    rel = gamma(terms, torch.float32)  # (2 gamma) / 2 for the square root
    assert n_p > 0.5 and abs(n_p - n_k) <= rel * n_p, (n_p, n_k, rel)
    lr, coefficient_rel = 1e-2, rel + 2 * UNIT_ROUNDOFF[torch.float32]  # c = 0.5 / (norm + 1e-6), rounded
    moved = 0
    start = weights(_llama())
    for (n, a), b in zip(weights(public).items(), keyed.parameters(), strict=True):
        torch.testing.assert_close(b.detach(), a, atol=lr * coefficient_rel / 4, rtol=8 * UNIT_ROUNDOFF[torch.float32])
        moved += int(not torch.equal(a, start[n]))
    assert moved == len(start), "one clipped step moves every tensor"


def test_keyed_only_rows_never_reach_the_public_parameters():
    """Two steps from the same weights whose keyed batches differ only in the keyed-only rows: the public entries
    end identical (those rows sent them nothing), the keyed entries differ; the loss is the batch mean either way."""
    pub, keyed_batch = ids(seed=4), ids(seed=5)
    other = keyed_batch.clone()
    other[:2] = ids(n=2, seed=9)
    only = torch.tensor([True, True, False, False])
    runs = []
    for batch in (keyed_batch, other):
        model = qwen()
        masks = keyed_masks(model, KEY)
        out = two_pass_step(
            model,
            KEY,
            torch.optim.SGD(model.parameters(), lr=1.0),
            pub,
            batch,
            masks=masks,
            grad_clip=None,
            keyed_only_rows=only,
        )
        runs.append((weights(model), masks, model, out))
    (w1, masks, model, out), (w2, *_rest) = runs
    keyed_moved = False
    for n, p in model.named_parameters():
        m = masks.get(p)
        public = torch.ones_like(p, dtype=torch.bool) if m is None else ~m
        torch.testing.assert_close(w1[n][public], w2[n][public], rtol=1e-6, atol=1e-7, msg=n)
        if m is not None:
            keyed_moved |= not torch.allclose(w1[n][m], w2[n][m])
    assert keyed_moved, "the keyed-only rows train the keyed parameters"
    with torch.no_grad():
        full = lm_loss(apply_key(qwen(), KEY), keyed_batch)
    assert out["keyed_loss"] == pytest.approx(float(full), rel=1e-5)


def test_keyed_rows_public_scale_interpolates_between_keyed_only_and_the_seed():
    """SGD without clipping is linear in the gradient: with the keyed-only rows' public share s, every public
    entry moves by (1 - s) x its keyed-only step + s x its seed step; the keyed entries move the same for every s."""
    pub, batch, only = ids(seed=4), ids(seed=5), torch.tensor([True, True, False, False])
    start = weights(qwen())
    moved = {}
    for s in (0.0, 0.25, 1.0):
        model = qwen()
        masks = keyed_masks(model, KEY)
        rows = None if s == 1.0 else only  # 1.0: the seed's keyed pass, no rows singled out
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        two_pass_step(
            model, KEY, opt, pub, batch, masks=masks, grad_clip=None, keyed_only_rows=rows, keyed_rows_public_scale=s
        )
        moved[s] = {n: w - start[n] for n, w in weights(model).items()}
    checked = 0
    for n, p in model.named_parameters():
        m = masks.get(p)
        public = torch.ones_like(p, dtype=torch.bool) if m is None else ~m
        want = 0.75 * moved[0.0][n] + 0.25 * moved[1.0][n]
        torch.testing.assert_close(moved[0.25][n][public], want[public], rtol=1e-4, atol=1e-6, msg=n)
        if m is not None:
            torch.testing.assert_close(moved[0.25][n][m], moved[0.0][n][m], rtol=1e-4, atol=1e-6, msg=n)
            torch.testing.assert_close(moved[1.0][n][m], moved[0.0][n][m], rtol=1e-4, atol=1e-6, msg=n)
        checked += 1
    assert checked == len(start)
    assert any(not torch.allclose(moved[0.0][n], moved[1.0][n]) for n in start), "the share changes the step"
