"""Small numerical building blocks shared by the losses, balancers and diagnostics."""

from __future__ import annotations

import torch
from torch import Tensor

#: Largest |log coefficient| a balancer may apply, whatever its ceiling: exp(50) ~ 5e21 keeps every
#: product with a log-ratio of up to 1e8 nats finite in float32 (a numerical guard, not a method choice).
LOG_COEF_LIMIT = 50.0


def upcast(x: Tensor) -> Tensor:
    """Half-precision inputs are computed in float32; float32 and float64 are kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """(B, T), (B, T) bool -> (B,) sum over True positions; masked values never reach the result."""
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(-1)


_LN2 = 0.6931471805599453


def log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a < 0, stable on both sides of -ln 2 (Maechler, 2012), value and gradient.

    Exact for every a < 0 that the dtype can tell from zero: only |a| below the smallest normal number
    (a = 0, a sequence of certainty, whose true value is -inf) is held at that number, which keeps the
    result finite (about -87 in float32) without moving any other value. Each branch is evaluated on
    inputs where it is finite, so that the branch not taken cannot put a NaN into the gradient.
    """
    a = a.clamp(max=-torch.finfo(a.dtype).tiny)
    near = a > -_LN2
    safe = torch.full((), -1.0, dtype=a.dtype, device=a.device)
    a_near = torch.where(near, a, safe)
    a_far = torch.where(near, safe, a)
    return torch.where(near, torch.log(-torch.expm1(a_near)), torch.log1p(-torch.exp(a_far)))


def logit_grad_sq(logp: Tensor, sum_p2: Tensor) -> Tensor:
    """||e_y - softmax(z)||^2 = 1 - 2 p_y + sum_j p_j^2 per token, from log p_y and sum_j p_j^2 (spec 2).

    Computed in float64 as (1 - p_y)^2 + (sum_j p_j^2 - p_y^2), with 1 - p_y = -expm1(log p_y): the
    literal form cancels when p_y is close to 1 (in float32 it is then rounding noise), this one does
    not. Detached; float64; clamped at 0 (the second term is rounding noise when no other token has
    mass).
    """
    lp = logp.detach().double()
    p = torch.exp(lp)
    one_minus_p = -torch.expm1(lp)
    return (one_minus_p.square() + (sum_p2.detach().double() - p.square())).clamp(min=0)


def masked_quantile(x: Tensor, mask: Tensor, q: float) -> Tensor:
    """(B, T) -> (B,) q-quantile of the True entries of each row, linear interpolation
    (the same convention as ``torch.quantile``). Rows must have at least one True entry."""
    n = mask.sum(-1)  # (B,)
    filled = torch.where(mask, x, torch.full((), float("inf"), dtype=x.dtype, device=x.device))
    srt = filled.sort(dim=-1).values  # valid entries first
    pos = q * (n - 1).clamp(min=0).to(x.dtype)  # (B,)
    lo = pos.floor().long()
    hi = torch.minimum(lo + 1, (n - 1).clamp(min=0))
    frac = pos - lo.to(x.dtype)
    v_lo = srt.gather(-1, lo[:, None]).squeeze(-1)
    v_hi = srt.gather(-1, hi[:, None]).squeeze(-1)
    return v_lo + frac * (v_hi - v_lo)


def scale_gradient(t: Tensor, c: Tensor) -> Tensor:
    """Gradient-only scaling: the value of ``t`` is kept and d/dt is multiplied by ``c``.

    Spec section 4 writes t -> c*t + (1-c)*sg(t); we compute the same map as sg(t) + c*(t - sg(t)),
    whose forward value is bit-for-bit sg(t) (``t - sg(t)`` is exactly zero) whatever c is.
    ``c`` carries no gradient.
    """
    c = c.detach().to(t.dtype)
    d = t.detach()
    return d + c * (t - d)


def bounded_exp(log_c: Tensor) -> Tensor:
    """exp of a log-coefficient held to [-LOG_COEF_LIMIT, LOG_COEF_LIMIT] (see LOG_COEF_LIMIT)."""
    return torch.exp(log_c.clamp(-LOG_COEF_LIMIT, LOG_COEF_LIMIT))
