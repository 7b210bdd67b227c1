"""The offline tiny tokenizer and model."""

import time

import pytest
import torch
from transformers import LlamaForCausalLM

from poise.model.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_special_tokens_and_vocab(tok):
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert 300 < len(tok) <= 512
    assert tok("the cat")["input_ids"][0] == 1
    assert tok("the cat", add_special_tokens=False)["input_ids"][0] != 1
    assert tok.convert_tokens_to_ids(["<|user|>", "<|assistant|>"]) == [4, 5]


def test_any_text_round_trips(tok):
    text = "Grüße, 世界! 🙂 tabs\tand\nnewlines  and ünïcödé"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_deterministic():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_options():
    small = build_tiny_tokenizer(
        ["aaa bbb aaa bbb ccc"] * 3, vocab_size=280, chat_template=False, add_bos=False
    )
    assert len(small) <= 280 and small.chat_template is None and small.bos_token_id is None
    assert small("aaa")["input_ids"] == small("aaa", add_special_tokens=False)["input_ids"]


def test_chat_template(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    full = tok.apply_chat_template(messages, tokenize=False)
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert full == "<bos><|user|>\nHi<eos><|assistant|>\nHello!<eos>"
    assert prompt == "<bos><|user|>\nHi<eos><|assistant|>\n"
    assert full.startswith(prompt)


def test_fast():
    start = time.perf_counter()
    tok = build_tiny_tokenizer()
    build_tiny_model(tok)
    assert time.perf_counter() - start < 2.0


def test_model(tok):
    model = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2)
    assert isinstance(model, LlamaForCausalLM)
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tok)
    assert (model.config.pad_token_id, model.config.eos_token_id) == (0, 2)
    logits = model(torch.tensor([[1, 50, 60, 2]])).logits
    assert logits.shape == (1, 4, len(tok)) and torch.isfinite(logits).all()


def test_model_seed_and_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = build_tiny_model(100), build_tiny_model(100), build_tiny_model(100, seed=1)
    assert torch.equal(torch.rand(3), expected)  # the global RNG is untouched
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    assert a.config.vocab_size == 100
