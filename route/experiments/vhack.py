"""Hack-direction extraction: the subspace of svf singular-value deltas that separates hack from clean.

    route vhack --env arith --pairs 256 --k 4 --out runs/vhack/arith.pt

For `--pairs` hackable training prompts (rows with a loophole) the environment's demonstration generator
gives a hack and a clean completion. In the svf target's coordinates (per adapted Linear
`y = W x + U_r((Vh_r x) * delta)`, delta of length r, zero at the base model) each completion's NLL
gradient w.r.t. every module's delta is taken at delta = 0; row i of the module's D_m (pairs, r) is
`d_i = grad NLL(clean) - grad NLL(hack) = grad logp(hack) - grad logp(clean)`. The top-k right singular
vectors of the uncentred D_m, each sign flipped so most d_i project positively on it, are the module's
subspace V_m (k, r), orthonormal rows: moving delta along +v raises logp(hack) relative to logp(clean).
`SVFTarget(model, hack_subspace=FILE)` reserves it. The file (`torch.save`, atomic) is
`{"format": "route.vhack/1", "subspace": {module: Tensor(k, r)}, "metadata": {...}}`; the metadata has
the model, env, pairs, k, rank, seed, per-module explained-variance ratios (S_j^2 / sum S^2 of D_m), the
mean cosine of the d_i with the subspace (mean |V d_i| / |d_i|), each direction's share of positive
projections, the pairs per mode, the time and the project version.

Departures from the seed (`v_hack = top SVD dirs of (grad logp(clean) - grad logp(hack)) over pairs`):
the sign is reversed so +v points towards the hack (same subspace); directions are per module, k of
them, in svf delta coordinates rather than one vector over all weights; NLL is summed over the
completion tokens and the closing EOS, tokenized as the organism's SFT does (prompt and completion
separately, via `route.models.organism.sft_batch`); pairs are demonstrations sharing a prompt, not sampled rollouts.
Per-row gradients take one backward per batch, recorded by the svf target's own per-row recorder (the model is
wrapped with `SVFTarget` for the extraction and unwrapped after): exact, as rows never interact. Results are a pure
function of (model, env, pairs, k, rank, seed); the batch size changes them only by float rounding.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from route import __version__
from route.targets.common import DEFAULT_MODULES
from route.utils.errors import ArgumentParser, cli
from route.utils.io import torch_save_atomic

FORMAT = "route.vhack/1"


# ---------------------------------------------------------------------------------------------- core math
def top_k_directions(D: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """(V (k, r), explained-variance ratios (k,), share of rows with positive projection (k,)) of D (n, r).

    V holds the top-k right singular vectors of the uncentred D, each sign flipped so that the majority
    of D's rows project positively on it (ties broken by the sum of the projections).
    """
    if D.ndim != 2:
        raise ValueError(f"top_k_directions: D must be 2-d (pairs, r), got shape {tuple(D.shape)}")
    k = int(k)
    if not 1 <= k <= min(D.shape):
        raise ValueError(f"top_k_directions: k must be in [1, {min(D.shape)}] for D of shape {tuple(D.shape)}")
    D = D.double()
    _, S, Vh = torch.linalg.svd(D, full_matrices=False)
    V = Vh[:k].clone()
    proj = D @ V.T  # (n, k)
    pos, neg = (proj > 0).sum(0), (proj < 0).sum(0)
    flip = (neg > pos) | ((neg == pos) & (proj.sum(0) < 0))
    V[flip] *= -1
    total = (S**2).sum()
    evr = (S[:k] ** 2) / total if total > 0 else torch.zeros(k, dtype=D.dtype)
    share = ((D @ V.T) > 0).double().mean(0)
    return V.float(), evr.float(), share.float()


def subspace_cosine(D: Tensor, V: Tensor) -> float:
    """Mean over rows of |V d| / |d|: the cosine of each row of D with the span of V's orthonormal rows."""
    D = D.double()
    norms = D.norm(dim=1)
    keep = norms > 0
    if not keep.any():
        return 0.0
    return float(((D[keep] @ V.double().T).norm(dim=1) / norms[keep]).mean())


# ---------------------------------------------------------------------------------------------- pairs
def check_env(env: Any) -> None:
    """ValueError unless `env` can supply demonstration pairs (`rows` and `demonstration`)."""
    for attr in ("rows", "demonstration"):
        if not callable(getattr(env, attr, None)):
            raise ValueError(f"environment {getattr(env, 'name', type(env).__name__)!r} has no `{attr}` method; "
                             "hack extraction needs `rows(n, seed, split)` and `demonstration(row, hack, rng)`")


def demonstration_pairs(env: Any, pairs: int, seed: int = 0) -> list[tuple[dict, str, str]]:
    """(row, hack, clean) for the first `pairs` hackable training rows; a pure function of (env, pairs, seed)."""
    check_env(env)
    size = max(64, 4 * pairs)
    while True:
        rows = env.rows(size, seed=seed, split="train")
        if rows and "loophole" not in rows[0]:
            raise ValueError(f"environment {env.name!r}: rows have no 'loophole' column; cannot find hackable rows")
        hackable = [r for r in rows if r.get("loophole")]
        if len(hackable) >= pairs:
            break
        if size >= 256 * max(64, pairs):
            raise ValueError(f"--pairs {pairs}: only {len(hackable)} hackable prompts among {size} training rows "
                             f"of {env.name!r} (hack_frac too low?)")
        size *= 4
    out = []
    for i, row in enumerate(hackable[:pairs]):
        rng = random.Random(f"vhack:{seed}:{i}")
        hack = env.demonstration(row, hack=True, rng=rng)
        clean = env.demonstration(row, hack=False, rng=rng)
        out.append((row, hack, clean))
    return out


# ---------------------------------------------------------------------------------------------- gradients
def delta_gradients(target: Any, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-row gradient of the summed completion NLL w.r.t. each module's svf delta: {plain module name: (B, r)}.

    `target` is an `SVFTarget`; the rows are recorded by its own per-row recorder (`SVFTarget.recording`, the one
    score routing uses) in one forward and one backward for the whole batch; its deltas are not touched.
    """
    model = target.model
    deltas = [layer.delta_keep for _, layer in target.layers]
    with target.recording() as recorder, torch.enable_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="sum")
        torch.autograd.grad(loss, deltas, allow_unused=True)  # fires the per-row hooks; no .grad is written
    records = recorder.pop()
    rows = batch["input_ids"].shape[0]
    return {name: records[i] if i in records else torch.zeros(rows, layer.rank)
            for i, (name, layer) in enumerate(target.layers)}


# ---------------------------------------------------------------------------------------------- extraction
def extract_hack_subspace(model: nn.Module, tokenizer, env: Any, pairs: int, k: int, rank: int | None = None,
                          seed: int = 0, batch_size: int = 32, progress: bool = True,
                          target_modules: Sequence[str] | None = None, cache_dir: str | None = None,
                          metadata: dict | None = None) -> dict[str, Any]:
    """The hack subspace of a plain (unwrapped) causal LM on `env`: `{"format", "subspace": {module: (k, r)},
    "metadata"}`, the dict `save_hack_subspace` writes. Raises ValueError (naming the CLI flag) for bad values."""
    from tqdm.auto import tqdm

    from route.models.organism import sft_batch  # the organism's SFT tokenization, mirrored exactly
    from route.targets.svf import SVFTarget

    check_args(pairs=pairs, k=k, rank=rank, batch_size=batch_size)
    check_env(env)
    try:
        target = SVFTarget(model, rank=rank, target_modules=target_modules, cache_dir=cache_dir, progress=progress)
    except ValueError:
        raise ValueError(f"--target_modules: no Linear module of the model matches "
                         f"{sorted(target_modules or DEFAULT_MODULES)}") from None
    for name, layer in target.layers:
        if k > layer.rank:
            target.model.unload()
            raise ValueError(f"--k {k} exceeds the svf rank {layer.rank} of module {name}")
    items = demonstration_pairs(env, pairs, seed)
    was_training = model.training
    model.eval()
    rows: dict[str, list[Tensor]] = {name: [] for name, _ in target.layers}
    try:
        with tqdm(total=pairs, desc="vhack pairs", disable=not progress) as bar:
            for start in range(0, pairs, batch_size):
                chunk = items[start: start + batch_size]
                seqs = [(row["prompt"], hack) for row, hack, _ in chunk] + [(row["prompt"], clean)
                                                                             for row, _, clean in chunk]
                grads = delta_gradients(target, sft_batch(tokenizer, seqs))
                n = len(chunk)
                for name, g in grads.items():
                    rows[name].append(g[n:] - g[:n])  # grad NLL(clean) - grad NLL(hack)
                bar.update(n)
    finally:
        target.model.unload()  # the caller's plain model again
        model.train(was_training)
    subspace, evr, share, cos = {}, {}, {}, {}
    for name, parts in rows.items():
        D = torch.cat(parts)
        V, ev, sh = top_k_directions(D, k)
        subspace[name] = V.contiguous().clone()
        evr[name] = [round(float(x), 6) for x in ev]
        share[name] = [round(float(x), 6) for x in sh]
        cos[name] = round(subspace_cosine(D, V), 6)
    modes: dict[str, int] = {}
    for row, _, _ in items:
        modes[row["loophole"]] = modes.get(row["loophole"], 0) + 1
    meta = {
        "model": getattr(model, "name_or_path", None) or None, "env": getattr(env, "name", type(env).__name__),
        "pairs": pairs, "k": k, "rank": rank, "seed": seed,
        "ranks": {name: int(V.shape[1]) for name, V in subspace.items()},
        "target_modules": list(target_modules or DEFAULT_MODULES), "nll": "sum over completion tokens and EOS",
        "orientation": "+v raises logp(hack) - logp(clean)", "pairs_by_mode": dict(sorted(modes.items())),
        "explained_variance": evr, "positive_share": share, "mean_cosine": cos,
        "mean_cosine_overall": round(sum(cos.values()) / len(cos), 6),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "version": __version__,
        **(metadata or {}),
    }
    return {"format": FORMAT, "subspace": subspace, "metadata": meta}


def save_hack_subspace(result: dict[str, Any], path: str | Path) -> Path:
    """Write `result` with `torch.save` through a temporary file and a rename."""
    if result.get("format") != FORMAT or not isinstance(result.get("subspace"), dict):
        raise ValueError(f"save_hack_subspace: not a {FORMAT} result (keys {sorted(result)})")
    path = Path(path)
    torch_save_atomic(result, path)
    return path


def check_args(pairs: int, k: int, rank: int | None, batch_size: int) -> None:
    """ValueError naming the flag for any out-of-range value."""
    if pairs < 1:
        raise ValueError(f"--pairs must be >= 1, got {pairs}")
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    if pairs < k:
        raise ValueError(f"--pairs ({pairs}) must be >= --k ({k}): k directions need at least k pairs")
    if rank is not None and rank < 1:
        raise ValueError(f"--rank must be >= 1, got {rank}")
    if rank is not None and k > rank:
        raise ValueError(f"--k ({k}) must be <= --rank ({rank})")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")


# ---------------------------------------------------------------------------------------------- CLI
def _setup(args: argparse.Namespace) -> tuple[Any, dict, Path]:
    """Check every flag before any work: (env, env_kwargs, model dir); ValueError naming the flag."""
    import envs

    check_args(args.pairs, args.k, args.rank, args.batch_size)
    try:
        env_kwargs = json.loads(args.env_kwargs) if args.env_kwargs else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--env_kwargs is not valid JSON: {e}") from None
    if not isinstance(env_kwargs, dict):
        raise ValueError(f"--env_kwargs must be a JSON object, got {args.env_kwargs}")
    try:
        env = envs.make_env(args.env, **env_kwargs)
        check_env(env)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--env {args.env} (--env_kwargs {env_kwargs}): {e}") from None
    demonstration_pairs(env, args.pairs, args.seed)  # enough hackable prompts?
    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a directory; give a file path")
    from route.targets.common import check_target_modules
    from route.trainer.parse import empty_model

    env.check_ready()
    if args.model is not None:
        from route.models.pretrained import resolve_model
        from route.utils.io import check_checkpoint

        args.model = resolve_model(args.model, flag="--model")  # a short name: its converted checkpoint

        try:
            check_checkpoint(args.model)
        except ValueError as e:
            raise ValueError(f"--model: {e}") from None
    check_target_modules(empty_model(args.model), args.target_modules)  # names only: before loading the weights
    if args.model is None:
        from route.models.organism import load_or_build

        return env, env_kwargs, load_or_build(progress=not args.no_progress)
    return env, env_kwargs, check_checkpoint(args.model)


@cli("route vhack")
def main(argv: list[str] | None = None) -> int:
    import envs

    p = ArgumentParser(prog="route vhack", description="Extract the hack subspace of svf deltas from "
                       "(prompt, hack, clean) demonstration pairs.")
    p.add_argument("--model", default=None, help="model directory with its tokenizer (default: cached organism)")
    p.add_argument("--env", default="arith", choices=envs.available_envs(), help="environment")
    p.add_argument("--env_kwargs", default=None, help="JSON object of environment arguments (default: the env's)")
    p.add_argument("--pairs", type=int, default=256, help="number of (hack, clean) pairs")
    p.add_argument("--k", type=int, default=4, help="directions kept per module")
    p.add_argument("--rank", type=int, default=None, help="svf rank per module (default: full)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demonstration pairs")
    p.add_argument("--batch_size", type=int, default=32, help="pairs per forward/backward")
    p.add_argument("--target_modules", nargs="+", default=None, help="module names (default: all projections)")
    p.add_argument("--out", required=True, help="output file (.pt)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    env, env_kwargs, model_dir = _setup(args)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    result = extract_hack_subspace(model, tok, env, args.pairs, args.k, rank=args.rank, seed=args.seed,
                                   batch_size=args.batch_size, progress=not args.no_progress,
                                   target_modules=args.target_modules,
                                   metadata={"model": str(model_dir), "env_kwargs": env_kwargs,
                                             "batch_size": args.batch_size})
    seconds = time.perf_counter() - start
    save_hack_subspace(result, args.out)
    meta = result["metadata"]
    evr1 = [v[0] for v in meta["explained_variance"].values()]
    print(f"hack subspace ({len(result['subspace'])} modules, k={args.k}) saved to {args.out} in "
          f"{seconds:.1f}s; top-1 explained variance mean {sum(evr1) / len(evr1):.3f}, "
          f"mean cosine with subspace {meta['mean_cosine_overall']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
