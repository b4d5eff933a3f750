"""Preference training of heads through TRL: the loss terms, the trainer's invariants, the task, the config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from route.models.heads import MAVForCausalLM, task
from route.models.heads.train import HeadsTrainConfig, make_trainer, parse_config
from route.models.heads.trainer import dpo_loss, kl_to_base, margin_loss, token_logps
from route.models.organism import build_tokenizer
from tests.heads.test_models import tiny_base


def test_kl_is_the_full_vocabulary_kl_on_masked_positions_only():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.float)
    assert kl_to_base(q, q, mask).item() == 0.0
    expected = F.kl_div(torch.log_softmax(q, -1), torch.log_softmax(p, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_to_base(p, q, mask), (expected * mask).sum() / mask.sum())
    p2 = p.clone()
    p2[0, 0] += 100.0  # an unmasked (prompt) position does not count
    torch.testing.assert_close(kl_to_base(p2, q, mask), kl_to_base(p, q, mask))


def test_margin_and_dpo_count_completion_tokens_only():
    g = torch.Generator().manual_seed(0)
    logps = -torch.rand(4, 6, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]] * 4, dtype=torch.float)
    base = margin_loss(logps, mask, beta=2.0)
    prompt_moved = logps.clone()
    prompt_moved[0, :2] -= 5.0
    assert torch.equal(margin_loss(prompt_moved, mask, beta=2.0), base)
    completion_moved = logps.clone()
    completion_moved[0, 2] += 1.0  # a chosen completion token gets likelier: the loss falls
    assert margin_loss(completion_moved, mask, beta=2.0) < base
    loss, chosen, rejected = dpo_loss(logps, logps.clone(), mask, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2.0)) and torch.equal(chosen, torch.zeros(2))
    dpo_moved, _, _ = dpo_loss(prompt_moved, logps, mask, beta=0.1)
    assert dpo_moved.item() == pytest.approx(math.log(2.0))


def test_token_logps_shift():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 5.0
    lp = token_logps(logits, torch.tensor([[0, 2, 1]]))
    assert lp.shape == (1, 2)
    assert lp[0, 0].item() == pytest.approx(torch.log_softmax(logits[0, 0], -1)[2].item())


def tiny_cfg(tmp_path, **kw) -> HeadsTrainConfig:
    base = dict(
        output_dir=str(tmp_path),
        head="mav",
        n_train=48,
        steps=4,
        batch_size=4,
        learning_rate=5e-2,
        fusion_width=8,
        progress=False,
        kl_weight=0.1,
        l2_weight=0.01,
        margin_weight=0.5,
    )
    return HeadsTrainConfig(**{**base, **kw})


def test_trainer_moves_every_head_parameter_and_never_the_base(tmp_path):
    base = tiny_base(layers=3)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = MAVForCausalLM(base, fusion_width=8, dropout=0.0)
    head_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = make_trainer(model, build_tokenizer(), tiny_cfg(tmp_path), tmp_path / "work")
    assert trainer.ref_model is model.base  # no second model: the reference is the frozen base itself
    trainer.train()
    assert trainer.state.global_step == 4
    opt_params = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert opt_params == {id(p) for p in model.head_parameters()}  # every head parameter reaches the optimizer
    assert {"fuse.weight", "fuse.bias", "out.weight", "out.bias"} == set(head_before)
    for n, p in model.named_parameters():
        if n in head_before:
            assert not torch.equal(p, head_before[n]), f"{n} did not move"
    for n, p in base.named_parameters():
        assert torch.equal(p, before[n]), f"base parameter {n} moved"
    logs = [h for h in trainer.state.log_history if "heads/kl" in h]
    assert logs and all(math.isfinite(h["heads/kl"]) for h in logs)
    ids = torch.randint(3, 40, (2, 7))
    model.eval()
    assert torch.equal(model(ids, alpha=0.0).logits, base(ids).logits)  # alpha = 0 after training: the base
    assert model(ids, alpha=1.0).alignment.abs().sum() > 0


def test_trainer_refuses_losses_it_does_not_implement(tmp_path):
    from trl import DPOConfig

    from route.models.heads.trainer import HeadDPOTrainer

    args = DPOConfig(output_dir=str(tmp_path), loss_type=["ipo"], use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="loss_type"):
        HeadDPOTrainer(MAVForCausalLM(tiny_base()), args=args, train_dataset=None)


def test_task_property_depends_on_the_prompt():
    probs = task.problems(200, seed=3, split="eval")
    assert probs == task.problems(200, seed=3, split="eval")  # a pure function of (seed, split, index)
    assert {p.fmt for p in probs} == set(task.FORMATS)
    p = task.Problem("3+4 fmt star>", 3, 4, "star")
    assert task.grade(p, "*7") == {"follows": True, "correct": True}
    assert task.grade(p, "#7") == {"follows": False, "correct": True}
    assert task.grade(p, "*8") == {"follows": True, "correct": False}
    assert task.grade(p, "*7*") == {"follows": False, "correct": True}  # malformed
    rows = task.preference_rows(probs, seed=0)
    for prob, chosen, rejected in zip(probs, rows["chosen"], rows["rejected"]):
        assert task.grade(prob, chosen)["follows"] and not task.grade(prob, rejected)["follows"]
        assert task.grade(prob, rejected)["correct"]
    # any one fixed answer format (what a constant bias can push towards) follows at most ~1/4 of prompts
    for fmt in task.FORMATS:
        share = sum(task.grade(q, task.render(q.a + q.b, fmt))["follows"] for q in probs) / len(probs)
        assert share < 0.4
    demos = task.demonstrations(probs, follow_share=0.5, seed=0)
    follow = sum(task.grade(q, c)["follows"] for q, (_, c) in zip(probs, demos)) / len(probs)
    assert 0.35 < follow < 0.65


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="head: invalid value 'bias'"):
        HeadsTrainConfig(head="bias")
    with pytest.raises(ValueError, match="layers: invalid value 'first'"):
        HeadsTrainConfig(layers="first")
    with pytest.raises(ValueError, match="kl_weight"):
        HeadsTrainConfig(kl_weight=-1.0)
    with pytest.raises(ValueError, match="dpo_weight, margin_weight"):
        HeadsTrainConfig(dpo_weight=0.0, margin_weight=0.0)
    assert HeadsTrainConfig(head="mav", layers=[0, -1]).head_settings("mav")["layers"] == [0, -1]
    path = tmp_path / "c.yaml"
    path.write_text("head: mav\nsteps: 7\n")
    cfg = parse_config(["--config", str(path), "--steps", "9"])
    assert cfg.head == "mav" and cfg.steps == 9
    path.write_text("head: mav\nstepz: 7\n")
    with pytest.raises(ValueError, match="unknown fields \\['stepz'\\]"):
        parse_config(["--config", str(path)])


class ScriptedModel(torch.nn.Module):
    """Stands in for a head model in `rates`: `generate` answers each prompt with a given completion."""

    def __init__(self, tokenizer, answers: dict[str, str]):
        super().__init__()
        self.tok, self.answers, self.anchor = tokenizer, answers, torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def generate(self, input_ids, attention_mask, alpha, **kw):
        self.calls.append((alpha, kw["do_sample"]))
        prompts = self.tok.batch_decode(input_ids, skip_special_tokens=True)
        new = [self.tok(self.answers[p], add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(map(len, new))
        pad = self.tok.pad_token_id
        rows = [n + [pad] * (width - len(n)) for n in new]
        return torch.cat([input_ids, torch.tensor(rows, dtype=input_ids.dtype)], dim=1)


def test_rates_count_follows_and_correct_answers():
    """`rates` on completions whose grades are known: the format named (follows) and the right sum (correct) counted
    separately, over every prompt, whatever the batch split."""
    from route.models.heads import task
    from route.models.heads.evaluate import rates
    from route.models.organism import build_tokenizer

    tok = build_tokenizer()
    probs = task.problems(8, seed=0, split="eval")
    wrong = {p.fmt: next(f for f in sorted(task.FORMATS) if f != p.fmt) for p in probs}
    kinds = ["follow", "follow", "follow", "other_format", "other_format", "wrong_sum", "garbage", "garbage"]
    answers = {}
    for p, kind in zip(probs, kinds, strict=True):
        answers[p.prompt] = {
            "follow": task.render(p.a + p.b, p.fmt),  # follows, correct
            "other_format": task.render(p.a + p.b, wrong[p.fmt]),  # correct only
            "wrong_sum": task.render(p.a + p.b + 1, p.fmt),  # follows only
            "garbage": "zz",  # neither
        }[kind]
    model = ScriptedModel(tok, answers)
    r = rates(model, tok, probs, alpha=1.5, max_new_tokens=4, batch_size=3, sample=False)
    assert (r["follow_rate"], r["accuracy"], r["n"], r["decoding"]) == (4 / 8, 5 / 8, 8, "greedy")
    assert model.calls == [(1.5, False)] * 3, "three batches of at most 3, at the alpha and decoding asked for"


def test_train_and_evaluate_end_to_end(tmp_path, capsys):
    """The CLI path on a tiny embedded base: results.json, saved heads that reload from the recorded base, CSV, PNG."""
    import csv
    import json

    from route.models.heads import evaluate, train

    out = tmp_path / "run"
    argv = [
        "--output_dir",
        str(out),
        "--head",
        "iav",
        "--base_hidden_size",
        "16",
        "--base_layers",
        "1",
        "--base_steps",
        "3",
        "--steps",
        "2",
        "--batch_size",
        "4",
        "--n_train",
        "16",
        "--n_eval",
        "8",
        "--max_new_tokens",
        "4",
        "--progress",
        "false",
    ]
    train.main(argv)
    results = json.loads((out / "results.json").read_text())
    assert set(results["heads"]) == {"iav", "bias"}
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))  # .<name>.v<id>: atomic versions
    assert visible == ["bias", "iav", "results.json"]  # no trainer leftovers
    assert results["base"]["n"] == 8
    # the written rates are those of the saved heads: re-measured from disk with the run's seed and decoding (the same
    # weights and operations, so the same samples), and each is a count out of n
    cfg = results["config"]
    again = {r["head"]: r for r in evaluate.sweep([str(out)], [cfg["eval_alpha"]], progress=False,
                                                  sample=cfg["eval_sample"])}
    for head in ("iav", "bias"):
        written = results["heads"][head]["eval"]
        assert written["alpha"] == cfg["eval_alpha"] and written["n"] == 8
        assert (again[head]["follow_rate"], again[head]["accuracy"]) == (written["follow_rate"], written["accuracy"])
        assert all(float(written[k] * 8).is_integer() for k in ("follow_rate", "accuracy")), written
    assert "follows format" in capsys.readouterr().out
    evaluate.main(["--run", str(out), "--alphas", "0", "1", "--n", "4"])
    with open(out / "alpha_sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["head"], float(r["alpha"])) for r in rows] == [("iav", 0.0), ("iav", 1.0), ("bias", 0.0), ("bias", 1.0)]
    assert rows[0]["follow_rate"] == rows[2]["follow_rate"]  # alpha 0 is the same base for every head
    assert (out / "alpha_sweep.png").stat().st_size > 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # a user error: one line naming the flag, exit status 2
        evaluate.main(["--run", str(tmp_path / "missing")])
    assert exc.value.code == 2 and "--run: no results.json" in capsys.readouterr().err


@pytest.mark.parametrize("name,head", [("iav_default", "iav"), ("mav_default", "mav")])
def test_default_configs_parse(name, head):
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    cfg = parse_config(["--config", str(path)])
    assert cfg.head == head and cfg.baseline and cfg.output_dir == f"runs/heads_{head}"
