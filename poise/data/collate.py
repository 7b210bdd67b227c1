"""Pad tokenized pairs into batches, and choose which rows go into each batch.

A :class:`PreferenceBatch` of B pairs stacks 2B rows: rows ``0..B-1`` are prompt + chosen, rows
``B..2B-1`` prompt + rejected of the same pairs in the same order, all right-padded with the pad id
to one length L. ``completion_mask`` is True exactly on the completion tokens, the tokens whose
log-probability is scored (the logit predicting position ``t`` sits at position ``t - 1``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch
from torch import Tensor

from poise.data.tokenize import TokenizedPair
from poise.errors import ConfigError

#: How many batches' worth of rows :func:`length_grouped_batches` sorts together.
MEGA_BATCH_FACTOR = 50

_Batch = TypeVar("_Batch", bound="SequenceBatch")


@dataclass
class SequenceBatch:
    """N right-padded prompt + completion rows.

    Attributes:
        input_ids: (N, L) long.
        attention_mask: (N, L) long, 1 on real tokens, 0 on padding.
        completion_mask: (N, L) bool, True on completion tokens only.
    """

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    def to(self: _Batch, device: torch.device | str) -> _Batch:
        """A copy with every tensor moved to ``device``."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})


@dataclass
class PreferenceBatch(SequenceBatch):
    """2B rows: prompt + chosen for rows ``0..B-1``, prompt + rejected for rows ``B..2B-1``."""

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2


def collate_sequences(
    seqs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_token_id: int,
    *,
    pad_to_multiple_of: int | None = None,
) -> SequenceBatch:
    """Right-pad ``(prompt_ids, completion_ids)`` sequences into a :class:`SequenceBatch`."""
    if not seqs:
        raise ValueError("collate_sequences needs at least one sequence")
    if pad_token_id is None:
        raise ConfigError(
            "the tokenizer has no pad token. Set one, e.g. tokenizer.pad_token = tokenizer.eos_token "
            "(padding is masked, so any token works)."
        )
    width = max(len(prompt) + len(completion) for prompt, completion in seqs)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, (prompt, completion) in enumerate(seqs):
        start, end = len(prompt), len(prompt) + len(completion)
        input_ids[row, :end] = torch.tensor([*prompt, *completion], dtype=torch.long)
        attention_mask[row, :end] = 1
        completion_mask[row, start:end] = True
    return SequenceBatch(input_ids, attention_mask, completion_mask)


def collate_pairs(
    pairs: Sequence[TokenizedPair], pad_token_id: int, *, pad_to_multiple_of: int | None = None
) -> PreferenceBatch:
    """Stack B pairs into a :class:`PreferenceBatch` of 2B rows (chosen rows first)."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    seqs = [(pair.prompt_ids, pair.chosen_ids) for pair in pairs]
    seqs += [(pair.prompt_ids, pair.rejected_ids) for pair in pairs]
    batch = collate_sequences(seqs, pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
    return PreferenceBatch(batch.input_ids, batch.attention_mask, batch.completion_mask)


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int, shuffle: bool = True
) -> list[list[int]]:
    """Batches of indices in which rows have similar lengths, to waste little padding.

    The indices are shuffled, cut into mega-batches of ``50 * batch_size``, each sorted by length
    (longest first) and cut into batches; then the batch order is shuffled and the batch holding the
    longest row is moved to the front, so an out-of-memory error shows at the first step. Only the
    last batch may be smaller. The same ``seed`` gives the same batches; ``shuffle=False`` keeps
    the input order before sorting and the batch order after it.
    """
    _check_batch_size(batch_size)
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    mega = MEGA_BATCH_FACTOR * batch_size
    batches = []
    for start in range(0, len(order), mega):
        group = sorted(order[start : start + mega], key=lambda index: -lengths[index])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    if shuffle and batches:
        rng.shuffle(batches)
        longest = max(range(len(batches)), key=lambda b: max(lengths[index] for index in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def shuffled_batches(n: int, batch_size: int, *, seed: int, drop_last: bool = False) -> list[list[int]]:
    """A seeded random permutation of ``range(n)`` cut into batches of ``batch_size``.

    With ``drop_last`` a final batch smaller than ``batch_size`` is left out.
    """
    _check_batch_size(batch_size)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be a positive integer, got {batch_size!r}.")
