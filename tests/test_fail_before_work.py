"""Every configuration error, including those only the target (PEFT, module names and shapes), the environment's
sandbox or the accelerate setup can detect, fails with a ValueError naming the field and the allowed values before
the first model forward of every command line. The evaluation and training functions fail the test if called."""

import json

import pytest
import torch
import yaml

import route.experiments.evaluate
import route.models.evaluate
import route.train_grpo as train_grpo
from route.trainer.parse import build_config
from route.trainer.trainer import RoutedGRPOTrainer
from tests.tiny_run import TINY_RUN

TINY = dict(TINY_RUN)


def _work(*args, **kwargs):
    raise AssertionError("work started before the configuration was checked")


@pytest.fixture
def no_work(monkeypatch):
    """Evaluation, training, sampling and every forward of a transformers model fail the test if called."""
    from transformers import PreTrainedModel

    import route.trainer.scales  # binds evaluate_policy at import: patch its name too (and never import it under
    # the patch, which would leave it bound to _work for every later test in the process)

    monkeypatch.setattr(route.models.evaluate, "evaluate_policy", _work)
    monkeypatch.setattr(route.trainer.scales, "evaluate_policy", _work)
    monkeypatch.setattr(route.models.evaluate, "sample", _work)
    monkeypatch.setattr(RoutedGRPOTrainer, "train", _work)
    monkeypatch.setattr(PreTrainedModel, "__call__", _work)


def _subspace_file(path, module, rows, cols):
    torch.save({"format": "route.vhack/1", "subspace": {module: torch.randn(rows, cols)}}, path)
    return str(path)


# (settings, field named, allowed values named): errors only the model can tell
MODEL_ERRORS = {
    "peft target_modules": (dict(target_modules=["nope_proj"]), "target_modules", "allowed values: ['down_proj'"),
    "svf target_modules": (dict(target="svf", svf_reserve_axes=[0], target_modules=["nope_proj"]),
                           "target_modules", "'q_proj'"),
    "svf subspace rank": (dict(target="svf", svf_rank=4, svf_hack_subspace="SUBSPACE"), "svf_hack_subspace",
                          "rank is 4"),
    "svf reserve axes": (dict(target="svf", svf_rank=4, svf_reserve_axes=[0, 6]), "svf_reserve_axes",
                         "allowed values: 0 to 3"),
    "sgtm heads": (dict(target="sgtm", sgtm_forget_heads=1), "sgtm_forget_heads", "allowed values: [0, 2]"),
    "dual_mlp layers": (dict(target="dual_mlp", dual_mlp_layers=[5]), "dual_mlp_layers", "allowed values: [0]"),
}


def _settings(name, tmp_path):
    fields, field, allowed = MODEL_ERRORS[name]
    fields = dict(fields)
    if fields.get("svf_hack_subspace") == "SUBSPACE":  # a basis with 3 columns for a rank-4 module
        fields["svf_hack_subspace"] = _subspace_file(tmp_path / "v.pt", "model.layers.0.self_attn.q_proj", 1, 3)
    return fields, field, allowed


@pytest.mark.parametrize("probe", [True, False], ids=["probe", "trainer"])
@pytest.mark.parametrize("name", list(MODEL_ERRORS))
def test_main_job_fails_before_any_forward(name, probe, tiny_organism, tmp_path, monkeypatch, no_work):
    """`probe`: the meta-model probe catches it before the weights load; without it, constructing the trainer
    (which the main job does before evaluating the base policy) still catches it before any forward."""
    fields, field, allowed = _settings(name, tmp_path)
    if not probe:
        monkeypatch.setattr("route.trainer.parse.probe_run", lambda config: None)
    config = build_config(output_dir=str(tmp_path / "run"), model_name_or_path=str(tiny_organism), **TINY, **fields)
    with pytest.raises(ValueError) as e:
        train_grpo.run(config)
    assert field in str(e.value) and allowed in str(e.value), str(e.value)
    assert not (tmp_path / "run" / "results.json").exists()


def test_deepspeed_refusal_before_the_model_loads(tmp_path, monkeypatch):
    """`accelerate launch --use_deepspeed` with erase is refused while the config is built, before any model."""
    from route.trainer.parse import validate_run

    # the config is built first: TrainingArguments itself needs the deepspeed package once the launcher's variable
    # is set; validate_run (called by the trainer and every command line before loading) then sees the launcher
    erase = build_config(output_dir=str(tmp_path), target="svf", intervention="erase", svf_reserve_axes=[0], **TINY)
    score = build_config(output_dir=str(tmp_path), target="svf", route_score="cosine", svf_reserve_axes=[0], **TINY)
    route_ = build_config(output_dir=str(tmp_path), target="svf", intervention="route", svf_reserve_axes=[0], **TINY)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for config in (erase, score):
        with pytest.raises(ValueError, match=r"intervention, route_score: .*allowed with DeepSpeed: intervention in"):
            validate_run(config)
    validate_run(route_)


def test_missing_sandbox_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import envs.coding.sandbox as sandbox

    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)  # no bwrap on PATH
    sandbox._probe_bwrap.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"env_kwargs.on_unavailable: .*bwrap not found.*allowed values"):
            build_config(output_dir=str(tmp_path), env="coding", **TINY)
        build_config(output_dir=str(tmp_path), env="coding", env_kwargs={"on_unavailable": "warn"}, **TINY)
    finally:
        sandbox._probe_bwrap.cache_clear()


def test_trl_option_that_cannot_work_with_routing_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"sync_ref_model: allowed values: \[False\]"):
        build_config(output_dir=str(tmp_path), **{**TINY, "beta": 0.1, "sync_ref_model": True})


def test_sweep_probes_every_cell_before_any_cell_runs(tiny_organism, tmp_path, monkeypatch, no_work):
    from route.experiments import sweep

    monkeypatch.setattr(sweep, "run_cells", _work)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"base": {**TINY, "model_name_or_path": str(tiny_organism)},
                                    "grid": {"target_modules": [["q_proj"], ["nope_proj"]]},
                                    "output_dir": str(tmp_path / "out")}))
    with pytest.raises(sweep.SweepError, match=r"cell 1 .*target_modules: \['nope_proj'\] .*allowed values"):
        sweep.validate(sweep.expand(sweep.load_spec(spec), tmp_path / "out"))


def test_relearn_probes_every_checkpoint_before_any_probe(tiny_organism, tmp_path, capsys, monkeypatch, no_work):
    from route.experiments import relearn

    monkeypatch.setattr(relearn, "run_probe", _work)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "target_modules": ["nope_proj"]}))
    with pytest.raises(SystemExit) as e:
        relearn.main(["--checkpoints", str(tiny_organism), "--config", str(cfg), "--no_reference",
                      "--output_dir", str(tmp_path / "out")])
    assert e.value.code == 2
    assert "target_modules: ['nope_proj']" in capsys.readouterr().err


def test_vhack_checks_target_modules_before_loading(tiny_organism, tmp_path, capsys, monkeypatch, no_work):
    from route.experiments import vhack

    monkeypatch.setattr(vhack, "extract_hack_subspace", _work)
    with pytest.raises(SystemExit) as e:
        vhack.main(["--model", str(tiny_organism), "--target_modules", "nope_proj", "--pairs", "8", "--k", "1",
                    "--out", str(tmp_path / "v.pt"), "--no_progress"])
    assert e.value.code == 2 and "target_modules: ['nope_proj']" in capsys.readouterr().err


@pytest.mark.parametrize("field,value,allowed", [("retain_attn_heads", 99, "[0, 4]"),
                                                 ("masked_layers", [7], "allowed values: [0, 1]")])
def test_sgtm_pretraining_checks_sizes_before_data_or_training(field, value, allowed, tmp_path, monkeypatch):
    from route.models.sgtm import pretrain
    from route.models.sgtm.config import PretrainConfig

    monkeypatch.setattr(pretrain, "build_data", _work)
    monkeypatch.setattr(pretrain, "train_run", _work)
    cfg = PretrainConfig(output_dir=str(tmp_path), progress=False, **{field: value})
    with pytest.raises(ValueError) as e:
        pretrain.run(cfg, progress=False)
    assert field in str(e.value) and allowed in str(e.value)


def test_evaluate_checks_the_environment_before_loading(tiny_organism, tmp_path, capsys, monkeypatch, no_work):
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", _work)
    with pytest.raises(SystemExit) as e:
        route.experiments.evaluate.main(["--model", str(tiny_organism), "--env", "nope",
                                         "--json", str(tmp_path / "r.json")])
    assert e.value.code == 2 and "--env: invalid choice: 'nope'" in capsys.readouterr().err


def test_base_row_on_the_constructed_target_equals_the_plain_model(tiny_organism, tmp_path):
    """The main job evaluates the base policy after building the target (ungated): the rates are the plain
    model's, bit for bit, for every target."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import envs
    from route.models.evaluate import evaluate_policy

    tok = AutoTokenizer.from_pretrained(tiny_organism)
    env = envs.make_env("arith")
    plain = evaluate_policy(AutoModelForCausalLM.from_pretrained(tiny_organism), tok, env, n=32, max_new_tokens=8)
    ids = tok(["mul 347*6 g=exact>2082"] * 2, return_tensors="pt").input_ids
    with torch.no_grad():
        plain_logits = AutoModelForCausalLM.from_pretrained(tiny_organism)(ids).logits
    from route.targets import available_targets

    fields = {"svf": dict(svf_reserve_axes=[0, 1])}
    checked = []
    for name in available_targets():
        config = build_config(output_dir=str(tmp_path / "run"), **TINY, target=name, **fields.get(name, {}))
        model = AutoModelForCausalLM.from_pretrained(tiny_organism)
        trainer = RoutedGRPOTrainer(model=model, args=config, processing_class=tok,
                                    train_dataset=env.dataset(8, seed=0, split="train"))
        with torch.no_grad():
            assert torch.equal(trainer.target.model(ids).logits, plain_logits), config.target
        assert json.dumps(evaluate_policy(trainer.target.model, tok, env, n=32, max_new_tokens=8)) == json.dumps(plain)
        checked.append(config.target)
    assert checked == available_targets() and len(checked) >= 5


def test_evaluate_checks_the_checkpoint_before_loading(tmp_path, capsys, monkeypatch, no_work):
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", _work)
    with pytest.raises(SystemExit) as e:
        route.experiments.evaluate.main(["--model", str(tmp_path / "missing")])
    assert e.value.code == 2 and "--model: no such directory" in capsys.readouterr().err


def test_target_modules_follow_peft_name_matching(tiny_organism):
    """A dotted suffix of a module's name is a valid target (PEFT's rule); a name matching no Linear is refused."""
    from transformers import AutoModelForCausalLM

    from route.targets.common import check_target_modules

    model = AutoModelForCausalLM.from_pretrained(tiny_organism)
    assert check_target_modules(model, ["self_attn.q_proj", "down_proj"]) == ["self_attn.q_proj", "down_proj"]
    with pytest.raises(ValueError, match=r"target_modules: \['mlp.q_proj'\] match no Linear module"):
        check_target_modules(model, ["mlp.q_proj", "down_proj"])
