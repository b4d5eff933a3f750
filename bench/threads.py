"""Thread thrash: a fixed CPU workload of the library, idle and beside one other CPU-bound process.

    python bench/threads.py                    # 100 warm-start steps of the default organism, four phases
    python bench/threads.py --steps 50 --competitor python
    python bench/threads.py --worker chosen --steps 1 --workload tiny    # one phase's workload, in this process

The workload is `--steps` supervised warm-start steps (`route.models.organism.sft`) of the default organism config
(batch 128, the full-size model; 2,000 demonstrations instead of 20,000 to start faster), from a fresh model,
timed after 3 untimed steps. It runs four times, each in a fresh worker process started from an environment
without OMP_NUM_THREADS / MKL_NUM_THREADS / ROUTE_THREADS (plain `python` on a user's machine):

1. `chosen`, idle: the thread count `import route` chooses (1 unless `--threads`);
2. `chosen`, beside one competitor: a second CPU-bound process this script starts (a 1-thread torch matmul loop,
   or a pure-Python busy loop with `--competitor python`), killed after the phase;
3. and 4. the same with torch's default thread count (one per core), the behaviour before threads were chosen.

It prints seconds per phase, the 1-minute load average before and after each (the machine may be shared), and
for each thread setting the ratio loaded / idle. Target: the chosen setting's ratio <= 1.5. `--workload tiny` runs the
test organism's config instead (a smoke run of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ROUTE_THREADS")
WARMUP_STEPS = 3
COMPETITORS = {
    "matmul": "import torch\ntorch.set_num_threads(1)\na = torch.randn(384, 384)\nwhile True:\n    a = (a @ a).tanh()",
    "python": "x = 0\nwhile True:\n    x = (x * 31 + 7) % 1000003\n",
}


WORKLOADS = ("default", "tiny")


def worker(steps: int, mode: str, threads: int | None, workload: str = "default") -> dict:
    """Run the workload in this process; `mode` "default" restores torch's own thread count after `import route`."""
    import torch

    default = torch.get_num_threads()  # torch's choice: nothing in the environment says otherwise
    import envs
    from route.models.organism import build_model, build_tokenizer, demonstrations, organism_config, sft, tiny_config
    from route.utils.threads import configure_threads

    if mode == "default":
        torch.set_num_threads(default)
    elif threads is not None:
        configure_threads(threads)
    base = organism_config() if workload == "default" else tiny_config(batch_size=8)
    cfg = dataclasses.replace(base, n_train=min(base.n_train, 2000))  # fewer demonstrations: quicker setup
    tokenizer = build_tokenizer()
    model = build_model(cfg, tokenizer)
    pairs = demonstrations(cfg, envs.make_env(cfg.env, **cfg.env_kwargs))
    sft(model, tokenizer, pairs, WARMUP_STEPS, cfg.batch_size, cfg.lr, progress=False)
    start = time.perf_counter()
    sft(model, tokenizer, pairs, steps, cfg.batch_size, cfg.lr, cfg.warmup_steps, cfg.seed, progress=False)
    return {"seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}


def phase(steps: int, mode: str, threads: int | None, competitor: str | None, workload: str = "default") -> dict:
    """One worker process (plain environment), with a competitor process beside it when `competitor` is set."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--worker", mode, "--steps", str(steps), "--workload", workload]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    rival = None
    if competitor:
        rival = subprocess.Popen([sys.executable, "-c", COMPETITORS[competitor]], env=env)
        time.sleep(2.0)  # let it reach its loop
    load_before = os.getloadavg()[0]
    try:
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    finally:
        if rival is not None:
            rival.kill()
            rival.wait()
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "load_before": load_before, "load_after": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> None:  # no `import route` before a worker reads torch's default threads
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="timed warm-start steps per phase (default: 100)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads of the `chosen` phases (default: what `import route` chooses, i.e. 1)",
    )
    p.add_argument(
        "--competitor",
        choices=sorted(COMPETITORS),
        default="matmul",
        help="the other CPU-bound process (default: matmul, a 1-thread torch loop)",
    )
    p.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="default",
        help="default: the default organism (the measurement); tiny: the test organism's config (a smoke run)",
    )
    p.add_argument("--worker", choices=["chosen", "default"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps: must be >= 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: must be >= 1, got {args.threads}")
    if args.worker:
        print(json.dumps(worker(args.steps, args.worker, args.threads, args.workload)))
        return
    print(
        f"{args.steps} warm-start steps of the default organism (batch 128); {os.cpu_count()} CPUs; "
        f"competitor: {args.competitor}"
    )
    rows = {}
    for mode in ("chosen", "default"):
        for competitor in (None, args.competitor):
            r = phase(args.steps, mode, args.threads, competitor, args.workload)
            rows[mode, bool(competitor)] = r
            print(
                f"  {mode:7s} threads {r['threads']}  {'beside competitor' if competitor else 'idle':17s} "
                f"{r['seconds']:7.1f} s  ({r['seconds'] / args.steps:.3f} s/step)  "
                f"load {r['load_before']:.2f} -> {r['load_after']:.2f}",
                flush=True,
            )
    for mode in ("chosen", "default"):
        ratio = rows[mode, True]["seconds"] / rows[mode, False]["seconds"]
        goal = "  (target <= 1.5: " + ("met)" if ratio <= 1.5 else "NOT met)") if mode == "chosen" else ""
        print(f"ratio {mode} (threads {rows[mode, False]['threads']}): beside / idle = {ratio:.2f}{goal}")


if __name__ == "__main__":
    main()
