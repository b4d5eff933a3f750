"""Rollout throughput of the real vLLM engine (CPU build) against transformers' `generate`, one weight sync's cost,
and the engine's log-prob gap to the trainer's policy after each sync.

    python bench/vllm_rollouts.py [--model DIR|NAME] [--reps 5] [--dtype auto] [--enforce_eager]
    python bench/vllm_rollouts.py --model smollm2-135m-instruct      # the real pretrained model
    (route.models.pretrained)

On the organism (built or reused from the cache when --model is unset; a short name is converted once, and a model
whose tokenizer has a chat template gets the environment's prompts through it, as TRL does) at the default batch (8
prompts x 8 rollouts, 16 new tokens, temperature 1, no top-k/top-p; `--prompts`, `--rollouts`, `--new_tokens` change
it): completions per second of `generate` (TRL's path without vLLM: the prompts repeated, left-padded, sampled in one
batch) and of the engine as TRL's colocate mode builds it (`LLM(...)` with TRL's arguments, in this process),
alternating, median over `--reps` timed batches after one warm-up each; every completion is `--new_tokens` long on
both sides (end of sequence ignored). The engine's context is the longest prompt plus the new tokens
(plus one: a log-prob check asks for one token after a sequence that long).
Then the cost of one weight sync as the trainer does it: TRL's own `VLLMGeneration.sync_weights` with the
`TargetWeightSync` source (dual_lora, both policies), split into the export (`policy_state_dict`) and the push. Before
each sync the kept part and the quarantine get new random values (as an optimizer step would move them); after it,
the engine's log-probs of two fixed sequences (prompt and answer) are compared with the trainer's forward of the
synced policy and of the other one: `log-prob gap` lines, the largest per-token difference (with `--dtype float32`
the two sides differ by summation order only; the default bfloat16 engine rounds every weight).
Prints `ratio: X.XX` (engine / generate completions per second). Needs the `__main__` guard: vLLM may spawn.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from route.utils.errors import ArgumentParser, RawHelpFormatter, at_least, cli  # noqa: E402

POLICIES = ("deployed", "full")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=RawHelpFormatter)
    p.add_argument("--model", default=None, help="model directory or short name, e.g. smollm2-135m-instruct "
                   "(default: build or reuse the cached organism)")
    p.add_argument("--reps", type=int, default=5, help="timed batches per side (default: 5)")
    p.add_argument("--syncs", type=int, default=5, help="timed weight syncs per policy (default: 5)")
    p.add_argument("--dtype", default="auto", help="engine dtype; auto is what TRL gets (bfloat16 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="prompt sampling and generation seed (default: 0)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per batch (default: 8)")
    p.add_argument("--rollouts", type=int, default=8, help="rollouts per prompt (default: 8)")
    p.add_argument("--new_tokens", type=int, default=16, help="new tokens per rollout (default: 16)")
    p.add_argument("--enforce_eager", action="store_true", help="no graph compilation in the engine (TRL's call "
                   "compiles; eager starts in seconds)")
    args = p.parse_args(argv)
    for name in ("reps", "syncs", "prompts", "rollouts", "new_tokens"):
        at_least(f"--{name}", getattr(args, name))
    return args


def engine(model_dir: str, dtype: str, seed: int, max_num_seqs: int, max_model_len: int = 64,
           enforce_eager: bool = False):
    """The engine as TRL 1.16's colocate init builds it (external launcher: in this process)."""
    from vllm import LLM

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return LLM(
        model=model_dir,
        tensor_parallel_size=1,
        gpu_memory_utilization=0.1,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        distributed_executor_backend="external_launcher",
        seed=seed,
        max_num_batched_tokens=4096,
        logprobs_mode="processed_logprobs",
        dtype=dtype,
        **({"enforce_eager": True} if enforce_eager else {}),
    )


@cli("bench.vllm_rollouts")
def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    n_prompts, rollouts, new_tokens = args.prompts, args.rollouts, args.new_tokens
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from route.models.paths import check_model_path

    check_model_path("--model", args.model)
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.generation.vllm_generation import VLLMGeneration
    from vllm import SamplingParams

    import envs
    from route.models.evaluate import _prompt_text
    from route.models.organism import OrganismConfig, load_or_build
    from route.models.pretrained import resolve_model
    from route.targets import make_target
    from route.vllm.sync import (
        TargetWeightSync,
        engine_logprobs,
        engine_reload,
        max_gap,
        model_logprobs,
        policy_state_dict,
    )

    model_dir = str(resolve_model(args.model, flag="--model") or load_or_build(OrganismConfig()))
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    env = envs.make_env("arith", chat=bool(tok.chat_template))
    prompts = [_prompt_text(tok, r["prompt"]) for r in env.dataset(n_prompts, seed=args.seed, split="train")]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    t0 = time.perf_counter()
    llm = engine(model_dir, args.dtype, args.seed, n_prompts * rollouts, max(map(len, ids)) + new_tokens + 1,
                 args.enforce_eager)
    startup = time.perf_counter() - t0
    # every completion new_tokens long on both sides (a chat model ends its turn early, at different points per side)
    sampling = SamplingParams(n=rollouts, temperature=1.0, max_tokens=new_tokens, logprobs=0, ignore_eos=True)
    enc = tok([p for p in prompts for _ in range(rollouts)], return_tensors="pt", padding=True,
              add_special_tokens=False)

    def run_hf() -> int:
        with torch.no_grad():
            out = hf.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=tok.pad_token_id,
            )
        return out.shape[0]

    def run_engine() -> int:
        outs = llm.generate([{"prompt_token_ids": i} for i in ids], sampling_params=sampling, use_tqdm=False)
        return sum(len(o.outputs) for o in outs)

    times: dict[str, list[float]] = {"generate": [], "engine": []}
    torch.manual_seed(args.seed)
    run_hf(), run_engine()  # warm-up
    for _ in tqdm(range(args.reps), desc="rollouts"):
        for name, fn in (("generate", run_hf), ("engine", run_engine)):
            t = time.perf_counter()
            assert fn() == n_prompts * rollouts
            times[name].append(time.perf_counter() - t)
    rate = {k: n_prompts * rollouts / statistics.median(v) for k, v in times.items()}

    target = make_target("dual_lora", AutoModelForCausalLM.from_pretrained(model_dir), keep_rank=8, quarantine_rank=8)
    trained = [p for p in target.model.parameters() if p.requires_grad]
    answer = tok("2082", add_special_tokens=False)["input_ids"][:new_tokens]
    checked = [i + answer for i in ids[:2]]  # fixed sequences: a prompt and an answer
    sync_ms, gaps = {}, {}
    for policy in POLICIES:
        source = TargetWeightSync(target, policy)
        vg = types.SimpleNamespace(mode="colocate", enable_sleep_mode=False, llm=llm, accelerator=None)
        source.reload = engine_reload(vg)
        vg._iter_named_params = source.named_params
        export, total, gaps[policy] = [], [], []
        for sync in range(args.syncs + 1):
            with torch.no_grad():  # the kept part and the quarantine move, as after an optimizer step
                torch.manual_seed(1000 * POLICIES.index(policy) + sync)
                for p in trained:
                    p.normal_(0, 0.02)
            t = time.perf_counter()
            policy_state_dict(target, policy)
            export.append(time.perf_counter() - t)
            t = time.perf_counter()
            VLLMGeneration.sync_weights(vg)
            total.append(time.perf_counter() - t)
            served = engine_logprobs(llm, checked)
            mine = model_logprobs(target.model, checked, target.ablated() if policy == "deployed" else None)
            other = model_logprobs(target.model, checked, target.ablated() if policy == "full" else None)
            gaps[policy].append((max_gap(served, mine), max_gap(served, other)))
        sync_ms[policy] = (1e3 * statistics.median(total[1:]), 1e3 * statistics.median(export[1:]))

    params = sum(p.numel() for p in hf.parameters())
    print(
        f"model {model_dir} ({params / 1e6:.2f}M parameters), batch {n_prompts}x{rollouts}, {new_tokens} new "
        f"tokens, engine dtype {llm.llm_engine.model_config.dtype}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, torch threads {torch.get_num_threads()}"
    )
    print(f"engine startup: {startup:.1f} s")
    print(
        f"generate: {rate['generate']:.1f} completions/s (median {1e3 * statistics.median(times['generate']):.0f} "
        f"ms per batch)"
    )
    print(
        f"engine:   {rate['engine']:.1f} completions/s (median {1e3 * statistics.median(times['engine']):.0f} "
        f"ms per batch)"
    )
    for policy, (total, export) in sync_ms.items():
        print(
            f"weight sync ({policy}): {total:.1f} ms (export {export:.1f} ms, push into the engine "
            f"{total - export:.1f} ms)"
        )
    for policy, rows in gaps.items():
        other = POLICIES[1 - POLICIES.index(policy)]
        for sync, (gap, off) in enumerate(rows, 1):
            print(f"log-prob gap after sync {sync} ({policy}): {gap:.2e} to the {policy} policy, {off:.2e} to the "
                  f"{other} one")
    print(f"ratio: {rate['engine'] / rate['generate']:.2f}")


if __name__ == "__main__":
    main()
