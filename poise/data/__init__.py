"""Preference data: load rows, tokenize and truncate them, and collate them into batches.

See :mod:`poise.data.load` (sources), :mod:`poise.data.formats` (row formats and implicit prompts),
:mod:`poise.data.tokenize` (tokens, truncation, bad rows) and :mod:`poise.data.collate` (batches), :mod:`poise.data.shared` (one row per pair, the prompt once).
"""

from poise.data.collate import (
    PreferenceBatch,
    SequenceBatch,
    collate_pairs,
    collate_sequences,
    length_grouped_batches,
    shuffled_batches,
)
from poise.data.formats import split_shared_messages, split_shared_prefix
from poise.data.load import Row, load_rows
from poise.data.shared import SharedPairBatch, collate_shared
from poise.data.tokenize import (
    BadRow,
    TokenizedData,
    TokenizedPair,
    sft_sequences,
    tokenize_rows,
    tokenize_sft_rows,
)

__all__ = [
    "BadRow",
    "PreferenceBatch",
    "Row",
    "SequenceBatch",
    "SharedPairBatch",
    "TokenizedData",
    "TokenizedPair",
    "collate_pairs",
    "collate_shared",
    "collate_sequences",
    "length_grouped_batches",
    "load_rows",
    "sft_sequences",
    "shuffled_batches",
    "split_shared_messages",
    "split_shared_prefix",
    "tokenize_rows",
    "tokenize_sft_rows",
]
