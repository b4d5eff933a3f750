"""Routing variants (`routing`, `route_weight`, `route_clamp`): each group's gradient and step against the formula.

On targets with one gated layer the table of docs/targets.md#routing-variants is exact: a row's gradient into the
kept (quarantine) parameters is its ordinary gradient times c_k (c_q) of its mode. The reference runs one ungated
backward per row and combines them by the table; the gated run does one backward for the whole batch. The two sum in
different orders, so they are compared in float64 (tests/fp.py); the step is checked against AdamW's formula on the
routed gradient itself.
"""


import pytest
import torch

from route.masks import RowGate
from route.masks.optim import build_optimizer
from route.models.organism import build_model, build_tokenizer, tiny_config
from route.targets import available_targets, make_target
from route.trainer.policy import routing_modes
from tests.fp import assert_adamw, assert_close_net64, dot_tolerance
from tests.targets.helpers import batch

FLAGS = [True, False, True, False]
IDS = [f"r{i}" for i in range(len(FLAGS))]
WEIGHTS = (0.0, 0.5, 1.0, 2.0)
CASES = [(routing, w) for routing in ("classic", "exclusive") for w in WEIGHTS]
EXCLUDED = {  # registered targets left out of this matrix, each with its reason
    "sgtm": "its default strategy (the SGTM seed's parameter masking) refuses soft routing (route_weight must be 1) "
    "and routes by the seed's masking rule, not this table (tests/targets/test_sgtm.py covers it)",
}


def _dual_lora(model):
    t = make_target("dual_lora", model, keep_rank=4, quarantine_rank=4, target_modules=["down_proj"])
    with torch.no_grad():
        for _, layer in t.layers:
            for adapter in ("keep", "quarantine"):
                layer.lora_B[adapter].weight.normal_(0, 0.2)
    return t


def _dual_mlp(model):
    t = make_target("dual_mlp", model, keep_units=4, quarantine_units=3)
    with torch.no_grad():  # output columns start at zero: give them values so every unit carries gradient
        for ps in t.param_groups().values():
            for p in ps:
                p.normal_(0, 0.2)
    return t


def _svf(model):
    return make_target("svf", model, rank=None, target_modules=["down_proj"], reserve_axes=[0, 1], progress=False)


def _logit_head(model):
    t = make_target("logit_head", model)
    with torch.no_grad():
        t.heads.keep.weight.normal_(0, 0.2)
        t.heads.quarantine.weight.normal_(0, 0.2)
    return t


BUILDERS = {"dual_lora": _dual_lora, "dual_mlp": _dual_mlp, "svf": _svf, "logit_head": _logit_head}
NAMES = sorted(BUILDERS)


def test_every_target_is_in_the_matrix_or_excluded_with_its_reason():
    """A newly registered target fails here until it gets a builder (joining the matrix) or a reason to stay out."""
    assert sorted([*BUILDERS, *EXCLUDED]) == available_targets() and not set(BUILDERS) & set(EXCLUDED)


def build(name: str, dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    t = BUILDERS[name](build_model(tiny_config(init_range=0.2), build_tokenizer()))  # one decoder layer
    t.model.to(dtype)
    return t


def row_loss(t, ids):
    return t.model(input_ids=ids, labels=ids).loss * ids.shape[0]  # a sum over rows: rows add up


def grads(t) -> dict[str, list[torch.Tensor]]:
    return {k: [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in ps]
            for k, ps in t.param_groups().items() if k != "shared"}


def coefficients(mode: str, weight: float) -> tuple[float, float]:
    """(c_k, c_q) of docs/targets.md#routing-variants."""
    return {"forget": (1.0 - weight, 1.0), "default": (1.0, 1.0), "exclusive": (1.0, 0.0)}[mode]


def reference(t, ids, modes: list[str], weight: float) -> dict[str, list[torch.Tensor]]:
    total = None
    for b, mode in enumerate(modes):
        t.model.zero_grad(set_to_none=True)
        row_loss(t, ids[b : b + 1]).backward()  # ungated: the ordinary gradient of row b
        c = dict(zip(("keep", "quarantine"), coefficients(mode, weight), strict=True))
        g = {k: [c[k] * x for x in v] for k, v in grads(t).items()}
        total = g if total is None else {k: [a + x for a, x in zip(total[k], g[k])] for k in g}
    t.model.zero_grad(set_to_none=True)
    return total


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("routing", "weight"), CASES)
def test_group_gradients_and_step_follow_the_table(name, routing, weight):
    t = build(name, torch.float64)
    codes = routing_modes(FLAGS, IDS, intervention="route", routing=routing)
    modes = [("forget", "retain", "default", "exclusive")[c] for c in codes.tolist()]
    assert modes[0] == "forget" and modes[1] == ("exclusive" if routing == "exclusive" else "default")
    ids = batch(len(FLAGS))
    expected = reference(t, ids, modes, weight)

    t.set_soft_routing(weight)
    with t.gate(codes):
        row_loss(t, ids).backward()
    got = grads(t)
    compared = 0
    for group in ("keep", "quarantine"):
        for g, e in zip(got[group], expected[group], strict=True):
            assert_close_net64(g, e)
            compared += 1
    assert compared == sum(len(t.param_groups()[k]) for k in ("keep", "quarantine")) > 0
    if weight == 1.0:
        assert any(bool(g.abs().sum() > 0) for g in got["keep"])  # unflagged rows still train the kept part
    # the step: SkipZeroAdamW's first step on the routed gradients, parameter by parameter; one without gradient stays
    groups = {k: t.param_groups()[k] for k in ("keep", "quarantine")}
    before = {k: [p.detach().clone() for p in ps] for k, ps in groups.items()}
    build_optimizer(t.param_groups(), lr=1e-2, weight_decay=0.01).step()
    stepped = 0
    for group, ps in groups.items():
        for p, w0, g in zip(ps, before[group], got[group], strict=True):
            assert_adamw(p.detach(), w0, [g], lr=1e-2, weight_decay=0.01, msg=f"{name} {group}")
            stepped += int(bool(g.any()))
    assert stepped > 0, "the step trained something"


@pytest.mark.parametrize("name", ["dual_lora", "dual_mlp", "logit_head"])
def test_exclusive_rows_leave_the_quarantine_in_place_after_steps(name):
    t = build(name)
    opt = build_optimizer(t.param_groups(), lr=1e-2, weight_decay=0.01)
    ids = batch(len(FLAGS))
    for step in range(2):  # step 0 builds momentum in both groups (all default), step 1 is exclusive only
        with t.gate(["default"] * 4 if step == 0 else ["exclusive"] * 4):
            row_loss(t, ids).backward()
        if step == 1:
            before = {k: [p.detach().clone() for p in ps] for k, ps in t.param_groups().items()}
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = t.param_groups()
    assert all(torch.equal(p, b) for p, b in zip(after["quarantine"], before["quarantine"], strict=True))
    assert any(not torch.equal(p, b) for p, b in zip(after["keep"], before["keep"], strict=True))


def test_exclusive_rows_keep_the_full_forward_values():
    t = build("dual_lora")
    ids = batch(len(FLAGS))
    with torch.no_grad():
        full = t.model(input_ids=ids).logits
        with t.gate(["exclusive"] * 4):
            assert torch.equal(t.model(input_ids=ids).logits, full)
        t.set_soft_routing(2.0)
        with t.gate(["forget"] * 4):
            assert torch.equal(t.model(input_ids=ids).logits, full)


@pytest.mark.parametrize("name", ["dual_lora", "dual_mlp", "logit_head"])
def test_clamp_bounds_each_coordinate_of_the_flagged_kept_gradient(name):
    """logit_head: kept output z_k = W_k h, so a flagged row's kept gradient is clamp(c_k dz, +-C)^T h."""
    t = build(name)
    ids = batch(1)
    weight, clamp = 2.0, 1e-3
    t.set_soft_routing(weight, clamp)
    with t.gate(["forget"]):
        row_loss(t, ids).backward()
    got = grads(t)["keep"]
    t.model.zero_grad(set_to_none=True)
    t.set_soft_routing(weight)  # unclamped
    with t.gate(["forget"]):
        row_loss(t, ids).backward()
    unclamped = grads(t)["keep"]
    assert any(not torch.allclose(g, u) for g, u in zip(got, unclamped, strict=True))
    if name == "logit_head":
        t.model.zero_grad(set_to_none=True)
        t.heads.route_gate = None
        h = t.model.model(input_ids=ids).last_hidden_state.detach()
        out = t.model(input_ids=ids, labels=ids)
        (dz,) = torch.autograd.grad(out.loss * ids.shape[0], out.logits)
        dz = ((1 - weight) * dz).clamp(-clamp, clamp)
        expected = torch.einsum("btv,bth->vh", dz, h)
        # one dot product over the b * t rows per entry, summed in another order by the routed backward; dz and h are
        # the same values either way (the same forward), so the bound of one sum applies (tests/fp.py)
        tol = dot_tolerance(torch.einsum("btv,bth->vh", dz.abs(), h.abs()), dz.shape[0] * dz.shape[1], dz.dtype)
        assert bool(((got[0] - expected).abs() <= tol).all()), float(((got[0] - expected).abs() - tol).max())


def test_defaults_reproduce_the_classic_gate_bitwise():
    """route_weight 1 / no clamp / classic: the same gate as before these options, the same gradients bit for bit."""
    t = build("dual_lora")
    t.set_soft_routing()  # the trainer's call with the config's defaults
    codes = routing_modes(FLAGS, IDS, intervention="route")
    gate = RowGate.from_modes(codes, strategy=t.strategy, **t._soft_routing())
    assert gate.kept_coef is None and gate.quar_grad is None and gate.kept_clamp is None
    assert torch.equal(gate.kept_grad, torch.tensor([False, True, False, True]))
    ids = batch(len(FLAGS))
    with t.gate(codes):
        row_loss(t, ids).backward()
    new = grads(t)
    t.model.zero_grad(set_to_none=True)
    with t._use(RowGate.from_modes(codes, strategy=t.strategy)):  # the call the targets made before
        row_loss(t, ids).backward()
    old = grads(t)
    assert all(torch.equal(a, b) for k in new for a, b in zip(new[k], old[k], strict=True))


def test_sgtm_refuses_soft_routing_under_parameter_masking_and_routes_exclusive_rows():
    torch.manual_seed(0)
    model = build_model(tiny_config(init_range=0.2), build_tokenizer())
    t = make_target("sgtm", model, forget_mlp_frac=0.25, forget_heads=0, strategy="parameter_masking")
    with pytest.raises(ValueError, match="route_weight"):
        t.set_soft_routing(0.5)
    t.set_soft_routing(1.0)
    ids = batch(len(FLAGS))
    with t.gate(["exclusive"] * 4):
        row_loss(t, ids).backward()
    quar = [p.grad for p in t.param_groups()["quarantine"]]
    assert quar and all(g is None or bool((g == 0).all()) for g in quar)
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in t.param_groups()["keep"])


# ---------------------------------------------------------------- split_moments: the unrouted gradient


@pytest.mark.parametrize("routing", ["classic", "exclusive"])
def test_dual_lora_records_the_unrouted_gradient_in_the_same_backward(routing):
    """One gated layer: `unrouted_grad` is the gradient of the ungated forward, `.grad` the routed one."""
    t = build("dual_lora", torch.float64)  # the ungated and the gated backward sum apart (tests/fp.py)
    ids = batch(len(FLAGS))
    row_loss(t, ids).backward()  # ungated: the gradient with no routing
    ungated = {k: [p.grad.clone() for p in ps] for k, ps in t.param_groups().items() if ps}
    t.model.zero_grad(set_to_none=True)
    assert t.record_unrouted_grads(True)
    codes = routing_modes(FLAGS, IDS, intervention="route", routing=routing)
    for half in (slice(0, 2), slice(2, 4)):  # two micro-batches accumulate, like .grad
        with t.gate(codes[half]):
            row_loss(t, ids[half]).backward()
    groups = t.param_groups()
    for group in ("keep", "quarantine"):
        for p, e in zip(groups[group], ungated[group], strict=True):
            assert_close_net64(p.unrouted_grad, e)
    routed_differs = [not torch.allclose(p.grad, p.unrouted_grad) for ps in groups.values() for p in ps]
    assert any(routed_differs)
    opt = build_optimizer(groups, lr=1e-2, split_moments=True)
    opt.step()
    assert all(getattr(p, "unrouted_grad", None) is None for ps in groups.values() for p in ps)


@pytest.mark.parametrize(("name", "field"), [("logit_head", "split_moments"), ("svf", "split_moments"),
                                             ("dual_mlp", "split_moments")])
def test_targets_without_unrouted_gradients_refuse_split_moments(name, field):
    from types import SimpleNamespace

    from route.targets import configure_routing

    args = SimpleNamespace(route_weight=1.0, route_clamp=None, split_moments=True)
    with pytest.raises(ValueError, match=f"^{field}: .*dual_lora"):
        configure_routing(build(name), args)
    configure_routing(build("dual_lora"), args)
