"""The main job: GRPO with gradient routing on an environment, then evaluation of the deployed policy.

    accelerate launch route/train_grpo.py                       # the embedded default (configs/default.yaml)
    accelerate launch route/train_grpo.py --config my.yaml      # any RoutedGRPOConfig YAML
    accelerate launch route/train_grpo.py --intervention none --output_dir runs/none

Writes `<output_dir>/results.json` (base, training and deployed rates on held-out prompts, seconds per phase; with
`deploy_scale_rule: monitor` also the policy at the picked quarantine scale, `route.trainer.scales`),
`<output_dir>/deployed/` (a plain transformers checkpoint), `<output_dir>/policy/` (the training policy with its
quarantine, for `route evaluate --run DIR --scales`), `<output_dir>/metrics.jsonl` (every logged step's
metrics) and `<output_dir>/train.log` (the run's log: phases, progress, every logged step, the table), and prints a
summary table whose per-mode columns (`hack:<mode>`) are hack rates on that loophole's own prompts.

Fail before work: the config is validated before anything loads (`route.trainer.parse.validate_run`), and the trainer
(which builds the target on the loaded model: PEFT, module names and shapes, the accelerate setup) is constructed before
the first forward. The base policy is then evaluated on the target's model with no gate: at construction every target's
ungated forward is the base model's, bit for bit (zero-initialised deltas; tested per target), so the base row is the
same as on the plain model without a second copy of the model in memory.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: its own folder (route/) must not shadow packages (route/vllm: vllm)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from route.models.paths import check_model_path
from route.utils.errors import cli

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def parse_config(argv: list[str] | None = None):
    """Parse flags and `--config` (default: configs/default.yaml) into a RoutedGRPOConfig."""
    import sys

    from route.utils.io import pop_config_arg

    pop_config_arg(sys.argv[1:] if argv is None else argv)  # a missing --config file fails before the TRL import
    from route.trainer.parse import parse_config as parse

    return parse(argv, default_config=str(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None)


def summary_table(results: dict) -> str:
    parts = list(results["base"].get("by_part", {}))  # detectable / undetectable, when the env has the split
    modes = results["base"]["hack_rate_by_mode"]  # per-mode columns: the hack rate on that loophole's own prompts
    rows = [("policy", "n", "solve", "hack", *(f"hack:{m}" for m in modes), *(f"hack:{p}" for p in parts))]
    names = ("base", "training", "deployed") + (("deployed_at_scale",) if "deployed_at_scale" in results else ())
    for name in names:
        r = results[name]
        if name == "deployed_at_scale":
            name = f"deployed@{results['deploy_scale']['picked']:g}"
        rows.append((name, str(r["n"]), f"{r['solve_rate']:.3f}", f"{r['hack_rate']:.3f}",
                     *(f"{v:.3f}" for v in r["hack_rate_by_mode"].values()),
                     *(f"{r['by_part'][p]['hack_rate']:.3f}" for p in parts)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def run(config) -> dict:
    """Train, evaluate base / training / deployed policies, save the deployed model and results.json.

    Also writes `<output_dir>/train.log` and `metrics.jsonl` (`route.utils.logs`). results.json's `seconds` splits the
    wall time into setup, organism (build or load), evaluation, training and deploy (ablation, saving), plus the
    total; `train_seconds` is training alone."""
    from route.trainer.parse import validate_run
    from route.utils.logs import run_log

    validate_run(config)  # fail before loading or writing anything
    with run_log(config.output_dir, append=bool(config.resume_from_checkpoint)):
        return _run(config)


def _run(config) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import envs
    from route.models.evaluate import evaluate_policy, format_rates
    from route.models.organism import load_or_build, organism_config
    from route.models.pretrained import resolve_model
    from route.monitors.build import build_detector
    from route.trainer.config import check_vllm_config
    from route.trainer.parse import flat_config, probe_run
    from route.trainer.scales import (
        deploy_at_picked_scale,
        deploy_scale_rule,
        finish_scaled,
        held_out_modes,
        real_monitor,
        save_policy,
    )
    from route.trainer.trainer import RoutedGRPOTrainer
    from route.utils.io import write_json_atomic
    from route.utils.logs import FILE_ONLY, MetricsFile, Phases, ProgressLines, StepLines, is_main_process, log

    phases = Phases()
    log.info("run: %s / %s -> %s", config.intervention, config.target, config.output_dir)
    with phases("setup"):
        probe_run(config)  # the target against the model's module names and shapes, before loading the weights
        check_vllm_config(config)
        env = envs.make_env(config.env, **config.env_kwargs)
    log.info("organism: loading %s", config.model_name_or_path or "the cached organism (built first when absent: "
             "minutes on a CPU)", extra=FILE_ONLY)
    with phases("organism"):
        model_dir = resolve_model(config.model_name_or_path)  # None: the environment's organism (built when absent)
        if model_dir is None:
            model_dir = str(load_or_build(organism_config(config.env, seed=config.organism_seed)))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(config.device)
    log.info("organism: %s (%.1f s)", model_dir, phases.seconds["organism"])
    progress = not config.disable_tqdm and is_main_process()
    eval_kw = dict(n=config.eval_n, seed=config.eval_seed, temperature=config.temperature,
                   max_new_tokens=config.eval_max_new_tokens or config.max_completion_length)
    with phases("setup"):
        detector = build_detector(config, env)  # also scores the evaluations (results' `monitor` entries)
        eval_kw["detector"] = real_monitor(detector)  # the real monitor, also under a flag control
        eval_kw["held_out_modes"] = held_out_modes(config, env)  # results' `undetectable` entries
        trainer = RoutedGRPOTrainer(model=model, args=config, env=env, processing_class=tokenizer, detector=detector,
                                    train_dataset=env.dataset(config.train_size, seed=config.seed, split="train"))
        for callback in (MetricsFile(config.output_dir), StepLines(), ProgressLines()):
            trainer.add_callback(callback)
    target = trainer.target

    def evaluate(name: str, context=None) -> dict:
        """One policy (inside `context`) on the held-out prompts, timed as evaluation, with a bar and a log line."""
        start = phases.seconds.get("evaluation", 0.0)
        with phases("evaluation"), context or contextlib.nullcontext():
            rates = evaluate_policy(target.model, tokenizer, env, **eval_kw, progress=progress, desc=f"eval {name}")
        log.info("eval %s (%.1f s): %s", name, phases.seconds["evaluation"] - start, format_rates(rates))
        return rates

    base = evaluate("base")  # ungated at init: the base model (docstring)
    with phases("evaluation"):
        rule = deploy_scale_rule(config, env, tokenizer, detector, eval_kw, target)  # base on validation prompts
    with phases("training"):
        trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    training = evaluate("training")
    with phases("deploy"):
        if trainer.accelerator.is_main_process:
            save_policy(target, config, model_dir, config.output_dir)  # the training policy, for route evaluate --run
    with phases("evaluation"):
        scaled = deploy_at_picked_scale(rule, target, tokenizer, env, eval_kw, training)  # before the ablation
    with phases("deploy"):
        target.ablate(trainable=config.ablate_trainable)
    deployed = evaluate("deployed", target.ablated())
    with phases("deploy"):
        trainer.save_deployed()

    logs = [h for h in trainer.state.log_history if "routing/realised_tpr" in h or "routing/flag_rate" in h]
    def mean_of(key):
        vals = [h[key] for h in logs if key in h and h[key] == h[key]]
        return sum(vals) / len(vals) if vals else None

    seconds = phases.summary()
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
        **finish_scaled(scaled, deployed),
        "seconds": seconds, "train_seconds": seconds.get("training", 0.0), "total_seconds": seconds["total"],
    }
    if trainer.accelerator.is_main_process:
        write_json_atomic(Path(config.output_dir) / "results.json", results)
    log.info("done: %s (%s)\n%s", Path(config.output_dir) / "results.json",
             ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()), summary_table(results), extra=FILE_ONLY)
    return results


def _jsonable(v) -> bool:
    import json

    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


@cli("route train")
def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    check_model_path("model_name_or_path", config.model_name_or_path, hub=True)  # a Hub id: looked up once
    results = run(config)
    print(f"\n{config.intervention} / {config.target} -> {config.output_dir}/results.json")
    print(summary_table(results))


if __name__ == "__main__":
    main()
