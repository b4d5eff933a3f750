"""SkipZeroAdamW: a parameter with no (or zero) gradient does not move, momentum and weight decay included."""

import torch
from torch import nn

from route.optim import SkipZeroAdamW, build_optimizer


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
