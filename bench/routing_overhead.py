"""Step time of RoutedGRPOTrainer (route, dual_lora r+r) against TRL's GRPOTrainer with one plain LoRA of rank 2r.

    python bench/routing_overhead.py [--model DIR|NAME] [--steps 40] [--rank 8] [--threads N]
    python bench/routing_overhead.py --model smollm2-135m-instruct --batch 8 --generations 4 --new_tokens 16 \
        --steps 6 --warmup 1 --reward digits          # the real pretrained model (route.models.pretrained)

Same model, config, data and seed for both, at the default experiment's shapes unless `--batch`,
`--generations` or `--new_tokens` say otherwise; a step is one optimizer step including generation,
scoring and the gated loss. The two trainers alternate in blocks so that machine drift hits
both; the median over all timed steps (warm-up steps dropped) is compared. Prints `ratio: X.XX`.
Torch runs on `--threads` threads (default 1: on a shared machine more threads measure the contention).
`--model` takes a directory or a short name (`route.models.pretrained`); a model whose tokenizer has a chat template
gets the environment's prompts as chat messages (`chat: true`), as a chat model is trained. `--reward digits` rewards
each rollout with the share of digits in its text instead of the environment's grade (a pretrained model that does
not know the task scores 0 on every rollout, so no step would have a gradient). `--targets` times other targets too,
each in its own blocks against the same plain-LoRA baseline (`TARGET_FIELDS`: svf of rank 2r with r reserved axes,
dual_mlp's and sgtm's defaults, logit_head); `ratio:` stays the first target's.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from route.models.paths import check_model_path
from route.utils.errors import ArgumentParser, RawHelpFormatter, at_least, cli  # noqa: E402


class StepTimer:
    """A TrainerCallback recording the wall time of each optimizer step."""

    def __init__(self):
        self.times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)

    def __getattr__(self, name):  # every other callback event is a no-op
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


TARGET_FIELDS = {
    "dual_lora": lambda r: dict(keep_rank=r, quarantine_rank=r),
    "svf": lambda r: dict(svf_rank=2 * r, svf_reserve_axes=list(range(r))),
    "dual_mlp": lambda r: {},
    "sgtm": lambda r: {},
    "logit_head": lambda r: {},
}


def digit_share(prompts, completions, **columns) -> list[float]:
    """The share of digits in each completion's text: a reward that varies within a group on any model."""
    from envs.base import completion_text

    texts = [completion_text(c) for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def timed_run(kind: str, model_dir: str, steps: int, rank: int, out: str, batch: int = 64, generations: int = 8,
              new_tokens: int = 16, reward: str = "env") -> list[float]:
    """Step times of `kind`: "plain" (TRL's GRPOTrainer, one LoRA of rank 2r) or a target name (RoutedGRPOTrainer)."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    import envs
    from route.targets.common import DEFAULT_MODULES
    from route.trainer.parse import build_config
    from route.trainer.trainer import RoutedGRPOTrainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = build_config(
        output_dir=out, use_cpu=True, bf16=False, gradient_checkpointing=False, learning_rate=1e-3, beta=0.0,
        per_device_train_batch_size=batch, num_generations=generations, max_completion_length=new_tokens,
        max_steps=steps, logging_steps=1000, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
        train_size=max(2048, batch * steps), intervention="route", detector_tpr=0.5, detector_fpr=0.05,
        env_kwargs={"chat": True} if tok.chat_template else {},
        **({"target": kind, **TARGET_FIELDS[kind](rank)} if kind != "plain" else TARGET_FIELDS["dual_lora"](rank)))
    env = envs.make_env(config.env, **config.env_kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    data = env.dataset(config.train_size, seed=0, split="train")
    rewards = [digit_share] if reward == "digits" else [env.reward_func]
    timer = StepTimer()
    if kind != "plain":
        trainer = RoutedGRPOTrainer(model=model, args=config, env=env, processing_class=tok, train_dataset=data,
                                    reward_funcs=rewards, callbacks=[timer])
    else:
        lora = LoraConfig(r=2 * rank, lora_alpha=2 * rank, target_modules=list(DEFAULT_MODULES), lora_dropout=0.0,
                          task_type="CAUSAL_LM")
        trainer = GRPOTrainer(model=model, args=config, reward_funcs=rewards, processing_class=tok,
                              train_dataset=data, peft_config=lora, callbacks=[timer])
    trainer.train()
    return timer.times


@cli("bench.routing_overhead")
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=RawHelpFormatter)
    parser.add_argument("--model", help="model directory or short name, e.g. smollm2-135m-instruct (default: the "
                        "cached organism, built if missing)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per block")
    parser.add_argument("--blocks", type=int, default=2, help="alternating blocks per trainer")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of each block")
    parser.add_argument("--rank", type=int, default=8, help="rank r of each routed adapter (plain LoRA gets 2r)")
    parser.add_argument("--batch", type=int, default=64, help="rollouts per step (the default experiment's)")
    parser.add_argument("--generations", type=int, default=8, help="rollouts per prompt")
    parser.add_argument("--new_tokens", type=int, default=16, help="max new tokens per rollout")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--reward", choices=["env", "digits"], default="env",
                        help="env: the environment's grade; digits: the share of digits in the completion")
    parser.add_argument("--targets", nargs="+", default=["dual_lora"], choices=list(TARGET_FIELDS),
                        help="routed targets to time (the first one's ratio is printed as `ratio:`)")
    args = parser.parse_args(argv)
    for name in ("steps", "blocks", "rank", "batch", "generations", "new_tokens", "threads"):
        at_least(f"--{name}", getattr(args, name))
    at_least("--warmup", args.warmup, 0)
    if args.warmup >= args.steps:
        raise ValueError(f"--warmup: must be below --steps ({args.steps}), got {args.warmup}")
    check_model_path("--model", args.model)
    import torch

    torch.set_num_threads(args.threads)
    from route.models.organism import load_or_build
    from route.models.pretrained import resolve_model

    model_dir = resolve_model(args.model, flag="--model") or str(load_or_build())
    kinds = ["plain", *dict.fromkeys(args.targets)]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for block in range(args.blocks):
            for kind in kinds:
                t = timed_run(kind, model_dir, args.steps, args.rank, f"{tmp}/{kind}{block}", args.batch,
                              args.generations, args.new_tokens, args.reward)
                times[kind] += t[args.warmup:]
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model: {model_dir}; batch {args.batch} ({args.generations} per prompt), {args.new_tokens} new tokens; "
          f"reward {args.reward}; torch threads {torch.get_num_threads()}")
    print(f"plain LoRA r={2 * args.rank} (TRL GRPOTrainer): median step {med['plain'] * 1e3:.1f} ms "
          f"over {len(times['plain'])} steps")
    for kind in kinds[1:]:
        what = f"dual_lora r={args.rank}+{args.rank}" if kind == "dual_lora" else kind
        print(f"routed {what} (RoutedGRPOTrainer): median step {med[kind] * 1e3:.1f} ms over {len(times[kind])} "
              f"steps ({med[kind] / med['plain']:.2f}x plain LoRA)")
    print(f"ratio: {med[kinds[1]] / med['plain']:.2f}")


if __name__ == "__main__":
    main()
