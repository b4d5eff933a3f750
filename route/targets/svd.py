"""Thin SVD of weight matrices with a canonical sign convention and an on-disk cache keyed by weight hash.

    U_r, S_r, Vh_r = svd_factors(linear.weight, rank=64)     # W ~= U_r diag(S_r) Vh_r (exact at full rank)

The `svf` target trains additive deltas on the singular values of frozen weights, and a hack basis extracted
for it (`route.experiments.vhack`) is a set of coordinates in those singular bases. For those coordinates to mean the
same thing on every machine and every recompute, each singular pair (u_i, v_i) is sign-fixed: the entry of largest
magnitude of each row of Vh is positive (ties: the first such index), and the matching column of U is flipped with it.
Pairs whose singular values are (nearly) degenerate are only defined up to a rotation of their span; no sign convention
fixes that, so such axes are comparable across machines only through the cache.

Computation: `torch.linalg.svd(full_matrices=False)` in float64 (default; `compute_dtype`) on the weight's device,
on the transposed matrix when the weight is wide (out < in), then cut to the top `rank` pairs and stored as float32.
Each entry is cached once, as `<cache_dir>/<sha256 of dtype, shape and bytes>.pt`, holding the top pairs up to the
largest rank asked for so far (a later request for more pairs recomputes and replaces it); writes go through a
temporary file and a rename, so concurrent processes never read half a file. The default cache directory is
`$ROUTE_CACHE/svd` (`ROUTE_CACHE` defaults to `~/.cache/route`, as for the organism).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor

from route.utils.io import torch_save_atomic

FORMAT = "route.svd/1"


def default_cache_dir() -> Path:
    from route.models.cache import cache_root

    return cache_root() / "svd"


def weight_hash(weight: Tensor) -> str:
    """sha256 over the weight's dtype, shape and raw bytes (the cache key)."""
    w = weight.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{FORMAT}|{w.dtype}|{tuple(w.shape)}|".encode())
    h.update(w.view(torch.uint8).numpy() if w.numel() else b"")
    return h.hexdigest()


def canonicalize_signs(u: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each singular pair so that the largest-magnitude entry of each row of `vh` is positive."""
    idx = vh.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(vh.gather(1, idx)).squeeze(1)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign.unsqueeze(0), vh * sign.unsqueeze(1)


def compute_svd(weight: Tensor, rank: int | None = None, compute_dtype: torch.dtype = torch.float64
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`rank` (None: all) canonical singular triplets of a 2-D weight, as float32 on the weight's device."""
    if weight.dim() != 2:
        raise ValueError(f"svd: expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to(compute_dtype)
    wide = w.shape[0] < w.shape[1]
    if wide:  # W^T = U' S Vh'  =>  W = Vh'^T S U'^T
        ut, s, vht = torch.linalg.svd(w.T, full_matrices=False)
        u, vh = vht.T, ut.T
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = _resolve_rank(rank, weight.shape)
    u, vh = canonicalize_signs(u[:, :r], vh[:r])
    return u.float().contiguous(), s[:r].float().contiguous(), vh.float().contiguous()


def _resolve_rank(rank: int | None, shape: torch.Size | tuple[int, ...]) -> int:
    full = min(int(shape[0]), int(shape[1]))
    if rank is None:
        return full
    if int(rank) < 1:
        raise ValueError(f"svf_rank: must be >= 1 or None (full rank), got {rank!r}")
    return min(int(rank), full)


def svd_factors(weight: Tensor, rank: int | None, cache_dir: str | os.PathLike | None = None,
                compute_dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """(U_r, S_r, Vh_r) of `weight` (out, in): U_r (out, r), S_r (r,), Vh_r (r, in), float32, on its device.

    r = min(rank, out, in); `rank=None` is full rank. Read from the cache when an entry with at least r pairs exists,
    else computed (see the module docstring) and written back. `cache_dir=None` uses `$ROUTE_CACHE/svd`.
    """
    r = _resolve_rank(rank, weight.shape)
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"{weight_hash(weight)}.pt"
    entry = _read(path, weight.shape)
    if entry is None or entry["rank"] < r:
        u, s, vh = compute_svd(weight, r, compute_dtype)
        _write(path, {"format": FORMAT, "shape": list(weight.shape), "rank": r, "compute_dtype": str(compute_dtype),
                      "U": u.cpu(), "S": s.cpu(), "Vh": vh.cpu()})
        return u, s, vh
    dev = weight.device
    return (entry["U"][:, :r].contiguous().to(dev), entry["S"][:r].contiguous().to(dev),
            entry["Vh"][:r].contiguous().to(dev))


def _read(path: Path, shape: torch.Size) -> dict | None:
    if not path.exists():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a corrupt or foreign file: recompute and overwrite
        return None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or list(entry.get("shape", ())) != list(shape):
        return None
    return entry


def _write(path: Path, entry: dict) -> None:
    torch_save_atomic(entry, path)  # world-readable: a shared cache


__all__ = ["canonicalize_signs", "compute_svd", "default_cache_dir", "svd_factors", "weight_hash"]
