"""The policy's training mode, and evaluation regions that put it back exactly as it was.

poise trains with the base model's dropout off (as TRL's ``disable_dropout``, so that the policy's and the
reference's log-probs agree at step 0), but two things need the training flag on one module at a time:

* activation checkpointing: transformers recomputes a layer in the backward only when *that layer's*
  ``training`` flag is set (``GradientCheckpointingLayer``); with the whole model in eval mode
  ``gradient_checkpointing: true`` silently kept every activation;
* LoRA's dropout (``lora_dropout``), a module of its own inside each adapted layer.

:func:`set_training_mode` sets exactly those flags (a module's own flag, not its children's: the
attention inside a checkpointed layer keeps its dropout off). :func:`eval_mode` is every no-grad pass
(reference, layout check, evaluation, generation): all flags off inside, each module's own flag restored
after, where ``model.train(was_training)`` would switch every dropout on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Turn on transformers' activation checkpointing (non-reentrant) under its current name
    (``activation_checkpointing_enable``, transformers >= 5.2x; the old name warns) or the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def set_training_mode(model: nn.Module) -> nn.Module:
    """Eval mode (dropout off) except the layers that checkpoint activations and LoRA's dropout."""
    model.eval()
    for name, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", False) is True and hasattr(module, "_gradient_checkpointing_func"):
            module.training = True  # its own flag only
        if name.endswith("lora_dropout"):
            module.train()
    return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every module in eval mode inside; each module's own flag as it was after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
