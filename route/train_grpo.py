"""The main job: GRPO with gradient routing on an environment, then evaluation of the deployed policy.

    accelerate launch route/train_grpo.py                       # the embedded default (configs/default.yaml)
    accelerate launch route/train_grpo.py --config my.yaml      # any RoutedGRPOConfig YAML
    accelerate launch route/train_grpo.py --intervention none --output_dir runs/none

Writes `<output_dir>/results.json` (base, training and deployed rates on held-out prompts),
`<output_dir>/deployed/` (a plain transformers checkpoint) and prints a summary table.

Fail before work: the config is validated before anything loads (`route.cli.validate_run`), and the trainer (which
builds the target on the loaded model: PEFT, module names and shapes, the accelerate setup) is constructed before
the first forward. The base policy is then evaluated on the target's model with no gate: at construction every
target's ungated forward is the base model's, bit for bit (zero-initialised deltas; tested per target), so the base
row is the same as on the plain model without a second copy of the model in memory.
"""

from __future__ import annotations

import time
from pathlib import Path

from route.errors import check_model_path, cli

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def parse_config(argv: list[str] | None = None):
    """Parse flags and `--config` (default: configs/default.yaml) into a RoutedGRPOConfig."""
    from route.cli import parse_config as parse

    return parse(argv, default_config=str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None)


def summary_table(results: dict) -> str:
    parts = list(results["base"].get("by_part", {}))  # detectable / undetectable, when the env has the split
    rows = [("policy", "n", "solve", "hack", *results["base"]["hack_rate_by_mode"], *(f"hack {p}" for p in parts))]
    for name in ("base", "training", "deployed"):
        r = results[name]
        rows.append((name, str(r["n"]), f"{r['solve_rate']:.3f}", f"{r['hack_rate']:.3f}",
                     *(f"{v:.3f}" for v in r["hack_rate_by_mode"].values()),
                     *(f"{r['by_part'][p]['hack_rate']:.3f}" for p in parts)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def run(config) -> dict:
    """Train, evaluate base / training / deployed policies, save the deployed model and results.json."""

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import envs
    from route.cli import flat_config, probe_run, validate_run
    from route.detectors import build_detector
    from route.evaluate import evaluate_policy
    from route.io import write_json_atomic
    from route.organism import load_or_build, organism_config
    from route.trainer import RoutedGRPOTrainer
    from route.vllm_sync import check_vllm_config

    t0 = time.time()
    validate_run(config)  # fail before loading anything
    probe_run(config)  # the target against the model's module names and shapes, before loading the weights
    check_vllm_config(config)
    env = envs.make_env(config.env, **config.env_kwargs)
    model_dir = config.model_name_or_path or str(load_or_build(organism_config(config.env)))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(config.device)
    eval_kw = dict(n=config.eval_n, seed=config.eval_seed,
                   max_new_tokens=config.eval_max_new_tokens or config.max_completion_length)
    detector = build_detector(config, env)  # also scores the evaluations (results' `monitor` entries)
    eval_kw["detector"] = detector
    trainer = RoutedGRPOTrainer(model=model, args=config, env=env, processing_class=tokenizer, detector=detector,
                                train_dataset=env.dataset(config.train_size, seed=config.seed, split="train"))
    target = trainer.target
    base = evaluate_policy(target.model, tokenizer, env, **eval_kw)  # ungated at init: the base model (docstring)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    training = evaluate_policy(target.model, tokenizer, env, **eval_kw)
    target.ablate(trainable=config.ablate_trainable)
    with target.ablated():
        deployed = evaluate_policy(target.model, tokenizer, env, **eval_kw)
    trainer.save_deployed()

    logs = [h for h in trainer.state.log_history if "routing/realised_tpr" in h or "routing/flag_rate" in h]
    def mean_of(key):
        vals = [h[key] for h in logs if key in h and h[key] == h[key]]
        return sum(vals) / len(vals) if vals else None

    results = {
        "config": {k: v for k, v in flat_config(config).items() if _jsonable(v)},
        "model": model_dir,
        "detector": {"kind": config.detector, "monitor": config.monitor,
                     "tpr": config.detector_tpr, "fpr": config.detector_fpr,
                     "modes": config.detector_modes, "realised_tpr": mean_of("routing/realised_tpr"),
                     "realised_fpr": mean_of("routing/realised_fpr"),
                     **{k: mean_of(k) for k in sorted({k for h in logs for k in h if k.startswith(
                         ("routing/realised_tpr/", "routing/hack_rate/"))})}},
        "base": base, "training": training, "deployed": deployed,
        "train_seconds": round(time.time() - t0, 1),
    }
    if trainer.accelerator.is_main_process:
        write_json_atomic(Path(config.output_dir) / "results.json", results)
    return results


def _jsonable(v) -> bool:
    import json

    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


@cli("route.train_grpo")
def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    check_model_path("model_name_or_path", config.model_name_or_path, hub=True)  # a Hub id: looked up once
    results = run(config)
    print(f"\n{config.intervention} / {config.target} -> {config.output_dir}/results.json")
    print(summary_table(results))


if __name__ == "__main__":
    main()
