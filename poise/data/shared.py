"""The shared-prefix layout: one row per pair, ``[prompt | chosen | rejected]``, the prompt run once.

The usual layout (:func:`poise.data.collate_pairs`) stacks 2B rows, prompt + chosen and prompt +
rejected, so every prompt token goes through the model twice. Here pair ``i`` is one row::

    tokens     p0 p1 p2 | c0 c1 c2 c3 | r0 r1 | pad pad
    segment     0  0  0 |  1  1  1  1 |  2  2 |  -1  -1
    position    0  1  2 |  3  4  5  6 |  3  4 |   0   0

and the attention mask (built by :func:`poise.model.shared_mask.attention_mask_4d` from ``segments``) lets a
token see the earlier tokens of the prompt and of its own segment only: the rejected tokens never see
the chosen ones, and their position ids restart where the prompt ends. Each completion token is then
computed exactly as in its own row ``prompt + completion``: the log-probs agree with the usual layout up
to float rounding (a test and :func:`poise.model.shared_prefix.verify_shared_prefix` hold them to that).

Packing: a row of the batch's width (its longest pair) holds as many pairs as fit (first fit, longest
first), each pair in its own block: its segment ids are ``3 * slot + kind`` (kind 0 prompt, 1 chosen,
2 rejected; ``slot`` the pair's place in the row), a token sees only tokens of its own pair, and the
positions restart at 0 for every pair. Two pairs of 100 and 140 tokens in a batch whose longest pair
has 250 share one row instead of padding two: on variable-length data most of the padding goes
(tested: the log-probs equal the unpacked layout's to float rounding). The rows never get longer, so
attention costs no more per row and there are fewer rows.

The first chosen and the first rejected token are both predicted by the last prompt position, so the
predicting position of a token is not simply ``t - 1``: ``pred_index`` lists it for every scored token.
The scored log-probs come back in the usual (2B, W) pair layout (chosen rows first), left-aligned, with
``completion_mask`` True on the first ``|y|`` columns, so everything above the engine is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from poise.data.collate import SequenceBatch
from poise.data.tokenize import TokenizedPair

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, -1


@dataclass
class SharedPairBatch(SequenceBatch):
    """B pairs in B rows of length L (see the module docstring).

    Attributes:
        input_ids: (B, L) long, ``prompt + chosen + rejected``, right-padded.
        attention_mask: (B, L) long, 1 on real tokens (the 2D padding mask; the engine builds the 4D one).
        completion_mask: (2B, W) bool, the layout of the *output*: row i chosen of pair i, row B + i its
            rejected, True on the first |y| columns.
        position_ids: (B, L) long, restarting at the prompt length for the rejected segment.
        segments: (R, L) int16, ``3 * slot + kind`` (kind PROMPT / CHOSEN / REJECTED of the pair in place
            ``slot`` of its row), PAD (-1) on padding; R <= B rows when pairs are packed.
        pred_index: (K,) long, flat index into (B * L) of the position predicting each scored token, in
            the row-major order of ``completion_mask``.
        targets: (K,) long, the scored token ids, in the same order.
    """

    position_ids: Tensor
    segments: Tensor
    pred_index: Tensor
    targets: Tensor

    @property
    def num_rows(self) -> int:
        return self.completion_mask.shape[0]

    @property
    def num_pairs(self) -> int:
        return self.completion_mask.shape[0] // 2


def _pack(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Pairs (by index) into rows of ``width`` tokens: first fit, longest first; each row's pairs in
    index order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return sorted((sorted(r) for r in rows), key=lambda r: r[0])  # rows in the order of their first pair


def collate_shared(
    pairs: Sequence[TokenizedPair], pad_token_id: int, *, pad_to_multiple_of: int | None = None,
    pack: bool = True,
) -> SharedPairBatch:
    """Pairs into a :class:`SharedPairBatch`: one row per pair, or (``pack``) as many pairs per row as
    fit the width of the longest."""
    if not pairs:
        raise ValueError("collate_shared needs at least one pair")
    for pair in pairs:
        if not pair.prompt_ids:
            raise ValueError("the shared-prefix layout needs a non-empty prompt (its last token predicts "
                             "the first completion token); use pair_layout: separate")
    sizes = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    width = max(sizes)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    rows = _pack(sizes, width) if pack else [[i] for i in range(len(pairs))]
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    seg = torch.full((len(rows), width), PAD, dtype=torch.int16)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    chosen_pred: list[list[int]] = [[] for _ in pairs]
    rejected_pred: list[list[int]] = [[] for _ in pairs]
    for r, members in enumerate(rows):
        start = 0
        for slot, i in enumerate(members):
            pair = pairs[i]
            n_p, n_c, n_r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
            n = n_p + n_c + n_r
            ids[r, start:start + n] = torch.tensor(list(pair.prompt_ids) + list(pair.chosen_ids)
                                                   + list(pair.rejected_ids), dtype=torch.long)
            seg[r, start:start + n] = torch.tensor([3 * slot + PROMPT] * n_p + [3 * slot + CHOSEN] * n_c
                                                   + [3 * slot + REJECTED] * n_r, dtype=torch.int16)
            pos[r, start:start + n] = torch.tensor(list(range(n_p + n_c)) + list(range(n_p, n_p + n_r)))
            base = r * width + start
            # chosen token j sits at n_p + j and is predicted by n_p + j - 1
            chosen_pred[i] = [base + n_p + j - 1 for j in range(n_c)]
            # rejected token j sits at n_p + n_c + j; token 0 is predicted by the last prompt position
            rejected_pred[i] = [base + (n_p - 1 if j == 0 else n_p + n_c + j - 1) for j in range(n_r)]
            start += n
    chosen_tgt = [list(p.chosen_ids) for p in pairs]
    rejected_tgt = [list(p.rejected_ids) for p in pairs]
    lengths = [len(t) for t in chosen_tgt + rejected_tgt]
    out_width = max(lengths)
    completion_mask = torch.arange(out_width)[None, :] < torch.tensor(lengths)[:, None]
    pred = [k for row in chosen_pred + rejected_pred for k in row]
    tgt = [t for row in chosen_tgt + rejected_tgt for t in row]
    return SharedPairBatch(
        input_ids=ids,
        attention_mask=(seg != PAD).long(),
        completion_mask=completion_mask,
        position_ids=pos,
        segments=seg,
        pred_index=torch.tensor(pred, dtype=torch.long),
        targets=torch.tensor(tgt, dtype=torch.long),
    )
