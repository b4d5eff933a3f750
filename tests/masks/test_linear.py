"""SplitLinearOut / SplitLinearIn / GatedLinear: drop-in nn.Linear behaviour and per-row parameter masks."""

import pytest
import torch
from torch import nn

from route.masks import GatedLinear, RowGate, SplitLinearIn, SplitLinearOut, masked_linear


@pytest.mark.parametrize("bias", [True, False])
def test_split_linear_out_is_a_drop_in_linear(bias):
    torch.manual_seed(0)
    ref = nn.Linear(6, 5, bias=bias)
    after_ref = torch.rand(3)
    torch.manual_seed(0)
    split = SplitLinearOut(6, 5, retain_dim=3, bias=bias)
    after_split = torch.rand(3)
    assert torch.equal(after_ref, after_split), "construction must draw the same random numbers"
    assert sum(p.numel() for p in split.parameters()) == sum(p.numel() for p in ref.parameters())
    assert torch.equal(split.weight, ref.weight) and split.weight_retain.shape == (3, 6)
    assert torch.equal(split.weight_retain, ref.weight[:3]) and torch.equal(split.weight_forget, ref.weight[3:])
    if bias:
        assert torch.equal(split.bias, ref.bias) and torch.equal(split.bias_forget, ref.bias[3:])
    else:
        assert split.bias is None and split.bias_retain is None
    x = torch.randn(2, 4, 6, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    assert torch.equal(split(x), ref(x2))
    g = torch.randn(2, 4, 5)
    split(x).backward(g)
    ref(x2).backward(g)
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(torch.cat([split.weight_retain.grad, split.weight_forget.grad]), ref.weight.grad)
    if bias:
        assert torch.equal(torch.cat([split.bias_retain.grad, split.bias_forget.grad]), ref.bias.grad)


def test_split_linear_in_and_gated_linear_match_linear():
    torch.manual_seed(0)
    ref = nn.Linear(6, 5)
    torch.manual_seed(0)
    split_in = SplitLinearIn(6, 5, retain_dim=4)
    gated = GatedLinear.from_linear(ref, split_dim=1, retain_dim=4)
    assert gated.weight is ref.weight, "GatedLinear shares the wrapped parameters"
    assert torch.equal(split_in.weight, ref.weight) and split_in.weight_forget.shape == (5, 2)
    x = torch.randn(3, 6)
    assert torch.equal(split_in(x), ref(x)) and torch.equal(gated(x), ref(x))


def test_merged_state_dict_keys_load_into_split_modules():
    ref = nn.Linear(6, 5)
    for cls in (SplitLinearOut, SplitLinearIn):
        split = cls(6, 5, retain_dim=2)
        split.load_state_dict(ref.state_dict())
        assert torch.equal(split.weight, ref.weight) and torch.equal(split.bias, ref.bias)
        assert set(split.state_dict()) == ({"weight_retain", "weight_forget", "bias_retain", "bias_forget"}
                                           if cls is SplitLinearOut else {"weight_retain", "weight_forget", "bias"})
        assert torch.equal(split.to_linear().weight, ref.weight)


def test_bad_retain_dim_names_the_field():
    with pytest.raises(ValueError, match="retain_dim"):
        SplitLinearOut(4, 3, retain_dim=5)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("which", ["kept", "rest", "both"])
def test_masked_linear_masks_only_the_chosen_slice_of_blocked_rows(dim, which):
    torch.manual_seed(0)
    w = torch.randn(5, 6, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    x = torch.randn(3, 4, 6, requires_grad=True)
    blocked = torch.tensor([True, False, True])
    g = torch.randn(3, 4, 5)
    rows = blocked if which in ("kept", "both") else None
    rest = ~blocked if which in ("rest", "both") else None
    out = masked_linear(x, w, b, rows, dim=dim, kept=2, rest_rows=rest)
    assert torch.equal(out, torch.nn.functional.linear(x, w, b))
    out.backward(g)
    expect_w, expect_b = torch.zeros_like(w), torch.zeros_like(b)
    for i in range(3):
        gw, gb = torch.autograd.grad(torch.nn.functional.linear(x[i], w, b), (w, b), g[i])
        keep_w, keep_b = torch.ones_like(w), torch.ones_like(b)
        kept_w = (slice(0, 2),) if dim == 0 else (slice(None), slice(0, 2))
        rest_w = (slice(2, None),) if dim == 0 else (slice(None), slice(2, None))
        if rows is not None and not rows[i]:  # no gradient into the kept slice (and its bias)
            keep_w[kept_w] = 0
            keep_b[slice(0, 2) if dim == 0 else slice(None)] = 0
        if rest is not None and not rest[i]:  # none into the rest (an output projection's bias is kept)
            keep_w[rest_w] = 0
            if dim == 0:
                keep_b[2:] = 0
        expect_w, expect_b = expect_w + gw * keep_w, expect_b + gb * keep_b
    torch.testing.assert_close(w.grad, expect_w)
    torch.testing.assert_close(b.grad, expect_b)
    torch.testing.assert_close(x.grad, g @ w.detach(), msg="the input gradient is never masked")


def test_output_projection_gates_its_input_per_row():
    lin = GatedLinear.from_linear(nn.Linear(4, 3, bias=False), split_dim=1, retain_dim=2)
    with torch.no_grad():
        lin.weight.copy_(torch.ones(3, 4))
    x = torch.ones(3, 1, 4)
    lin.row_gate = RowGate.from_modes(["forget", "retain", "default"], strategy="activation_masking")
    out = lin(x)
    assert out[0, 0, 0] == 2 and out[1, 0, 0] == 2 and out[2, 0, 0] == 4  # kept zeroed / forget zeroed / all
    lin.row_gate = RowGate.ablated()
    assert lin(torch.ones(7, 4))[0, 0] == 2, "ablated: forget columns contribute nothing, any batch size"
    lin.row_gate = RowGate.from_modes(["forget", "retain"])
    with pytest.raises(RuntimeError, match="batch size"):
        lin(torch.ones(3, 4))
