"""Baseline losses beside the balancers (spec section 10): the published answers to displacement
(the chosen log-prob falling) and squeezing that a comparison needs.

Same notation as spec section 1; ``t.chosen``/``t.rejected`` arrive already balanced. Every
-log sigma(x) is computed as softplus(-x), and 1 - sigma(x) as sigma(-x) (no cancellation when
sigma(x) is close to 1).

Decided here or in the spec:

- ``dpop`` uses the spec's revised bracketing: the penalty lambda*max(0, -h_w) sits inside the beta,
  so beta*(h_w - h_l - lambda*max(0, -h_w)); at h_w >= 0 it is DPO exactly.
- ``nca`` is the pairwise form (TRL's ``nca_pair``). Its chosen part has its minimum at
  beta*h_w = ln 2 (d/dx [softplus(-x) + softplus(x)/2] = 0 at e^-x = 1/2), so it regresses h_w onto
  a target rather than pushing it up without end.
- ``apozero``/``apodown`` are bounded (each term in (0, 1)); ``apodown``'s chosen log-ratio enters
  twice with opposite signs (pushed down alone, up in the margin), so the loss is not monotone in h_w.
- ``simper`` is reference-free and has no hyperparameter: its implicit reward for logging is A (the
  log of the inverse perplexity exp(A)), with no scale (``reward_scale=None``).
- ``dponorm`` is DPO on hbar = h/|y| (Tulu 3); its beta default is 5.0 because hbar is per token. Its
  logged reward is the standard beta*h of spec section 1, as for IPO.

How AdaDPO applies its kappa to each of them is decided in poise/balance/ada.py (``GRADIENT_ONLY``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from poise.losses.base import HBAR, MEAN_LOGP, H, LossSpec, Terms
from poise.params import Param, beta_param


def dpop(t: Terms, *, beta: float, dpop_lambda: float) -> Tensor:
    """DPO-Positive / Smaug (arXiv 2402.13228), revised bracketing (spec section 10):
    -log sigma(beta*(h_w - h_l - lambda*max(0, -h_w)))."""
    return F.softplus(-beta * (t.chosen - t.rejected - dpop_lambda * F.relu(-t.chosen)))


def nca(t: Terms, *, beta: float) -> Tensor:
    """NCA, pairwise form (arXiv 2402.05369; TRL's nca_pair):
    -log sigma(beta*h_w) - 0.5*log sigma(-beta*h_w) - 0.5*log sigma(-beta*h_l)."""
    r_w, r_l = beta * t.chosen, beta * t.rejected
    return F.softplus(-r_w) + 0.5 * F.softplus(r_w) + 0.5 * F.softplus(r_l)


def apozero(t: Terms, *, beta: float) -> Tensor:
    """APO-zero (arXiv 2408.06266): (1 - sigma(beta*h_w)) + sigma(beta*h_l)."""
    return torch.sigmoid(-beta * t.chosen) + torch.sigmoid(beta * t.rejected)


def apodown(t: Terms, *, beta: float) -> Tensor:
    """APO-down (arXiv 2408.06266): sigma(beta*h_w) + (1 - sigma(beta*(h_w - h_l)))."""
    return torch.sigmoid(beta * t.chosen) + torch.sigmoid(-beta * (t.chosen - t.rejected))


def simper(t: Terms) -> Tensor:
    """SimPER (arXiv 2502.00883): -exp(A_w) + exp(A_l), the inverse perplexities; no hyperparameter,
    no reference. The loss is in (-1, 1) for log-probs <= 0."""
    return torch.exp(t.rejected) - torch.exp(t.chosen)


def dponorm(t: Terms, *, beta: float) -> Tensor:
    """Length-normalised DPO (Tulu 3, arXiv 2411.15124): -log sigma(beta*(hbar_w - hbar_l))."""
    return F.softplus(-beta * (t.chosen - t.rejected))


BASELINE_LOSSES = (
    LossSpec("dpop", dpop, H, (beta_param(), Param(
        "dpop_lambda", 50.0, "DPO-Positive's lambda: weight of the penalty max(0, -h_w) that keeps the chosen "
        "log-ratio from falling below the reference's (0 gives DPO).", low=0.0)),
        "Pal et al. 2024 (DPO-Positive / Smaug), arXiv 2402.13228",
        "DPO with a penalty when the chosen log-prob falls below the reference's (against displacement)",
        equation="-log sigma(beta*(h_w - h_l - dpop_lambda*max(0, -h_w)))"),
    LossSpec("nca", nca, H, (beta_param(),), "Chen et al. 2024 (NCA), arXiv 2402.05369",
             "Noise-contrastive alignment, pairwise form: absolute rewards, the chosen one held near ln 2/beta",
             equation="-log sigma(beta*h_w) - 0.5*log sigma(-beta*h_w) - 0.5*log sigma(-beta*h_l)"),
    LossSpec("apozero", apozero, H, (beta_param(),), "D'Oosterlinck et al. 2024 (APO), arXiv 2408.06266",
             "Anchored preference optimisation, zero: push the chosen log-ratio up and the rejected down, bounded",
             equation="(1 - sigma(beta*h_w)) + sigma(beta*h_l)"),
    LossSpec("apodown", apodown, H, (beta_param(),), "D'Oosterlinck et al. 2024 (APO), arXiv 2408.06266",
             "Anchored preference optimisation, down: push the chosen log-ratio down, the margin up, bounded",
             equation="sigma(beta*h_w) + (1 - sigma(beta*(h_w - h_l)))"),
    LossSpec("simper", simper, MEAN_LOGP, (), "Xiao et al. 2025 (SimPER), arXiv 2502.00883",
             "Reference-free and hyperparameter-free: raise the chosen inverse perplexity, lower the rejected",
             equation="-exp(A_w) + exp(A_l)", reward_scale=None),
    LossSpec("dponorm", dponorm, HBAR, (beta_param(5.0, "Length-normalised DPO's beta: scale of the per-token "
                                                   "log-ratio hbar = h/|y| (Tulu 3: 5)."),),
             "Lambert et al. 2024 (Tulu 3), arXiv 2411.15124",
             "DPO on the length-normalised log-ratios hbar = h/|y|",
             equation="-log sigma(beta*(hbar_w - hbar_l))"),
)
