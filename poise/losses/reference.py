"""Base losses with a reference model (spec section 3). Terms are log-ratios h = S - S_ref
(hbar = h/|y| for IPO); ``t.chosen``/``t.rejected`` arrive already balanced."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from poise.losses.base import HBAR, H, LossSpec, Terms
from poise.params import Param, beta_param

_SMOOTHING = Param(
    "label_smoothing", 0.1,
    "Assumed probability e that a preference label is flipped; in [0, 0.5).",
    low=0.0, high=0.5, high_open=True,
)


def dpo(t: Terms, *, beta: float) -> Tensor:
    """DPO (arXiv 2305.18290, Eq. 7): -log sigma(beta*(h_w - h_l))."""
    return F.softplus(-beta * (t.chosen - t.rejected))


def cdpo(t: Terms, *, beta: float, label_smoothing: float) -> Tensor:
    """Conservative DPO: (1-e)*softplus(-u) + e*softplus(u), u = beta*(h_w - h_l)."""
    u = beta * (t.chosen - t.rejected)
    return (1 - label_smoothing) * F.softplus(-u) + label_smoothing * F.softplus(u)


def robust(t: Terms, *, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO (arXiv 2403.00409): [(1-e)*softplus(-u) - e*softplus(u)] / (1-2e); may be negative."""
    u = beta * (t.chosen - t.rejected)
    e = label_smoothing
    return ((1 - e) * F.softplus(-u) - e * F.softplus(u)) / (1 - 2 * e)


def ipo(t: Terms, *, beta: float) -> Tensor:
    """IPO (arXiv 2310.12036, Eq. 17), length-normalised as in TRL: (hbar_w - hbar_l - 1/(2 beta))^2."""
    return (t.chosen - t.rejected - 1 / (2 * beta)) ** 2


def hinge(t: Terms, *, beta: float) -> Tensor:
    """SLiC hinge (arXiv 2305.10425): max(0, 1 - beta*(h_w - h_l))."""
    return F.relu(1 - beta * (t.chosen - t.rejected))


def rdpo(t: Terms, *, beta: float, alpha: float) -> Tensor:
    """R-DPO (arXiv 2403.19159): -log sigma(beta*(h_w - h_l) + alpha*(|y_w| - |y_l|))."""
    return F.softplus(-(beta * (t.chosen - t.rejected) + alpha * (t.n_w - t.n_l)))


def caldpo(t: Terms, *, beta: float) -> Tensor:
    """Cal-DPO (arXiv 2412.14516): -log sigma(h_w - h_l) + (h_w - 1/(2 beta))^2 + (h_l + 1/(2 beta))^2.
    No beta in the first term (spec)."""
    c = 1 / (2 * beta)
    return F.softplus(-(t.chosen - t.rejected)) + (t.chosen - c) ** 2 + (t.rejected + c) ** 2


def dposhift(t: Terms, *, beta: float, shift: float) -> Tensor:
    """DPO-Shift (arXiv 2502.07599): -log sigma(beta*h_w - f*beta*h_l)."""
    return F.softplus(-(beta * t.chosen - shift * beta * t.rejected))


REFERENCE_LOSSES = (
    LossSpec("dpo", dpo, H, (beta_param(),), "Rafailov et al. 2023, arXiv 2305.18290, Eq. 7",
             "Direct Preference Optimization: logistic loss on the log-ratio margin",
             equation="-log sigma(beta*(h_w - h_l))"),
    LossSpec("cdpo", cdpo, H, (beta_param(), _SMOOTHING), "Mitchell 2023, conservative DPO note",
             "DPO with label smoothing e (labels flipped with probability e)",
             equation="(1-e)*softplus(-u) + e*softplus(u), u = beta*(h_w - h_l)"),
    LossSpec("robust", robust, H, (beta_param(), _SMOOTHING), "Chowdhury et al. 2024, arXiv 2403.00409",
             "Unbiased DPO under label noise e (the loss can be negative)",
             equation="[(1-e)*softplus(-u) - e*softplus(u)] / (1-2e), u = beta*(h_w - h_l)"),
    LossSpec("ipo", ipo, HBAR, (beta_param(doc="IPO's tau: the target margin is 1/(2 beta) nats per token."),),
             "Azar et al. 2023, arXiv 2310.12036, Eq. 17",
             "Squared regression of the length-normalised log-ratio margin onto 1/(2 beta)",
             equation="(hbar_w - hbar_l - 1/(2*beta))^2"),
    LossSpec("hinge", hinge, H, (beta_param(),), "Zhao et al. 2023 (SLiC-HF), arXiv 2305.10425",
             "Hinge loss on the log-ratio margin",
             equation="max(0, 1 - beta*(h_w - h_l))"),
    LossSpec("rdpo", rdpo, H, (beta_param(), Param(
        "alpha", 0.05, "R-DPO length regulariser: weight of |y_w| - |y_l| in the margin.")),
        "Park et al. 2024, arXiv 2403.19159", "DPO with a length term in the margin",
             equation="-log sigma(beta*(h_w - h_l) + alpha*(|y_w| - |y_l|))"),
    LossSpec("caldpo", caldpo, H, (beta_param(),), "Xiao et al. 2024, arXiv 2412.14516",
             "DPO plus calibration of each log-ratio to +-1/(2 beta)",
             equation="-log sigma(h_w - h_l) + (h_w - 1/(2*beta))^2 + (h_l + 1/(2*beta))^2"),
    LossSpec("dposhift", dposhift, H, (beta_param(), Param(
        "shift", 0.75, "DPO-Shift's f: the rejected log-ratio is scaled by f in (0, 1].",
        low=0.0, low_open=True, high=1.0)),
        "Yang et al. 2025, arXiv 2502.07599", "DPO with the rejected reward shifted by a factor f",
        equation="-log sigma(beta*h_w - shift*beta*h_l)"),
)
