"""Tolerances derived from the computation, for tests that compare two computations of one function.

Bitwise equality (`torch.equal`) is asserted only where both sides run the same floating-point operations in the
same order on the same values (the same kernels, shapes and inputs: a mask of exact 1.0s, a copy, the same run
repeated in one process). Everywhere else the two sides round differently, on any CPU in its own way (Intel and AMD
pick different kernels and blockings), and a test compares them with one of these:

- **one sum or dot product** of n terms, evaluated in any order, is within gamma(n) * sum|terms| of the exact value,
  gamma(n) = n u / (1 - n u), u the unit roundoff (2**-24 in float32, 2**-53 in float64: the standard bound of
  floating-point summation); two orders differ by at most twice that (`dot_tolerance`).
- **a whole network** (several layers, norms, softmax): the per-op bound above, about 5.7e-14 * sum|terms| in float64
  for n <= 512, with sum|terms| <= 100 in these tiny randomly initialised models, is at most 5.7e-12 per op; allowing
  each of at most four residual layers to amplify an earlier error by 10 (their Jacobians, with weights of std <= 0.3,
  are of order 1) gives 5.7e-8. Such comparisons run in float64 with `NET64` (1e-7, rtol and atol), far below what
  breaking an invariant moves (a quarantine, a key or a head changes these logits by 1e-3 and more; the tests assert
  it where it is the point). In float32 the same analysis gives 2**29 times more, far too loose to catch anything.
- **an optimizer step** is compared before an optimizer can magnify a last-bit difference. AdamW's first step moves a
  weight by lr * g / (|g| + eps) (bias-corrected moments m = g, v = g**2), a function of g with Lipschitz constant
  1 / eps = 1e8: two runs whose gradients differ in their last bits can differ by up to lr after one step. So a step
  is checked against AdamW's formula evaluated on the *same* gradients (`assert_adamw`, a few units of roundoff per
  step, bound in `adamw_reference`), and the gradient itself against its reference separately; or two runs are
  compared after one step, with the bound of how their inputs differ carried through it.
- **greedy decoding** by two paths whose logits differ by at most `tol`: a token chosen by one is a valid argmax of the
  other when its logit is within 2 * tol of the maximum (`assert_greedy_tokens`); exact token equality at a near-tie
  would depend on the CPU, so it is asserted only where no step is one. **Sampling** is compared through each step's
  logits (the distribution sampled from) on the same prefix, not through the tokens drawn.
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


def assert_close_net64(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None,
                       rounded_to: torch.dtype | None = None) -> None:
    """Two float64 computations of one network function agree to NET64 (derivation in the module docstring).

    `rounded_to`: `actual` was rounded once to this dtype (e.g. generate's float32 logits of a float64 model), which
    adds its unit roundoff to the relative tolerance."""
    assert expected.dtype == torch.float64 and actual.dtype == (rounded_to or torch.float64), (
        "whole-network comparisons run in float64"
    )
    extra = UNIT_ROUNDOFF[rounded_to] if rounded_to is not None else 0.0
    torch.testing.assert_close(actual.double(), expected, rtol=NET64["rtol"] + extra, atol=NET64["atol"], msg=msg)


def greedy_tolerance(logits: torch.Tensor) -> float:
    """How far two float64 decoders' logits may differ (NET64), plus one rounding to float32 (generate's logits)."""
    return NET64["atol"] + (NET64["rtol"] + UNIT_ROUNDOFF[torch.float32]) * float(logits.abs().max())


def assert_greedy_tokens(tokens: torch.Tensor, logits: torch.Tensor, tol: float) -> float:
    """Each of `tokens` (B, T) is an argmax of `logits` (B, T, V) up to 2 * tol (another decoder of the same function
    may have picked it at a near-tie). Returns the smallest margin between the two largest logits: above 2 * tol at
    every step, any decoder within tol of `logits` must pick exactly `tokens`."""
    assert tokens.shape == logits.shape[:2] and tokens.numel() > 0
    chosen = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    gap = logits.max(-1).values - chosen
    assert bool((gap <= 2 * tol).all()), f"a token is not an argmax: largest gap {float(gap.max())} > {2 * tol}"
    top2 = logits.topk(2, dim=-1).values
    return float((top2[..., 0] - top2[..., 1]).min())


def adamw_reference(w0: torch.Tensor, grads: list[torch.Tensor], lr: float, weight_decay: float,
                    second: list[torch.Tensor] | None = None, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, grad_rel: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """AdamW's steps from zero moments on fixed gradients, in float64: (expected weights, bound per entry).

    m averages `grads`, v the squares of `second` (default `grads`; split_moments feeds v another gradient). The bound
    covers an implementation in w0's dtype (unit roundoff u) that runs the same formula with its own operations and
    order, on the same gradients: each rounded operation is off by at most u relative, m's error is at most about 3 u
    per step of the sum of its terms' magnitudes (it can cancel), v's at most 4 u per step of v (its terms are
    positive), and the update lr m^ / (sqrt(v^) + eps) carries them as lr (dm^ / d + |m^| dd / d^2), plus 2 u of the
    update and u of the weight per step for the decay and the subtraction. No error is magnified: the gradients are
    the same on both sides (two runs on gradients that differ in their last bits can differ by up to lr per step).
    `grad_rel`: the gradients are known to this relative accuracy only (e.g. scaled by a coefficient the
    implementation computes another way); it adds to m's and sqrt(v)'s relative errors."""
    u = UNIT_ROUNDOFF[w0.dtype]
    b1, b2 = betas
    w = w0.double()
    m, m_abs, v, err = (torch.zeros_like(w) for _ in range(4))
    for t, (g, s) in enumerate(zip(grads, second or grads, strict=True), start=1):
        g, s = g.double(), s.double()
        w = w * (1 - lr * weight_decay)
        err = err + u * w.abs()
        m, m_abs = b1 * m + (1 - b1) * g, b1 * m_abs + (1 - b1) * g.abs()
        v = b2 * v + (1 - b2) * s * s
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        d = v_hat.sqrt() + eps
        dm = ((3 * t + 2) * u + grad_rel) * m_abs / (1 - b1**t)
        dd = (((4 * t + 2) / 2 + 2) * u + grad_rel) * v_hat.sqrt()
        step = lr * m_hat / d
        err = err + lr * (dm / d + m_hat.abs() * dd / d**2) + 2 * u * step.abs() + u * w.abs()
        w = w - step
    return w, err


def assert_adamw(w1: torch.Tensor, w0: torch.Tensor, grads: list[torch.Tensor], lr: float, weight_decay: float,
                 second: list[torch.Tensor] | None = None, msg: str = "", **kw) -> None:
    """`w1` is AdamW's steps from `w0` on `grads` within `adamw_reference`'s bound; when every gradient is all zero,
    exactly `w0` (SkipZeroAdamW skips the parameter: no decay, no moment)."""
    if not any(bool(g.any()) for g in grads):
        assert torch.equal(w1, w0), f"{msg}: no gradient, the parameter must not move"
        return
    expected, bound = adamw_reference(w0, grads, lr, weight_decay, second, **kw)
    excess = (w1.double() - expected).abs() - bound
    assert bool((excess <= 0).all()), f"{msg}: off AdamW by {float(excess.max())} beyond the bound"
