"""A target defined outside the package registers itself and trains; every config file parses; TRL's call order."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import route.targets as targets
from route.targets import RoutingRows, TargetArgs, TargetBase, register_target
from route.trainer.parse import build_config, parse_config
from tests.test_trainer import TINY, group_inputs, make_trainer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class ToyArgs(TargetArgs):
    toy_layer: int = field(default=-1, metadata={"help": "toy: the layer whose down_proj gets the deltas."})

    def validate(self, config, target) -> None:
        if not isinstance(self.toy_layer, int):
            raise ValueError(f"toy_layer: must be an int, got {self.toy_layer!r}")


class ToyDeltaTarget(TargetBase):
    """Kept and quarantine full-rank deltas on one down_proj, gated per row by the shared RowGate (a test target)."""

    args_cls = ToyArgs

    def __init__(self, model: nn.Module, layer: int = -1):
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.linear = model.model.layers[layer].mlp.down_proj
        self.name_prefix = f"model.layers.{layer % len(model.model.layers)}.mlp.down_proj"
        shape = self.linear.weight.shape
        self.keep = nn.Parameter(torch.zeros(shape))
        self.quar = nn.Parameter(torch.zeros(shape))
        self.route_gate = None
        self.calls = {"after_backward": 0, "before_optimizer_step": 0}
        self.linear.register_forward_hook(self._hook)

    @classmethod
    def from_args(cls, model, args, config):
        return cls(model, args.toy_layer)

    def _hook(self, module, args, out):
        x, gate = args[0], self.route_gate
        k, q = F.linear(x, self.keep), F.linear(x, self.quar)
        if gate is None:
            return out + k + q
        return out + gate.kept(k) + gate.quarantine(q)

    def _gate_holders(self):
        return [self]

    def ablate(self, trainable=False):
        with torch.no_grad():
            self.quar.zero_()
        self.quar.requires_grad_(trainable)

    def param_groups(self):
        return {"keep": [self.keep], "quarantine": [self.quar], "shared": []}

    @torch.no_grad()
    def merged_state_dict(self, quarantine=True, dtype=None):
        out = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        key = f"{self.name_prefix}.weight"
        merged = out[key].float() + self.keep + (self.quar if quarantine else 0)
        out[key] = merged.to(dtype or out[key].dtype)
        return out

    def after_backward(self, rows: RoutingRows) -> None:
        assert rows.modes.shape == rows.flags.shape == rows.exploited.shape == rows.candidates.shape
        self.calls["after_backward"] += 1

    def before_optimizer_step(self, reduce=None):
        self.calls["before_optimizer_step"] += 1
        return {"toy/quarantine_norm": float(self.quar.detach().norm())}


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.fixture
def toy_registered():
    register_target("toy_delta")(ToyDeltaTarget)
    yield
    targets._REGISTRY.pop("toy_delta", None)


def test_a_target_defined_in_a_test_registers_and_trains_two_steps(tiny_organism, tmp_path, toy_registered):
    from route.trainer.config import RoutedGRPOConfig

    assert "toy_delta" in targets.available_targets()
    assert not hasattr(RoutedGRPOConfig, "toy_layer")  # the config never learned about it
    overrides = {k: v for k, v in TINY.items() if k not in ("keep_rank", "quarantine_rank")}
    t = make_trainer(tiny_organism, tmp_path, reward_funcs=[length_reward],
                     **{**overrides, "target": "toy_delta", "toy_layer": 0, "max_steps": 2, "detector_fpr": 0.5})
    assert isinstance(t.target, ToyDeltaTarget) and t.args.toy_layer == 0  # its setting reads through the config
    keep0, quar0 = t.target.keep.detach().clone(), t.target.quar.detach().clone()
    t.train()
    assert t.target.calls["before_optimizer_step"] == 2 and t.target.calls["after_backward"] >= 2
    assert not torch.equal(t.target.keep, keep0) and not torch.equal(t.target.quar, quar0)  # both trained
    assert any("toy/quarantine_norm" in h for h in t.state.log_history)  # the hook's metrics are logged
    t.save_deployed()  # the shared export: a plain transformers checkpoint with the kept delta merged
    from transformers import AutoModelForCausalLM

    deployed = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "deployed")
    w = dict(deployed.named_parameters())[f"{t.target.name_prefix}.weight"]
    torch.testing.assert_close(w, t.target.linear.weight + t.target.keep.detach())


def test_settings_of_the_target_are_validated_and_unknown_targets_listed(toy_registered):
    with pytest.raises(ValueError, match="toy_layer: must be an int"):
        build_config(output_dir="x", use_cpu=True, bf16=False, report_to="none", target="toy_delta", toy_layer="a")
    with pytest.raises(ValueError, match=r"target: invalid value 'nope'; allowed values: .*toy_delta"):
        build_config(output_dir="x", use_cpu=True, bf16=False, report_to="none", target="nope")
    with pytest.raises(ValueError, match=r"intervention: invalid value 'erase'.*with target 'toy_delta'.*svf"):
        build_config(output_dir="x", use_cpu=True, bf16=False, report_to="none", target="toy_delta",
                     intervention="erase")


def test_config_module_names_no_target():
    import ast
    import dataclasses

    from route.trainer.config import RoutedGRPOConfig

    path = Path(targets.__file__).parents[1] / "trainer" / "config.py"
    tree = ast.parse(path.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m and m.split(".")[0] == "envs" or m.startswith(("route.targets",
                                                                                          "route.masks"))}
    fields = {f.name for f in dataclasses.fields(RoutedGRPOConfig)}
    owned = {f.name for cls in targets.target_args_classes() for f in dataclasses.fields(cls)}
    assert owned and not fields & owned  # every target setting lives with its target
    code = "\n".join(ast.unparse(n) for n in tree.body if not isinstance(n, ast.Expr))  # without docstrings
    for name in ("svf", "sgtm"):
        assert name not in code, name


def test_every_config_file_parses(tmp_path, monkeypatch):
    """Each file in configs/ through the parser that reads it: main-job configs, SGTM pretraining, sweeps,
    accelerate; a file nobody reads fails the test."""
    import yaml

    from route.experiments.sweep import load_spec
    from route.models.heads.train import parse_config as heads_parse
    from route.models.sgtm.config import parse_pretrain_config as sgtm_parse
    from route.models.tiered.config import parse_tiered_config as tiered_parse

    (tmp_path / "runs" / "vhack").mkdir(parents=True)
    torch.save({"format": "route.vhack/1", "subspace": {}, "metadata": {}}, tmp_path / "runs" / "vhack" / "arith.pt")
    monkeypatch.chdir(tmp_path)  # svf.yaml names runs/vhack/arith.pt relative to the working directory
    checked = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        if "compute_environment" in values:  # an accelerate config
            assert values["distributed_type"] in ("DEEPSPEED", "MULTI_GPU", "FSDP", "NO"), path.name
        elif "grid" in values:
            assert load_spec(path)["grid"], path.name
        elif path.name.startswith("sgtm_"):
            assert sgtm_parse(["--config", str(path)]) is not None
        elif path.name.startswith("tiered_"):
            assert tiered_parse(["--config", str(path)]) is not None
        elif path.name in ("iav_default.yaml", "mav_default.yaml"):
            assert heads_parse(["--config", str(path)]).head == values["head"]
        else:
            c = parse_config(["--config", str(path), "--bf16", "false", "--use_cpu", "true"])
            assert c.target_args is not None and c.target == values.get("target", "dual_lora"), path.name
            for key, value in values.items():  # every target setting in the file reached the target's settings
                if hasattr(c.target_args, key):
                    assert getattr(c.target_args, key) == value, (path.name, key)
        checked.append(path.name)
    assert len(checked) == len(list(CONFIGS.glob("*.yaml"))) >= 8


def test_a_batch_whose_rewards_were_not_computed_fails_clearly(tiny_organism, tmp_path, monkeypatch):
    from trl import GRPOTrainer

    t = make_trainer(tiny_organism, tmp_path, intervention="route")
    # TRL computing rewards without the override (a changed call order) leaves no routing for the batch
    monkeypatch.setattr(type(t), "_calculate_rewards", GRPOTrainer._calculate_rewards)
    with pytest.raises(RuntimeError, match="rewards were not computed for this batch"):
        t._generate_and_score_completions(group_inputs(t))


def test_a_routing_never_consumed_fails_clearly(tiny_organism, tmp_path):
    t = make_trainer(tiny_organism, tmp_path, intervention="route")
    inputs = group_inputs(t)
    prompts = [x["prompt"] for x in inputs]
    completions = ["1"] * len(inputs)
    t._calculate_rewards(inputs, prompts, completions, [[1]] * len(inputs))
    with pytest.raises(RuntimeError, match="never consumed"):
        t._calculate_rewards(inputs, prompts, completions, [[1]] * len(inputs))


def test_a_micro_batch_without_routing_columns_fails_clearly(tiny_organism, tmp_path):
    t = make_trainer(tiny_organism, tmp_path, intervention="route")
    with pytest.raises(KeyError, match="routing_modes.*missing from the batch"):
        t._compute_loss(t.model, {"prompt_ids": torch.zeros(1, 1, dtype=torch.long)})
