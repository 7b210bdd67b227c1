"""Balanced-DPO (seed 001; arXiv 2502.20847; spec section 7). A RECONSTRUCTION: the paper's exact
reweighting is not public; this implements its stated idea, as the spec decides.

Variant "norm" (default): equal logit-space gradient norm for the two branches, total scale kept:

    G_w = sqrt(sum_t (1 - 2 p_t + sum_j p_tj^2))  over chosen tokens   (||d S_w / d logits||)
    G_l = the same over rejected tokens
    w_w = sg(2 G_l / (G_w + G_l)),  w_l = sg(2 G_w / (G_w + G_l)),  applied gradient-only

For losses whose term is not a sequence log-prob (A, hbar: divide by |y|; ORPO's log-odds: also by
1 - P) G is that of the term, by the chain rule; for h and S it is exactly the spec's.

The weights equalise the branches' geometry (what the model makes of a push on each term), not the
weight a loss gives its two terms on purpose: where |dL/dt_w| != |dL/dt_l| by design (dposhift's f,
Cal-DPO's calibration, and the baselines of spec section 10: dpop's penalty, NCA's and APO's separate
anchored terms, SimPER's exp(A) weights), that asymmetry is kept and multiplied by w_w and w_l; for a
loss of one margin (dpo, ipo, simpo, dponorm, ...) |dL/dS_w|*G_w = |dL/dS_l|*G_l holds exactly.

Variant "prob": beta_l = beta * sg(min(1, exp(A_l - A_w))), forward on the rejected term (the mirror
of AdaDPO). Variant "norm" needs the per-token ``sum_p2`` statistic from the log-prob pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from poise.balance.base import Balancer, Scale
from poise.ops import logit_grad_sq, masked_sum
from poise.params import Param

BALANCED_PARAMS = (
    Param("balanced_variant", "norm", "'norm': equalise the logit-space gradient norms of the chosen and "
          "rejected terms (needs sum_p2 statistics); 'prob': scale the rejected term by "
          "min(1, exp(A_l - A_w)).", kind="choice", choices=("norm", "prob")),
)


def _logit_grad_norm(lp: Tensor, mask: Tensor, sum_p2: Tensor) -> Tensor:
    """(B,) sqrt(sum_t ||e_y - p_t||^2) = ||d S / d logits|| over the masked tokens (spec section 2),
    float64, without the cancellation of 1 - 2p + sum p^2 when p is close to 1."""
    return masked_sum(logit_grad_sq(lp, sum_p2), mask).sqrt()


class Balanced(Balancer):
    name = "balanced"
    params = BALANCED_PARAMS
    paper = "Balanced-DPO, arXiv 2502.20847 (seed 001); reconstruction"
    summary = "Reweight chosen and rejected gradients to equal logit-space norm (or by probability)"

    @property
    def needs_stats(self) -> frozenset[str]:
        return frozenset({"sum_p2"}) if self.hp["balanced_variant"] == "norm" else frozenset()

    def scales(self, state, seq, rewards):
        with torch.no_grad():
            if self.hp["balanced_variant"] == "prob":
                c_l = torch.exp((seq.A_l - seq.A_w).detach().clamp(max=0))
                return [Scale("forward", rejected=c_l)], {"balance/beta_l_scale_mean": c_l.mean()}
            lp = seq.logps
            g_w = _logit_grad_norm(lp.chosen, lp.chosen_mask, lp.chosen_stats["sum_p2"])
            g_l = _logit_grad_norm(lp.rejected, lp.rejected_mask, lp.rejected_stats["sum_p2"])
            g_w = g_w * self.loss.term.dS(seq, "w").detach().double()  # chain rule: G of the term
            g_l = g_l * self.loss.term.dS(seq, "l").detach().double()
            total = g_w + g_l
            ok = total > 0
            safe = torch.where(ok, total, torch.ones_like(total))
            w_w = torch.where(ok, 2 * g_l / safe, torch.ones_like(total))
            w_l = torch.where(ok, 2 * g_w / safe, torch.ones_like(total))
            w_w, w_l, g_w, g_l = (x.to(seq.dtype) for x in (w_w, w_l, g_w, g_l))
            metrics = {
                "balance/w_chosen_mean": w_w.mean(), "balance/w_rejected_mean": w_l.mean(),
                "balance/grad_norm_chosen": g_w.mean(), "balance/grad_norm_rejected": g_l.mean(),
            }
        return [Scale("gradient", chosen=w_w, rejected=w_l)], metrics
