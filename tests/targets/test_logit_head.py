"""logit_head: values and gradients per routing mode, invariants after optimizer.step(), ablation and export."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from route.masks.optim import build_optimizer
from route.models.organism import build_model, build_tokenizer, tiny_config
from route.targets import make_target
from tests.fp import assert_close_net64
from tests.targets.helpers import batch, logits, on_grid


@pytest.fixture
def target():
    torch.manual_seed(0)
    model = build_model(tiny_config(init_range=0.2), build_tokenizer())
    t = make_target("logit_head", model)
    with torch.no_grad():  # non-zero heads so both paths carry signal
        t.heads.keep.weight.normal_(0, 0.2)
        t.heads.quarantine.weight.normal_(0, 0.2)
    return t


def test_only_the_two_heads_train_and_they_start_at_the_base(target):
    groups = target.param_groups()
    assert groups["keep"] == [target.heads.keep.weight] and groups["quarantine"] == [target.heads.quarantine.weight]
    assert not groups["shared"]
    trainable = [n for n, p in target.model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == ["route_logit_heads.keep.weight", "route_logit_heads.quarantine.weight"]
    fresh = make_target("logit_head", build_model(tiny_config(init_range=0.2), build_tokenizer()))
    ids = batch()
    with torch.no_grad():
        fresh.heads.route_gate = None
        base = fresh.model.get_output_embeddings()  # zero heads: the logits are the base's bitwise
        h = fresh.model.model(input_ids=ids).last_hidden_state
        assert torch.equal(logits(fresh, ids), base(h))


def test_forget_and_default_keep_values_retain_drops_the_quarantine(target):
    ids = batch()
    full, ablated = logits(target, ids), logits(target, ids, target.ablated())
    assert not torch.allclose(full, ablated)
    for modes in (["forget"] * 4, ["default"] * 4):
        assert torch.equal(logits(target, ids, target.gate(modes)), full)
    mixed = logits(target, ids, target.gate(["retain", "default", "retain", "forget"]))
    assert torch.equal(mixed[0], ablated[0]) and torch.equal(mixed[2], ablated[2])
    assert torch.equal(mixed[1], full[1]) and torch.equal(mixed[3], full[3])


MOVES = {"forget": (False, True), "retain": (True, False), "default": (True, True)}


@pytest.mark.parametrize("mode", list(MOVES))
def test_which_head_moves_after_optimizer_step(target, mode):
    opt = build_optimizer(target.param_groups(), lr=1e-2, weight_decay=0.01)
    ids = batch()
    for step in range(2):  # the first step builds AdamW momentum in both heads (the trap)
        with target.gate(["default" if step == 0 else mode] * 4):
            loss = target.model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 1:
            before = {k: getattr(target.heads, k).weight.detach().clone() for k in ("keep", "quarantine")}
        opt.step()
        opt.zero_grad(set_to_none=True)
    keep_moves, quar_moves = MOVES[mode]
    assert (not torch.equal(target.heads.keep.weight, before["keep"])) == keep_moves
    assert (not torch.equal(target.heads.quarantine.weight, before["quarantine"])) == quar_moves


def test_ablate_and_export_a_plain_untied_checkpoint(target, tmp_path):
    """Every weight on a 2**-6 grid, so the export's float32 merge of the heads into the vocabulary head is exact
    (`on_grid`); the checkpoint's forward then differs from the target's only in summation order: float64 (tests/fp.py).
    After `ablate()` the same operations as the ablated forward (a zero head added): bit for bit."""
    on_grid(target.model)
    target.model.double()
    ids = batch()
    deployed = logits(target, ids, target.ablated())
    weights = {k: v.clone() for k, v in target.model.state_dict().items() if not k.startswith("route_logit_heads")}
    target.save_deployed(str(tmp_path / "dep"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dep").double()
    assert_close_net64(plain(input_ids=ids).logits, deployed)
    assert plain.get_output_embeddings().weight is not plain.get_input_embeddings().weight  # untied on export
    sd = target.merged_state_dict(quarantine=True)
    with torch.no_grad():
        full = logits(target, ids)
    plain.load_state_dict(sd, strict=False)
    assert_close_net64(plain(input_ids=ids).logits, full)
    for k, v in target.model.state_dict().items():  # the export never touched the training weights
        if k in weights:
            assert torch.equal(v, weights[k]), k
    target.ablate()
    assert torch.equal(logits(target, ids), deployed)
    assert not target.heads.quarantine.weight.requires_grad and not target.param_groups()["quarantine"]
