"""Gradient checkpointing under the per-row gate: checkpointed layers are recomputed in the backward, after the
gate's context has exited; `route.targets.checkpointing` re-enters the forward's gate there. Gradients (and svf's
per-rollout records) with checkpointing equal those without, for every target; setups that cannot do it are refused."""

import pytest
import torch
from torch.utils.checkpoint import CheckpointError
from transformers.modeling_layers import GradientCheckpointingLayer

from route.masks import DEFAULT, FORGET, RETAIN
from route.models.organism import build_model, build_tokenizer, tiny_config
from route.targets import available_targets, check_target, checkpointing, make_target
from route.trainer.parse import build_config
from tests.test_trainer import TINY, make_trainer

MODES = torch.tensor([FORGET, RETAIN, DEFAULT, FORGET, DEFAULT, RETAIN])
SIZES = {"dual_lora": dict(keep_rank=2, quarantine_rank=2), "sgtm": dict(forget_mlp_frac=0.25),
         "svf": dict(rank=8, reserve_axes=[0, 1], progress=False, score_threshold=0.3), "logit_head": {},
         "dual_mlp": dict(keep_units=2, quarantine_units=2)}
GATED_IN_LAYERS = ("dual_lora", "dual_mlp", "sgtm", "svf")  # logit_head gates after the last layer: no recompute


def build(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_config(init_range=0.2, num_layers=2), build_tokenizer())
    kwargs = dict(SIZES[name], cache_dir=tmp_path / "svd") if name == "svf" else SIZES[name]
    target = make_target(name, model, **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero adapters, so every gated path carries gradient
        for n, p in target.model.named_parameters():
            if p.requires_grad and ("lora_" in n or "svf_" in n or "logit_heads" in n or ".route_" in n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return target


def gated_grads(target):
    """Parameter gradients (and svf's per-row records) of one gated forward + backward on a mixed batch."""
    model = target.model.train()
    model.zero_grad(set_to_none=True)
    ids = torch.randint(3, 40, (len(MODES), 10), generator=torch.Generator().manual_seed(2))
    with target.gate(MODES):
        logits = model(input_ids=ids).logits
    logits.float().log_softmax(-1)[..., 5].mean().backward()  # the backward runs after the gate's context
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    recorded = target._recorder.records if hasattr(target, "_recorder") else {}
    records = {i: r.clone() for i, r in recorded.items()}
    return grads, records


def count_recomputes(target) -> list:
    """Wrap `target.recompute_context`; the list grows by one per checkpointed call that captured the gate."""
    entered, original = [], target.recompute_context

    def counted():
        entered.append(1)
        return original()

    target.recompute_context = counted
    return entered


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def unfixed_is_wrong(target, reference, use_reentrant):
    """Plain checkpointing (no gate in the recompute): the backward fails or its gradients differ."""
    target.model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    try:
        grads, _ = gated_grads(target)
    except CheckpointError:  # non-reentrant: the ungated recompute saves other tensors than the forward
        return True
    finally:
        target.model.gradient_checkpointing_disable()
    return not same(grads, reference)


def test_gradients_with_checkpointing_equal_those_without(tmp_path):
    names = available_targets()
    assert names == ["dual_lora", "dual_mlp", "logit_head", "sgtm", "svf"]
    checked = []
    for name in names:
        target = build(name, tmp_path)
        reference, records = gated_grads(target)
        assert len(reference) >= 2, name
        if name == "svf":
            assert records, "svf scoring records per-row delta gradients"
        # the comparison below can fail: without the fix the recompute runs ungated
        if name in GATED_IN_LAYERS:
            assert unfixed_is_wrong(target, reference, use_reentrant=False), name
            assert unfixed_is_wrong(target, reference, use_reentrant=True), name  # silently wrong

        checkpointing.install(target.model, target)
        target.model.gradient_checkpointing_enable()
        layers = [m for m in target.model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert len(layers) == 2 and all(m.gradient_checkpointing for m in layers), name
        entered = count_recomputes(target)
        grads, got = gated_grads(target)
        assert len(entered) == 2, name
        assert same(grads, reference), name
        assert same(got, records), name  # svf: each row's delta gradient recorded once, not again in the recompute
        checked.append(name)
    assert checked == names


def test_refusals(tmp_path):
    base = dict(TINY, output_dir=str(tmp_path / "run"), gradient_checkpointing=True)
    for kwargs in ({"use_reentrant": True}, '{"use_reentrant": true}'):
        with pytest.raises(ValueError, match=r"gradient_checkpointing_kwargs: use_reentrant=True"):
            build_config(**{**base, "gradient_checkpointing_kwargs": kwargs})
    with pytest.raises(ValueError, match=r"gradient_checkpointing, torch_compile"):
        build_config(**{**base, "torch_compile": True})
    build_config(**base)  # non-reentrant (the default) is accepted

    class NoRecompute:
        model = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"target: NoRecompute does not implement .*recompute_context"):
        check_target(NoRecompute())

    target = build("dual_lora", tmp_path)
    target.model.gradient_checkpointing_enable()  # enabled before the gate could be installed
    with pytest.raises(ValueError, match=r"gradient_checkpointing: .* without the routing gate"):
        checkpointing.install(target.model, target)
    target.model.gradient_checkpointing_disable()
    checkpointing.install(target.model, target)
    with pytest.raises(ValueError, match=r"use_reentrant=True"):
        target.model.gradient_checkpointing_enable({"use_reentrant": True})


def length_reward(prompts, completions, **columns):
    """Varied rewards (the tiny organism rarely earns the env's in two steps), so advantages and gradients are live."""
    return [float(len(c)) / 8 for c in completions]


def test_two_step_run_with_checkpointing(tiny_organism, tmp_path):
    runs = []
    for gc in (True, False):
        t = make_trainer(tiny_organism, tmp_path / str(gc), max_steps=2, detector_fpr=0.5, gradient_checkpointing=gc,
                         reward_funcs=[length_reward])
        before = [p.detach().clone() for p in t.target.param_groups()["keep"]]
        entered = count_recomputes(t.target)
        t.train()
        assert t.state.global_step == 2
        assert t.model.is_gradient_checkpointing == gc
        assert bool(entered) == gc  # the recompute ran under the gate
        after = [p.detach().clone() for p in t.target.param_groups()["keep"]]
        assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)), "the kept adapter trains"
        assert any(h.get("routing/frac_forget", 0) > 0 for h in t.state.log_history)
        runs.append(after + [p.detach().clone() for p in t.target.param_groups()["quarantine"]])
    for a, b in zip(*runs, strict=True):  # checkpointing changes memory, not the run
        torch.testing.assert_close(a, b)
