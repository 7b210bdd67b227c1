"""The policy's training mode: dropout off, but checkpointing layers and LoRA's dropout on; evaluation
regions restore every module's own flag."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from poise.model.load import add_lora
from poise.model.modes import enable_activation_checkpointing, eval_mode, set_training_mode


def _model(checkpointing=True, lora=True):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.5)
    model = LlamaForCausalLM(cfg).eval()
    if checkpointing:
        enable_activation_checkpointing(model)
    if lora:
        model = add_lora(model, r=2, alpha=4, dropout=0.5, target_modules=["q_proj"])
    return model


def _flags(model):
    return {name: m.training for name, m in model.named_modules()}


def test_training_mode_sets_only_the_checkpointing_layers_and_lora_dropout():
    model = set_training_mode(_model())
    flags = _flags(model)
    on = sorted(n for n, f in flags.items() if f)
    layers = [n for n in on if n.endswith(tuple(f"layers.{i}" for i in range(2)))]
    assert len(layers) == 2  # the decoder layers themselves...
    assert all(flags[f"{n}.self_attn"] is False and flags[f"{n}.mlp"] is False for n in layers)  # ...not inside
    assert sum(n.endswith("lora_dropout") for n in on) == 2
    # and the decoder, whose flag transformers' older checkpointing loop reads; nothing else
    assert set(on) - set(layers) - {n for n in on if "lora_dropout" in n} == {"base_model.model.model"}
    assert not model.training


def test_without_checkpointing_or_lora_everything_is_in_eval_mode():
    model = set_training_mode(_model(checkpointing=False, lora=False))
    assert not any(_flags(model).values())


def test_eval_mode_restores_each_modules_own_flag():
    model = set_training_mode(_model())
    before = _flags(model)
    with eval_mode(model):
        assert not any(_flags(model).values())
    assert _flags(model) == before


def test_the_training_forward_is_deterministic_and_recomputes_the_layers(monkeypatch):
    """Dropout stays off (attention_dropout=0.5 in the config, lora dropout masked by zero-init B) and the
    checkpointed layers run again in the backward."""
    model = set_training_mode(_model(lora=False))
    from transformers.models.llama import modeling_llama

    calls, real = [], modeling_llama.LlamaMLP.forward

    def counting(self, x):
        calls.append(1)
        return real(self, x)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", counting)
    ids = torch.randint(0, 61, (2, 7))
    a = model(input_ids=ids).logits
    b = model(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    calls.clear()
    model(input_ids=ids).logits.sum().backward()
    assert len(calls) == 4  # 2 layers forward + 2 recomputed
