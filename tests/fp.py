"""Tolerances derived from the computation, for tests that compare two computations of one function.

Bitwise equality (`torch.equal`) is asserted only where both sides run the same floating-point operations in the
same order on the same values (the same kernels, shapes and inputs: a mask of exact 1.0s, a copy, the same run
repeated in one process). Everywhere else the two sides round differently, on any CPU in its own way (Intel and AMD
pick different kernels and blockings), and a test compares them with one of these:

- **one sum or dot product** of n terms, evaluated in any order, is within gamma(n) * sum|terms| of the exact value,
  gamma(n) = n u / (1 - n u), u the unit roundoff (2**-24 in float32, 2**-53 in float64; N. J. Higham, *Accuracy and
  Stability of Numerical Algorithms*, 2002, eq. 3.5); two orders differ by at most twice that (`dot_tolerance`).
- **a whole network** (several layers, norms, softmax): the per-op bound above, about 5.7e-14 * sum|terms| in float64
  for n <= 512, with sum|terms| <= 100 in these tiny randomly initialised models, is at most 5.7e-12 per op; allowing
  each of at most four residual layers to amplify an earlier error by 10 (their Jacobians, with weights of std <= 0.3,
  are of order 1) gives 5.7e-8. Such comparisons run in float64 with `NET64` (1e-7, rtol and atol), which is at least
  1000x below what breaking an invariant moves (each test asserts that its compared paths do differ where they
  should, by more than 1e-4). In float32 the same analysis gives 2**29 times more, far too loose to catch anything.
- **an optimizer step** is compared before an optimizer can magnify a last-bit difference: AdamW's first step moves a
  weight by lr * g / (|g| + eps) (bias-corrected moments m = g, v = g**2), a function of g with Lipschitz constant
  1 / eps, so gradients within `grad_tol` give weights within lr * grad_tol / eps (`adam_first_step_tolerance`);
  in float64, where gradients agree to NET64, that is meaningful, in float32 it is not.
- **greedy decoding** by two paths whose logits differ by at most `tol`: a token chosen by one is a valid argmax of the
  other when its logit is within 2 * tol of the maximum (`assert_greedy_tokens`); exact token equality at a near-tie
  would depend on the CPU.
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}
NET64 = {"rtol": 1e-7, "atol": 1e-7}


def gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's gamma_n: the relative bound of a sum of n terms in any order, in units of sum|terms|."""
    nu = n * UNIT_ROUNDOFF[dtype]
    assert nu < 1, "the bound needs n * u < 1"
    return nu / (1 - nu)


def dot_tolerance(abs_sum: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """How far two evaluations (any orders) of dot products of n terms with sum|terms| = `abs_sum` may differ."""
    return 2 * gamma(n, dtype) * abs_sum


def assert_close_net64(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    """Two float64 computations of one network function agree to NET64 (derivation in the module docstring)."""
    assert actual.dtype == expected.dtype == torch.float64, "whole-network comparisons run in float64"
    torch.testing.assert_close(actual, expected, **NET64, msg=msg)


def adam_first_step_tolerance(lr: float, grad_tol: float, eps: float = 1e-8) -> float:
    """Bound on the weight difference after one AdamW step from zero moments on gradients within `grad_tol`."""
    return lr * grad_tol / eps


def assert_greedy_tokens(tokens: torch.Tensor, logits: torch.Tensor, tol: float) -> int:
    """Each of `tokens` (B, T) is an argmax of `logits` (B, T, V) up to 2 * tol; returns how many were checked."""
    assert tokens.shape == logits.shape[:2] and tokens.numel() > 0
    chosen = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    gap = logits.max(-1).values - chosen
    assert bool((gap <= 2 * tol).all()), f"a token is not an argmax: largest gap {float(gap.max())} > {2 * tol}"
    return tokens.numel()
