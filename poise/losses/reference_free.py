"""Reference-free base losses (spec section 3): they never read the reference fields."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from poise.losses.base import LOG_ODDS, MEAN_LOGP, SUM_LOGP, LossSpec, Terms
from poise.params import Param, beta_param


def simpo(t: Terms, *, beta: float, gamma_beta_ratio: float) -> Tensor:
    """SimPO (arXiv 2405.14734, Eq. 6): -log sigma(beta*(A_w - A_l) - gamma), gamma = beta*ratio."""
    return F.softplus(-(beta * (t.chosen - t.rejected) - beta * gamma_beta_ratio))


def cpo(t: Terms, *, beta: float, cpo_alpha: float) -> Tensor:
    """CPO (arXiv 2401.08417): -log sigma(beta*(S_w - S_l)); the objective adds cpo_alpha*NLL(y_w)."""
    return F.softplus(-beta * (t.chosen - t.rejected))


def orpo(t: Terms, *, orpo_lambda: float) -> Tensor:
    """ORPO (arXiv 2403.07691, Eqs. 4-7): -lambda*log sigma(logodds_w - logodds_l); the objective adds
    NLL(y_w) with weight 1."""
    return orpo_lambda * F.softplus(-(t.chosen - t.rejected))


REFERENCE_FREE_LOSSES = (
    LossSpec("simpo", simpo, MEAN_LOGP, (
        beta_param(2.5, "SimPO's beta: scale of the length-normalised reward beta*A."),
        Param("gamma_beta_ratio", 0.55, "SimPO's target margin gamma divided by beta.", low=0.0)),
        "Meng et al. 2024, arXiv 2405.14734, Eq. 6",
        "Reference-free, length-normalised reward with a target margin gamma",
        equation="-log sigma(beta*(A_w - A_l) - beta*gamma_beta_ratio)"),
    LossSpec("cpo", cpo, SUM_LOGP, (
        beta_param(),
        Param("cpo_alpha", 1.0, "CPO's lambda: weight of the chosen NLL term.", low=0.0)),
        "Xu et al. 2024, arXiv 2401.08417", "Reference-free DPO on sequence log-probs plus chosen NLL",
        builtin_nll=lambda hp: hp["cpo_alpha"],
        equation="-log sigma(beta*(S_w - S_l)) + cpo_alpha*NLL(y_w)"),
    LossSpec("orpo", orpo, LOG_ODDS, (
        Param("orpo_lambda", 0.1, "ORPO's lambda: weight of the odds-ratio term next to the NLL.",
              low=0.0, low_open=True),),
        "Hong et al. 2024, arXiv 2403.07691, Eqs. 4-7",
        "Chosen NLL plus a log odds-ratio penalty; no reference",
        reward_scale="orpo_lambda", builtin_nll=lambda hp: 1.0,
        equation="NLL(y_w) - orpo_lambda*log sigma(logodds_w - logodds_l), logodds = A - log(1 - exp(A))"),
)
