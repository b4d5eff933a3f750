"""Forward+backward step time of the svf target (top-r, gated) against PEFT LoRA of rank r, and SVD setup time.

    python bench/svf_overhead.py [--model DIR|NAME] [--rank 8] [--batch 64] [--seq 40] [--repeats 40] [--threads 1]
                                 [--skip-large] [--device cpu|cuda]
    python bench/svf_overhead.py --model smollm2-135m-instruct --batch 8 --seq 48 --repeats 6 --warmup 1 --skip-large

Step: zero_grad, a causal-LM loss forward and its backward on the same random token batch, on two copies of the
same model adapting the same modules (every attention and MLP projection): svf with rank r and a one-axis quarantine,
its forward inside `target.gate(modes)` with a training-like mix (1 in 8 rows forget, the rest default), against
PEFT LoRA of rank r (alpha = r). The two alternate step by step (the order flips every repeat) so machine drift hits
both; after `--warmup` dropped repeats the medians are compared: `ratio: X.XX` is svf / LoRA (target <= 1.10).

SVD setup: the time to build the svf target (every module's SVD, full rank, canonical signs) with an empty cache
(cold) and again from the cache (warm), for the model (`--model`: a directory or a short name such as
`smollm2-135m-instruct`, `route.models.pretrained`; default the organism, `route.models.organism.load_or_build()`) and,
unless `--skip-large`, for a randomly initialised Qwen2-0.5B-shaped model built from a config (hidden 896, 24 layers,
MLP 4864, 14 heads / 2 KV heads; vocabulary cut to 1024, since embeddings are not adapted).
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from route.utils.errors import ArgumentParser, cli  # noqa: E402


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_times(model_dir: str, rank: int, batch: int, seq: int, repeats: int, warmup: int, device: str,
               cache: str) -> dict[str, list[float]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from route.targets.common import DEFAULT_MODULES
    from route.targets.svf import SVFTarget

    base = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=rank, target_modules=list(DEFAULT_MODULES),
                                                          lora_dropout=0.0, task_type="CAUSAL_LM"))
    svf = SVFTarget(copy.deepcopy(base), rank=rank, reserve_axes=[0], cache_dir=cache, progress=False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, (batch, seq), generator=g).to(device)
    modes = ["forget" if i % 8 == 0 else "default" for i in range(batch)]

    def run(kind: str) -> float:
        model = lora if kind == "lora" else svf.model
        model.zero_grad(set_to_none=True)
        _sync(device)
        t = time.perf_counter()
        if kind == "lora":
            loss = model(input_ids=ids, labels=ids).loss
        else:
            with svf.gate(modes):
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        _sync(device)
        return time.perf_counter() - t

    times: dict[str, list[float]] = {"lora": [], "svf": []}
    for i in range(warmup + repeats):
        for kind in (("lora", "svf") if i % 2 == 0 else ("svf", "lora")):
            dt = run(kind)
            if i >= warmup:
                times[kind].append(dt)
    return times


def svd_setup(model, rank: int | None, cache: str) -> tuple[float, float]:
    """(cold, warm) seconds to wrap `model` with the svf target (the first call fills `cache`)."""
    from route.targets.svf import SVFTarget

    out = []
    for _ in range(2):
        m = copy.deepcopy(model)
        t = time.perf_counter()
        SVFTarget(m, rank=rank, reserve_axes=[0], cache_dir=cache, progress=False)
        out.append(time.perf_counter() - t)
        del m
    return out[0], out[1]


def qwen_05b_shaped():
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@cli("bench.svf_overhead")
def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory or short name, e.g. smollm2-135m-instruct "
                        "(default: the cached organism)")
    parser.add_argument("--rank", type=int, default=8, help="svf rank r and LoRA rank r")
    parser.add_argument("--batch", type=int, default=64, help="rows per step (a GRPO micro-batch of the default run)")
    parser.add_argument("--seq", type=int, default=40, help="tokens per row")
    parser.add_argument("--repeats", type=int, default=40, help="timed steps per kind")
    parser.add_argument("--warmup", type=int, default=5, help="repeats dropped at the start")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--skip-large", action="store_true", help="skip the 0.5B-shaped SVD setup")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from route.models.organism import load_or_build
    from route.models.paths import check_model_path
    from route.models.pretrained import resolve_model

    check_model_path("--model", args.model)
    model_dir = resolve_model(args.model, flag="--model") or str(load_or_build())
    name = args.model or "organism"
    print(f"model: {model_dir}; device {args.device}; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        times = step_times(model_dir, args.rank, args.batch, args.seq, args.repeats, args.warmup, args.device,
                           f"{tmp}/step")
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"LoRA r={args.rank}: median fwd+bwd {med['lora'] * 1e3:.2f} ms over {len(times['lora'])} steps "
              f"(batch {args.batch} x {args.seq} tokens)")
        print(f"svf r={args.rank} (gated, 1/8 forget rows): median fwd+bwd {med['svf'] * 1e3:.2f} ms "
              f"over {len(times['svf'])} steps")
        print(f"ratio: {med['svf'] / med['lora']:.2f}")

        model = AutoModelForCausalLM.from_pretrained(model_dir).to(args.device)
        n = sum(p.numel() for p in model.parameters())
        cold, warm = svd_setup(model, None, f"{tmp}/model")
        print(f"SVD setup, {name} ({n / 1e6:.1f}M params, full rank): cold {cold:.2f} s, cached {warm:.2f} s")
        if not args.skip_large:
            large = qwen_05b_shaped().to(args.device)
            n = sum(p.numel() for p in large.parameters())
            cold, warm = svd_setup(large, None, f"{tmp}/large")
            print(f"SVD setup, Qwen2-0.5B-shaped random model ({n / 1e6:.0f}M params, full rank): "
                  f"cold {cold:.1f} s, cached {warm:.1f} s")


if __name__ == "__main__":
    main()
