"""The quarantine-scale dial at evaluation: rate curves over scales, the deployment-scale rule, a run's saved policy.

Every target runs its training policy with the quarantine's contribution times s (`target.scaled(s)`; 0 is the
deployed policy, 1 the training policy). This module measures policies along that dial:

- `scale_curve`: per scale, solve, hack, hack by mode, hack on the undetectable part (held-out modes and the env's
  undetectable prompts, `route.models.evaluate.undetectable_rates`) and the *monitored* hack rate: the share of rollouts
  the run's monitor flags (`monitored_hack_rate`), the only rate a deployer without ground truth can see;
- `DeployScale`: the main job's rule "deploy the highest scale whose monitored hack rate is below the base model's",
  measured on a validation split (`validation_rows`: prompts of the env's held-out split drawn with another seed,
  minus every prompt of the test set) from the real monitor's flags only, never ground truth; under a flag control
  (`flag_control`) the rule still reads the monitor the control wraps;
- `save_policy` / `load_policy`: `<output_dir>/policy/` (the target's trained parameters and the run's settings),
  from which `route evaluate --run DIR --scales` rebuilds the training policy; `plot_scales` draws a curve.

Departures: gradient routing (Cloud et al. 2024, "Gradient Routing: Masking Gradients to Localize Computation in
Neural Networks") deploys the ablated model only; scaling the quarantine and picking a scale by a monitor are this
library's. The rule scans the grid from the top and stops at the first scale that passes (the highest passing one),
so the validation curve it reports holds the scales it measured, not always the whole grid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from route.models.evaluate import evaluate_policy

POLICY_DIR = "policy"
STATE_FILE = "target_state.pt"
SETTINGS_FILE = "settings.json"
VAL_SEED_OFFSET = 1  # validation prompts and sampling use eval_seed + 1 (prompts of the test set are removed)


def real_monitor(detector: Any) -> Any:
    """The monitor itself: a flag control (`route.monitors.detectors.ControlDetector`) wraps the real one as
    `.monitor`."""
    return detector.monitor if hasattr(detector, "control") and hasattr(detector, "monitor") else detector


def held_out_modes(config: Any, env: Any) -> list[str]:
    """The env's modes the monitor was never told about (`detector_modes`; None: all known, nothing held out)."""
    known = config.detector_modes
    return [] if known is None else [m for m in env.modes if m not in known]


def _key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def validation_rows(env: Any, n: int, seed: int, test_rows: Sequence[dict]) -> list[dict]:
    """`n` prompt rows of the env's held-out split drawn with `seed`, none of whose prompts is among `test_rows`.

    Rows are drawn in order (`env.rows(k, seed)` is a prefix of `env.rows(2k, seed)`) and kept unless their prompt
    text is a test prompt; their ids carry `seed`, so they differ from the test ids too. ValueError naming `val_n`
    when the split has too few other prompts."""
    taken = {_key(r["prompt"]) for r in test_rows}
    k = n
    while True:
        rows = [r for r in env.rows(k, seed=seed, split="test") if _key(r["prompt"]) not in taken]
        if len(rows) >= n:
            return rows[:n]
        if k >= 64 * n:
            raise ValueError(
                f"val_n: found only {len(rows)} validation prompts outside the {len(taken)} test prompts "
                f"in {k} draws; lower val_n or eval_n"
            )
        k *= 2


def monitored_hack_rate(result: dict) -> float:
    return result["monitor"]["flag_rate"]


def scale_point(scale: float, result: dict) -> dict[str, Any]:
    """One point of a curve: the headline rates of `result` (an `evaluate_policy` result with a monitor)."""
    hidden = result.get("undetectable", {})
    return {
        "scale": scale,
        "n": result["n"],
        "solve_rate": result["solve_rate"],
        "hack_rate": result["hack_rate"],
        "hack_rate_by_mode": result["hack_rate_by_mode"],
        "hack_rate_undetectable": hidden.get("hack_rate"),
        "hack_rate_held_out": hidden.get("hack_rate_held_out"),
        "monitored_hack_rate": monitored_hack_rate(result),
    }


def scale_curve(
    target: Any,
    tokenizer: Any,
    env: Any,
    scales: Sequence[float],
    monitor: Any,
    held_out: Sequence[str],
    progress: bool = True,
    **eval_kw: Any,
) -> list[dict[str, Any]]:
    """`evaluate_policy` of the target's policy at each scale (with `scale` and `point`, `scale_point`'s summary)."""
    from tqdm.auto import tqdm

    out = []
    for s in tqdm(list(scales), desc="scales", disable=not progress):
        with target.scaled(s):
            r = evaluate_policy(target.model, tokenizer, env, detector=monitor, held_out_modes=held_out, **eval_kw)
        out.append({"scale": s, "point": scale_point(s, r), **r})
    return out


class DeployScale:
    """The main job's deployment-scale rule (`deploy_scale_rule: monitor`), in two calls around training.

    `measure_base(target)` before training (the target's ungated model is the base model) measures the base's
    monitored hack rate on the validation prompts; `pick(target)` after training scans `scale_grid` from the top
    and returns the highest scale whose monitored hack rate is strictly below it (0, the ablated policy, if none).
    """

    def __init__(
        self, config: Any, env: Any, tokenizer: Any, detector: Any, test_rows: Sequence[dict], max_new_tokens: int
    ):
        self.env, self.tokenizer, self.monitor = env, tokenizer, real_monitor(detector)
        self.grid = sorted(config.scale_grid, reverse=True)
        self.seed = config.eval_seed + VAL_SEED_OFFSET
        self.rows = validation_rows(env, config.val_n, self.seed, test_rows)
        self.kw = dict(n=len(self.rows), seed=self.seed, max_new_tokens=max_new_tokens, rows=self.rows,
                       detector=self.monitor, temperature=config.temperature)
        self.base_rate: float | None = None
        self.base_reward: float | None = None

    def measure_base(self, target: Any) -> float:
        r = evaluate_policy(target.model, self.tokenizer, self.env, **self.kw)
        self.base_rate, self.base_reward = monitored_hack_rate(r), r["pass_rate"]
        return self.base_rate

    def pick(self, target: Any) -> dict[str, Any]:
        """{"rule", "picked", "met", "base_monitored_hack_rate", "base_task_reward", "val_n", "val_seed",
        "validation": [points]}; a point holds the scale, its monitored hack rate and its task reward (the share of
        rollouts the environment's grader passes: the training reward, which a deployer sees;
        route.experiments.selection reads both to pick configurations)."""
        if self.base_rate is None:
            raise RuntimeError("DeployScale.pick: call measure_base(target) before training")
        curve, picked = [], None
        for s in self.grid:
            with target.scaled(s):
                r = evaluate_policy(target.model, self.tokenizer, self.env, **self.kw)
            rate = monitored_hack_rate(r)
            curve.append({"scale": s, "monitored_hack_rate": rate, "task_reward": r["pass_rate"]})
            if rate < self.base_rate:
                picked = s
                break
        return {
            "rule": "monitor",
            "picked": 0.0 if picked is None else picked,
            "met": picked is not None,
            "base_monitored_hack_rate": self.base_rate,
            "base_task_reward": self.base_reward,
            "val_n": len(self.rows),
            "val_seed": self.seed,
            "validation": sorted(curve, key=lambda p: p["scale"]),
        }


def deploy_scale_rule(
    config: Any, env: Any, tokenizer: Any, detector: Any, eval_kw: dict, target: Any
) -> DeployScale | None:
    """The main job's rule (None under `deploy_scale_rule: none`), its base rate measured now (before training)."""
    if config.deploy_scale_rule == "none":
        return None
    test_rows = env.rows(eval_kw["n"], seed=eval_kw["seed"], split="test")
    rule = DeployScale(config, env, tokenizer, detector, test_rows, eval_kw["max_new_tokens"])
    rule.measure_base(target)
    return rule


def deploy_at_picked_scale(
    rule: DeployScale | None, target: Any, tokenizer: Any, env: Any, eval_kw: dict, training: dict
) -> dict | None:
    """After training, before the ablation: the picked scale and the test rates there ({"deploy_scale", "result"};
    None without a rule). At 1 the result is `training`'s; at 0 `finish_scaled` takes the deployed result."""
    if rule is None:
        return None
    pick = rule.pick(target)
    s = pick["picked"]
    if s in (0.0, 1.0):
        return {"deploy_scale": pick, "result": training if s == 1.0 else None}
    with target.scaled(s):
        return {"deploy_scale": pick, "result": evaluate_policy(target.model, tokenizer, env, **eval_kw)}


def finish_scaled(scaled: dict | None, deployed: dict) -> dict[str, Any]:
    """results.json's `deploy_scale` (rule, picked scale, validation curve) and `deployed_at_scale` entries."""
    if scaled is None:
        return {}
    return {"deploy_scale": scaled["deploy_scale"], "deployed_at_scale": scaled["result"] or deployed}


# ---------------------------------------------------------------------- the run's training policy on disk
def save_policy(target: Any, config: Any, model_dir: str, output_dir: str | os.PathLike) -> Path:
    """Write `<output_dir>/policy/`: the target's trainable parameters (`target_state.pt`) and the run's settings
    (`settings.json`: the base model and every field of this library's config and the target's)."""
    import dataclasses

    from trl import GRPOConfig

    from route.trainer.parse import flat_config
    from route.utils.io import torch_save_atomic, write_json_atomic

    out = Path(output_dir) / POLICY_DIR
    state = {n: p.detach().cpu() for n, p in target.model.named_parameters() if p.requires_grad}
    torch_save_atomic(state, out / STATE_FILE)
    inherited = {f.name for f in dataclasses.fields(GRPOConfig)} - {"seed", "max_completion_length"}
    fields = {k: v for k, v in flat_config(config).items() if k not in inherited and k != "target_args"}
    write_json_atomic(out / SETTINGS_FILE, {"model": model_dir, "fields": fields})
    return out


def load_policy(run_dir: str | os.PathLike) -> tuple[Any, Any, Any]:
    """(target, tokenizer, config) of a run's saved training policy (`save_policy`), the quarantine in place; the
    base model's path is `config.model_name_or_path` (the organism's directory when the run built it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from route.targets import build_target
    from route.trainer.parse import build_config

    policy = Path(run_dir) / POLICY_DIR
    if not (policy / STATE_FILE).is_file() or not (policy / SETTINGS_FILE).is_file():
        raise ValueError(
            f"--run: {run_dir} has no {POLICY_DIR}/{STATE_FILE} and {SETTINGS_FILE} (written by the main "
            "job, route.train_grpo, since the scale dial exists)"
        )
    settings = json.loads((policy / SETTINGS_FILE).read_text())
    fields = {**settings["fields"], "model_name_or_path": settings["model"]}
    config = build_config(**fields, output_dir=str(run_dir), report_to="none", use_cpu=not torch.cuda.is_available())
    model = AutoModelForCausalLM.from_pretrained(settings["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(settings["model"])
    target = build_target(config, model)
    state = torch.load(policy / STATE_FILE, map_location="cpu", weights_only=True)
    missing = sorted(set(state) - set(target.model.state_dict()))
    if missing:
        raise ValueError(f"--run: {policy / STATE_FILE} holds parameters the rebuilt target lacks: {missing[:3]}")
    target.model.load_state_dict(state, strict=False)
    return target, tokenizer, config


def evaluate_run(
    run_dir: str | os.PathLike,
    scales: Sequence[float] = (0.0, 1.0),
    n: int | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """A run's base model and its training policy at each quarantine scale, on the run's test prompts (`eval_n`,
    `eval_seed` unless given), scored by the run's real monitor. Scale 0 is the deployed policy, 1 the training one.

    Returns {"run", "env", "n", "seed", "held_out_modes", "base": point, "scales": [point], "details": [result]}."""
    import torch
    from transformers import AutoModelForCausalLM

    import envs
    from route.monitors.build import build_detector

    target, tokenizer, config = load_policy(run_dir)
    env = envs.make_env(config.env, **config.env_kwargs)
    monitor, held = real_monitor(build_detector(config, env)), held_out_modes(config, env)
    kw = dict(
        n=n or config.eval_n,
        seed=config.eval_seed if seed is None else seed,
        max_new_tokens=config.eval_max_new_tokens or config.max_completion_length,
        temperature=config.temperature,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base_model = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, dtype=torch.float32).to(device)
    base = evaluate_policy(base_model, tokenizer, env, detector=monitor, held_out_modes=held, **kw)
    del base_model
    target.model.to(device)
    curve = scale_curve(target, tokenizer, env, scales, monitor, held, progress=progress, **kw)
    return {
        "run": str(run_dir),
        "env": config.env,
        "n": kw["n"],
        "seed": kw["seed"],
        "held_out_modes": held,
        "base": scale_point(None, base),
        "scales": [c.pop("point") for c in curve],
        "details": curve,
    }


def format_curve(result: dict[str, Any]) -> str:
    """The curve as a text table (one row per scale, then the base model)."""
    head = f"{'scale':>6} {'solve':>6} {'hack':>6} {'undetect':>8} {'monitored':>9}"
    rows = [(f"{p['scale']:.2f}" if p["scale"] is not None else "base", p) for p in [*result["scales"], result["base"]]]

    def cell(v):
        return "   nan" if v is None else f"{v:.3f}"

    return "\n".join(
        [head]
        + [
            f"{name:>6} {cell(p['solve_rate']):>6} {cell(p['hack_rate']):>6} "
            f"{cell(p['hack_rate_undetectable']):>8} {cell(p['monitored_hack_rate']):>9}"
            for name, p in rows
        ]
    )


def add_arguments(parser: Any) -> None:
    """`route.models.evaluate`'s options for a run directory and its scale curve."""
    parser.add_argument(
        "--run",
        help="a main-job output directory (with policy/): evaluate its training policy at "
        "quarantine scales instead of --model (default scales: 0 = deployed and 1 = training)",
    )
    parser.add_argument(
        "--scales",
        nargs="?",
        const="default",
        default=None,
        metavar="S,S,...",
        help="with --run: evaluate at these scales (bare --scales: 0, 0.1, ..., 1)",
    )
    parser.add_argument("--png", help="with --run: plot the rates against scale into this PNG")


def run_cli(args: Any) -> dict[str, Any]:
    """The `--run` branch of `route evaluate`: evaluate, print, write --json and --png. ValueError on bad input."""
    from route.trainer.config import parse_scale_grid
    from route.utils.io import write_json_atomic

    grid = parse_scale_grid(None if args.scales in (None, "default") else args.scales, "--scales")
    if args.scales is None:
        grid = [0.0, 1.0]
    result = evaluate_run(args.run, grid, n=args.n, seed=args.seed)
    print(format_curve(result))
    if args.json:
        write_json_atomic(args.json, result)
    if args.png:
        plot_scales(result["scales"], args.png, base=result["base"], title=Path(args.run).resolve().name)
    return result


def plot_scales(points: Sequence[dict], path: str | os.PathLike, base: dict | None = None, title: str = "") -> None:
    """PNG of solve, hack, hack by mode, hack on the undetectable part and monitored hack rate against scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from route.utils.io import save_figure

    xs = [p["scale"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in (
        ("solve_rate", "solve", "-o"),
        ("hack_rate", "hack", "-s"),
        ("hack_rate_undetectable", "hack, undetectable part", "-^"),
        ("monitored_hack_rate", "monitored hack (flag share)", "-D"),
    ):
        if any(p.get(key) is not None and p[key] == p[key] for p in points):  # skip a part no prompt has (NaN)
            ax.plot(xs, [p[key] for p in points], style, label=label)
    for mode in points[0]["hack_rate_by_mode"]:
        ax.plot(xs, [p["hack_rate_by_mode"][mode] for p in points], ":", alpha=0.7, label=f"hack {mode}")
    if base is not None:
        ax.axhline(base["monitored_hack_rate"], color="grey", ls="--", label="base model, monitored hack")
    ax.set(xlabel="quarantine scale (0 = deployed, 1 = training policy)", ylabel="rate", ylim=(0, 1))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)


__all__ = [
    "DeployScale",
    "add_arguments",
    "deploy_at_picked_scale",
    "deploy_scale_rule",
    "finish_scaled",
    "evaluate_run",
    "format_curve",
    "held_out_modes",
    "load_policy",
    "monitored_hack_rate",
    "plot_scales",
    "real_monitor",
    "run_cli",
    "save_policy",
    "scale_curve",
    "scale_point",
    "validation_rows",
]
