"""Where the output head of a causal LM is, and what its forward does to ``head(hidden)``.

The log-prob engine (:mod:`poise.model.logprobs`) runs the backbone and applies the head itself, only on
the positions it scores; this module finds the two parts and the element-wise maps the model's own
forward applies to the head's output (soft-capping, logit scales), or says why it cannot.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: Model types whose causal-LM head does more than ``head(hidden)`` in a way not reproduced here.
_FALLBACK_MODEL_TYPES = frozenset({"blt", "csm", "modernbert_decoder", "modernvbert"})


class NoFastPath(Exception):
    """Raised while resolving the fast path; the message says why it is not available."""


@dataclass
class FastPath:
    backbone: nn.Module
    head: nn.Module
    transforms: list[Callable[[Tensor], Tensor]]


def _unwrap_peft(model: nn.Module) -> nn.Module:
    peft = sys.modules.get("peft")  # a PeftModel cannot exist unless peft was imported
    if peft is None or not isinstance(model, peft.PeftModel):
        return model
    if getattr(model.active_peft_config, "is_prompt_learning", False):
        raise NoFastPath("a peft prompt-learning adapter injects virtual tokens in forward()")
    return model.get_base_model()


def _check_wrappers(model: nn.Module) -> None:
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise NoFastPath("DistributedDataParallel: only its forward() synchronises gradients")
    fsdp = torch.distributed.fsdp
    if isinstance(model, fsdp.FullyShardedDataParallel) or isinstance(model, getattr(fsdp, "FSDPModule", ())):
        raise NoFastPath("FSDP: only the root forward() unshards the root parameters")


def _config_value(model: nn.Module, name: str):
    config = getattr(model, "config", None)
    if config is None:
        return None
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.insert(0, config.get_text_config())
    for cfg in configs:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return None


def _scale(factor) -> Callable[[Tensor], Tensor]:
    return lambda z: z * factor


def _logits_scaling(base: nn.Module, model_type: str) -> Callable[[Tensor], Tensor] | None:
    scaling = _config_value(base, "logits_scaling")
    if scaling is None:
        return None
    if model_type.startswith("granite"):
        return lambda z: z / scaling
    if model_type.startswith("hyperclovax"):
        return _scale(scaling)
    raise NoFastPath(f"unknown meaning of config.logits_scaling for model type {model_type!r}")


def _head_transforms(base: nn.Module, backbone: nn.Module) -> list[Callable[[Tensor], Tensor]]:
    """The element-wise maps the model's own forward applies to ``lm_head(hidden)``, in order."""
    model_type = str(_config_value(base, "model_type") or "")
    if model_type in _FALLBACK_MODEL_TYPES or _config_value(base, "is_encoder_decoder"):
        raise NoFastPath(f"model type {model_type!r} has a head the fast path does not reproduce")
    transforms = []
    scaling = _logits_scaling(base, model_type)
    if scaling is not None:
        transforms.append(scaling)
    for owner in (base, backbone):
        for name in ("logit_scale", "lm_head_multiplier"):
            factor = getattr(owner, name, None)
            if factor is not None:
                transforms.append(_scale(factor))
    cap = _config_value(base, "final_logit_softcapping")
    if cap is not None:
        transforms.append(lambda z: torch.tanh(z / cap) * cap)
    vocab = _config_value(base, "unpadded_vocab_size")
    if vocab is not None:
        transforms.append(lambda z: z[..., :vocab])
    return transforms


def resolve_fast_path(model: nn.Module) -> FastPath:
    _check_wrappers(model)
    base = _unwrap_peft(model)
    get_decoder = getattr(base, "get_decoder", None)
    try:
        backbone = get_decoder() if callable(get_decoder) else None
    except (AttributeError, NotImplementedError, ValueError) as err:
        raise NoFastPath(f"get_decoder() failed: {err}") from err
    if not isinstance(backbone, nn.Module) or backbone is base:
        raise NoFastPath("the model has no separate decoder backbone")
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module):
        raise NoFastPath("the model has no output embeddings")
    return FastPath(backbone, head, _head_transforms(base, backbone))


def fast_path_reason(model: nn.Module) -> str | None:
    """None if ``path="auto"`` takes the fast path for ``model``, else why it falls back."""
    try:
        resolve_fast_path(model)
    except NoFastPath as err:
        return str(err)
    return None
