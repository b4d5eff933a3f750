"""The shared gating core: mode encoding, RowGate values and gradients, HookSet cleanup."""

import pytest
import torch
from torch import nn

from route.masks import DEFAULT, EXCLUSIVE, FORGET, RETAIN, HookSet, RowGate, encode_modes


def test_encode_modes_names_codes_and_errors():
    assert encode_modes(["forget", "retain", "default", "exclusive"]).tolist() == [FORGET, RETAIN, DEFAULT, EXCLUSIVE]
    assert encode_modes("retain", batch_size=3).tolist() == [RETAIN] * 3
    assert encode_modes(torch.tensor([2, 0])).tolist() == [DEFAULT, FORGET]
    with pytest.raises(ValueError, match="allowed values"):
        encode_modes(["forget", "quarantine"])
    with pytest.raises(ValueError, match="codes"):
        encode_modes(torch.tensor([4]))


@pytest.mark.parametrize("mode", ["forget", "retain", "default"])
def test_row_gate_values_and_gradients(mode):
    kept = torch.randn(2, 3, 4, requires_grad=True)
    quar = torch.randn(2, 3, 4, requires_grad=True)
    gate = RowGate.from_modes([mode, "default"])
    out = gate.kept(kept) + gate.quarantine(quar)
    expected_row0 = kept[0] + (0 if mode == "retain" else quar[0])
    assert torch.equal(out[0], expected_row0)
    assert torch.equal(out[1], kept[1] + quar[1])
    out.sum().backward()
    assert torch.equal(kept.grad[0], torch.full((3, 4), 0.0 if mode == "forget" else 1.0))
    assert torch.equal(quar.grad[0], torch.full((3, 4), 0.0 if mode == "retain" else 1.0))
    assert torch.equal(kept.grad[1], torch.ones(3, 4)) and torch.equal(quar.grad[1], torch.ones(3, 4))


def test_ablated_gate_drops_quarantine_for_any_batch_size():
    gate = RowGate.ablated()
    y = torch.randn(5, 2)
    assert torch.equal(gate.kept(y), y)
    assert torch.equal(gate.quarantine(y), torch.zeros_like(y))


def test_gate_rejects_mismatched_batch():
    with pytest.raises(RuntimeError, match="batch size"):
        RowGate.from_modes(["forget", "retain"]).kept(torch.randn(3, 2))


def test_hookset_removes_exactly_its_hooks():
    layer = nn.Linear(2, 2)
    keep = layer.register_forward_hook(lambda m, a, o: o)
    with HookSet([(layer, lambda m, a, o: o * 0)]):
        assert len(layer._forward_hooks) == 2
        assert torch.equal(layer(torch.ones(1, 2)), torch.zeros(1, 2))
    assert list(layer._forward_hooks) == [keep.id]
    with pytest.raises(KeyError), HookSet([(layer, lambda m, a, o: o)]):
        raise KeyError("boom")
    assert list(layer._forward_hooks) == [keep.id]


def test_unit_masks_match_the_split_rule_per_row():
    like = torch.zeros(3, 7, 5)  # rows forget, retain, default; units [kept 2 | quarantine 3]
    value, grad = RowGate.from_modes(["forget", "retain", "default"]).unit_masks(2, 5, like=like)
    assert value.shape == grad.shape == (3, 1, 5)
    assert value.squeeze(1).tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert grad.squeeze(1).tolist() == [[0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    value, _ = RowGate.from_modes(["forget", "default"], strategy="activation_masking").unit_masks(2, 5, like[:2])
    assert value.squeeze(1).tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert RowGate.from_modes("default", batch_size=3).unit_masks(2, 5, like) == (None, None)
    value, grad = RowGate.ablated().unit_masks(2, 5, like)
    assert value.squeeze(1).tolist() == [[1, 1, 0, 0, 0]] * 3 and grad is None
    with pytest.raises(RuntimeError, match="row modes"):
        RowGate.from_modes(["forget", "retain"]).unit_masks(2, 5, like)
    with pytest.raises(ValueError, match="masked_linear"):
        RowGate.from_modes(["forget"], strategy="parameter_masking").unit_masks(2, 5, like[:1])
