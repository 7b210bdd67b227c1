"""Padding, masks and batch order."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from poise.data import (
    PreferenceBatch,
    Row,
    SequenceBatch,
    TokenizedPair,
    collate_pairs,
    collate_sequences,
    length_grouped_batches,
    shuffled_batches,
    tokenize_rows,
)
from poise.errors import ConfigError

PAD = 0
PAIRS = [
    TokenizedPair((1, 10, 11), (20, 21, 2), (30, 2), "f", 1),
    TokenizedPair((1, 12), (22, 2), (31, 32, 33, 34, 2), "f", 2),
]


def test_collate_pairs_exact_layout():
    batch = collate_pairs(PAIRS, PAD)
    assert isinstance(batch, PreferenceBatch) and batch.num_pairs == 2 and batch.num_rows == 4
    assert batch.input_ids.tolist() == [
        [1, 10, 11, 20, 21, 2, 0],  # pair 1 chosen
        [1, 12, 22, 2, 0, 0, 0],  # pair 2 chosen
        [1, 10, 11, 30, 2, 0, 0],  # pair 1 rejected
        [1, 12, 31, 32, 33, 34, 2],  # pair 2 rejected
    ]
    assert batch.attention_mask.tolist() == [
        [1, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
    ]
    assert batch.completion_mask.tolist() == [
        [0, 0, 0, 1, 1, 1, 0],
        [0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 1],
    ]
    assert batch.input_ids.dtype == torch.long and batch.attention_mask.dtype == torch.long
    assert batch.completion_mask.dtype == torch.bool


def test_masks_cover_exactly_the_completion_tokens_of_real_data(tok):
    rows = [
        Row(
            "f",
            1,
            {
                "prompt": "What is the capital of France?",
                "chosen": " Paris.",
                "rejected": " London, I think.",
            },
        ),
        Row("f", 2, {"prompt": "Hi", "chosen": " Hello there, friend.", "rejected": " Bye."}),
    ]
    pairs = tokenize_rows(rows, tok).pairs
    batch = collate_pairs(pairs, tok.pad_token_id, pad_to_multiple_of=8)
    assert batch.input_ids.shape[1] % 8 == 0
    sides = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    for row, (prompt, completion) in enumerate(sides):
        ids = batch.input_ids[row]
        assert ids[batch.completion_mask[row]].tolist() == list(completion)
        assert ids[batch.attention_mask[row].bool()].tolist() == [*prompt, *completion]
        n = len(prompt) + len(completion)
        assert (
            batch.attention_mask[row, :n].all() and not batch.attention_mask[row, n:].any()
        )  # right padding
        assert (ids[n:] == tok.pad_token_id).all()
        assert not batch.completion_mask[row, : len(prompt)].any()


def test_pad_to_multiple_and_sequences():
    batch = collate_sequences([((1, 2), (3,)), ((1,), (4, 5, 6, 7))], PAD, pad_to_multiple_of=4)
    assert isinstance(batch, SequenceBatch) and not isinstance(batch, PreferenceBatch)
    assert batch.input_ids.tolist() == [[1, 2, 3, 0, 0, 0, 0, 0], [1, 4, 5, 6, 7, 0, 0, 0]]
    assert batch.completion_mask.tolist() == [[0, 0, 1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 0, 0, 0]]
    assert collate_sequences([((1,), (2,))], PAD, pad_to_multiple_of=4).input_ids.shape == (1, 4)


def test_to_keeps_the_batch_type():
    batch = collate_pairs(PAIRS, PAD).to("cpu")
    assert isinstance(batch, PreferenceBatch) and batch.num_pairs == 2


def test_collate_errors():
    with pytest.raises(ConfigError, match="no pad token"):
        collate_pairs(PAIRS, None)
    with pytest.raises(ValueError):
        collate_pairs([], PAD)


LENGTHS = [(i * 37) % 101 + 1 for i in range(1000)]


def test_length_grouping_is_deterministic_and_a_permutation():
    a = length_grouped_batches(LENGTHS, 8, seed=3)
    assert a == length_grouped_batches(LENGTHS, 8, seed=3)
    assert a != length_grouped_batches(LENGTHS, 8, seed=4)
    assert sorted(i for batch in a for i in batch) == list(range(len(LENGTHS)))
    assert [len(batch) for batch in a] == [8] * 125
    assert max(LENGTHS) in [LENGTHS[i] for i in a[0]]


def test_length_grouping_groups_similar_lengths():
    lengths = LENGTHS[:400]  # one mega-batch of 50 * 8: batches are runs of the sorted lengths
    batches = sorted(length_grouped_batches(lengths, 8, seed=0), key=lambda b: -max(lengths[i] for i in b))
    for longer, shorter in zip(batches, batches[1:]):
        assert min(lengths[i] for i in longer) >= max(lengths[i] for i in shorter)
    padding = sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    random_padding = sum(
        len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b)
        for b in shuffled_batches(400, 8, seed=0)
    )
    assert padding < random_padding / 10


def test_length_grouping_without_shuffle():
    assert length_grouped_batches([3, 1, 2, 5, 4], 2, seed=0, shuffle=False) == [[3, 4], [0, 2], [1]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), max_size=300), st.integers(1, 9), st.integers(0, 2**32))
def test_length_grouping_property(lengths, batch_size, seed):
    batches = length_grouped_batches(lengths, batch_size, seed=seed)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert sum(len(b) < batch_size for b in batches) <= 1


def test_shuffled_batches():
    a = shuffled_batches(10, 3, seed=1)
    assert a == shuffled_batches(10, 3, seed=1) and a != shuffled_batches(10, 3, seed=2)
    assert sorted(i for b in a for i in b) == list(range(10)) and [len(b) for b in a] == [3, 3, 3, 1]
    assert [len(b) for b in shuffled_batches(10, 3, seed=1, drop_last=True)] == [3, 3, 3]
    assert shuffled_batches(9, 3, seed=1, drop_last=True) == shuffled_batches(9, 3, seed=1)
    with pytest.raises(ConfigError):
        shuffled_batches(10, 0, seed=1)


def test_collate_shared_exact_layout():
    """One row per pair, prompt | chosen | rejected; rejected positions restart after the prompt; the
    first chosen and the first rejected token are both predicted by the last prompt position."""
    from poise.data import SharedPairBatch, collate_shared

    batch = collate_shared(PAIRS, PAD)
    assert isinstance(batch, SharedPairBatch) and batch.num_pairs == 2 and batch.num_rows == 4
    assert batch.input_ids.tolist() == [
        [1, 10, 11, 20, 21, 2, 30, 2, 0],
        [1, 12, 22, 2, 31, 32, 33, 34, 2],
    ]
    assert batch.segments.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, -1], [0, 0, 1, 1, 2, 2, 2, 2, 2]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 3, 4, 0], [0, 1, 2, 3, 2, 3, 4, 5, 6]]
    assert batch.attention_mask.tolist() == [[1] * 8 + [0], [1] * 9]
    # output layout: chosen rows then rejected rows, left-aligned
    assert batch.completion_mask.tolist() == [
        [True, True, True, False, False],
        [True, True, False, False, False],
        [True, True, False, False, False],
        [True, True, True, True, True],
    ]
    w = 9  # flat index = row * 9 + position
    assert batch.pred_index.tolist() == [
        2, 3, 4,  # pair 1 chosen: predicted by positions 2 (last prompt), 3, 4
        w + 1, w + 2,  # pair 2 chosen
        2, 6,  # pair 1 rejected: the last prompt position, then its own first token
        w + 1, w + 4, w + 5, w + 6, w + 7,  # pair 2 rejected
    ]
    assert batch.targets.tolist() == [20, 21, 2, 22, 2, 30, 2, 31, 32, 33, 34, 2]
    # the predicting positions hold the tokens just before each chosen target
    flat = batch.input_ids.reshape(-1)
    assert flat[batch.pred_index].tolist()[:3] == [11, 20, 21]


def test_collate_shared_needs_a_prompt():
    from poise.data import collate_shared

    with pytest.raises(ValueError, match="non-empty prompt"):
        collate_shared([TokenizedPair((), (5, 2), (6, 2), "f", 1)], PAD)
