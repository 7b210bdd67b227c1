"""The shared-prefix layout, model side: which models it is exact for, and its 4D attention mask.

The layout is :class:`poise.data.SharedPairBatch` (one row ``[prompt | chosen | rejected]``, position ids
restarting for the rejected segment). :func:`attention_mask_4d` keeps the rejected tokens from seeing
the chosen ones. The result is exact only for models whose attention takes a custom 4D mask and whose
positions come only from ``position_ids`` (rotary embeddings), without sliding windows:
:func:`shared_prefix_reason` says whether a model qualifies.

This module imports nothing of the log-prob engine, so that the engine
(:func:`poise.model.logprobs.batch_logps`) can build the mask and refuse a model that does not qualify,
and :mod:`poise.model.shared_prefix` (the check against the usual layout, the choice of layout) sits on
top of the engine.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from poise.data.shared import PROMPT

#: Model types known to take a custom 4D mask and position ids as the only source of positions.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3", "granite"})
#: Attention implementations whose custom-mask format this module writes.
SUPPORTED_ATTENTION = ("sdpa", "eager")


def model_config(model: nn.Module):
    """(the config of ``model``, or of a peft model's base model; why the layout cannot apply, or None)."""
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):
        if getattr(model.active_peft_config, "is_prompt_learning", False):
            return None, "a peft prompt-learning adapter injects virtual tokens"
        model = model.get_base_model()
    return getattr(model, "config", None), None


def shared_prefix_reason(model: nn.Module) -> str | None:
    """None if the shared-prefix layout is exact for ``model``, else why not."""
    config, reason = model_config(model)
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
    """(B, 1, L, L) mask: query q sees key k <= q of its own pair's prompt or of q's own segment
    (``segments`` = 3 * slot + kind, several pairs per row when packed).

    Boolean (True = attend) for sdpa; additive float (0 or the dtype's minimum) for eager. Padding
    queries see themselves (and earlier padding), so no softmax row is empty.
    """
    length = segments.shape[1]
    pos = torch.arange(length, device=segments.device)
    causal = pos[None, :] <= pos[:, None]  # (L, L): key <= query
    segments = segments.long()
    seg_q, seg_k = segments[:, :, None], segments[:, None, :]
    pair_q, pair_k = torch.div(seg_q, 3, rounding_mode="floor"), torch.div(seg_k, 3, rounding_mode="floor")
    kind_k = seg_k - 3 * pair_k  # PAD (-1): pair -1, kind 2
    # the same pair (a packed row holds several), and the key in the prompt or in the query's own segment
    allowed = causal[None] & (pair_q == pair_k) & ((kind_k == PROMPT) | (seg_k == seg_q))  # (B, L, L)
    allowed = allowed[:, None]
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return allowed


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 if it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def shared_attention_mask(model: nn.Module, segments: Tensor) -> Tensor:
    """The 4D mask of a shared-layout batch for ``model``; ValueError if the layout is not exact for it."""
    reason = shared_prefix_reason(model)
    if reason:
        raise ValueError(f"the shared-prefix layout is not exact for this model: {reason}")
    config, _ = model_config(model)
    return attention_mask_4d(segments, config._attn_implementation, model_dtype(model))
