"""Greedy decoding cost of alignment heads (IAV, MAV) against a GenARM-style two-model decode.

    python bench/heads_decode.py --device cpu --tokens 8 --batch 1 --threads 1     # short CPU run
    python bench/heads_decode.py --device cuda --tokens 128 --batch 8 --dtype bfloat16

Every method decodes the same random prompts greedily, KV cache on, same batch, dtype and
device, through the same decoding loop (`route.models.heads.decode`):
- base: the base model alone;
- iav / mav: the base plus the head, one base forward per token (`z_base + alpha * a`, alpha 1);
- genarm_1x / genarm_0.25x: the base plus a second causal LM with its own KV cache (1x the base, and
  about a quarter of it: half the width, half the depth), next-token log-probs summed per token.
Models are Llama-shaped with random weights (hidden >= 1024 by default, so the model's work, not
Python, dominates). Each method runs in its own fresh process, so its peak memory (CUDA: peak
allocated; CPU: peak resident set above the process's footprint before any model exists) is its own;
`--in-process` runs them one after another in this process instead (a smoke run: latencies hold, the
CPU peak memory is then the whole process's and is not a measurement).
Per-token latency = (time for N tokens - time for 1 token) / (N - 1), median over repeats: prefill
excluded. Ratios are against genarm_1x measured in the same run.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path
from queue import Empty, SimpleQueue

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from route.utils.errors import ArgumentParser, cli  # noqa: E402

METHODS = ("base", "iav", "mav", "genarm_1x", "genarm_0.25x")


def llama(hidden: int, layers: int, vocab: int, seed: int, dtype, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 256),
        intermediate_size=int(hidden * 8 / 3) // 64 * 64,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def build(method: str, a):
    """(step function, extra parameters, base parameters) for one method."""
    import torch

    from route.models.heads import IAVForCausalLM, MAVForCausalLM, causal_lm_step

    dtype = getattr(torch, a.dtype)
    base = llama(a.hidden, a.layers, a.vocab, 0, dtype, a.device)

    if method == "base":
        return causal_lm_step(base), 0, n_params(base)
    if method in ("iav", "mav"):
        model = IAVForCausalLM(base) if method == "iav" else MAVForCausalLM(base, fusion_width=a.hidden, dropout=0.0)
        with torch.no_grad():  # random, non-zero heads: the head's matmuls run as after training
            for p in model.head_parameters():
                p.normal_(0.0, 0.02)
        return model.eval().decode_step(alpha=1.0), model.extra_parameters(), n_params(base)
    scale = 1.0 if method == "genarm_1x" else 0.5
    rm = llama(int(a.hidden * scale) // 64 * 64, max(1, int(a.layers * scale)), a.vocab, 1, dtype, a.device)
    base_step, rm_step = causal_lm_step(base), causal_lm_step(rm)

    def step(ids, mask, pos, past):
        past_b, past_r = past or (None, None)
        zb, past_b = base_step(ids, mask, pos, past_b)
        zr, past_r = rm_step(ids, mask, pos, past_r)
        combined = torch.log_softmax(zb.float(), -1) + torch.log_softmax(zr.float(), -1) / a.rm_beta
        return combined, (past_b, past_r)

    return step, n_params(rm), n_params(base)


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(method: str, a, queue) -> None:
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the memory baseline)

    from route.models.heads import decode

    torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    before = torch.cuda.memory_allocated() if cuda else rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step, extra, base_params = build(method, a)
    g = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, a.vocab, (a.batch, a.prompt_len), generator=g).to(a.device)

    def timed(n: int) -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = decode(step, ids, None, n, eos_token_id=None)
        sync()
        assert out.shape[1] == a.prompt_len + n
        return time.perf_counter() - t

    timed(2)  # warm-up
    per_token = []
    for _ in range(a.repeats):
        one, full = timed(1), timed(a.tokens)
        per_token.append((full - one) / (a.tokens - 1))
    peak = (torch.cuda.max_memory_allocated() if cuda else rss_bytes()) - before
    queue.put(
        {
            "method": method,
            "per_token_s": statistics.median(per_token),
            "peak_bytes": peak,
            "extra_params": extra,
            "base_params": base_params,
        }
    )


@cli("bench.heads_decode")
def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    p.add_argument("--hidden", type=int, default=1024, help="base hidden size (>= 1024 keeps Python overhead small)")
    p.add_argument("--layers", type=int, default=8, help="base decoder layers")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (shared by every model)")
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    p.add_argument("--prompt_len", type=int, default=16, help="prompt tokens")
    p.add_argument("--tokens", type=int, default=8, help="new tokens N per decode (>= 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed decodes per method (median)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--rm_beta", type=float, default=1.0, help="GenARM-style: second model's log-probs / rm_beta")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"subset of {list(METHODS)}")
    p.add_argument("--seed", type=int, default=0, help="seed of the models and prompts")
    p.add_argument("--in-process", action="store_true", help="measure in this process (a smoke run; see above)")
    a = p.parse_args(argv)
    if a.device not in ("cpu", "cuda") and not a.device.startswith("cuda:"):
        raise ValueError(f"--device: invalid value {a.device!r}; allowed values: ['cpu', 'cuda']")
    bad = sorted(set(a.methods) - set(METHODS))
    if bad or "genarm_1x" not in a.methods:
        raise ValueError(
            f"--methods: invalid {bad or a.methods}; allowed values: {list(METHODS)}, genarm_1x included (the baseline)"
        )
    if a.tokens < 2 or a.hidden < 64:
        raise ValueError("--tokens must be >= 2 and --hidden >= 64")
    ctx = mp.get_context("spawn")
    rows = {}
    for method in a.methods:
        if a.in_process:
            queue = SimpleQueue()
            measure(method, a, queue)
            rows[method] = queue.get()
            continue
        queue = ctx.Queue()
        proc = ctx.Process(target=measure, args=(method, a, queue))
        proc.start()
        while True:  # a worker that dies (out of memory, a crash) must not hang the parent on queue.get()
            try:
                rows[method] = queue.get(timeout=5)
                break
            except Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"{method}: the measuring process exited with code {proc.exitcode}") from None
        proc.join()
    ref = rows["genarm_1x"]
    print(
        f"device {a.device}, dtype {a.dtype}, batch {a.batch}, prompt {a.prompt_len}, {a.tokens} new tokens, "
        f"hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, threads {a.threads}, KV cache on everywhere"
    )
    print(
        f"{'method':<14}{'ms/token':>10}{'latency ratio':>15}{'peak MiB':>10}{'memory ratio':>14}"
        f"{'extra params':>14}{'extra/base':>12}"
    )
    for m, r in rows.items():
        print(
            f"{m:<14}{r['per_token_s'] * 1e3:>10.2f}{r['per_token_s'] / ref['per_token_s']:>15.2f}"
            f"{r['peak_bytes'] / 2**20:>10.0f}{r['peak_bytes'] / max(1, ref['peak_bytes']):>14.2f}"
            f"{r['extra_params'] / 1e6:>13.1f}M{r['extra_params'] / r['base_params']:>12.2f}"
        )
    print("ratios: against genarm_1x (base + a second model of the same size) in this run"
          + ("; --in-process: peak memory is the whole process's, not a measurement" if a.in_process else ""))


if __name__ == "__main__":
    main()
