"""What a loss is: a pure function of a chosen and a rejected term, plus its declaration.

A base loss of spec section 3 is written as ``f(t_w, t_l, ...)`` where the terms are the quantities a
balancer acts on (h for DPO, A for SimPO, S for CPO, the log-odds for ORPO, hbar for IPO). The
objective extracts the terms, lets the balancers rescale them, then calls the loss. The loss itself
is a few lines of tensor maths with the paper's equation in its docstring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from poise.ops import log1mexp
from poise.params import Param
from poise.seq import PairSeq


@dataclass
class Terms:
    """The (possibly balanced) terms of a batch, each (B,), and the completion lengths."""

    chosen: Tensor
    rejected: Tensor
    n_w: Tensor
    n_l: Tensor


def _h(seq: PairSeq) -> tuple[Tensor, Tensor]:
    return seq.h_w, seq.h_l


def _hbar(seq: PairSeq) -> tuple[Tensor, Tensor]:
    return seq.hbar_w, seq.hbar_l


def _mean_logp(seq: PairSeq) -> tuple[Tensor, Tensor]:
    return seq.A_w, seq.A_l


def _sum_logp(seq: PairSeq) -> tuple[Tensor, Tensor]:
    return seq.S_w, seq.S_l


def _log_odds(seq: PairSeq) -> tuple[Tensor, Tensor]:
    """log(P/(1-P)) with P = exp(A) the mean-token probability (ORPO, arXiv 2403.07691 Eq. 4)."""
    return seq.A_w - log1mexp(seq.A_w), seq.A_l - log1mexp(seq.A_l)


#: The term kinds a loss may act on: name -> (function of PairSeq, whether it reads the reference).
TERM_KINDS: dict[str, tuple[Callable[[PairSeq], tuple[Tensor, Tensor]], bool]] = {
    "h": (_h, True),
    "hbar": (_hbar, True),
    "A": (_mean_logp, False),
    "S": (_sum_logp, False),
    "logodds": (_log_odds, False),
}


@dataclass(frozen=True)
class LossSpec:
    """The declaration of a base loss; one row of the loss table.

    Args:
        name: public name (``dpo``, ``simpo``, ...).
        fn: ``fn(terms, **hp) -> (B,)`` per-pair loss, hp being this loss's own hyperparameters.
        term: which term kind the loss reads (key of TERM_KINDS); decides whether it needs a reference.
        params: its hyperparameters (``nll_weight`` is added to every loss by the objective).
        paper: citation shown by ``poise ls`` and the docs.
        summary: one line.
        reward_scale: name of the hyperparameter that scales the implicit reward for logging
            (r = scale * term; spec section 1), usually ``beta``.
        builtin_nll: hp -> weight of the loss's own chosen-NLL term (CPO: cpo_alpha, ORPO: 1).
        ada_apply: how AdaDPO's coefficients are applied for this base ("forward" or "gradient").
        ada_log_ratio: policy-space token-form log kappa for this base, when it is not A_w - A_l.
        ada_sequence_form: whether AdaDPO's sequence form is defined for this base.
    """

    name: str
    fn: Callable[..., Tensor]
    term: str
    params: tuple[Param, ...]
    paper: str
    summary: str
    reward_scale: str = "beta"
    builtin_nll: Callable[[dict[str, Any]], float] = field(default=lambda hp: 0.0)
    ada_apply: str = "forward"
    ada_log_ratio: Callable[[PairSeq], Tensor] | None = None
    ada_sequence_form: bool = True

    @property
    def needs_reference(self) -> bool:
        return TERM_KINDS[self.term][1]

    def terms(self, seq: PairSeq) -> tuple[Tensor, Tensor]:
        return TERM_KINDS[self.term][0](seq)

    def rewards(self, seq: PairSeq, hp: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Implicit rewards for logging (spec section 1): beta*h with a reference, else beta*A
        (SimPO, ORPO) or beta*S (CPO)."""
        scale = hp[self.reward_scale]
        if self.needs_reference:
            return scale * seq.h_w, scale * seq.h_l
        kind = "S" if self.term == "S" else "A"
        w, l = TERM_KINDS[kind][0](seq)
        return scale * w, scale * l
