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
- heads_decode: `bench/heads_decode.py` on this device and shape, when that bench and `route.heads` exist.
- ckpt_equal: each target's gradients of one gated forward + backward (rows mixing forget / retain / default,
  adapters randomised so every gated path carries gradient) with and without gradient checkpointing; passes when
  max |g_ckpt - g| / max |g| over every parameter is <= the tolerance: 0 (exact) in fp32, 1e-2 in bf16.

Goals (on GPU): routed / vanilla step time <= 1.05 (dual_lora, sgtm), svf / LoRA <= 1.00. A measurement starts only
if the remaining `--budget-s` covers the longest one of its kind so far (else status "skipped: budget"); one that
raises records the error and the run goes on. One table is printed and written as JSON (`--out`, atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import io
import json
import re
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from routing_overhead import StepTimer  # noqa: E402

QWEN2 = dict(num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936)
SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=64, tie_word_embeddings=True),
    "0.5b": dict(QWEN2, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, intermediate_size=4864),
    "1.5b": dict(QWEN2, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, intermediate_size=8960),
}
# (rows per step, generations per prompt, completion tokens); rows of the equality check x its tokens
RUNS = {"tiny": (8, 4, 8), "0.5b": (16, 8, 32), "1.5b": (16, 8, 32)}
EQUALITY_ROWS, EQUALITY_TOKENS = 6, 16
STEPS = (("lora", None), ("dual_lora", "lora"), ("svf", "lora"), ("full", None), ("sgtm", "full"))
GOALS = {"dual_lora": 1.05, "svf": 1.00, "sgtm": 1.05}
TOLERANCE = {"float32": 0.0, "bfloat16": 1e-2}
COLUMNS = ("name", "kind", "status", "value", "unit", "baseline", "ratio", "goal", "met", "peak_mib", "peak_ratio",
           "seconds", "detail")


def build_tokenizer(vocab_size: int):
    """The organism's character tokenizer with filler tokens `<xN>` appended up to `vocab_size` ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from route.organism import build_tokenizer as char_tokenizer

    base = char_tokenizer()
    spec = json.loads(base.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size: must be >= {len(vocab)} (the character tokenizer), got {vocab_size}")
    vocab.update({f"<x{i}>": i for i in range(len(vocab), vocab_size)})
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token=base.pad_token,
                                   eos_token=base.eos_token, unk_token=base.unk_token, padding_side="left")


def build_model(ctx: dict):
    """A random-weight Qwen2-shaped causal LM on the device, in the run's dtype; the same weights on every call."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = ctx["tokenizer"]
    config = Qwen2Config(**SHAPES[ctx["shape"]], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None)
    torch.manual_seed(ctx["seed"])
    with torch.device(ctx["device"]):
        model = AutoModelForCausalLM.from_config(config, dtype=ctx["dtype"])
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model


def varied_reward(prompts, completions, **columns) -> list[float]:
    """A reward that differs between completions (a random model earns none of the environment's)."""
    return [sum(map(ord, c)) % 7 / 6 for c in completions]


class Memory:
    """Peak memory of a block above what was in use when it started: CUDA allocated, or the process's RSS."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __enter__(self):
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            with contextlib.suppress(OSError, AttributeError):  # freed heap back to the system, so reuse shows
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            with contextlib.suppress(OSError):  # resets the peak RSS (VmHWM) to the current RSS
                Path("/proc/self/clear_refs").write_text("5")
            self.before = self._rss("VmRSS")
        return self

    def __exit__(self, *exc):
        import torch

        peak = torch.cuda.max_memory_allocated() if self.cuda else self._rss("VmHWM")
        self.peak_mib = (peak - self.before) / 2**20

    @staticmethod
    def _rss(field: str) -> int:
        return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def run_steps(kind: str, ctx: dict, warmup: int | None = None, steps: int | None = None) -> dict:
    """Train `--warmup` + `--steps` optimizer steps with one trainer kind; median step time and peak memory."""
    import torch
    from peft import LoraConfig
    from transformers import PrinterCallback
    from trl import GRPOTrainer

    from route.cli import build_config
    from route.targets.common import DEFAULT_MODULES
    from route.trainer import RoutedGRPOTrainer

    a, cuda = ctx["args"], ctx["device"] == "cuda"
    warmup, steps = a.warmup if warmup is None else warmup, a.steps if steps is None else steps
    rows, gens, tokens = RUNS[ctx["shape"]]
    target = kind if kind in ("dual_lora", "svf", "sgtm") else "dual_lora"
    config = build_config(
        output_dir=f"{ctx['tmp']}/{kind}", use_cpu=not cuda, bf16=cuda, gradient_checkpointing=True,
        learning_rate=1e-4, beta=0.0, per_device_train_batch_size=rows, num_generations=gens,
        max_completion_length=tokens, generation_kwargs={"min_new_tokens": tokens}, max_steps=warmup + steps,
        logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True, seed=a.seed,
        train_size=rows * (warmup + steps), intervention="route", detector_tpr=0.5, detector_fpr=0.25,
        target=target, keep_rank=a.rank, quarantine_rank=a.rank, svf_rank=2 * a.rank, svf_reserve_axes=[0],
        svf_cache_dir=ctx["svd_cache"])
    env, tok = ctx["env"], ctx["tokenizer"]
    data = env.dataset(config.train_size, seed=a.seed, split="train")
    timer = StepTimer()
    if cuda:
        end = timer.on_step_end
        timer.on_step_end = lambda *x, **k: (torch.cuda.synchronize(), end(*x, **k))
    with Memory(ctx["device"]) as mem:
        model = build_model(ctx)
        common = dict(model=model, args=config, reward_funcs=[varied_reward], processing_class=tok,
                      train_dataset=data, callbacks=[timer])
        if kind in ("lora", "full"):
            lora = LoraConfig(r=2 * a.rank, lora_alpha=2 * a.rank, target_modules=list(DEFAULT_MODULES),
                              lora_dropout=0.0, task_type="CAUSAL_LM")
            trainer = GRPOTrainer(**common, peft_config=lora if kind == "lora" else None)
        else:
            trainer = RoutedGRPOTrainer(**common, env=env)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    del trainer, model
    timed = timer.times[warmup:]
    if len(timed) != steps:
        raise RuntimeError(f"{kind}: {len(timer.times)} steps ran, expected {warmup + steps}")
    return dict(value=statistics.median(timed) * 1e3, unit="ms/step", peak_mib=mem.peak_mib,
                detail={"timed_ms": [round(t * 1e3, 2) for t in timed]})


def svd_setup(ctx: dict) -> dict:
    """Seconds to build the svf target at full rank with an empty SVD cache (cold), then from that cache."""
    from route.targets.svf import SVFTarget

    seconds = []
    for _ in range(2):
        model = build_model(ctx)
        _sync(ctx)
        start = time.perf_counter()
        SVFTarget(model, rank=None, reserve_axes=[0], cache_dir=ctx["svd_cache"], progress=False)
        _sync(ctx)
        seconds.append(time.perf_counter() - start)
        del model
    cold, cached = seconds
    entries = len(list(Path(ctx["svd_cache"]).glob("*.pt")))
    return dict(value=cold, unit="s cold", ratio=cached / cold, detail={"cached_s": cached, "cache_entries": entries})


def _sync(ctx: dict) -> None:
    import torch

    if ctx["device"] == "cuda":
        torch.cuda.synchronize()


def checkpoint_equality(name: str, ctx: dict) -> dict:
    """max |g_ckpt - g| / max |g| over every parameter, for one gated forward + backward with / without checkpoints."""
    import torch

    from route.masks import DEFAULT, FORGET, RETAIN
    from route.targets import checkpointing, make_target

    a = ctx["args"]
    sizes = {"dual_lora": dict(keep_rank=a.rank, quarantine_rank=a.rank), "sgtm": dict(forget_mlp_frac=0.125),
             "svf": dict(rank=2 * a.rank, reserve_axes=[0, 1], cache_dir=ctx["svd_cache"], progress=False)}
    target = make_target(name, build_model(ctx), **sizes[name])
    g = torch.Generator().manual_seed(a.seed + 1)
    with torch.no_grad():  # non-zero adapters, so every gated path carries gradient
        for n, p in target.model.named_parameters():
            if p.requires_grad and ("lora_" in n or "svf_" in n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    modes = torch.tensor([FORGET, RETAIN, DEFAULT] * (EQUALITY_ROWS // 3))
    vocab = SHAPES[ctx["shape"]]["vocab_size"]
    ids = torch.randint(3, vocab, (len(modes), EQUALITY_TOKENS), generator=g).to(ctx["device"])

    def grads() -> dict:
        model = target.model.train()
        model.zero_grad(set_to_none=True)
        with target.gate(modes):
            logits = model(input_ids=ids).logits
        logits.float().log_softmax(-1)[..., 5].mean().backward()  # the backward runs after the gate's context
        return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}

    reference = grads()
    checkpointing.install(target.model, target)
    target.model.gradient_checkpointing_enable()
    recomputes, original = [], target.recompute_context
    target.recompute_context = lambda: (recomputes.append(1), original())[1]
    got = grads()
    if got.keys() != reference.keys():
        raise RuntimeError(f"{name}: checkpointing changed which parameters get a gradient")
    err = max(((got[k] - reference[k]).abs().max() / reference[k].abs().max().clamp_min(1e-30)).item()
              for k in reference if reference[k].numel())
    tol = TOLERANCE[str(ctx["dtype"]).removeprefix("torch.")]
    return dict(value=err, unit="max rel diff", goal=tol, met=err <= tol,
                detail={"parameters": len(reference), "checkpointed_recomputes": len(recomputes),
                        "exact": all(torch.equal(got[k], reference[k]) for k in reference)})


def heads_decode(ctx: dict, path: Path | None = None) -> dict:
    """`bench/heads_decode.py`'s table on this device and shape, or status "not available" when it cannot run."""
    path = path or Path(__file__).resolve().parent / "heads_decode.py"
    if not path.exists():
        return dict(status="not available", detail={"reason": f"{path.name} does not exist"})
    spec = importlib.util.spec_from_file_location("heads_decode", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        importlib.import_module("route.heads")
    except ImportError as e:
        return dict(status="not available", detail={"reason": f"{type(e).__name__}: {e}"})
    shape, cuda = SHAPES[ctx["shape"]], ctx["device"] == "cuda"
    argv = ["--device", ctx["device"], "--dtype", "bfloat16" if cuda else "float32",
            "--hidden", str(shape["hidden_size"]), "--layers", str(shape["num_hidden_layers"]),
            "--vocab", str(shape["vocab_size"]), "--tokens", "32" if cuda else "4", "--batch", "8" if cuda else "1"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main(argv)
    return dict(unit="table", detail={"argv": argv, "output": out.getvalue().splitlines()})


def measure(report: dict, name: str, kind: str, fn, budget_end: float, spent: dict) -> dict:
    """Run one measurement into a row of `report` (skipped if the budget left is below the longest of its kind)."""
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
    lines = [[r["name"], r["status"][:60], f(r["value"], ".4g"), f(r["unit"]), f(r["baseline"]), f(r["ratio"]),
              f(r["goal"]), f(r["met"]), f(r["peak_mib"], ".0f"), f(r["peak_ratio"]), f(r["seconds"])]
             for r in report["rows"]]
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    out = [" | ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in (head, *lines)]
    out.insert(1, "-+-".join("-" * w for w in widths))
    m = report["meta"]
    return (f"{m['device_name']}, shape {m['shape']} ({m['parameters'] / 1e6:.1f}M parameters), {m['dtype']}, "
            f"{m['steps']} timed + {m['warmup']} warm-up steps; met: GPU goals only\n" + "\n".join(out))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda or cpu (default: cuda)")
    p.add_argument("--shape", default="0.5b", help=f"model shape, one of {list(SHAPES)} (default: 0.5b)")
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds for the whole run (default: 420)")
    p.add_argument("--out", default="runs/gpu_check/report.json", help="JSON output path")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per trainer (default: 5)")
    p.add_argument("--warmup", type=int, default=3, help="dropped optimizer steps per trainer (default: 3)")
    p.add_argument("--rank", type=int, default=8, help="dual_lora r+r; svf and plain LoRA rank 2r (default: 8)")
    p.add_argument("--skip", nargs="*", default=[], help="measurement kinds not to run: warmup step svd_setup "
                                                         "heads_decode ckpt_equal")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="model weights, data and sampling seed (default: 0)")
    a = p.parse_args(argv)
    kinds = ("warmup", "step", "svd_setup", "heads_decode", "ckpt_equal")
    checks = [("--device", a.device in ("cuda", "cpu"), ["cuda", "cpu"]), ("--shape", a.shape in SHAPES, list(SHAPES)),
              ("--budget-s", a.budget_s > 0, "> 0"), ("--steps", a.steps >= 1, ">= 1"),
              ("--warmup", a.warmup >= 0, ">= 0"), ("--rank", a.rank >= 1, ">= 1"),
              ("--skip", set(a.skip) <= set(kinds), list(kinds))]
    for flag, ok, allowed in checks:
        if not ok:
            raise ValueError(f"{flag}: invalid value {getattr(a, flag[2:].replace('-', '_'))!r}; allowed: {allowed}")
    return a


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    budget_end = time.monotonic() + a.budget_s
    import torch

    import envs
    from route.io import write_json_atomic

    if a.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but torch.cuda.is_available() is False; use --device cpu")
    torch.set_num_threads(a.threads)
    cuda = a.device == "cuda"
    ctx = dict(args=a, device=a.device, shape=a.shape, seed=a.seed, dtype=torch.bfloat16 if cuda else torch.float32,
               tokenizer=build_tokenizer(SHAPES[a.shape]["vocab_size"]), env=envs.make_env("arith", hack_frac=0.5))
    probe = build_model(ctx)
    meta = dict(device=a.device, device_name=torch.cuda.get_device_name() if cuda else "cpu", shape=a.shape,
                dims=SHAPES[a.shape], parameters=sum(p.numel() for p in probe.parameters()),
                dtype=str(ctx["dtype"]).removeprefix("torch."), steps=a.steps, warmup=a.warmup, rank=a.rank,
                rows_generations_tokens=list(RUNS[a.shape]), budget_s=a.budget_s, torch=torch.__version__,
                tolerance=TOLERANCE[str(ctx["dtype"]).removeprefix("torch.")])
    ids = torch.full((2, 8), 3, device=a.device)
    probe(input_ids=ids, labels=ids).loss.backward()  # first-use kernel and library set-up, outside every figure
    del probe, ids
    report, spent = {"meta": meta, "rows": []}, {}
    plan = [("warm-up: 1 step lora, untimed", "warmup", 0), ("step lora", "step", "lora"), ("step dual_lora", "step", "dual_lora"), ("svd_setup svf", "svd_setup", 0),
            ("step svf", "step", "svf"), ("step full", "step", "full"), ("step sgtm", "step", "sgtm"),
            *[(f"ckpt_equal {t}", "ckpt_equal", t) for t in ("dual_lora", "svf", "sgtm")],
            ("heads_decode", "heads_decode", 0)]
    fns = {"warmup": lambda _, c: run_steps("lora", c, warmup=0, steps=1), "step": run_steps, "svd_setup": lambda _, c: svd_setup(c), "ckpt_equal": checkpoint_equality,
           "heads_decode": lambda _, c: heads_decode(c)}
    with tempfile.TemporaryDirectory() as tmp:
        ctx.update(tmp=tmp, svd_cache=f"{tmp}/svd")
        for name, kind, arg in plan:
            if kind in a.skip:
                report["rows"].append({**dict.fromkeys(COLUMNS), "name": name, "kind": kind,
                                       "status": "skipped: --skip"})
                continue
            measure(report, name, kind, lambda k=kind, x=arg: fns[k](x, ctx), budget_end, spent)
    add_ratios(report, cuda)
    meta["elapsed_s"] = round(a.budget_s - (budget_end - time.monotonic()), 1)
    report["table"] = format_table(report)
    print(report["table"])
    write_json_atomic(a.out, report)
    print(f"written: {a.out}")
    return report


if __name__ == "__main__":
    main()
