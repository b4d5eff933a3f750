"""SkipZeroAdamW: a parameter with no (or zero) gradient does not move, momentum and weight decay included."""

import torch
from torch import nn

from route.masks.optim import SkipZeroAdamW, build_optimizer
from tests.fp import UNIT_ROUNDOFF, adamw_reference, assert_adamw


def test_zero_grad_parameter_does_not_move_despite_momentum_and_decay():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    opt = build_optimizer({"keep": [a], "quarantine": [b]}, lr=0.1, weight_decay=0.1)
    (a.sum() + b.sum()).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)  # grads are zero tensors, not None: the trap plain AdamW falls into
    b_before, a_before = b.detach().clone(), a.detach().clone()
    (a * 2).sum().backward()
    assert torch.count_nonzero(b.grad) == 0
    opt.step()
    assert torch.equal(b.detach(), b_before), "a zero-gradient parameter moved"
    assert not torch.equal(a.detach(), a_before)
    assert opt.last_grad_norms["quarantine"] == 0.0 and opt.last_grad_norms["keep"] > 0
    assert b.grad is not None, "gradients are restored after the step"


def test_plain_adamw_would_move_it():
    b = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([b], lr=0.1, weight_decay=0.1)
    b.sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    before = b.detach().clone()
    opt.step()
    assert not torch.equal(b.detach(), before)


def test_group_names_and_lr_scale():
    a, b = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
    opt = build_optimizer({"keep": [a], "quarantine": [b], "shared": []}, lr=1e-3, lr_scale={"quarantine": 0.5})
    assert isinstance(opt, SkipZeroAdamW)
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("keep", 1e-3), ("quarantine", 5e-4)]


# ---------------------------------------------------------------- split_moments


def test_split_moments_update_is_adam_with_m_routed_and_v_unrouted():
    """Against AdamW written out in float64 on the same gradients, within the bound of tests/fp.py."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5))
    p0 = p.detach().clone()
    routed = [torch.randn(5) for _ in range(3)]
    unrouted = [g + torch.randn(5) for g in routed]
    opt = build_optimizer({"keep": [p]}, lr=0.05, weight_decay=0.1, split_moments=True)
    for g, u in zip(routed, unrouted, strict=True):
        p.grad, p.unrouted_grad = g.clone(), u.clone()
        opt.step()
        assert p.unrouted_grad is None, "the step consumes the unrouted gradient"
    assert_adamw(p.detach(), p0, routed, lr=0.05, weight_decay=0.1, second=unrouted)
    plain, _ = adamw_reference(p0, routed, lr=0.05, weight_decay=0.1)
    assert not torch.allclose(p.detach().double(), plain, atol=1e-4), "v must come from the unrouted gradient"
    # v: three positive terms, each a product and a scaling, summed in float32: within 4 u per term of the exact sum
    v = sum(0.001 * 0.999 ** (2 - i) * x.double() ** 2 for i, x in enumerate(unrouted))
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"].double(), v, rtol=12 * UNIT_ROUNDOFF[torch.float32], atol=0)


def test_split_moments_parameter_without_unrouted_gradient_is_plain_adamw():
    torch.manual_seed(1)
    a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    ref = nn.Parameter(b.detach().clone())
    opt = build_optimizer({"keep": [a], "quarantine": [b]}, lr=0.05, weight_decay=0.1, split_moments=True)
    plain = build_optimizer({"quarantine": [ref]}, lr=0.05, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(4)
        a.grad, a.unrouted_grad, b.grad, ref.grad = torch.randn(4), torch.randn(4), g.clone(), g.clone()
        opt.step()
        plain.step()
    assert torch.equal(b.detach(), ref.detach()), "no unrouted gradient: exactly SkipZeroAdamW's plain step"


def test_split_moments_clip_is_one_event_for_both_moments():
    """The trainer clips p.grad after `note_preclip`; the unrouted gradient gets the same coefficient."""
    torch.manual_seed(2)
    p, q = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6))
    p0, q0 = p.detach().clone(), q.detach().clone()
    g, u, h = torch.randn(6) * 10, torch.randn(6) * 10, torch.randn(6) * 10
    opt = build_optimizer({"keep": [p], "quarantine": [q]}, lr=0.05, split_moments=True)
    p.grad, p.unrouted_grad, q.grad = g.clone(), u.clone(), h.clone()
    opt.note_preclip()
    norm = torch.nn.utils.clip_grad_norm_([p, q], max_norm=1.0)
    coef = float(torch.clamp(1.0 / (norm + 1e-6), max=1.0))
    assert coef < 0.1
    opt.step()
    # p.grad was multiplied by `coef` itself; the unrouted gradient by the optimizer's ratio of the norms after and
    # before clipping, each a sum of 12 squares (within 7 u once rooted): 16 u from coef in all
    rel = 16 * UNIT_ROUNDOFF[torch.float32]
    assert_adamw(p.detach(), p0, [g * coef], lr=0.05, weight_decay=0.0, second=[u * coef], grad_rel=rel)
    assert_adamw(q.detach(), q0, [h * coef], lr=0.05, weight_decay=0.0, grad_rel=rel)
    # with the unrouted gradient left unclipped the first step would be different
    unclipped, _ = adamw_reference(p0, [g * coef], lr=0.05, weight_decay=0.0, second=[u])
    assert not torch.allclose(p.detach().double(), unclipped)


def test_split_moments_off_is_todays_optimizer_bitwise():
    torch.manual_seed(3)
    a = nn.Parameter(torch.randn(4))
    b = nn.Parameter(a.detach().clone())
    default = build_optimizer({"keep": [a]}, lr=0.05, weight_decay=0.1)
    plain = SkipZeroAdamW([{"params": [b], "name": "keep", "lr": 0.05}], lr=0.05, weight_decay=0.1)
    assert default.split_moments is False
    for _ in range(3):
        g = torch.randn(4)
        a.grad, a.unrouted_grad, b.grad = g.clone(), torch.randn(4), g.clone()  # ignored when off
        default.step()
        plain.step()
    assert torch.equal(a.detach(), b.detach())
