"""What the portable kernels cost: the same work under ROUTE_KERNELS=portable and =native, as a ratio.

    python bench/kernels.py                          # the main job's GRPO training, 60 steps, 3 alternating reps
    python bench/kernels.py --workload model --model_shape smollm2   # forward/backward/step at SmolLM2-135M's shapes

The kernel mode is chosen before torch runs its first kernel (`route.utils.kernels`), so every measurement is a fresh
process; the modes alternate (portable, native, portable, ...) so that a change in the machine's load falls on both.
`job` runs `route/train_grpo.py` with `--max_steps` steps and reads `train_seconds` from its results.json; `model`
times forward + backward + AdamW steps of a Llama (the organism's shapes, or SmolLM2-135M's with random weights) on
a batch of `--batch` x `--seq` tokens. Prints each rep, the medians, and `ratio: portable / native`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # name -> LlamaConfig fields
    "organism": dict(vocab_size=48, hidden_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=256),
    "smollm2": dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536),
}


def model_worker(shape: str, steps: int, batch: int, seq: int) -> float:
    """Seconds per training step of a Llama of `shape` (after one warm-up step), in this process's kernel mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import route  # noqa: F401  (threads and kernels, before torch runs anything)
    from route.masks.optim import build_optimizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], max_position_embeddings=max(64, seq),
                                         tie_word_embeddings=True))
    opt = build_optimizer({"keep": list(model.parameters())}, lr=1e-4)
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return (time.perf_counter() - start) / steps


def job_seconds(mode: str, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / "route" / "train_grpo.py"), "--max_steps", str(steps), "--eval_n", "16",
               "--deploy_scale_rule", "none", "--output_dir", tmp, "--disable_tqdm", "true"]
        subprocess.run(cmd, env=_env(mode), check=True, capture_output=True)
        return json.loads((Path(tmp) / "results.json").read_text())["train_seconds"] / steps


def _env(mode: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "ROUTE_KERNELS": mode, "PYTHONPATH": path}


def measure(mode: str, args: argparse.Namespace) -> float:
    if args.workload == "job":
        return job_seconds(mode, args.max_steps)
    cmd = [sys.executable, __file__, "--worker", "--model_shape", args.model_shape, "--max_steps", str(args.max_steps),
           "--batch", str(args.batch), "--seq", str(args.seq)]
    out = subprocess.run(cmd, env=_env(mode), check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(prog="bench/kernels.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=["job", "model"], default="job",
                   help="job: the main job's training phase; model: forward + backward + AdamW of a Llama")
    p.add_argument("--model_shape", choices=list(SHAPES), default="organism", help="--workload model: the shapes")
    p.add_argument("--max_steps", type=int, default=60, help="steps per measurement")
    p.add_argument("--batch", type=int, default=8, help="--workload model: sequences per step")
    p.add_argument("--seq", type=int, default=64, help="--workload model: tokens per sequence")
    p.add_argument("--reps", type=int, default=3, help="measurements per mode, alternating")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(model_worker(args.model_shape, args.max_steps, args.batch, args.seq))
        return 0.0
    times: dict[str, list[float]] = {"portable": [], "native": []}
    for rep in range(args.reps):
        for mode in times:
            times[mode].append(measure(mode, args))
            print(f"rep {rep}: {mode:8} {times[mode][-1] * 1e3:9.1f} ms/step", flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    what = "main job training" if args.workload == "job" else f"{args.model_shape} forward+backward+AdamW"
    print(f"{what}: portable {med['portable'] * 1e3:.1f} ms/step, native {med['native'] * 1e3:.1f} ms/step")
    print(f"ratio: {med['portable'] / med['native']:.2f}")
    return med["portable"] / med["native"]


if __name__ == "__main__":
    main()
