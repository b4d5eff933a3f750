"""CPU kernels are chosen at `import route`: portable by default (ATen AVX2, MKL's vendor-independent path, fused
AdamW), native on request; the choice reaches torch and child processes, and a bad value names ROUTE_KERNELS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from route.masks.optim import build_optimizer
from route.utils import kernels
from route.utils.kernels import PORTABLE_ENV, adamw_kwargs, chosen_kernels, configure_kernels, portable_sqrt

ROOT = Path(__file__).resolve().parent.parent
VARS = ("ROUTE_KERNELS", *PORTABLE_ENV)


def fresh_python(code: str, **env: str) -> str:
    """`code` in a new interpreter (no torch, transformers or trl imported before it) with only `env` set of VARS."""
    base = {k: v for k, v in os.environ.items() if k not in VARS}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def restore_env():
    """The kernel variables as they were before the test (the suite runs portable)."""
    saved = {v: os.environ.get(v) for v in VARS}
    yield
    for var, value in saved.items():
        os.environ.pop(var, None) if value is None else os.environ.__setitem__(var, value)


def test_import_route_chooses_portable_kernels_before_torch_runs_one():
    code = ("import route, torch, os; torch.ones(2) @ torch.ones(2); "
            "print(torch.backends.cpu.get_cpu_capability(), os.environ['MKL_CBWR'], os.environ['ROUTE_KERNELS'])")
    assert fresh_python(code).split() == ["AVX2", "COMPATIBLE", "portable"]
    # torch imported first, but no kernel run yet: the choice still applies (ATen and MKL read it lazily)
    code = "import torch, route; torch.ones(2).sum(); print(torch.backends.cpu.get_cpu_capability())"
    assert fresh_python(code) == "AVX2"


def test_native_leaves_torch_its_own_choice():
    native = fresh_python("import torch; print(torch.backends.cpu.get_cpu_capability())")
    code = "import route, torch, os; print(torch.backends.cpu.get_cpu_capability(), os.environ.get('MKL_CBWR'))"
    assert fresh_python(code, ROUTE_KERNELS="native").split() == [native, "None"]


def test_a_bad_mode_names_its_source_and_the_allowed_values(restore_env, monkeypatch):
    monkeypatch.setenv("ROUTE_KERNELS", "fast")
    with pytest.raises(ValueError, match=r"ROUTE_KERNELS: invalid value 'fast'; allowed values: \['portable', "):
        chosen_kernels()
    with pytest.raises(ValueError, match=r"--kernels: invalid value 'x'"):
        chosen_kernels("x")


def test_configure_exports_the_choice_and_native_undoes_only_its_own_settings(restore_env, monkeypatch):
    assert configure_kernels("portable") == "portable"
    assert all(os.environ[k] == v for k, v in PORTABLE_ENV.items()) and os.environ["ROUTE_KERNELS"] == "portable"
    assert adamw_kwargs() == {"fused": True}
    monkeypatch.setenv("MKL_CBWR", "AVX2")  # a user's own setting
    assert configure_kernels("native") == "native"
    assert os.environ["MKL_CBWR"] == "AVX2" and "ATEN_CPU_CAPABILITY" not in os.environ
    assert adamw_kwargs() == {}
    configure_kernels("portable")


def test_the_project_optimizer_is_fused_in_portable_mode(restore_env):
    configure_kernels("portable")
    w = torch.nn.Parameter(torch.ones(3))
    opt = build_optimizer({"keep": [w]}, lr=1e-2)
    assert opt.defaults["fused"] is True
    w.grad = torch.tensor([1.0, -2.0, 0.5])
    opt.step()
    assert not torch.equal(w.detach(), torch.ones(3))  # it stepped


def test_portable_sqrt_is_correctly_rounded(restore_env):
    """Against numpy's float64 root rounded to float32: correctly rounded, by the argument in `portable_sqrt`."""
    configure_kernels("portable")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200_000, generator=g) * 10.0 ** torch.randint(-30, 30, (200_000,), generator=g).float()
    exact = torch.from_numpy(np.sqrt(x.numpy().astype(np.float64)).astype(np.float32))
    assert torch.equal(portable_sqrt(x), exact)
    assert portable_sqrt(x.double()).dtype == torch.float64  # other dtypes: plain sqrt
    assert kernels.portable()
