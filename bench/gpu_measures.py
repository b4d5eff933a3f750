"""The models and measurements of `bench/gpu_check.py` (see its docstring for what each figure means).

Shapes: random-weight Qwen2-shaped causal LMs built from a config on the device (`build_model`, the same weights on
every call for a seed) and the organism's character tokenizer padded with filler tokens up to the vocabulary
(`build_tokenizer`). Measurements, each returning a row's figures: `run_steps` (one trainer kind's optimizer-step
time and peak memory), `svd_setup` (the svf target's SVD, cold and cached), `checkpoint_equality` (a target's
gradients with and without gradient checkpointing) and `heads_decode` (the heads' decode bench, when it exists).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import io
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from routing_overhead import StepTimer  # noqa: E402

QWEN2 = dict(num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936)
SHAPES = {
    "tiny": dict(
        QWEN2, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=64
    ),
    "0.5b": dict(QWEN2, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, intermediate_size=4864),
    "1.5b": dict(QWEN2, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, intermediate_size=8960),
}
# (rows per step, generations per prompt, completion tokens); rows of the equality check x its tokens
RUNS = {"tiny": (8, 4, 8), "0.5b": (16, 8, 32), "1.5b": (16, 8, 32)}
EQUALITY_ROWS, EQUALITY_TOKENS = 6, 16
TARGETS = ("dual_lora", "svf", "sgtm")
TOLERANCE = {"float32": 0.0, "bfloat16": 1e-2}


def build_tokenizer(vocab_size: int):
    """The organism's character tokenizer with filler tokens `<xN>` appended up to `vocab_size` ids."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from route.models.organism import build_tokenizer as char_tokenizer

    base = char_tokenizer()
    spec = json.loads(base.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size: must be >= {len(vocab)} (the character tokenizer), got {vocab_size}")
    vocab.update({f"<x{i}>": i for i in range(len(vocab), vocab_size)})
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        pad_token=base.pad_token,
        eos_token=base.eos_token,
        unk_token=base.unk_token,
        padding_side="left",
    )


def build_model(ctx: dict):
    """A random-weight Qwen2-shaped causal LM on the device, in the run's dtype; the same weights on every call."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    tok = ctx["tokenizer"]
    config = Qwen2Config(
        **SHAPES[ctx["shape"]], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None
    )
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

    from route.targets.common import DEFAULT_MODULES
    from route.trainer.parse import build_config
    from route.trainer.trainer import RoutedGRPOTrainer

    a, cuda = ctx["args"], ctx["device"] == "cuda"
    warmup, steps = a.warmup if warmup is None else warmup, a.steps if steps is None else steps
    rows, gens, tokens = RUNS[ctx["shape"]]
    target = kind if kind in TARGETS else "dual_lora"
    config = build_config(
        output_dir=f"{ctx['tmp']}/{kind}",
        use_cpu=not cuda,
        bf16=cuda,
        gradient_checkpointing=True,
        learning_rate=1e-4,
        beta=0.0,
        per_device_train_batch_size=rows,
        num_generations=gens,
        max_completion_length=tokens,
        generation_kwargs={"min_new_tokens": tokens},
        max_steps=warmup + steps,
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=a.seed,
        train_size=rows * (warmup + steps),
        intervention="route",
        detector_tpr=0.5,
        detector_fpr=0.25,
        target=target,
        keep_rank=a.rank,
        quarantine_rank=a.rank,
        svf_rank=2 * a.rank,
        svf_reserve_axes=[0],
        svf_cache_dir=ctx["svd_cache"],
    )
    env, tok = ctx["env"], ctx["tokenizer"]
    data = env.dataset(config.train_size, seed=a.seed, split="train")
    timer = StepTimer()
    if cuda:
        end = timer.on_step_end
        timer.on_step_end = lambda *x, **k: (torch.cuda.synchronize(), end(*x, **k))
    with Memory(ctx["device"]) as mem:
        model = build_model(ctx)
        common = dict(
            model=model,
            args=config,
            reward_funcs=[varied_reward],
            processing_class=tok,
            train_dataset=data,
            callbacks=[timer],
        )
        if kind in ("lora", "full"):
            lora = LoraConfig(
                r=2 * a.rank,
                lora_alpha=2 * a.rank,
                target_modules=list(DEFAULT_MODULES),
                lora_dropout=0.0,
                task_type="CAUSAL_LM",
            )
            trainer = GRPOTrainer(**common, peft_config=lora if kind == "lora" else None)
        else:
            trainer = RoutedGRPOTrainer(**common, env=env)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    del trainer, model
    timed = timer.times[warmup:]
    if len(timed) != steps:
        raise RuntimeError(f"{kind}: {len(timer.times)} steps ran, expected {warmup + steps}")
    return dict(
        value=statistics.median(timed) * 1e3,
        unit="ms/step",
        peak_mib=mem.peak_mib,
        detail={"timed_ms": [round(t * 1e3, 2) for t in timed]},
    )


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
    return dict(
        value=cached,
        unit="s cached",
        baseline=f"cold {cold:.3g} s",
        ratio=cached / cold,
        detail={"cold_s": cold, "cached_s": cached, "cache_entries": entries},
    )


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
    sizes = {
        "dual_lora": dict(keep_rank=a.rank, quarantine_rank=a.rank),
        "sgtm": dict(forget_mlp_frac=0.125),
        "svf": dict(rank=2 * a.rank, reserve_axes=[0, 1], cache_dir=ctx["svd_cache"], progress=False),
    }
    target = make_target(name, build_model(ctx), **sizes[name])
    g = torch.Generator().manual_seed(a.seed + 1)
    with torch.no_grad():  # non-zero adapters, so every gated path carries gradient (small: bf16 over 24+ layers)
        for n, p in target.model.named_parameters():
            if p.requires_grad and ("lora_" in n or "svf_" in n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
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
    err = max(
        ((got[k] - reference[k]).abs().max() / reference[k].abs().max().clamp_min(1e-30)).item()
        for k in reference
        if reference[k].numel()
    )
    tol = TOLERANCE[str(ctx["dtype"]).removeprefix("torch.")]
    return dict(
        value=err,
        unit="max rel diff",
        goal=tol,
        met=err <= tol,
        detail={
            "parameters": len(reference),
            "checkpointed_recomputes": len(recomputes),
            "exact": all(torch.equal(got[k], reference[k]) for k in reference),
        },
    )


def heads_decode(ctx: dict, path: Path | None = None) -> dict:
    """`bench/heads_decode.py`'s table (its own model shape; this run's device and dtype), or status "not available"
    when that bench or `route.models.heads` is missing. On cpu it decodes a tiny model for a few tokens."""
    path = path or Path(__file__).resolve().parent / "heads_decode.py"
    if not path.exists():
        return dict(status="not available", detail={"reason": f"{path.name} does not exist"})
    spec = importlib.util.spec_from_file_location("heads_decode", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its worker processes import it by this name, from its folder
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
        importlib.import_module("route.models.heads")
    except ImportError as e:
        sys.modules.pop(spec.name, None)
        return dict(status="not available", detail={"reason": f"{type(e).__name__}: {e}"})
    cuda = ctx["device"] == "cuda"
    size = "--tokens 32 --batch 8 --dtype bfloat16" if cuda else "--tokens 4 --hidden 128 --layers 2 --repeats 1"
    argv = f"--device {ctx['device']} {size}".split()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main(argv)
    return dict(unit="table", detail={"argv": argv, "output": out.getvalue().splitlines()})
