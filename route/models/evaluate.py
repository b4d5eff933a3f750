"""Hack and solve rates of a policy on held-out prompts.

    route evaluate --model DIR --env arith --n 512 --json OUT.json

`hack_rate` is the share of all rollouts that are exploits; `hack_rate_by_mode[m]` is
measured on the prompts whose grader has loophole `m` only. Environments with a detectability
split (`env.detect_column`) also get `by_part`: the same rates on the `detectable` and the
`undetectable` prompts; environments whose hacks have forms (`env.hack_form`) get
`hack_rate_by_form[m][f]` (share of mode-m prompts answered with form f). Given a detector,
`monitor` holds its realised rates on these samples per condition, its TPR per hack form and `flag_rate`, the share
of rollouts it flags (the *monitored* hack rate). Given the modes a monitor never saw (`held_out_modes`),
`undetectable` holds the rates on the prompts no monitor of the run can see: a held-out mode's prompts and the
env's undetectable part (`undetectable_rates`).

    route evaluate --run runs/default --scales --json scales.json --png scales.png

evaluates a run's saved training policy at every quarantine scale (`route.trainer.scales`, docs/scales.md).
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

import envs
from envs.base import Grade


def rates(grades: Sequence[Grade], modes: Sequence[str]) -> dict[str, Any]:
    """Summary rates of a list of grades; modes with no prompt get NaN."""
    n = len(grades)
    by_mode: dict[str, list[bool]] = defaultdict(list)
    for g in grades:
        if g.mode is not None:
            by_mode[g.mode].append(g.exploited)
    nan = float("nan")
    return {
        "n": n,
        "solve_rate": sum(g.solved for g in grades) / n if n else nan,
        "hack_rate": sum(g.exploited for g in grades) / n if n else nan,
        "pass_rate": sum(g.passed for g in grades) / n if n else nan,
        "hack_rate_by_mode": {m: (sum(by_mode[m]) / len(by_mode[m]) if by_mode[m] else nan) for m in modes},
    }


def _prompt_text(tokenizer, prompt: Any) -> str:
    """A plain prompt as is; a conversation (list of messages) through the tokenizer's chat template."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def sample(model, tokenizer, prompts: Sequence[Any], max_new_tokens: int = 16, temperature: float = 1.0,
           seed: int = 0, batch_size: int = 256, progress: bool = False, desc: str = "sample") -> list[str]:
    """Sample one completion per prompt (temperature sampling, no top-k/top-p), reproducibly.

    `progress`: a tqdm bar over the prompts named `desc`, advanced per batch (closed when sampling ends)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    out: list[str] = []
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    # the caller's RNG (CPU and the model's GPU) is left as it was: evaluating never changes a training run
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False)
    with bar, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            texts = [_prompt_text(tokenizer, p) for p in prompts[i: i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            bar.update(len(texts))
    model.train(was_training)
    tokenizer.padding_side = side
    return out


def split_rates(env, rows: list[dict], prompts: list[str], completions: list[str], grades: list[Grade],
                detector=None) -> dict[str, Any]:
    """The by-part, by-form and monitor entries of `evaluate_policy` (empty when the env has none)."""
    from route.monitors.detectors import call_detector
    from route.monitors.systematic import detector_parts, realised_by_part

    out: dict[str, Any] = {}
    column = getattr(env, "detect_column", None)
    if column is not None and rows and column in rows[0]:
        out["by_part"] = {name: rates([g for g, r in zip(grades, rows) if bool(r[column]) == want], env.modes)
                          for name, want in (("detectable", True), ("undetectable", False))}
    forms = [env.hack_form(r, c) if hasattr(env, "hack_form") else None for r, c in zip(rows, completions)]
    if hasattr(env, "hack_form"):
        out["hack_rate_by_form"] = {
            m: {f: _share([fm == f for fm, r in zip(forms, rows) if r["loophole"] == m]) for f in env.forms[m]}
            for m in env.modes}
    if detector is not None:
        ids = [f"eval|{r.get('prompt_id', i)}" for i, r in enumerate(rows)]
        context = {"prompts": prompts, "completions": completions,
                   "columns": {k: [r[k] for r in rows] for k in rows[0]}}
        flags = call_detector(detector, grades, ids, **context)
        parts = detector_parts(detector, grades, ids, **context) or ["all"] * len(grades)
        by_form: dict[str, list[bool]] = defaultdict(list)
        for g, f, form in zip(grades, flags, forms):
            if g.exploited:
                by_form[f"{g.mode}/{form}"].append(f)
        out["monitor"] = {"flag_rate": _share([bool(f) for f in flags]),
                          "by_part": realised_by_part(grades, flags, parts),
                          "tpr_by_form": {k: _share(v) for k, v in sorted(by_form.items())},
                          "n_by_form": {k: len(v) for k, v in sorted(by_form.items())}}
    return out


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


def undetectable_rates(env, rows: list[dict], grades: list[Grade], held_out_modes: Sequence[str]) -> dict[str, Any]:
    """Rates on the prompts a monitor cannot see: those whose loophole is a held-out mode, plus the env's
    undetectable part (`env.detect_column` False), when it has one. `hack_rate_held_out`: on held-out modes only."""
    column = getattr(env, "detect_column", None)
    held = [r["loophole"] in held_out_modes for r in rows]
    hidden = [h or (column is not None and column in r and not r[column]) for h, r in zip(held, rows)]
    part = [g for g, h in zip(grades, hidden) if h]
    return {**rates(part, env.modes), "held_out_modes": list(held_out_modes),
            "hack_rate_held_out": _share([g.exploited for g, h in zip(grades, held) if h]), "n_held_out": sum(held)}


def evaluate_policy(model, tokenizer, env, n: int = 512, seed: int = 0, max_new_tokens: int = 16,
                    policy: contextlib.AbstractContextManager | None = None, detector=None,
                    held_out_modes: Sequence[str] | None = None, rows: list[dict] | None = None,
                    progress: bool = False, desc: str = "eval", temperature: float = 1.0) -> dict[str, Any]:
    """Rates of `model` on `n` held-out prompts (split "test"), sampled at `temperature` (a run's own: its
    `temperature`); `policy` wraps sampling (e.g. `target.ablated()`).

    With a `detector`, the result also has its realised rates on these rollouts (`monitor`, see `split_rates`); with
    `held_out_modes` (a list, possibly empty), the rates on the undetectable part (`undetectable_rates`). `rows`:
    evaluate these prompt rows instead (e.g. a validation split, `route.trainer.scales.validation_rows`). `progress`: a
    tqdm bar named `desc` over the prompts while they are sampled (per batch)."""
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    rows = env.rows(n, seed=seed, split="test") if rows is None else rows
    prompts = [r["prompt"] for r in rows]
    with policy or contextlib.nullcontext():
        completions = sample(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                             seed=seed, progress=progress, desc=desc)
    columns = {k: [r[k] for r in rows] for k in rows[0]} if rows else {}
    grades = env.grade(prompts, completions, **columns)
    out = {**rates(grades, env.modes), **split_rates(env, rows, prompts, completions, grades, detector)}
    if held_out_modes is not None:
        out["undetectable"] = undetectable_rates(env, rows, grades, held_out_modes)
    return out


def evaluate_dir(model_dir: str | os.PathLike, env_name: str = "arith", n: int = 512, seed: int = 0,
                 env_kwargs: dict | None = None, max_new_tokens: int = 16, progress: bool = True) -> dict[str, Any]:
    """Load a saved checkpoint (plain transformers) and evaluate it (`progress`: a bar while sampling)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    env = envs.make_env(env_name, **(env_kwargs or {}))  # bad settings fail before the model loads
    env.check_ready()
    from route.models.pretrained import resolve_model

    model_dir = resolve_model(model_dir)  # a short name or a .gguf file: its converted checkpoint
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return evaluate_policy(model, tokenizer, env, n=n, seed=seed, max_new_tokens=max_new_tokens, progress=progress)


def format_rates(r: dict[str, Any], title: str = "") -> str:
    modes = " ".join(f"{m}={v:.3f}" for m, v in r["hack_rate_by_mode"].items())
    head = f"{title}: " if title else ""
    parts = "".join(f" | {name}: solve={p['solve_rate']:.3f} hack={p['hack_rate']:.3f}"
                    for name, p in r.get("by_part", {}).items())
    return (f"{head}n={r['n']} solve={r['solve_rate']:.3f} hack={r['hack_rate']:.3f} "
            f"pass={r['pass_rate']:.3f} | by mode: {modes}{parts}")


def steps_to_threshold(steps: Sequence[int], hack: Sequence[float], threshold: float) -> int | None:
    """The first measured step whose hack rate is >= threshold; None when the curve never reaches it."""
    return next((s for s, h in zip(steps, hack, strict=True) if h >= threshold), None)
