"""One prepared check of the routed trainer at a realistic shape: step time, peak memory, SVD setup, checkpointing.

    python bench/gpu_check.py --device cuda --shape 0.5b --budget-s 420 --out runs/gpu_check/0.5b.json
    python bench/gpu_check.py --device cpu --shape tiny --out runs/gpu_check/tiny.json     # seconds; CI runs it

Models have random weights and Qwen2's layout, built from a config on the device (nothing downloaded): `tiny` (2
layers, hidden 64, vocabulary 64), `0.5b` (Qwen2-0.5B: hidden 896, 24 layers, 14 / 2 KV heads, MLP 4864) and `1.5b`
(Qwen2-1.5B: hidden 1536, 28 layers, 12 / 2 KV heads, MLP 8960), both with the full 151936-token vocabulary and tied
embeddings. The tokenizer is the organism's character tokenizer made in-process, padded with filler tokens up to
the vocabulary. bf16 on cuda, fp32 on cpu. Every measurement has its own baseline in the same run:

- warmup: one untimed optimizer step of the first trainer kind, so that no figure carries first-use costs (lazy
  imports, kernel set-up, heap growth).
- step: median optimizer-step time (generation, scoring, loss, backward, optimizer; `--warmup` steps dropped, then
  `--steps` timed) and peak memory (cuda: `max_memory_allocated` above what was allocated before; cpu: peak RSS
  above the RSS before) of `RoutedGRPOTrainer` with dual_lora r+r and with svf of rank 2r (axis 0 reserved) against
  TRL's `GRPOTrainer` with one plain PEFT LoRA of rank 2r, and with sgtm against TRL's full-parameter
  `GRPOTrainer`; gradient checkpointing on, intervention route with noisy flags, a reward that varies per
  completion (so advantages and gradients are live) and completions of fixed length (`min_new_tokens`).
- svd_setup: seconds to wrap the model with the svf target at full rank with an empty SVD cache, then again from it.
- heads_decode: `bench/heads_decode.py` (its own model shape and baselines) on this device, when that bench and
  `route.models.heads` exist; else status "not available".
- ckpt_equal: each target's gradients of one gated forward + backward (rows mixing forget / retain / default,
  adapters randomised so every gated path carries gradient) with and without gradient checkpointing; passes when
  max |g_ckpt - g| / max |g| over every parameter is <= the tolerance: 0 (exact) in fp32, 1e-2 in bf16.

Goals (on GPU): routed / vanilla step time <= 1.05 (dual_lora, sgtm), svf / LoRA <= 1.00. A measurement starts only
if the remaining `--budget-s` covers the longest one of its kind so far (else status "skipped: budget"); one that
raises records the error and the run goes on. The measurements run most wanted first (steps of lora, dual_lora and
svf, the equality checks, then full and sgtm, the heads last). One table is printed and written as JSON (`--out`,
atomically; rewritten after every measurement with `meta.complete` false, so a run killed from outside keeps what it
finished); a progress line per measurement goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_measures import (  # noqa: E402
    RUNS,
    SHAPES,
    TARGETS,
    TOLERANCE,
    build_model,
    build_tokenizer,
    checkpoint_equality,
    heads_decode,
    run_steps,
    svd_setup,
)

from route.utils.errors import ArgumentParser, cli  # noqa: E402

STEPS = (("lora", None), ("dual_lora", "lora"), ("svf", "lora"), ("full", None), ("sgtm", "full"))
HEADS_DECODE_S = 120.0  # the heads' decode bench: five fresh processes, each loading torch and a model
GOALS = {"dual_lora": 1.05, "svf": 1.00, "sgtm": 1.05}
COLUMNS = (
    "name",
    "kind",
    "status",
    "value",
    "unit",
    "baseline",
    "ratio",
    "goal",
    "met",
    "peak_mib",
    "peak_ratio",
    "seconds",
    "detail",
)


def measure(report: dict, name: str, kind: str, fn, budget_end: float, spent: dict) -> dict:
    """Run one measurement into a row of `report`; skipped if the budget left is below the longest one of its kind
    so far (`spent`: seconds by kind, seeded with an estimate where the first one may be long)."""
    row = dict.fromkeys(COLUMNS)
    row.update(name=name, kind=kind)
    left = budget_end - time.monotonic()
    if left <= max(spent.get(kind, [0.0])):
        row["status"] = "skipped: budget"
    else:
        start = time.monotonic()
        try:
            row.update({"status": "ok", **fn()})
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            row.update(status=f"error: {type(e).__name__}: {e}", detail={"traceback": traceback.format_exc()})
        gc.collect()
        row["seconds"] = round(time.monotonic() - start, 2)
        spent.setdefault(kind, []).append(row["seconds"])
    report["rows"].append(row)
    return row


def add_ratios(report: dict, cuda: bool) -> None:
    """Step rows against their baselines (same run): step-time and memory ratios, and goals (met: GPU only)."""
    steps = {r["name"].removeprefix("step "): r for r in report["rows"] if r["kind"] == "step"}
    for name, base in STEPS:
        row, ref = steps.get(name), steps.get(base)
        if base is None or row is None or row["status"] != "ok":
            continue
        row.update(baseline=f"step {base}", goal=GOALS[name])
        if ref is not None and ref["status"] == "ok":
            row.update(ratio=row["value"] / ref["value"], peak_ratio=row["peak_mib"] / max(ref["peak_mib"], 1e-9))
            row["met"] = row["ratio"] <= row["goal"] if cuda else None


def format_table(report: dict) -> str:
    def f(v, spec=".3g"):
        return "" if v is None else format(v, spec) if isinstance(v, float) else str(v)

    head = ("measurement", "status", "value", "unit", "baseline", "ratio", "goal", "met", "peak MiB", "peak ratio", "s")
    lines = [
        [
            r["name"],
            r["status"][:60],
            f(r["value"], ".4g"),
            f(r["unit"]),
            f(r["baseline"]),
            f(r["ratio"]),
            f(r["goal"]),
            f(r["met"]),
            f(r["peak_mib"], ".0f"),
            f(r["peak_ratio"]),
            f(r["seconds"]),
        ]
        for r in report["rows"]
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    out = [" | ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in (head, *lines)]
    out.insert(1, "-+-".join("-" * w for w in widths))
    m = report["meta"]
    return (
        f"{m['device_name']}, shape {m['shape']} ({m['parameters'] / 1e6:.1f}M parameters), {m['dtype']}, "
        f"{m['steps']} timed + {m['warmup']} warm-up steps; step goals are judged (met) on GPU only\n" + "\n".join(out)
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda or cpu (default: cuda)")
    p.add_argument("--shape", default="0.5b", help=f"model shape, one of {list(SHAPES)} (default: 0.5b)")
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds for the whole run (default: 420)")
    p.add_argument(
        "--out", default="runs/gpu_check/report.json", help="JSON output path (default: runs/gpu_check/report.json)"
    )
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per trainer (default: 5)")
    p.add_argument("--warmup", type=int, default=3, help="dropped optimizer steps per trainer (default: 3)")
    p.add_argument("--rank", type=int, default=8, help="dual_lora r+r; svf and plain LoRA rank 2r (default: 8)")
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        help="measurement kinds not to run: warmup step svd_setup heads_decode ckpt_equal",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="model weights, data and sampling seed (default: 0)")
    a = p.parse_args(argv)
    kinds = ("warmup", "step", "svd_setup", "heads_decode", "ckpt_equal")
    checks = [
        ("--device", a.device in ("cuda", "cpu"), ["cuda", "cpu"]),
        ("--shape", a.shape in SHAPES, list(SHAPES)),
        ("--budget-s", a.budget_s > 0, "> 0"),
        ("--steps", a.steps >= 1, ">= 1"),
        ("--warmup", a.warmup >= 0, ">= 0"),
        ("--rank", a.rank >= 1, ">= 1"),
        ("--skip", set(a.skip) <= set(kinds), list(kinds)),
    ]
    for flag, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{flag}: invalid value {getattr(a, flag[2:].replace('-', '_'))!r}; allowed: {allowed}")
    return a


@cli("bench.gpu_check")
def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    budget_end = time.monotonic() + a.budget_s
    import torch

    import envs

    if a.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but torch.cuda.is_available() is False; use --device cpu")
    torch.set_num_threads(a.threads)
    cuda = a.device == "cuda"
    ctx = dict(
        args=a,
        device=a.device,
        shape=a.shape,
        seed=a.seed,
        dtype=torch.bfloat16 if cuda else torch.float32,
        tokenizer=build_tokenizer(SHAPES[a.shape]["vocab_size"]),
        env=envs.make_env("arith", hack_frac=0.5),
    )
    probe = build_model(ctx)
    meta = dict(
        device=a.device,
        device_name=torch.cuda.get_device_name() if cuda else "cpu",
        shape=a.shape,
        dims=SHAPES[a.shape],
        parameters=sum(p.numel() for p in probe.parameters()),
        dtype=str(ctx["dtype"]).removeprefix("torch."),
        steps=a.steps,
        warmup=a.warmup,
        rank=a.rank,
        rows_generations_tokens=list(RUNS[a.shape]),
        budget_s=a.budget_s,
        torch=torch.__version__,
        tolerance=TOLERANCE[str(ctx["dtype"]).removeprefix("torch.")],
    )
    ids = torch.full((2, 8), 3, device=a.device)
    probe(input_ids=ids, labels=ids).loss.backward()  # first-use kernel and library set-up, outside every figure
    del probe, ids
    report, spent = {"meta": meta, "rows": []}, {"heads_decode": [HEADS_DECODE_S]} if cuda else {}
    steps = [(f"step {k}", "step", k) for k, _ in STEPS]
    plan = [  # most wanted first: a run cut short by its budget keeps routed vs vanilla and the equality checks
        ("warm-up: 1 step lora, untimed", "warmup", "lora"),
        *steps[:2],
        ("svd_setup svf", "svd_setup", None),  # before the svf trainer, which then reads the SVD cache
        steps[2],
        *[(f"ckpt_equal {t}", "ckpt_equal", t) for t in TARGETS],
        *steps[3:],
        ("heads_decode", "heads_decode", None),
    ]
    fns = {
        "warmup": lambda k, c: run_steps(k, c, warmup=0, steps=1),
        "step": run_steps,
        "svd_setup": lambda _, c: svd_setup(c),
        "ckpt_equal": checkpoint_equality,
        "heads_decode": lambda _, c: heads_decode(c),
    }
    with tempfile.TemporaryDirectory() as tmp:
        ctx.update(tmp=tmp, svd_cache=f"{tmp}/svd")
        for name, kind, arg in plan:
            if kind in a.skip:
                report["rows"].append(
                    {**dict.fromkeys(COLUMNS), "name": name, "kind": kind, "status": "skipped: --skip"}
                )
                continue
            row = measure(report, name, kind, lambda k=kind, x=arg: fns[k](x, ctx), budget_end, spent)
            print(f"gpu_check: {name}: {row['status']} ({row['seconds']} s)", file=sys.stderr, flush=True)
            write_report(report, a, budget_end, cuda, done=False)  # a run killed later keeps what it finished
    write_report(report, a, budget_end, cuda, done=True)
    print(report["table"])
    print(f"written: {a.out}")
    return report


def write_report(report: dict, a: argparse.Namespace, budget_end: float, cuda: bool, done: bool) -> None:
    from route.utils.io import write_json_atomic

    add_ratios(report, cuda)
    report["meta"].update(complete=done, elapsed_s=round(a.budget_s - (budget_end - time.monotonic()), 1))
    report["table"] = format_table(report)
    write_json_atomic(a.out, report)


if __name__ == "__main__":
    main()
