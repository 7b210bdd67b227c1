"""What a loss is: a pure function of a chosen and a rejected term, plus its declaration.

A base loss of spec section 3 is written as ``f(t_w, t_l, ...)`` where the terms are the quantities a
balancer acts on (h for DPO, A for SimPO, S for CPO, the log-odds for ORPO, hbar for IPO). The
objective extracts the terms, lets the balancers rescale them, then calls the loss. The loss itself
is a few lines of tensor maths with the paper's equation in its docstring.

A term kind is an object (:class:`TermKind`) that carries what anyone above needs to know of a term:
its values, whether it reads the reference, its derivative with respect to the sequence log-prob S
(Balanced-DPO's chain rule) and which implicit reward it implies. Nothing here knows of a balancer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
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


def _one(seq: PairSeq, side: str) -> Tensor:
    return torch.ones_like(seq.n_w if side == "w" else seq.n_l)


def _per_token(seq: PairSeq, side: str) -> Tensor:
    return 1.0 / (seq.n_w if side == "w" else seq.n_l)


def _log_odds_slope(seq: PairSeq, side: str) -> Tensor:
    """d logodds / d S = 1/(|y| (1 - P)), P = exp(A)."""
    a = (seq.A_w if side == "w" else seq.A_l).detach()
    return torch.exp(-log1mexp(a)) * _per_token(seq, side)


@dataclass(frozen=True)
class TermKind:
    """A kind of term a loss may act on.

    Args:
        name: short name (``h``, ``hbar``, ``A``, ``S``, ``logodds``), shown in the docs.
        symbol: how the docs write it.
        values: ``seq -> (t_w, t_l)``, each (B,), carrying the policy's gradient.
        reads_reference: whether the term needs the reference log-probs.
        dS: ``(seq, side) -> (B,)`` |d term / d S| of side ``"w"`` or ``"l"``, detached (the chain rule
            factor that turns a gradient with respect to the term into one with respect to S).
        reward: ``seq -> (r_w, r_l)`` before scaling, the implicit reward of spec section 1: h with a
            reference, else A (or S for a loss on S).
    """

    name: str
    symbol: str
    values: Callable[[PairSeq], tuple[Tensor, Tensor]]
    reads_reference: bool
    dS: Callable[[PairSeq, str], Tensor]
    reward: Callable[[PairSeq], tuple[Tensor, Tensor]]


H = TermKind("h", "h = S - S_ref", lambda s: (s.h_w, s.h_l), True, _one, lambda s: (s.h_w, s.h_l))
HBAR = TermKind("hbar", "hbar = h/|y|", lambda s: (s.hbar_w, s.hbar_l), True, _per_token,
                lambda s: (s.h_w, s.h_l))
MEAN_LOGP = TermKind("A", "A = S/|y|", lambda s: (s.A_w, s.A_l), False, _per_token, lambda s: (s.A_w, s.A_l))
SUM_LOGP = TermKind("S", "S", lambda s: (s.S_w, s.S_l), False, _one, lambda s: (s.S_w, s.S_l))
LOG_ODDS = TermKind(
    "logodds", "log(P/(1-P)), P = exp(A)",
    # ORPO (arXiv 2403.07691 Eq. 4): the odds of the mean-token probability
    lambda s: (s.A_w - log1mexp(s.A_w), s.A_l - log1mexp(s.A_l)), False, _log_odds_slope,
    lambda s: (s.A_w, s.A_l))

#: Every term kind by name.
TERM_KINDS: dict[str, TermKind] = {k.name: k for k in (H, HBAR, MEAN_LOGP, SUM_LOGP, LOG_ODDS)}


@dataclass(frozen=True)
class LossSpec:
    """The declaration of a base loss; one row of the loss table.

    Args:
        name: public name (``dpo``, ``simpo``, ...).
        fn: ``fn(terms, **hp) -> (B,)`` per-pair loss, hp being this loss's own hyperparameters.
        term: the :class:`TermKind` the loss reads; decides whether it needs a reference.
        params: its hyperparameters (``nll_weight`` is added to every loss by the objective).
        paper: citation shown by ``poise ls`` and the docs.
        summary: one line.
        equation: the per-pair formula as the docs print it (spec notation).
        reward_scale: name of the hyperparameter that scales the implicit reward for logging
            (r = scale * reward term; spec section 1), usually ``beta``; None for a loss without one.
        builtin_nll: hp -> weight of the loss's own chosen-NLL term (CPO: cpo_alpha, ORPO: 1).
    """

    name: str
    fn: Callable[..., Tensor]
    term: TermKind
    params: tuple[Param, ...]
    paper: str
    summary: str
    equation: str = ""
    reward_scale: str | None = "beta"
    builtin_nll: Callable[[dict[str, Any]], float] = field(default=lambda hp: 0.0)

    @property
    def needs_reference(self) -> bool:
        return self.term.reads_reference

    def terms(self, seq: PairSeq) -> tuple[Tensor, Tensor]:
        return self.term.values(seq)

    def rewards(self, seq: PairSeq, hp: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Implicit rewards for logging (spec section 1): beta*h with a reference, else beta*A
        (SimPO, ORPO) or beta*S (CPO)."""
        scale = hp[self.reward_scale] if self.reward_scale else 1.0
        w, l = self.term.reward(seq)
        return scale * w, scale * l
