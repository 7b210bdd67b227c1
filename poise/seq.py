"""Sequence-level quantities of a batch of pairs, computed once from the per-token log-probs.

Notation of spec section 1: S = sum_t l_t, |y| = number of completion tokens, A = S/|y|,
h = S - S_ref, hbar = h/|y|. All (B,), in float32 or wider, carrying the gradient of the policy's
log-probs (the reference carries none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from poise.ops import masked_sum, upcast
from poise.types import PairLogps


def _ref_sum(ref: Tensor, mask: Tensor) -> Tensor:
    ref = upcast(ref).detach()
    return masked_sum(ref, mask) if ref.dim() == 2 else ref


@dataclass
class PairSeq:
    """S, |y|, A (and h, hbar when a reference is read) for chosen (w) and rejected (l)."""

    logps: PairLogps
    S_w: Tensor
    S_l: Tensor
    n_w: Tensor
    n_l: Tensor
    h_w: Tensor | None = None
    h_l: Tensor | None = None

    @classmethod
    def build(cls, logps: PairLogps, *, read_reference: bool) -> PairSeq:
        """Reference fields are read only when ``read_reference`` is True: reference-free objectives
        never touch them (a test holds them to that)."""
        S_w = masked_sum(upcast(logps.chosen), logps.chosen_mask)
        S_l = masked_sum(upcast(logps.rejected), logps.rejected_mask)
        # |y| clamped to 1 only for division; data loading rejects empty completions (spec 1).
        n_w = logps.chosen_mask.sum(-1).to(S_w.dtype).clamp(min=1)
        n_l = logps.rejected_mask.sum(-1).to(S_l.dtype).clamp(min=1)
        seq = cls(logps, S_w, S_l, n_w, n_l)
        if read_reference:
            seq.h_w = S_w - _ref_sum(logps.ref_chosen, logps.chosen_mask).to(S_w.dtype)
            seq.h_l = S_l - _ref_sum(logps.ref_rejected, logps.rejected_mask).to(S_l.dtype)
        return seq

    @property
    def A_w(self) -> Tensor:
        return self.S_w / self.n_w

    @property
    def A_l(self) -> Tensor:
        return self.S_l / self.n_l

    @property
    def hbar_w(self) -> Tensor:
        return self.h_w / self.n_w

    @property
    def hbar_l(self) -> Tensor:
        return self.h_l / self.n_l

    @property
    def dtype(self) -> torch.dtype:
        return self.S_w.dtype
