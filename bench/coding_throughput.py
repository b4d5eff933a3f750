"""Benchmark: coding-env programs graded per second, worker pool vs one sandboxed run at a time.

    python bench/coding_throughput.py [--n 96] [--workers N] [--repeats 3]

Grades the same `n` completions (reference solutions and hacks of every mode, on the packaged
problems, each in its own bwrap sandbox) sequentially (one sandboxed subprocess at a time) and
on the worker pool, alternating, `repeats` times; prints the median rate of each and their ratio.
"""

from __future__ import annotations

import os
import random
import statistics
import time

import envs
from route.utils.errors import ArgumentParser, cli


def completions(env, n: int) -> tuple[list[str], dict[str, list]]:
    """`n` rows with a mix of correct solutions and hacks of each row's loophole."""
    rows = env.rows(n, seed=0, split="train")
    rng = random.Random(0)
    comps = [env.demonstration(r, hack=bool(r["loophole"]) and i % 2 == 0, rng=rng) for i, r in enumerate(rows)]
    cols = {k: [r[k] for r in rows] for k in ("entry_point", "loophole", "visible_tests", "hidden_tests")}
    return comps, cols


def rate(env, comps: list[str], cols: dict[str, list]) -> float:
    """Programs graded per second for one `grade_runs` call over all completions (no grade cache)."""
    start = time.perf_counter()
    grades = env.grade_runs(comps, comps, **cols)
    elapsed = time.perf_counter() - start
    assert len(grades) == len(comps)
    return len(comps) / elapsed


@cli("bench.coding_throughput")
def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=96, help="programs per measurement")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="pool size")
    ap.add_argument("--repeats", type=int, default=3, help="measurements of each (the median is printed)")
    args = ap.parse_args(argv)
    seq_env = envs.make_env("coding", workers=1)
    pool_env = envs.make_env("coding", workers=args.workers)
    comps, cols = completions(seq_env, args.n)
    for env in (seq_env, pool_env):  # warm up: sandbox probe, pool threads
        env.grade_runs(comps[:4], comps[:4], **{k: v[:4] for k, v in cols.items()})
    seqs, pools = [], []
    for _ in range(args.repeats):
        seqs.append(rate(seq_env, comps, cols))
        pools.append(rate(pool_env, comps, cols))
    seq, pool = statistics.median(seqs), statistics.median(pools)
    print(f"backend: {pool_env.sandbox.backend}, cpus: {os.cpu_count()}, programs: {args.n}")
    print(f"one at a time : {seq:7.1f} programs/s")
    print(f"pool ({args.workers:>2} workers): {pool:7.1f} programs/s")
    print(f"ratio          : {pool / seq:7.2f}x")
    seq_env.close()
    pool_env.close()


if __name__ == "__main__":
    main()
