"""Generation: the one routine that samples or greedily decodes completions, for every caller.

:func:`generate_ids` takes prompts as token ids or as strings and returns the new token ids of each
completion, cut before the first EOS; :func:`generate` decodes them (special tokens dropped, nothing
else touched). The evaluation of a run (:mod:`poise.eval.run`), the testbed's scoring and on-policy pairs
(:mod:`poise.testbed`) and the instruct testbed's self-sampled pairs (:mod:`poise.testbed.instruct`) all
call it.

* Prompts are left-padded (with the tokenizer's pad token, or EOS when it has none) into batches of
  ``batch_size``, so batched greedy decoding equals decoding one prompt at a time.
* A string prompt is tokenized as poise's data pipeline tokenizes a prompt (:func:`prompt_ids`): no
  special tokens added, except BOS in front when the tokenizer adds one and the text lacks it. A prompt
  rendered with a chat template (which writes its own BOS and turn markers) therefore gets no second
  BOS, and its ids are those the trainer saw.
* ``temperature=0`` decodes greedily; a positive temperature samples from the full distribution (top-k
  and top-p off, whatever the model's generation config says).
* Sampling is seeded: torch's generator is seeded with ``seed`` once, the batches run in order, and the
  global RNG state (the CPU's and the model's device's) is restored afterwards, so the same seed,
  prompts and ``batch_size`` give the same completions and the caller's random stream is untouched.
  (This is the seeding of the testbed's former ``generate``, whose committed results it reproduces.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from poise.data.tokenize import _bos_to_add

#: A prompt: token ids, or a string tokenized by :func:`prompt_ids`.
Prompt = str | Sequence[int]


def prompt_ids(tokenizer: Any, text: str) -> tuple[int, ...]:
    """Token ids of a prompt string as poise's data pipeline makes them (:mod:`poise.data.tokenize`): no
    special tokens added, except BOS in front when the tokenizer adds one and the text lacks it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = _bos_to_add(tokenizer)
    return tuple(ids if bos is None or ids[:1] == [bos] else [bos, *ids])


@torch.no_grad()
def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[list[int]]:
    """The new token ids of one completion per prompt, cut before the first EOS (module doc).

    Args:
        model: a causal LM with ``generate`` (transformers, optionally peft); put in eval mode for the
            call and back in its former mode afterwards.
        tokenizer: its tokenizer (pad and EOS ids; it tokenizes string prompts).
        prompts: token-id sequences, or strings (tokenized by :func:`prompt_ids`).
        max_new_tokens: at most this many new tokens per completion.
        temperature: 0 for greedy decoding, > 0 to sample at that temperature.
        seed: seeds the sampling; the global RNG is restored afterwards.
        batch_size: prompts per ``generate`` call (the completions sampled depend on it).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ids = [prompt_ids(tokenizer, p) if isinstance(p, str) else tuple(p) for p in prompts]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = _device(model)
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        with _seeded(seed, device):
            for start in range(0, len(ids), batch_size):
                out += _generate_batch(model, ids[start:start + batch_size], pad=pad, eos=eos, device=device,
                                       max_new_tokens=max_new_tokens, temperature=temperature)
    finally:
        model.train(was_training)
    return out


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 16,
) -> list[str]:
    """:func:`generate_ids`, decoded: one string per prompt, special tokens dropped, not stripped (testbed
    responses start with a space, so ``prompt + response`` re-tokenizes as generated)."""
    out = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                       seed=seed, batch_size=batch_size)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in out]


def _generate_batch(model: Any, chunk: list[tuple[int, ...]], *, pad: int, eos: int | None, device: torch.device,
                    max_new_tokens: int, temperature: float) -> list[list[int]]:
    width = max(len(p) for p in chunk)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (b, width), left-padded
    mask = torch.zeros_like(ids)
    for r, p in enumerate(chunk):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         pad_token_id=pad, eos_token_id=eos, **_decoding(temperature))
    return [_until_eos(row, eos) for row in out[:, width:].tolist()]


def _decoding(temperature: float) -> dict[str, Any]:
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    # greedy; None clears sampling settings of the model's generation config (no warnings about them)
    return {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}


def _until_eos(row: list[int], eos: int | None) -> list[int]:
    return row[:row.index(eos)] if eos is not None and eos in row else row


def _device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Inside: torch's CPU generator and ``device``'s seeded with ``seed``. Afterwards: both as they were."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else 0
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.default_generator.manual_seed(seed)
        with module.device(index) if hasattr(module, "device") else nullcontext():
            module.manual_seed(seed)  # this device only; torch.manual_seed would reseed every GPU
        yield
