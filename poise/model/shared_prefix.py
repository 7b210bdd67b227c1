"""The shared-prefix layout: the check against the usual layout, and the choice between the two.

The layout is :class:`poise.data.SharedPairBatch` (one row ``[prompt | chosen | rejected]``, position ids
restarting for the rejected segment): the prompt goes through the model once per pair. Its attention
mask and the models it is exact for are in :mod:`poise.model.shared_mask`; the engine's one entry,
:func:`poise.model.logprobs.batch_logps`, scores it.

It is exact only for models whose attention takes a custom 4D mask and whose positions come only from
``position_ids`` (rotary embeddings), without sliding windows:
:func:`poise.model.shared_mask.shared_prefix_reason` says whether a model qualifies,
:func:`check_layouts` compares the two layouts on real pairs (in float32 where the weights are), and :func:`choose_layout`
(``pair_layout: auto``) uses the shared layout only when both agree.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from poise.data import SequenceBatch, TokenizedPair, collate_pairs
from poise.data.shared import collate_shared
from poise.errors import ConfigError
from poise.model.logprobs import batch_logps
from poise.model.modes import eval_mode
from poise.model.shared_mask import model_dtype, shared_prefix_reason

log = logging.getLogger("poise")

#: Largest per-token |shared - separate| log-prob difference accepted by the check, by dtype.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
#: With half-precision weights the layouts' matmuls round differently (different shapes, different
#: blocking): on SmolLM2-135M in bf16 single tokens differ by up to 0.18 nats while the mean is 0.027, so
#: the check takes the mean per-token difference there; a wrong mask moves it by far more (tested).
HALF_MEAN_TOLERANCE = 0.05


def collate_layout(pairs: Sequence[TokenizedPair], pad_token_id: int, layout: str) -> SequenceBatch:
    """The batch of ``pairs`` in ``layout`` (``"shared"`` or ``"separate"``)."""
    if layout == "shared":
        return collate_shared(pairs, pad_token_id)
    return collate_pairs(pairs, pad_token_id)


@torch.no_grad()
def layout_differences(model: nn.Module, pairs: Sequence[TokenizedPair], pad_token_id: int, *,
                       chunk_size: int = 1024) -> torch.Tensor:
    """Per-token |shared - separate| log-probs on ``pairs`` (no grad, eval mode, in the ambient precision)."""
    device = next(model.parameters()).device
    with eval_mode(model):
        sep = batch_logps(model, collate_pairs(pairs, pad_token_id).to(device), chunk_size=chunk_size)
        sh = batch_logps(model, collate_shared(pairs, pad_token_id).to(device), chunk_size=chunk_size)
    return (sep.logps[sep.mask] - sh.logps[sh.mask]).abs().float()


def verify_shared_prefix(model: nn.Module, pairs: Sequence[TokenizedPair], pad_token_id: int, *,
                         chunk_size: int = 1024) -> float:
    """Largest per-token |shared - separate| log-prob on ``pairs`` (no grad, eval mode)."""
    return layout_differences(model, pairs, pad_token_id, chunk_size=chunk_size).max().item()


def check_layouts(model: nn.Module, pairs: Sequence[TokenizedPair], pad_token_id: int, *,
                  chunk_size: int = 1024) -> str | None:
    """Why the two layouts disagree on ``pairs`` for ``model``, or None when they agree.

    The layout is exact or wrong whatever the precision (it is a mask and positions), so the check runs
    in the weights' precision with autocast off: with float32 master weights under bf16 autocast it
    compares in float32 (largest per-token difference at most 1e-3), where bf16 rounding, which differs
    between the two layouts' matmul shapes, cannot hide or fake a disagreement. Half-precision weights are
    compared on the mean per-token difference (at most :data:`HALF_MEAN_TOLERANCE`).
    """
    device = next(model.parameters()).device.type
    with torch.autocast(device, enabled=False):
        diffs = layout_differences(model, pairs, pad_token_id, chunk_size=chunk_size)
    tol = TOLERANCE.get(model_dtype(model))
    if tol is not None:
        worst = diffs.max().item()
        return None if worst <= tol else f"the layouts disagree by {worst:.3g} nats on a token (tolerance {tol:g})"
    mean = diffs.mean().item()
    return None if mean <= HALF_MEAN_TOLERANCE else (
        f"the layouts disagree by {mean:.3g} nats per token on average (tolerance {HALF_MEAN_TOLERANCE:g} "
        f"for {model_dtype(model)} weights)")


def pairs_reason(pairs: Sequence[TokenizedPair]) -> str | None:
    """Why these pairs cannot take the shared layout, or None: it needs at least one prompt token, whose
    position predicts the first token of each response."""
    return "some pairs have an empty prompt" if any(not p.prompt_ids for p in pairs) else None


def choose_layout(setting: str, models: Sequence[nn.Module], pairs: Sequence[TokenizedPair], pad_token_id: int,
                  *, chunk_size: int = 1024) -> str:
    """``"shared"`` or ``"separate"`` for the config value ``pair_layout`` (auto / shared / separate).

    ``auto`` takes the shared layout when every model qualifies and the two layouts agree on the first
    pairs; ``shared`` raises a :class:`ConfigError` where ``auto`` would fall back.
    """
    if setting == "separate" or not pairs:
        return "separate"
    problem = next((r for r in map(shared_prefix_reason, models) if r), None) or pairs_reason(pairs)
    if problem is None:
        sample = list(pairs[:4])
        problem = next((r for r in (check_layouts(m, sample, pad_token_id, chunk_size=chunk_size) for m in models)
                        if r), None)
    if problem is None:
        log.info("pair layout: shared prompt prefix (one row per pair)")
        return "shared"
    if setting == "shared":
        raise ConfigError(f"pair_layout: shared is not possible: {problem}. Use pair_layout: separate "
                          "(or auto, which falls back by itself).")
    log.info("pair layout: separate rows (%s)", problem)
    return "separate"
