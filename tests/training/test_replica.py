"""The main process's full copy of a sharded model (FSDP2, ZeRO-3), on which the probes run, is in the
policy's training mode: dropout off, the checkpointing layers' own flags on, as the training step."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from poise.model.modes import enable_activation_checkpointing, set_training_mode
from poise.training.engines import empty_copy, fill_replica


def test_the_filled_replica_has_the_policys_mode_and_weights():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, attention_dropout=0.5)
    model = LlamaForCausalLM(cfg)
    model = set_training_mode(enable_activation_checkpointing(model))
    replica = empty_copy(model.train())  # whatever the flags when it was copied
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    filled = fill_replica(replica, state, torch.device("cpu"), engine="fsdp")
    assert {n: m.training for n, m in filled.named_modules()} == {n: m.training for n, m in
                                                                   set_training_mode(model).named_modules()}
    assert not filled.model.layers[0].self_attn.training and filled.model.layers[0].training
    ids = torch.randint(0, 61, (2, 7))
    torch.testing.assert_close(filled(input_ids=ids).logits, filled(input_ids=ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(filled(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-6, atol=0)
