"""`dual_mlp`: settings, the frozen base, steps per group, chosen layers, GPT-Neo export, and vLLM at every scale.

The shared matrices (tests/targets/test_scaled.py, test_routing_variants.py, tests/test_invariants.py,
tests/test_checkpointing.py, tests/test_resume.py, tests/test_vllm_engine.py) cover what every target must do; this
file covers what is particular to this target: the engine layout (one width at every scale, explicit zeros at
scale 0) and how a vLLM engine for it is built (colocate: the target writes it; server: serve `save_engine`'s).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import envs
from route.masks.optim import build_optimizer
from route.models.organism import build_model, build_tokenizer, tiny_config
from route.targets import make_target
from route.targets.dual_mlp import ENGINE_DIR
from route.trainer.parse import build_config
from route.trainer.trainer import RoutedGRPOTrainer
from route.vllm.sync import TargetWeightSync
from tests.fake_vllm import FakeEngine, install_fake_vllm
from tests.fp import assert_close_net64
from tests.targets.helpers import batch, logits
from tests.test_trainer import TINY, ParityDetector


def build(layers=None, units=(4, 3), num_layers=2):
    torch.manual_seed(0)
    model = build_model(tiny_config(init_range=0.2, num_layers=num_layers), build_tokenizer())
    t = make_target("dual_mlp", model, keep_units=units[0], quarantine_units=units[1], layers=layers)
    return t


def randomize(t, std=0.2):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for ps in t.param_groups().values():
            for p in ps:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dual_mlp_keep_units", 0),
        ("dual_mlp_keep_units", 2.5),
        ("dual_mlp_quarantine_units", True),
        ("dual_mlp_quarantine_units", -1),
        ("dual_mlp_layers", "a,b"),
        ("dual_mlp_layers", []),
        ("target_modules", ["down_proj"]),
    ],
)
def test_bad_settings_name_the_field_in_one_line(field, value, tmp_path):
    with pytest.raises(ValueError) as e:
        build_config(output_dir=str(tmp_path), target="dual_mlp", **TINY, **{field: value})
    assert str(e.value).startswith(f"{field}: ") and "\n" not in str(e.value)


def test_layer_indices_and_architecture_are_checked_against_the_model():
    with pytest.raises(ValueError, match=r"^dual_mlp_layers: 2 is not a layer index; allowed values: \[0, 1\]"):
        build(layers=[2])
    with pytest.raises(ValueError, match=r"^target: dual_mlp: unsupported architecture"):
        make_target("dual_mlp", torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_starts_as_the_base_model_with_the_base_frozen_and_the_documented_parameter_count():
    torch.manual_seed(0)
    plain = build_model(tiny_config(init_range=0.2, num_layers=2), build_tokenizer())
    ids = batch()
    with torch.no_grad():
        base = plain(input_ids=ids).logits
    t = build(units=(5, 3))
    with torch.no_grad():
        assert torch.equal(logits(t, ids), base)  # output columns start at zero: base + exact zeros, bit for bit
    groups = t.param_groups()
    assert not groups["shared"]
    assert all(not p.requires_grad for n, p in t.model.named_parameters() if ".route_" not in n)
    hidden = t.model.config.hidden_size  # Llama form: gate and up rows, down columns, no bias: 3 * hidden per unit
    assert sum(p.numel() for p in groups["keep"]) == 2 * 5 * 3 * hidden
    assert sum(p.numel() for p in groups["quarantine"]) == 2 * 3 * 3 * hidden


@pytest.mark.parametrize(
    ("modes", "moved"),
    [
        (["forget"] * 4, {"quarantine"}),
        (["retain"] * 4, {"keep"}),
        (["exclusive"] * 4, {"keep"}),
        (["forget", "default", "retain", "default"], {"keep", "quarantine"}),
    ],
)
def test_steps_move_only_the_groups_the_modes_train(modes, moved):
    """After `optimizer.step()` (SkipZeroAdamW with weight decay, momentum built by an earlier all-default step): the
    base model never moves; a group a batch must not train stays bit-identical."""
    t = build()
    randomize(t)
    opt = build_optimizer(t.param_groups(), lr=1e-2, weight_decay=0.1)
    ids = batch()
    frozen = {n: p.detach().clone() for n, p in t.model.named_parameters() if not p.requires_grad}
    for step in range(2):
        with t.gate(["default"] * 4 if step == 0 else modes):
            t.model(input_ids=ids, labels=ids).loss.backward()
        before = {k: [p.detach().clone() for p in ps] for k, ps in t.param_groups().items()}
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = t.param_groups()
    for group in ("keep", "quarantine"):
        same = all(torch.equal(p, b) for p, b in zip(after[group], before[group], strict=True))
        assert same == (group not in moved), group
    assert all(torch.equal(p, frozen[n]) for n, p in t.model.named_parameters() if n in frozen)


def test_chosen_layers_only_and_exports_padded_to_one_width(tmp_path):
    t = build(layers=[-1])
    randomize(t)
    names = [n for n, _ in t.model.named_parameters() if ".route_" in n]
    assert names and all(n.startswith("model.layers.1.mlp.") for n in names)
    base = t.model.config.intermediate_size
    sd = t.merged_state_dict()
    assert sd["model.layers.0.mlp.down_proj.weight"].shape[1] == sd["model.layers.1.mlp.down_proj.weight"].shape[1]
    assert not bool(sd["model.layers.0.mlp.gate_proj.weight"][base:].any())  # layer 0: zero units
    t.save_deployed(str(tmp_path / "d"))
    t.save_deployed(str(tmp_path / "s"), scale=0.5)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "d").config.intermediate_size == base + 4
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "s").config.intermediate_size == base + 4 + 3


def test_gpt_neo_exports_exactly_at_every_scale(tmp_path):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(0)
    layers = [[["global", "local"], 1]]
    config = GPTNeoConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, attention_types=layers)
    t = make_target("dual_mlp", GPTNeoForCausalLM(config).eval(), keep_units=4, quarantine_units=3)
    randomize(t)
    t.model.double()  # float32 values: the export (copies, and a scale that is a power of two) is exact
    assert t.units == {"keep": 4, "quarantine": 3} and t.base_width == 4 * 32
    ids, checked = batch(), []
    for s in (0.0, 0.5, 1.0):
        t.save_deployed(str(tmp_path / str(s)), scale=s)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / str(s)).eval().double()
        with torch.no_grad():  # one wide MLP against the base MLP beside the units: summed apart, float64 (tests/fp.py)
            assert_close_net64(plain(input_ids=ids).logits, logits(t, ids, t.scaled(s)))
        checked.append(plain.config.intermediate_size)
    assert checked == [128 + 4, 128 + 7, 128 + 7]


@pytest.mark.parametrize("trainable", [False, True])
def test_ablate_keeps_the_deployed_forward_and_removes_the_quarantine(trainable):
    t = build()
    randomize(t)
    t.model.double()
    ids = batch()
    with torch.no_grad():
        deployed = logits(t, ids, t.ablated())
    t.ablate(trainable=trainable)
    with torch.no_grad():  # the ablated path and the ablated weights reach it apart: float64 (tests/fp.py)
        assert_close_net64(logits(t, ids), deployed)
    quarantine = [p for n, p in t.model.named_parameters() if ".route_quarantine." in n]
    assert quarantine and all(p.requires_grad == trainable for p in quarantine)
    inputs = [p for n, p in t.model.named_parameters() if ".route_quarantine." in n and "down_proj" not in n]
    assert all(bool(p.any()) == trainable for p in inputs)


def test_vllm_pushes_explicit_weights_that_differ_between_scale_0_and_1_and_serve_each(tmp_path):
    """The trap this target exists to avoid: an 'ablated' sync that pushes the training weights. Every push has the
    engine's shapes; at scale 0 the quarantine's rows and columns are zero, at 1 they are the trained ones."""
    t = build()
    randomize(t)
    ids = batch()
    t.save_engine(str(tmp_path / "engine"))
    eng = FakeEngine(str(tmp_path / "engine"))
    base, pushed, checked = t.model.config.intermediate_size, {}, []
    for s, sync in (
        (0.0, TargetWeightSync(t, "deployed")),
        (1.0, TargetWeightSync(t, "full")),
        (0.0, TargetWeightSync(t, "full", scale=0.0)),
    ):
        for name, tensor in sync.named_params():
            eng.load(name, tensor)
        eng.close_sync()
        pushed[s] = eng.syncs[-1].tensors
        with torch.no_grad():
            torch.testing.assert_close(
                eng.model(input_ids=ids).logits, logits(t, ids, t.scaled(s)), rtol=1e-5, atol=1e-5
            )
        checked.append(s)
    assert checked == [0.0, 1.0, 0.0] and pushed[0].keys() == pushed[1].keys()
    down, gate = "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.gate_proj.weight"
    assert pushed[0][down].shape == pushed[1][down].shape == (t.model.config.hidden_size, base + 7)
    assert not bool(pushed[0][down][:, base + 4 :].any()) and not bool(pushed[0][gate][base + 4 :].any())
    assert bool(pushed[1][down][:, base + 4 :].any())
    assert torch.equal(pushed[0][down][:, : base + 4], pushed[1][down][:, : base + 4])


def _trainer(model_dir, tmp_path, mode, policy):
    from transformers import AutoTokenizer

    config = build_config(
        output_dir=str(tmp_path / "run"),
        use_vllm=True,
        vllm_mode=mode,
        generation_policy=policy,
        target="dual_mlp",
        dual_mlp_keep_units=4,
        dual_mlp_quarantine_units=4,
        **{**TINY, "max_steps": 2},
    )
    env = envs.make_env(config.env)
    return RoutedGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=config,
        env=env,
        detector=ParityDetector(),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
        train_dataset=env.dataset(config.train_size, seed=0, split="train"),
    )


@pytest.mark.parametrize(("mode", "policy"), [("colocate", "deployed"), ("server", "full")])
def test_trl_runs_vllm_on_the_engine_checkpoint(mode, policy, tiny_organism, tmp_path, monkeypatch):
    """Colocate: the target writes `output_dir/vllm_engine` and TRL builds its LLM there (the KL reference stays the
    base model's path); server: the server serves a `save_engine` checkpoint written before the run."""
    server_model = None
    if mode == "server":
        server_model = tmp_path / "served"
        model = AutoModelForCausalLM.from_pretrained(tiny_organism)
        make_target("dual_mlp", model, keep_units=4, quarantine_units=4).save_engine(str(server_model))
    fake = install_fake_vllm(monkeypatch, server_model=server_model)
    t = _trainer(tiny_organism, tmp_path, mode, policy)
    if mode == "colocate":
        assert t.model.name_or_path == str(tmp_path / "run" / ENGINE_DIR)
        assert t.model.config._name_or_path == str(tiny_organism)
        eng = fake.LLM.instances[-1].engine
    else:
        eng = fake.FakeVLLMClient.instances[-1].engine
    assert eng.model.config.intermediate_size == t.target.base_width + 8
    randomize(t.target)
    t.train()
    assert t.state.global_step == 2 and len(eng.syncs) == 2
    t._generate(["mul 12*3 g=exact>"])  # a new global step: the trained weights are pushed
    ids = torch.tensor([[3, 9, 12, 5, 20, 7, 11]])
    with torch.no_grad():
        served = eng.model(input_ids=ids).logits
        ctx = t.target.ablated() if policy == "deployed" else t.target.scaled(1.0)
        torch.testing.assert_close(served, logits(t.target, ids, ctx), rtol=1e-5, atol=1e-5)
        other = logits(t.target, ids, t.target.scaled(1.0) if policy == "deployed" else t.target.ablated())
    assert not torch.allclose(served, other, atol=1e-3), "the quarantine must matter for this test"


def test_row_norms_follow_the_gate_and_are_recorded_once_under_gradient_checkpointing():
    """Absorption metrics: each row's norm per group is what the gate lets it send (test_absorption.py checks the
    values against separate backwards); a checkpointed recompute must not record the rows a second time."""
    from route.targets import checkpointing

    t = build()
    randomize(t)
    ids = batch()

    def norms():
        t.model.train().zero_grad(set_to_none=True)
        assert t.record_row_grads(True)
        with t.gate(["forget", "default", "retain", "exclusive"]):
            loss = t.model(input_ids=ids, labels=ids).loss
        loss.backward()
        return t.pop_row_grads()

    plain = norms()
    checkpointing.install(t.model, t)
    t.model.gradient_checkpointing_enable()
    again = norms()
    assert plain.keys() == again.keys() == {"keep", "quarantine"}
    for group in plain:
        torch.testing.assert_close(again[group], plain[group])
    assert plain["keep"].tolist()[0] == 0.0 and all(v > 0 for v in plain["keep"].tolist()[1:])
    assert [v > 0 for v in plain["quarantine"].tolist()] == [True, True, False, False]
