"""AdaDPO (seed 000; arXiv 2605.28440; spec section 5).

Per-pair stop-gradient coefficients beta_w = beta*kappa, beta_l = beta with kappa = sg(p_w/p_l), which
makes |dL/dp_w| = |dL/dp_l|. Stable (default) form: per-token balancing with a ceiling C,

    Dbar  = A_w - A_l              (ada_space="policy")   or  hbar_w - hbar_l   (ada_space="reference")
    kappa = sg(exp(min(Dbar, log C)))
    L     = -log sigma(beta*kappa*h_w - beta*h_l)

Exponent family: c_w = k * exp(min(alpha_w*Dbar, log C)) (floored at ada_floor), c_l =
exp(min(-alpha_l*Dbar, log C)); AdaDPO = (1, 0), symmetric = (0.5, 0.5), DPO = (0, 0).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from poise.balance.base import Balancer, Scale
from poise.ops import LOG_COEF_LIMIT, bounded_exp, log1mexp
from poise.params import Param
from poise.seq import PairSeq

ADA_PARAMS = (
    Param("ada_form", "token", "'token': Dbar from mean token log-probs (stable, the paper's practical "
          "form); 'sequence': from sequence log-probs (exact balance, unstable; for ablations).",
          kind="choice", choices=("token", "sequence")),
    Param("ada_space", "policy", "'policy': kappa from the policy's probabilities (default); 'reference': "
          "from the log-ratios h (needs a reference).", kind="choice", choices=("policy", "reference")),
    Param("ada_clip", 2.0, "Ceiling C on kappa (the paper's clipping bound; stable in [1.5, 2.5], worse "
          "from 5). null disables the ceiling.", kind="float|none", low=0.0, low_open=True),
    Param("ada_floor", None, "Floor on kappa (null: none, the paper's default). 1.0 never weakens the "
          "chosen push below DPO's; use it when chosen responses are unlikely under the policy.",
          kind="float|none", low=0.0, low_open=True),
    Param("ada_alpha_w", 1.0, "Exponent of rho = exp(Dbar) in the chosen coefficient (AdaDPO: 1).", low=0.0),
    Param("ada_alpha_l", 0.0, "Exponent of 1/rho in the rejected coefficient (AdaDPO: 0). Balanced for "
          "every pair iff ada_alpha_w + ada_alpha_l = 1.", low=0.0),
    Param("ada_k", 1.0, "Constant factor on the chosen coefficient: a deliberate asymmetry (default 1).",
          low=0.0, low_open=True),
)


def _orpo_log_ratio(seq: PairSeq) -> Tensor:
    """log kappa for ORPO: log[P_w(1-P_w) / (P_l(1-P_l))] with P = exp(A) (spec section 5)."""
    return seq.A_w - seq.A_l + log1mexp(seq.A_w) - log1mexp(seq.A_l)


# AdaDPO's constructions for the other losses (spec section 5, table). They live here, not in the loss
# table: a loss knows nothing of the balancers composed with it. Any loss not named below gets the
# DPO construction (kappa from A_w - A_l, applied as forward scaling of the chosen term).
#: Losses on which kappa is applied gradient-only (dL/dt_w scaled by kappa, the loss value kept).
#: Spec section 5: the chosen term is a regression target (IPO, Cal-DPO), so that the target does not
#: move. Decided here for the baselines of spec section 10, whose chosen term is not coupled to the
#: rejected one through a single margin u = beta*(t_w - t_l), so that forward scaling (beta_w =
#: beta*kappa) would not scale the chosen gradient by kappa relative to the rejected one as it does
#: for DPO (where both share sigma(-u)):
#:   nca:     its chosen part has its minimum at beta*h_w = ln 2, a target; forward scaling would move
#:            it to ln 2/(beta*kappa) (the IPO/Cal-DPO rule);
#:   apodown: not monotone in h_w (pushed down alone, up in the margin); forward scaling would move the
#:            point where the two pushes cancel, i.e. change the loss's anchor, not its balance;
#:   apozero: monotone but separable and bounded: the forward gradient kappa*sigma'(beta*kappa*h_w)
#:            is not kappa times sigma'(beta*h_w), and is smaller than the base's once the sigmoid
#:            saturates (kappa = 2 at beta*h_w = 3 gives 0.11x, not 2x), weakening what it means to strengthen;
#:   simper:  separable, no beta: forward scaling turns exp(A_w) into exp(kappa*A_w), no longer the
#:            inverse perplexity, with a gradient kappa*exp(kappa*A_w) that is below the base's for
#:            kappa > 1 whenever A_w < -ln(kappa)/(kappa - 1).
#: dpop and dponorm keep DPO's forward construction: both are -log sigma of one margin (dpop's
#: penalty depends on h_w only, so kappa*h_w scales the whole chosen reward h_w - lambda*max(0, -h_w)
#: by kappa, as beta_w = beta*kappa): the ratio of the chosen to the rejected gradient is the base's
#: times exactly kappa, as for DPO (identity 3).
GRADIENT_ONLY = frozenset({"ipo", "caldpo", "nca", "apozero", "apodown", "simper"})
#: Token-form log kappa where it is not A_w - A_l: loss -> (function, kappa as the docs write it).
LOG_RATIO = {"orpo": (_orpo_log_ratio, "P_w(1-P_w) / (P_l(1-P_l)), P = exp(A)")}
#: Losses for which only the token form is defined (ORPO's odds are of the mean token probability).
TOKEN_FORM_ONLY = frozenset({"orpo"})


class Ada(Balancer):
    name = "ada"
    params = ADA_PARAMS
    paper = "AdaDPO, arXiv 2605.28440 (seed 000)"
    summary = "Per-pair stop-gradient coefficient kappa = p_w/p_l (per token, clipped) on the chosen term"

    def __init__(self, loss, hp: dict[str, Any]):
        super().__init__(loss, hp)
        if hp["ada_space"] == "reference" and not loss.needs_reference:
            raise self._refuse("ada_space='reference' needs log-ratios, and this loss is reference-free. "
                               "Use ada_space='policy'.")
        if hp["ada_form"] == "sequence" and loss.name in TOKEN_FORM_ONLY:
            raise self._refuse("its odds are defined on the mean token probability, so only "
                               "ada_form='token' is defined.")
        clip, floor = hp["ada_clip"], hp["ada_floor"]
        if clip is not None and floor is not None and floor > clip:
            raise self._refuse(f"ada_floor={floor} is above ada_clip={clip}; the floor must not exceed "
                               "the ceiling.")
        self.log_cap = math.log(clip) if clip is not None else LOG_COEF_LIMIT

    @property
    def needs_reference(self) -> bool:
        return self.hp["ada_space"] == "reference"

    def log_ratio(self, seq: PairSeq) -> Tensor:
        """Dbar of spec section 5 for the configured form and space, detached, float32 or wider."""
        token = self.hp["ada_form"] == "token"
        if self.hp["ada_space"] == "reference":
            d = seq.hbar_w - seq.hbar_l if token else seq.h_w - seq.h_l
        elif token:
            d = LOG_RATIO[self.loss.name][0](seq) if self.loss.name in LOG_RATIO else seq.A_w - seq.A_l
        else:
            d = seq.S_w - seq.S_l
        return d.detach()

    def scales(self, state, seq, rewards):
        hp = self.hp
        with torch.no_grad():
            d = self.log_ratio(seq)  # (B,)
            log_w = hp["ada_alpha_w"] * d
            kappa = bounded_exp(log_w.clamp(max=self.log_cap))
            if hp["ada_floor"] is not None:
                kappa = kappa.clamp(min=hp["ada_floor"])
            c_w = hp["ada_k"] * kappa
            c_l = bounded_exp((-hp["ada_alpha_l"] * d).clamp(max=self.log_cap))
            metrics = {
                "balance/kappa_mean": c_w.mean(), "balance/kappa_min": c_w.min(),
                "balance/kappa_max": c_w.max(),
                "balance/clipped_frac": (log_w > self.log_cap).to(d.dtype).mean(),
                "balance/below_one_frac": (c_w < 1).to(d.dtype).mean(),
                "balance/adaptive_rewards_chosen": (c_w * rewards[0]).mean(),
            }
            if hp["ada_alpha_l"] != 0:
                metrics["balance/kappa_rejected_mean"] = c_l.mean()
        mode = "gradient" if self.loss.name in GRADIENT_ONLY else "forward"
        return [Scale(mode, chosen=c_w, rejected=c_l)], metrics
