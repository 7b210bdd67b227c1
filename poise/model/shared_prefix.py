"""Log-probs of pairs in the shared-prefix layout: the prompt goes through the model once per pair.

The layout is :class:`poise.data.SharedPairBatch` (one row ``[prompt | chosen | rejected]``, position ids
restarting for the rejected segment). This module builds the 4D attention mask that keeps the rejected
tokens from seeing the chosen ones, runs the model with it, and scores every completion token at its
own predicting position, with the same head code as :func:`poise.model.logprobs.token_logps` (fast path:
backbone + head on scored positions only; fallback: the model's own logits).

It is exact only for models whose attention takes a custom 4D mask and whose positions come only from
``position_ids`` (rotary embeddings), without sliding windows: :func:`shared_prefix_reason` says
whether a model qualifies, :func:`verify_shared_prefix` compares the two layouts on real pairs, and
:func:`choose_layout` (``pair_layout: auto``) uses the shared layout only when both agree.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from poise.data import SequenceBatch, TokenizedPair, collate_pairs
from poise.data.shared import PROMPT, SharedPairBatch, collate_shared
from poise.errors import ConfigError
from poise.model.logprobs import (
    TokenLogps,
    head_values,
    last_hidden,
    logits_values,
    resolve_path,
    scatter_values,
    token_logps,
)
from poise.types import STAT_NAMES

log = logging.getLogger("poise")

#: Model types known to take a custom 4D mask and position ids as the only source of positions.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3", "granite"})
#: Attention implementations whose custom-mask format this module writes.
SUPPORTED_ATTENTION = ("sdpa", "eager")
#: Largest per-token |shared - separate| log-prob difference accepted by the check, by dtype.
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HALF_TOLERANCE = 0.1


def _config(model: nn.Module):
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):
        if getattr(model.active_peft_config, "is_prompt_learning", False):
            return None, "a peft prompt-learning adapter injects virtual tokens"
        model = model.get_base_model()
    return getattr(model, "config", None), None


def shared_prefix_reason(model: nn.Module) -> str | None:
    """None if the shared-prefix layout is exact for ``model``, else why not."""
    config, reason = _config(model)
    if reason:
        return reason
    if config is None:
        return "the model has no config"
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not in {sorted(SUPPORTED_MODEL_TYPES)}"
    impl = getattr(config, "_attn_implementation", None)
    if impl not in SUPPORTED_ATTENTION:
        return f"attention implementation {impl!r} does not take the custom mask (use sdpa or eager)"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if any(t != "full_attention" for t in layer_types):
            return "the model has sliding-window layers"
    elif getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "the model uses sliding-window attention"
    return None


def attention_mask_4d(segments: Tensor, implementation: str, dtype: torch.dtype) -> Tensor:
    """(B, 1, L, L) mask: query q sees key k <= q of the prompt or of q's own segment.

    Boolean (True = attend) for sdpa; additive float (0 or the dtype's minimum) for eager. Padding
    queries see themselves (and earlier padding), so no softmax row is empty.
    """
    length = segments.shape[1]
    pos = torch.arange(length, device=segments.device)
    causal = pos[None, :] <= pos[:, None]  # (L, L): key <= query
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    allowed = causal[None] & ((seg_k == PROMPT) | (seg_k == seg_q))  # (B, L, L)
    allowed = allowed[:, None]
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return allowed


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def shared_token_logps(
    model: nn.Module,
    batch: SharedPairBatch,
    *,
    stats: Sequence[str] = (),
    chunk_size: int = 1024,
    path: str = "auto",
) -> TokenLogps:
    """Per-token log-probs of a :class:`SharedPairBatch`, in the usual (2B, W) pair layout."""
    reason = shared_prefix_reason(model)
    if reason:
        raise ValueError(f"the shared-prefix layout is not exact for this model: {reason}")
    unknown = [s for s in stats if s not in STAT_NAMES]
    if unknown:
        raise ValueError(f"unknown stats {unknown}; choose from {STAT_NAMES}")
    names = tuple(dict.fromkeys(stats))
    config, _ = _config(model)
    mask = attention_mask_4d(batch.segments, config._attn_implementation, _model_dtype(model))
    kwargs = dict(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, use_cache=False)
    fast = resolve_path(model, path)
    if fast is not None:
        hidden = last_hidden(fast.backbone(**kwargs))  # (B, L, H)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.pred_index)  # (K, H)
        values, stat_values = head_values(fast, rows, batch.targets, chunk_size, names)
    else:
        logits = model(**kwargs).logits
        values, stat_values = logits_values(logits, batch.pred_index, batch.targets, chunk_size, names)
    return scatter_values(batch.completion_mask, values, stat_values, names, fast is not None)


def batch_logps(model: nn.Module, batch: SequenceBatch, *, stats: Sequence[str] = (), chunk_size: int = 1024,
                path: str = "auto") -> TokenLogps:
    """Per-token log-probs of any batch: the shared-prefix layout or the usual padded rows."""
    if isinstance(batch, SharedPairBatch):
        return shared_token_logps(model, batch, stats=stats, chunk_size=chunk_size, path=path)
    return token_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask, stats=stats,
                       chunk_size=chunk_size, path=path)


def collate_layout(pairs: Sequence[TokenizedPair], pad_token_id: int, layout: str) -> SequenceBatch:
    """The batch of ``pairs`` in ``layout`` (``"shared"`` or ``"separate"``)."""
    if layout == "shared":
        return collate_shared(pairs, pad_token_id)
    return collate_pairs(pairs, pad_token_id)


@torch.no_grad()
def verify_shared_prefix(model: nn.Module, pairs: Sequence[TokenizedPair], pad_token_id: int, *,
                         chunk_size: int = 1024) -> float:
    """Largest per-token |shared - separate| log-prob on ``pairs`` (no grad, eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        sep = batch_logps(model, collate_pairs(pairs, pad_token_id).to(device), chunk_size=chunk_size)
        sh = batch_logps(model, collate_shared(pairs, pad_token_id).to(device), chunk_size=chunk_size)
    finally:
        model.train(was_training)
    return (sep.logps[sep.mask] - sh.logps[sh.mask]).abs().max().item()


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
        for model in models:
            diff = verify_shared_prefix(model, sample, pad_token_id, chunk_size=chunk_size)
            tol = TOLERANCE.get(_model_dtype(model), HALF_TOLERANCE)
            if not diff <= tol:
                problem = f"the layouts disagree by {diff:.3g} nats on a token (tolerance {tol:g})"
                break
    if problem is None:
        log.info("pair layout: shared prompt prefix (one row per pair)")
        return "shared"
    if setting == "shared":
        raise ConfigError(f"pair_layout: shared is not possible: {problem}. Use pair_layout: separate "
                          "(or auto, which falls back by itself).")
    log.info("pair layout: separate rows (%s)", problem)
    return "separate"
