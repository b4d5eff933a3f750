"""CPU kernels are chosen, never inherited: the same bits on any x86-64 CPU with AVX2, Intel or AMD.

torch's CPU kernels pick a code path from the CPU they run on: ATen's vectorised kernels (softmax, attention,
reductions) from the instruction set (AVX-512 or AVX2), and MKL's matrix products and vector math (`exp`, `log`,
`sqrt`, ...) from the instruction set *and the vendor*. Each path rounds differently, so a seeded RL run on an
AMD EPYC and on an Intel Xeon drifts apart from the first optimizer step (measured: the main job's deployed hack
rate 0.164 on one, 0.145 on the other). `configure_kernels()` removes that choice:

- `portable` (the default): ATen's AVX2 kernels (`ATEN_CPU_CAPABILITY=avx2`), MKL's vendor-independent code path
  (`MKL_CBWR=COMPATIBLE`, its conditional numerical reproducibility mode) and oneDNN capped at AVX2
  (`ONEDNN_MAX_CPU_ISA=AVX2`). One path that every Intel and AMD CPU since about 2013 runs.
- `native`: whatever torch picks (faster on large matrices; bits depend on the CPU).

One path depends on the vendor under every MKL setting: MKL's vector `sqrt`, which `torch.sqrt` calls (and so
torch's default AdamW), is not correctly rounded on AMD and differs from Intel's. In portable mode the project's
optimizers therefore use torch's fused AdamW (`adamw_kwargs()`), whose square root is the exact IEEE
instruction, `portable_sqrt` where the project takes a tensor's square root itself, and `portable_sqrt_in` where
a library does (TRL's reward standard deviation, which scales every advantage). `native` keeps torch's
default AdamW, so it reproduces figures made before this mode existed, on the CPU they name. The check:
`scripts/check_portable.py` (docs/reproducibility.md).

`import route` calls `configure_kernels()` once, as it does `configure_threads()`: $ROUTE_KERNELS, else portable.
The settings take effect if they are made before torch runs its first kernel, which every entry point guarantees
(they import `route` first); a thread count is part of the result too (`route.utils.threads`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from types import ModuleType

KERNEL_MODES = ("portable", "native")
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def chosen_kernels(mode: str | None = None) -> str:
    """The kernel mode: `mode`, else $ROUTE_KERNELS, else portable; ValueError naming the source otherwise."""
    source, value = ("--kernels", mode) if mode is not None else ("ROUTE_KERNELS", os.environ.get("ROUTE_KERNELS"))
    if value in (None, ""):
        return "portable"
    if value not in KERNEL_MODES:
        raise ValueError(f"{source}: invalid value {value!r}; allowed values: {list(KERNEL_MODES)}")
    return value


def configure_kernels(mode: str | None = None) -> str:
    """Apply `chosen_kernels(mode)` to this process and its children (environment variables); returns the mode.

    `native` removes the portable settings that this function made earlier and leaves a user's own alone."""
    chosen = chosen_kernels(mode)
    os.environ["ROUTE_KERNELS"] = chosen  # a child process (a sweep cell) makes the same choice
    for var, value in PORTABLE_ENV.items():
        if chosen == "portable":
            os.environ[var] = value
        elif os.environ.get(var) == value:
            del os.environ[var]
    return chosen


def portable() -> bool:
    """Whether this process runs the portable kernels (`configure_kernels`)."""
    return os.environ.get("ROUTE_KERNELS", "portable") == "portable"


def adamw_kwargs() -> dict:
    """Keyword arguments for every `torch.optim.AdamW` the project builds: the fused kernel in portable mode (its
    square root is the IEEE instruction on every CPU), torch's default otherwise."""
    return {"fused": True} if portable() else {}


def portable_sqrt(x):
    """`x.sqrt()`, correctly rounded on every CPU in portable mode: a float32 CPU tensor's root is taken in float64
    (MKL's float32 `sqrt` is off by an ulp here and there on AMD; a float64 error of at most an ulp cannot move the
    float32 rounding, since a float32's square root lies at least 2^-50 relative away from a rounding midpoint)."""
    import torch

    if portable() and x.dtype == torch.float32 and x.device.type == "cpu":
        return x.double().sqrt().float()
    return x.sqrt()


class _PortableSqrtMode:
    """A torch function mode (built lazily: this module imports no torch) that sends `torch.sqrt` and
    `Tensor.sqrt` through `portable_sqrt`."""

    _cls = None

    @classmethod
    def make(cls):
        if cls._cls is None:
            import torch
            from torch.overrides import TorchFunctionMode

            class Mode(TorchFunctionMode):
                def __torch_function__(self, func, types, args=(), kwargs=None):
                    if func in (torch.sqrt, torch.Tensor.sqrt) and not kwargs and len(args) == 1:
                        return portable_sqrt(args[0])
                    return func(*args, **(kwargs or {}))

            cls._cls = Mode
        return cls._cls()


@contextlib.contextmanager
def portable_sqrt_in(module: ModuleType, name: str) -> Iterator[None]:
    """Within the block, `module.name` (a function of a library the project does not own, e.g. TRL's `nanstd`,
    which scales GRPO's advantages) takes its square roots with `portable_sqrt`; the original is put back on exit.
    In native mode nothing changes."""
    if not portable():
        yield
        return
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        with _PortableSqrtMode.make():
            return original(*args, **kwargs)

    setattr(module, name, wrapped)
    try:
        yield
    finally:
        setattr(module, name, original)


__all__ = ["KERNEL_MODES", "PORTABLE_ENV", "adamw_kwargs", "chosen_kernels", "configure_kernels", "portable",
           "portable_sqrt", "portable_sqrt_in"]
