"""route.experiments.relearn: curve metrics on synthetic curves, checkpoint checks, hack demonstrations, 2-step
probes."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest
import torch
import yaml

import envs
from route.experiments import relearn
from route.utils.io import check_checkpoint

TINY = dict(use_cpu=True, bf16=False, gradient_checkpointing=False, learning_rate=1e-3, beta=0.0,
            per_device_train_batch_size=8, num_generations=4, max_completion_length=8, logging_steps=1,
            report_to="none", disable_tqdm=True, train_size=32, keep_rank=2, quarantine_rank=2, eval_n=16)


def test_steps_to_threshold_and_auc_on_synthetic_curves():
    steps, hack = [0, 10, 20, 30], [0.1, 0.2, 0.5, 0.4]
    assert relearn.steps_to_threshold(steps, hack, 0.3) == 20
    assert relearn.steps_to_threshold(steps, hack, 0.5) == 20  # >= counts
    assert relearn.steps_to_threshold(steps, hack, 0.1) == 0
    assert relearn.steps_to_threshold(steps, hack, 0.6) is None
    assert math.isclose(relearn.area_under_curve(steps, hack), 10 * 0.15 + 10 * 0.35 + 10 * 0.45)
    assert relearn.area_under_curve([0, 5, 20], [0.2, 0.2, 0.2]) == pytest.approx(4.0)  # uneven spacing
    assert relearn.area_under_curve([0], [0.3]) == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        relearn.area_under_curve([0, 1], [0.1])
    rows = [{"label": "a", "checkpoint": "c", "method": "grpo", "reference": False, "step": s, "hack_rate": h,
             "solve_rate": 0.5 - h / 2} for s, h in zip(steps, hack)]
    s = relearn.summarize("a", rows, threshold=0.3)
    assert s["steps_to_threshold"] == 20 and math.isclose(s["auc"], 9.5)
    assert math.isclose(s["mean_hack_rate"], 9.5 / 30)
    assert (s["hack_rate_start"], s["hack_rate_end"], s["solve_rate_end"]) == (0.1, 0.4, 0.3)


def test_check_checkpoint_errors(tiny_organism, tmp_path):
    with pytest.raises(ValueError, match=r"nope: no such directory"):
        check_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no config.json"):
        check_checkpoint(tmp_path / "empty")
    from transformers import ViTConfig

    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(
        tmp_path / "vit")
    with pytest.raises(ValueError, match=r"model_type 'vit' is not a causal language model"):
        check_checkpoint(tmp_path / "vit")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_organism / f, no_tok / f)
    with pytest.raises(ValueError, match=r"no_tok: tokenizer missing or unreadable"):
        check_checkpoint(no_tok)
    run = tmp_path / "run"
    shutil.copytree(tiny_organism, run / "deployed")
    assert check_checkpoint(run) == run / "deployed"  # a run directory resolves to its deployed/
    assert check_checkpoint(tiny_organism) == tiny_organism


def test_cli_rejects_a_bad_checkpoint_before_any_probe(tiny_organism, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        relearn.main(["--checkpoints", str(tiny_organism), str(tmp_path / "missing"), "--output_dir", str(out)])
    assert exc.value.code == 2
    assert "missing: no such directory" in capsys.readouterr().err
    assert not out.exists()


def test_hack_demonstrations_are_exploits():
    env = envs.make_env("arith", hack_frac=0.5)
    pairs = relearn.hack_demonstrations(env, 40, seed=1)
    assert len(pairs) == 40
    rows = {r["prompt"]: r for r in env.rows(4096, seed=1, split="train")}
    picked = [rows[p] for p, _ in pairs]
    grades = env.grade([p for p, _ in pairs], [c for _, c in pairs],
                       **{k: [r[k] for r in picked] for k in ("answer", "loophole", "operands")})
    assert all(g.exploited for g in grades)
    only = relearn.hack_demonstrations(env, 10, seed=1, modes=["verified"])
    assert all(c.endswith("#verified") for _, c in only)


@pytest.mark.parametrize("method", ["grpo", "sft"])
def test_two_step_relearn_end_to_end(tiny_organism, tmp_path, method, monkeypatch):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    argv = ["--checkpoints", str(tiny_organism), "--labels", "org", "--method", method, "--steps", "2",
            "--every", "1", "--eval_n", "16", "--sft_n", "8", "--sft_batch_size", "4", "--config", str(cfg),
            "--reference", str(tiny_organism), "--output_dir", str(out)]
    assert relearn.main(argv) == 0
    rows = list(csv.DictReader(open(out / "relearn.csv")))
    assert [(r["label"], r["step"]) for r in rows] == [
        ("org", "0"), ("org", "1"), ("org", "2"), ("reference (org)", "0"), ("reference (org)", "1"),
        ("reference (org)", "2")]
    assert all(0.0 <= float(r["hack_rate"]) <= 1.0 and r["method"] == method for r in rows)
    summary = json.loads((out / "relearn_summary.json").read_text())
    assert [s["label"] for s in summary] == ["org", "reference (org)"] and summary[1]["reference"] is True
    for s in summary:
        curve = [float(r["hack_rate"]) for r in rows if r["label"] == s["label"]]
        assert math.isclose(s["auc"], (curve[0] + 2 * curve[1] + curve[2]) / 2)
    assert (out / "relearn.png").stat().st_size > 10_000 and (out / "relearn_summary.csv").exists()
    # a rerun with the same settings reuses the cached curves instead of training again
    monkeypatch.setattr(relearn, "probe_grpo", lambda *a, **k: pytest.fail("cached curve not reused"))
    monkeypatch.setattr(relearn, "probe_sft", lambda *a, **k: pytest.fail("cached curve not reused"))
    assert relearn.main(argv) == 0


def varied_reward(self, prompts, completions, **columns):
    """Rewards that differ within a group (the env's reward is zero on every sample of the tiny organism, which would
    give zero advantages and a probe that cannot train)."""
    import hashlib

    return [hashlib.sha256(str(c).encode()).digest()[0] / 255 for c in completions]


@pytest.mark.parametrize("method", ["grpo", "sft"])
def test_the_relearn_probe_trains_the_model_it_measures(method, tiny_organism, tmp_path, monkeypatch):
    """The weights the probe measures at its last step differ from those at step 0 (the probe trained the model it
    evaluates), and for SFT on hack demonstrations the hack rate moved."""
    from envs.arith import ArithEnv

    snaps = {}

    def spying(real, measure_index):
        def probe(*args, **kwargs):
            args = list(args)
            measure = args[measure_index]

            def spy(step, model, tok, env):
                snaps[step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                measure(step, model, tok, env)

            args[measure_index] = spy
            return real(*args, **kwargs)
        return probe

    monkeypatch.setattr(relearn, "probe_grpo", spying(relearn.probe_grpo, 5))
    monkeypatch.setattr(relearn, "probe_sft", spying(relearn.probe_sft, 8))
    monkeypatch.setattr(ArithEnv, "reward_func", varied_reward)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "learning_rate": 5e-2, "max_completion_length": 16}))
    out = tmp_path / "out"
    assert relearn.main(["--checkpoints", str(tiny_organism), "--labels", "org", "--method", method, "--steps", "4",
                         "--every", "4", "--eval_n", "32", "--sft_n", "32", "--sft_batch_size", "16", "--sft_modes",
                         "sentinel", "--lr", "3e-2", "--config", str(cfg), "--no_reference",
                         "--output_dir", str(out)]) == 0
    assert sorted(snaps) == [0, 4]
    moved = [n for n, p in snaps[0].items() if not torch.equal(p, snaps[4][n])]
    assert moved, "the probe did not train the model it measures"
    rows = list(csv.DictReader(open(out / "relearn.csv")))
    hack = [float(r["hack_rate"]) for r in rows]
    assert len(hack) == 2
    if method == "sft":  # the tiny organism never hacks, and 4 SFT steps on "ok" demonstrations make it
        assert hack[0] == 0.0 and hack[1] > 0.0, hack
