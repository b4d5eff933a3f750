"""The scale dial at evaluation: validation prompts, the main job's deployment-scale rule, `route evaluate --run`."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import envs
import route.train_grpo as train_grpo
from envs.arith import ArithEnv
from route.experiments.evaluate import main as evaluate_main
from route.experiments.relearn import selected_checkpoint
from route.trainer.parse import build_config
from route.trainer.scales import load_policy, real_monitor, validation_rows
from tests.test_resume import RUN as RESUME_RUN
from tests.test_resume import varied_reward

# the resume test's tiny run, shorter, with two held-out modes and a three-point grid
RUN = dict(
    RESUME_RUN,
    save_strategy="no",
    max_steps=2,
    eval_n=24,
    val_n=16,
    scale_grid=[0.0, 0.5, 1.0],
    detector_modes=["sentinel", "format"],
)


def test_validation_prompts_are_disjoint_from_the_test_prompts_in_every_env():
    checked = []
    for name in envs.available_envs():
        env = envs.make_env(name)
        test = env.rows(200, seed=0, split="test")
        val = validation_rows(env, 100, seed=1, test_rows=test)
        assert len(val) == 100
        assert not {str(r["prompt"]) for r in val} & {str(r["prompt"]) for r in test}
        assert not {r["prompt_id"] for r in val} & {r["prompt_id"] for r in test}
        assert val == validation_rows(env, 100, seed=1, test_rows=test)  # a pure function of (seed, test set)
        checked.append(name)
    assert len(checked) == len(envs.available_envs()) >= 2


def test_too_few_validation_prompts_name_val_n():
    class OnePrompt:  # a held-out split of one prompt, which the test set already holds
        def rows(self, n, seed=0, split="test"):
            return [{"prompt": "p", "prompt_id": f"one-{seed}-{i}"} for i in range(n)]

    env = OnePrompt()
    with pytest.raises(ValueError, match="val_n"):
        validation_rows(env, 8, seed=1, test_rows=env.rows(1, seed=0))


def test_the_rule_reads_the_monitor_a_flag_control_wraps():
    class Control:  # the shape of route.monitors.detectors.ControlDetector
        def __init__(self, monitor):
            self.monitor, self.control = monitor, "never"

    monitor = object()
    assert real_monitor(Control(monitor)) is monitor and real_monitor(monitor) is monitor


def _strip(results):
    out = json.loads(json.dumps(results))
    for k in ("train_seconds", "total_seconds", "seconds", "config"):
        out.pop(k)
    for name in ("base", "training", "deployed"):
        out[name].pop("undetectable", None)
        out[name].get("monitor", {}).pop("flag_rate", None)
    return out


def test_main_job_picks_a_scale_by_the_monitor_and_leaves_scale_0_unchanged(
    tiny_organism, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(ArithEnv, "reward_func", varied_reward)
    fields = dict(RUN, model_name_or_path=str(tiny_organism))
    off = train_grpo.run(build_config(output_dir=str(tmp_path / "off"), deploy_scale_rule="none", **fields))
    on = train_grpo.run(build_config(output_dir=str(tmp_path / "on"), **fields))
    assert "deploy_scale" not in off and "deployed_at_scale" not in off
    # the rule's extra evaluations change nothing else: base, training and deployed rates are the same
    assert {k: v for k, v in _strip(on).items() if k not in ("deploy_scale", "deployed_at_scale")} == _strip(off)

    pick = on["deploy_scale"]
    base_rate, curve = pick["base_monitored_hack_rate"], pick["validation"]
    assert pick["val_n"] == 16 and curve and 0 <= base_rate <= 1
    passing = [p["scale"] for p in curve if p["monitored_hack_rate"] < base_rate]
    assert pick["met"] == bool(passing) and pick["picked"] == (max(passing) if passing else 0.0)
    # the scan stops at the highest passing scale: every measured scale above the pick failed
    assert all(p["monitored_hack_rate"] >= base_rate for p in curve if p["scale"] > pick["picked"])
    # the task reward (the grader's pass share) beside each monitored rate: what route.experiments.selection reads
    assert 0 <= pick["base_task_reward"] <= 1 and all(0 <= p["task_reward"] <= 1 for p in curve)
    assert on["deployed_at_scale"]["n"] == 24
    if pick["picked"] == 0.0:
        assert on["deployed_at_scale"] == on["deployed"]
    assert on["deployed"]["undetectable"]["held_out_modes"] == ["echo", "verified"]
    assert f"deployed@{pick['picked']:g}" in train_grpo.summary_table(on)

    # route evaluate --run rebuilds the training policy: scale 0 is the deployed policy, 1 the training policy
    out, png = tmp_path / "scales.json", tmp_path / "scales.png"
    evaluate_main(["--run", str(tmp_path / "on"), "--scales", "0,0.5,1", "--json", str(out), "--png", str(png)])
    curve = json.loads(out.read_text())
    assert [p["scale"] for p in curve["scales"]] == [0.0, 0.5, 1.0] and png.stat().st_size > 1000
    for point, name in ((curve["scales"][0], "deployed"), (curve["scales"][-1], "training")):
        assert point["solve_rate"] == on[name]["solve_rate"] and point["hack_rate"] == on[name]["hack_rate"]
        assert point["hack_rate_undetectable"] == on[name]["undetectable"]["hack_rate"]
        assert point["monitored_hack_rate"] == on[name]["monitor"]["flag_rate"]
    assert curve["base"]["hack_rate"] == on["base"]["hack_rate"]
    assert "monitored" in capsys.readouterr().out

    # a relearn probe starts from the policy the run deployed: deployed/ at scale 0, else that scale's export
    run, results = tmp_path / "on", json.loads((tmp_path / "on" / "results.json").read_text())
    for picked in (0.0, 0.5):
        results["deploy_scale"]["picked"] = picked
        (run / "results.json").write_text(json.dumps(results))
        assert selected_checkpoint(run).name == ("deployed" if picked == 0.0 else "deployed_at_scale")
    exported = AutoModelForCausalLM.from_pretrained(selected_checkpoint(run), dtype=torch.float32)
    target, _, _ = load_policy(run)
    ids = torch.tensor([[3, 5, 7, 11, 13, 2]])
    with torch.no_grad(), target.scaled(0.5):
        want = target.model(input_ids=ids).logits
    with torch.no_grad():
        got = exported(input_ids=ids).logits
        ablated = AutoModelForCausalLM.from_pretrained(run / "deployed", dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, ablated)  # the quarantine at 0.5 is in the export, not the ablated policy
    shutil.rmtree(run / "policy")  # exported once: the second call reads the export, not the policy
    assert selected_checkpoint(run) == run / "deployed_at_scale"
    (run / "deployed_at_scale").unlink()  # a symlink to its version (route.utils.io.atomic_dir)
    with pytest.raises(ValueError, match="picked quarantine scale 0.5 and the run has no policy/"):
        selected_checkpoint(run)


def test_evaluate_run_without_a_saved_policy_names_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate_main(["--run", str(tmp_path)])
    assert "--run" in capsys.readouterr().err


def test_bad_scales_name_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate_main(["--run", str(tmp_path), "--scales", "0,2"])
    assert "--scales" in capsys.readouterr().err


class _DialTarget:
    """A stand-in target whose `scaled(s)` records the scale the next evaluation runs at."""

    model = None

    def __init__(self):
        self.scale, self.seen = 1.0, []

    def scaled(self, s):
        import contextlib

        self.seen.append(s)
        self.scale = s
        return contextlib.nullcontext()


@pytest.mark.parametrize(
    "flags,expected", [({1.0: 0.5, 0.5: 0.2, 0.0: 0.1}, 0.5), ({1.0: 0.5, 0.5: 0.4, 0.0: 0.3}, 0.0)]
)
def test_the_rule_reads_flags_only_and_picks_the_highest_passing_scale(monkeypatch, flags, expected):
    import route.trainer.scales as scales

    target = _DialTarget()
    base = {"flag_rate": 0.3, "hack_rate": 0.0}

    def fake_evaluate(model, tokenizer, env, **kw):  # ground truth says the opposite of the flags
        rate = base["flag_rate"] if target.scale is None else flags[target.scale]
        return {"monitor": {"flag_rate": rate}, "hack_rate": 1 - rate, "pass_rate": 0.25 + (target.scale or 0) / 2}

    monkeypatch.setattr(scales, "evaluate_policy", fake_evaluate)
    config = build_config(use_cpu=True, report_to="none", scale_grid=[0.0, 0.5, 1.0], val_n=8)
    rule = scales.DeployScale(config, envs.make_env("arith"), None, object(), [], 4)
    with pytest.raises(RuntimeError, match="measure_base"):
        rule.pick(target)
    target.scale = None
    assert rule.measure_base(target) == 0.3
    pick = rule.pick(target)
    assert pick["picked"] == expected and pick["met"] == (expected > 0 or flags[0.0] < 0.3)
    assert target.seen == [1.0, 0.5] if expected == 0.5 else target.seen == [1.0, 0.5, 0.0]
    assert [p["scale"] for p in pick["validation"]] == sorted(target.seen)
    # each point carries the task reward measured at its own scale, the base's its own
    assert [p["task_reward"] for p in pick["validation"]] == [0.25 + s / 2 for s in sorted(target.seen)]
    assert pick["base_task_reward"] == 0.25


@pytest.mark.parametrize(
    "bad", [dict(deploy_scale_rule="best"), dict(scale_grid=[0.5, 1.5]), dict(val_n=0), dict(scale_grid=[])]
)
def test_bad_scale_settings_name_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        build_config(use_cpu=True, report_to="none", **bad)
