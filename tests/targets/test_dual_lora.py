"""dual_lora: forward equivalences, routing invariants after optimizer.step(), ablation and export."""

import contextlib

import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear
from transformers import AutoModelForCausalLM

from route.masks import HookSet, RowGate
from route.masks.optim import build_optimizer
from route.models.organism import build_model, build_tokenizer, tiny_config
from route.targets import make_target
from route.targets.common import plain_name
from route.targets.dual_lora import FusedDualLoraLinear
from tests.fp import assert_close_net64
from tests.targets.helpers import batch, logits, on_grid, sampled_with_logits, teacher_forced


@pytest.fixture
def target():
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tiny_config(init_range=0.2), tok)
    t = make_target("dual_lora", model, keep_rank=4, quarantine_rank=4)
    with torch.no_grad():  # non-zero B so both paths carry signal
        for _, layer in t.layers:
            for name in ("keep", "quarantine"):
                layer.lora_B[name].weight.normal_(0, 0.2)
    return t


def test_forward_unchanged_under_forget_and_default_gates(target):
    """Forget and default rows multiply the rank-space activation by exact 1.0s: the same operations as the ungated
    forward on the same values, so the same logits bit for bit."""
    ids = batch()
    ref = logits(target, ids)
    for modes in (["forget"] * 4, ["default"] * 4, ["forget", "default", "forget", "default"]):
        assert torch.equal(logits(target, ids, target.gate(modes)), ref)


def test_retain_rows_equal_the_ablated_forward(target):
    """A retain row runs the fused rank r_k + r_q product with its quarantine units zeroed, the ablated forward the kept
    rank-r_k product alone: other shapes, so other summation orders; compared in float64 (tests/fp.py). The other rows
    of the mixed batch run the ungated forward's own call on the same values: bit for bit."""
    target.model.double()
    ids = batch()
    ablated = logits(target, ids, target.ablated())
    mixed = logits(target, ids, target.gate(["retain", "default", "retain", "forget"]))
    full = logits(target, ids)
    assert_close_net64(mixed[[0, 2]], ablated[[0, 2]])
    assert torch.equal(mixed[1], full[1]) and torch.equal(mixed[3], full[3])
    assert not torch.allclose(ablated, full, atol=1e-3), "the quarantine must matter for this test to mean anything"


def test_per_row_modes_in_one_batch_equal_separate_batches(target):
    """One gated backward against one backward per row: other summation orders, float64 (tests/fp.py)."""
    target.model.double()
    ids = batch()
    modes = ["forget", "retain", "default", "retain"]
    grads_mixed = _grads(target, ids, modes)
    grads_sep = None
    for i, m in enumerate(modes):
        g = _grads(target, ids[i: i + 1], [m])
        grads_sep = g if grads_sep is None else {k: grads_sep[k] + g[k] for k in g}
    assert grads_mixed.keys() == grads_sep.keys() and len(grads_mixed) > 0
    for k in grads_mixed:
        assert_close_net64(grads_mixed[k], grads_sep[k])


def _grads(t, ids, modes):
    t.model.zero_grad(set_to_none=True)
    with t.gate(modes):
        out = t.model(input_ids=ids).logits.float().logsumexp(-1).sum()
    out.backward()
    return {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in t.model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def _peft_forward_gated_by_hooks(t, modes):
    """The unfused reference: PEFT's own per-adapter LoRA forward, each adapter's output gated by RowGate hooks."""
    gate = RowGate.from_modes(modes, strategy="gradient_routing")
    hooks = []
    for _, layer in t.layers:
        hooks.append((layer.lora_B["keep"], lambda m, a, out: gate.kept(out)))
        hooks.append((layer.lora_B["quarantine"], lambda m, a, out: gate.quarantine(out)))
    for _, layer in t.layers:
        layer.__class__ = LoraLinear
    try:
        with HookSet(hooks):
            yield
    finally:
        for _, layer in t.layers:
            layer.__class__ = FusedDualLoraLinear


@pytest.mark.parametrize("modes", [["forget", "retain", "default", "forget"], ["retain"] * 4, ["default"] * 4, None])
def test_fused_forward_and_grads_equal_peft_per_adapter_reference(modes):
    torch.manual_seed(0)
    model = build_model(tiny_config(init_range=0.2), build_tokenizer())
    t = make_target("dual_lora", model, keep_rank=4, quarantine_rank=3, lora_alpha=8)  # scalings 2 and 8/3
    with torch.no_grad():
        for _, layer in t.layers:
            for name in ("keep", "quarantine"):
                layer.lora_B[name].weight.normal_(0, 0.2)
    t.model.double()  # one fused rank-7 product against PEFT's two: other summation orders (tests/fp.py)
    ids = batch()

    def run(ctx):
        t.model.zero_grad(set_to_none=True)
        with ctx:
            out = t.model(input_ids=ids).logits
        out.float().logsumexp(-1).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}

    fused = run(t.gate(modes) if modes else contextlib.nullcontext())
    ref = run(_peft_forward_gated_by_hooks(t, modes or ["default"] * 4))
    assert_close_net64(fused[0], ref[0])
    assert fused[1].keys() == ref[1].keys() and len(ref[1]) == 4 * len(t.layers)
    for name in ref[1]:
        assert_close_net64(fused[1][name], ref[1][name], msg=name)


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(params, before):
    return [not torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True)]


@pytest.mark.parametrize("mode,keep_moves,quar_moves", [
    ("forget", False, True), ("retain", True, False), ("default", True, True)])
def test_optimizer_step_invariants(target, mode, keep_moves, quar_moves):
    groups = target.param_groups()
    assert groups["keep"] and groups["quarantine"] and not groups["shared"]
    opt = build_optimizer(groups, lr=1e-2, weight_decay=0.01)
    ids = batch()
    # a first default step builds AdamW momentum in every parameter: the trap is that it keeps moving them
    with target.gate(["default"] * 4):
        target.model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    before_k, before_q = _snapshot(groups["keep"]), _snapshot(groups["quarantine"])
    with target.gate([mode] * 4):
        target.model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    changed_k, changed_q = _changed(groups["keep"], before_k), _changed(groups["quarantine"], before_q)
    assert len(changed_k) == len(groups["keep"]) > 0
    assert any(changed_k) == keep_moves and (all(changed_k) or not keep_moves)
    assert any(changed_q) == quar_moves and (all(changed_q) or not quar_moves)


def test_deployed_checkpoint_matches_ablated_forward_and_generation(target, tmp_path):
    """Every weight on a 2**-6 grid, so the export's float32 merge W + B_k A_k is exact (`on_grid`) and the checkpoint
    holds the ablated policy's weights exactly; its forward then differs from the ablated one only in summation order,
    compared in float64 (tests/fp.py). Generation: at every sampled step, both ways round, the sampling distribution of
    one (generate's own logits, KV cache and all, which generate rounds to float32 once) is the other's on the same
    prefix, so the two sample the same policy
    (the tokens themselves could part at a near-tie of the sampling draw on another CPU)."""
    tok = build_tokenizer()
    ids = batch()
    on_grid(target.model)
    before = {n: p.detach().clone() for n, p in target.model.named_parameters()}
    target.save_deployed(str(tmp_path / "deployed"), tokenizer=tok)
    assert all(torch.equal(p, before[n]) for n, p in target.model.named_parameters()), "export touched training weights"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "deployed")
    assert type(plain).__name__ == "LlamaForCausalLM"
    merged = {n: w.double() for n, w in target.deployed_state_dict().items()}
    for name, layer in target.layers:  # the kept adapter merged here, in float64: exact on the grid
        key = f"{plain_name(name)}.weight"
        exact = layer.get_base_layer().weight.double() + layer.lora_B["keep"].weight.double() @ layer.lora_A[
            "keep"].weight.double() * float(layer.scaling["keep"])
        assert torch.equal(merged[key], exact) and torch.equal(plain.state_dict()[key].double(), exact), key
    plain.double()
    target.model.double()
    assert_close_net64(plain(input_ids=ids).logits, logits(target, ids, target.ablated()))
    prompt = tok(["mul 123*4 g=exact>"] * 2, return_tensors="pt")["input_ids"]
    kw = dict(do_sample=True, max_new_tokens=6, top_k=0, pad_token_id=tok.pad_token_id)
    torch.manual_seed(3)
    ours, ours_logits = sampled_with_logits(target.model, prompt, target.ablated(), **kw)
    assert_close_net64(ours_logits, teacher_forced(plain, ours, prompt.shape[1]), rounded_to=torch.float32)
    torch.manual_seed(3)
    theirs, theirs_logits = sampled_with_logits(plain, prompt, **kw)
    assert_close_net64(theirs_logits, teacher_forced(target.model, theirs, prompt.shape[1], target.ablated()),
                       rounded_to=torch.float32)
    assert ours_logits.shape[1] == 6 and ours.shape == theirs.shape


@pytest.mark.parametrize("trainable", [False, True])
def test_ablate_removes_quarantine_only(target, trainable):
    """After `ablate()` the ungated forward runs the fused product with B_q = 0, the ablated one the kept product alone:
    other shapes, compared in float64 (tests/fp.py)."""
    target.model.double()
    ids = batch()
    ablated_before = logits(target, ids, target.ablated())
    keep_before = _snapshot(target.param_groups()["keep"])
    target.ablate(trainable=trainable)
    assert_close_net64(logits(target, ids), ablated_before)
    assert not any(_changed(target.param_groups()["keep"], keep_before))
    layers = target.layers
    assert layers
    for _, layer in layers:
        assert torch.count_nonzero(layer.lora_B["quarantine"].weight) == 0
        a_q = layer.lora_A["quarantine"].weight
        assert a_q.requires_grad == trainable
        assert (torch.count_nonzero(a_q) > 0) == trainable


def test_bad_ranks_raise():
    model = build_model(tiny_config(), build_tokenizer())
    with pytest.raises(ValueError, match="keep_rank"):
        make_target("dual_lora", model, keep_rank=0)
    with pytest.raises(ValueError, match="allowed values"):
        make_target("nope", model)


def test_merged_state_dict_refuses_an_adapter_merged_in_place(target):
    _, layer = target.layers[0]
    layer.merge()
    with pytest.raises(RuntimeError, match="merged into the base weight"):
        target.deployed_state_dict()
    layer.unmerge()
    assert target.deployed_state_dict()
