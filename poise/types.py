"""The tensors that cross the cut between the model side and the maths.

Shapes are stated once, here:
    B  pairs in the batch
    T  tokens per row (padded; chosen and rejected may have different T)

Everything above this module is pure tensor maths on per-token log-probs; everything below it
(data, models, log-prob engine) produces a :class:`PairLogps`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

#: Names of the per-token statistics a log-prob pass may return (each (B, T), float).
#: ``sum_p2`` = sum_j p_j^2 of the softmax at that position, ``entropy`` = -sum_j p_j log p_j,
#: ``max_p`` = max_j p_j.
STAT_NAMES = ("sum_p2", "entropy", "max_p")


@dataclass
class PairLogps:
    """Per-token log-probs of a batch of preference pairs.

    Args:
        chosen: (B, T_w) log pi(y_w,t | x, y_w,<t) of the policy; any value on masked positions.
        rejected: (B, T_l) the same for the rejected completions.
        chosen_mask: (B, T_w) bool, True on completion tokens (prompt and padding False).
        rejected_mask: (B, T_l) bool.
        ref_chosen: the frozen reference's log-probs, per token (B, T_w) or per-sequence sums (B,).
        ref_rejected: the same for the rejected completions.
        chosen_stats: optional per-token statistics of the policy's softmax, {name: (B, T_w)}, names
            from :data:`STAT_NAMES`; Balanced-DPO needs ``sum_p2``.
        rejected_stats: the same for the rejected completions.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_mask: Tensor
    rejected_mask: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_stats: dict[str, Tensor] | None = None
    rejected_stats: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        for side in ("chosen", "rejected"):
            lp, mask = getattr(self, side), getattr(self, f"{side}_mask")
            if lp.dim() != 2:
                raise ValueError(f"PairLogps.{side} must be (B, T) per-token log-probs, got shape {tuple(lp.shape)}")
            if mask.shape != lp.shape:
                raise ValueError(
                    f"PairLogps.{side}_mask has shape {tuple(mask.shape)} but {side} has {tuple(lp.shape)}"
                )
            if mask.dtype != torch.bool:
                setattr(self, f"{side}_mask", mask.bool())
            ref = getattr(self, f"ref_{side}")
            if ref is not None and ref.shape not in (lp.shape, lp.shape[:1]):
                raise ValueError(
                    f"PairLogps.ref_{side} must be per token {tuple(lp.shape)} or per sequence "
                    f"({lp.shape[0]},), got {tuple(ref.shape)}"
                )
        if self.chosen.shape[0] != self.rejected.shape[0]:
            raise ValueError(
                f"chosen has {self.chosen.shape[0]} rows but rejected has {self.rejected.shape[0]}"
            )
        if (self.ref_chosen is None) != (self.ref_rejected is None):
            raise ValueError("give both ref_chosen and ref_rejected, or neither")

    @property
    def batch_size(self) -> int:
        return self.chosen.shape[0]

    @property
    def has_reference(self) -> bool:
        return self.ref_chosen is not None


@dataclass
class ObjectiveOutput:
    """What an objective returns.

    Attributes:
        loss: scalar; ``loss.backward()`` yields the balanced gradient. Equal to ``per_pair.mean()``
            (or to the step-level normalisation the caller asked for).
        per_pair: (B,) each pair's share of the loss, detached from nothing (it carries the graph).
        metrics: namespaced detached 0-d tensors (``rewards/margins``, ``balance/kappa_mean``, ...).
            Keys ending in ``_min``/``_max`` reduce by min/max across micro-batches and ranks, the
            others are means over pairs.
    """

    loss: Tensor
    per_pair: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
