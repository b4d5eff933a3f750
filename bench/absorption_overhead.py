"""Step time of RoutedGRPOTrainer with the absorption metrics off and on, in the same run.

    python bench/absorption_overhead.py [--model DIR] [--steps 60] [--target dual_lora] [--threads 1]

One trainer at the default experiment's shapes (configs/default.yaml: arith, batch 64, 8 generations, 16 new tokens,
dual_lora r=8+8, route, noisy detector 0.5 / 0.05; `--batch`, `--generations`, `--new_tokens` and `--rank` change
them) on the cached organism. The metrics are switched on and off on
alternate optimizer steps (the meter and the target's per-row recording together), so machine drift and the policy's
changing completion lengths hit both; the first `--warmup` steps are dropped and the medians compared. A step is one
optimizer step including generation, scoring, the gated loss and its backward. Prints `ratio: X.XXX` (on / off).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.routing_overhead import StepTimer  # noqa: E402
from route.utils.errors import ArgumentParser, RawHelpFormatter, at_least, cli  # noqa: E402


class Alternate(StepTimer):
    """Times each step and switches the absorption metrics on for even steps, off for odd ones."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer, self.meter, self.on = trainer, trainer._absorption, []

    def on_step_begin(self, args, state, control, **kw):
        on = state.global_step % 2 == 0
        self.trainer._absorption = self.meter if on else None
        self.trainer.target.record_row_grads(on)
        self.on.append(on)
        super().on_step_begin(args, state, control, **kw)


@cli("bench.absorption_overhead")
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=RawHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the cached organism, built if missing)")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (half with the metrics on)")
    parser.add_argument("--warmup", type=int, default=6, help="steps dropped at the start")
    parser.add_argument("--target", default="dual_lora", choices=["dual_lora", "svf"], help="quarantine target")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--batch", type=int, default=64, help="rollouts per step")
    parser.add_argument("--generations", type=int, default=8, help="rollouts per prompt")
    parser.add_argument("--new_tokens", type=int, default=16, help="max new tokens per rollout")
    parser.add_argument("--rank", type=int, default=8, help="dual_lora: rank of each adapter")
    args = parser.parse_args(argv)
    for name in ("steps", "threads", "batch", "generations", "new_tokens", "rank"):
        at_least(f"--{name}", getattr(args, name))
    at_least("--warmup", args.warmup, 0)
    if args.steps - args.warmup < 2:
        raise ValueError(f"--steps: must leave >= 2 timed steps after --warmup {args.warmup}, got {args.steps}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import envs
    from route.models.organism import load_or_build
    from route.trainer.parse import build_config
    from route.trainer.trainer import RoutedGRPOTrainer

    torch.set_num_threads(args.threads)
    model_dir = args.model or str(load_or_build())
    with tempfile.TemporaryDirectory() as tmp:
        config = build_config(
            output_dir=tmp,
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            learning_rate=1e-3,
            beta=0.0,
            per_device_train_batch_size=args.batch,
            num_generations=args.generations,
            max_completion_length=args.new_tokens,
            max_steps=args.steps,
            logging_steps=1000,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=0,
            train_size=4096,
            env_kwargs={"hack_frac": 0.5},
            intervention="route",
            target=args.target,
            detector_tpr=0.5,
            detector_fpr=0.05,
            absorption_metrics=True,
            **({"keep_rank": args.rank, "quarantine_rank": args.rank} if args.target == "dual_lora" else {}),
        )
        env = envs.make_env(config.env, **config.env_kwargs)
        trainer = RoutedGRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(model_dir),
            args=config,
            env=env,
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            train_dataset=env.dataset(config.train_size, seed=0, split="train"),
        )
        timer = Alternate(trainer)
        trainer.add_callback(timer)
        trainer.train()
    timed = list(zip(timer.on, timer.times))[args.warmup :]
    on = statistics.median(t for o, t in timed if o)
    off = statistics.median(t for o, t in timed if not o)
    n = len(timed) // 2
    print(f"model: {model_dir}  target: {args.target}  threads: {args.threads}")
    print(f"absorption_metrics off: median step {off * 1e3:.1f} ms over {len(timed) - n} steps")
    print(f"absorption_metrics on:  median step {on * 1e3:.1f} ms over {n} steps")
    print(f"ratio: {on / off:.3f}")


if __name__ == "__main__":
    main()
