"""The quarantine-scale dial on every registered target: `scaled(s)`, export at s, the vLLM sync at s."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from route.models.organism import build_model, build_tokenizer, tiny_config
from route.targets import available_targets, make_target
from route.vllm.sync import TargetWeightSync
from tests.fake_vllm import FakeEngine
from tests.fp import assert_close_net64
from tests.targets.helpers import batch, logits

SCALES = (0.0, 0.3, 1.0)


def _model():
    torch.manual_seed(0)
    return build_model(tiny_config(init_range=0.2), build_tokenizer())


@torch.no_grad()
def _randomize(tensors):
    g = torch.Generator().manual_seed(1)
    for t in tensors:
        t.copy_(torch.randn(t.shape, generator=g) * 0.2)


def _dual_lora():
    t = make_target("dual_lora", _model(), keep_rank=4, quarantine_rank=4)
    _randomize([layer.lora_B[n].weight for _, layer in t.layers for n in ("keep", "quarantine")])
    return t


def _svf():
    t = make_target("svf", _model(), rank=8, reserve_axes=[0, 3], progress=False)
    _randomize([p for _, layer in t.layers for p in (layer.delta_keep, layer.coef)])
    return t


def _sgtm():  # the reserved units are the model's own (non-zero) weights
    return make_target("sgtm", _model(), forget_mlp_frac=0.25)


def _logit_head(untied: bool = False):
    model = _model()
    if untied:  # what a vLLM run with logit_head needs (tied embeddings are refused: route.targets.logit_head)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    t = make_target("logit_head", model)
    _randomize([t.heads.keep.weight, t.heads.quarantine.weight])
    return t


def _dual_mlp():  # units in the first of two layers only: the second is padded with zero units in every export
    torch.manual_seed(0)
    model = build_model(tiny_config(init_range=0.2, num_layers=2), build_tokenizer())
    t = make_target("dual_mlp", model, keep_units=4, quarantine_units=3, layers=[0])
    _randomize([p for ps in t.param_groups().values() for p in ps])
    return t


BUILD = {"dual_lora": _dual_lora, "svf": _svf, "sgtm": _sgtm, "logit_head": _logit_head, "dual_mlp": _dual_mlp}


def test_every_registered_target_is_covered():
    assert sorted(BUILD) == available_targets()


@pytest.fixture(params=sorted(BUILD))
def target(request):
    return BUILD[request.param]()


def test_scaled_zero_is_the_model_without_its_quarantine_and_scaled_one_is_the_ungated_forward(target):
    """scaled(0) (which `ablated()` is) against an independent computation: a copy whose quarantine parameters are set
    to zero, run with no gate. The two run different operations (a path skipped, or run on zeros), so they are compared
    in float64 (tests/fp.py). scaled(1) is an all-default gate, which passes both paths through unchanged: the same
    operations as the ungated forward, bit for bit."""
    target.model.double()
    ids = batch()
    full, at0 = logits(target, ids), logits(target, ids, target.scaled(0))
    twin = copy.deepcopy(target)
    quarantine = twin.param_groups()["quarantine"]
    assert quarantine and any(bool(p.any()) for p in quarantine)
    with torch.no_grad():
        for p in quarantine:
            p.zero_()
    assert_close_net64(at0, logits(twin, ids))
    assert torch.equal(logits(target, ids, target.ablated()), at0)
    assert torch.equal(logits(target, ids, target.scaled(1)), full)
    assert not torch.allclose(at0, full, atol=1e-4), "the quarantine must matter for this test to mean anything"
    mid = logits(target, ids, target.scaled(0.5))
    assert not torch.allclose(mid, full, atol=1e-4) and not torch.allclose(mid, at0, atol=1e-4)


def test_logits_at_a_scale_equal_a_plain_checkpoint_exported_at_that_scale(target, tmp_path):
    ids = batch()
    checked = []
    for s in SCALES:
        target.save_deployed(str(tmp_path / f"s{s}"), scale=s)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / f"s{s}").eval()
        assert not any("lora" in k or "svf" in k or "forget" in k or "route_" in k for k in plain.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(
                plain(input_ids=ids).logits, logits(target, ids, target.scaled(s)), rtol=1e-4, atol=1e-4
            )
        checked.append(s)
    assert checked == list(SCALES)


def test_export_at_the_ends_equals_the_deployed_and_training_exports(target):
    deployed, training = target.deployed_state_dict(), target.merged_state_dict(quarantine=True)
    at0, at1 = target.merged_state_dict(scale=0), target.merged_state_dict(scale=1)
    assert deployed.keys() == at0.keys() == training.keys() == at1.keys() and deployed
    assert all(torch.equal(deployed[k], at0[k]) and torch.equal(training[k], at1[k]) for k in deployed)


def test_vllm_sync_at_a_scale_serves_the_scaled_policy(target, tmp_path):
    if target.name == "logit_head":
        target = _logit_head(untied=True)
    ids = batch()
    target.save_engine(str(tmp_path / "engine"))  # the engine starts from the target's engine checkpoint
    engine = FakeEngine(str(tmp_path / "engine"))
    sync = TargetWeightSync(target, "deployed", scale=0.3)
    for name, tensor in sync.named_params():
        engine.load(name, tensor)
    engine.close_sync()
    assert len(engine.syncs) == 1 and engine.syncs[0].tensors
    with torch.no_grad():
        torch.testing.assert_close(
            engine.model(input_ids=ids).logits, logits(target, ids, target.scaled(0.3)), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.5", True])
def test_a_scale_outside_0_1_names_scale(bad):
    t = _logit_head()
    with pytest.raises(ValueError, match="scale"):
        t.scaled(bad)
    with pytest.raises(ValueError, match="scale"):
        t.merged_state_dict(scale=bad)
    with pytest.raises(ValueError, match="scale"):
        TargetWeightSync(t, "deployed", scale=bad)
