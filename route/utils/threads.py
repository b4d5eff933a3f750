"""CPU threads are chosen, never inherited: torch's default (one per core) thrashes a shared machine.

`configure_threads(n)` picks n, else `$ROUTE_THREADS`, else `$OMP_NUM_THREADS` when the user set it, else 1, and
applies it to torch (intra-op) and to the OpenMP / MKL variables that subprocesses and a later `import torch`
read, and to `ROUTE_THREADS` (so a child process, e.g. a sweep cell, makes the same choice). `import route`
calls it once, so the library imported from plain `python` behaves like `accelerate launch` (which sets
OMP_NUM_THREADS=1); every command line's `--threads` (or `threads` field) calls it again.
"""

from __future__ import annotations

import os
import sys

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ROUTE_THREADS")  # exported
THREADS_DEFAULT = "$ROUTE_THREADS, else $OMP_NUM_THREADS, else 1"  # for help texts


def chosen_threads(n: int | None = None) -> int:
    """The thread count to use: `n`, else $ROUTE_THREADS, else $OMP_NUM_THREADS, else 1."""
    for source, value in (("--threads", n), ("ROUTE_THREADS", os.environ.get("ROUTE_THREADS")),
                          ("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS"))):
        if value in (None, ""):
            continue
        try:
            k = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: must be a whole number >= 1, got {value!r}") from None
        if k < 1:
            raise ValueError(f"{source}: must be a whole number >= 1, got {value!r}")
        return k
    return 1


def configure_threads(n: int | None = None) -> int:
    """Apply `chosen_threads(n)` to torch (if imported) and to the thread variables; returns the count."""
    k = chosen_threads(n)
    for var in THREAD_VARS:
        os.environ[var] = str(k)
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != k:
        torch.set_num_threads(k)
    return k


__all__ = ["THREADS_DEFAULT", "THREAD_VARS", "chosen_threads", "configure_threads"]
