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
        segments: (B, L) int8, PROMPT / CHOSEN / REJECTED / PAD.
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
        return self.input_ids.shape[0]


def _row(pair: TokenizedPair, width: int) -> tuple[list[int], list[int], list[int]]:
    p, c, r = list(pair.prompt_ids), list(pair.chosen_ids), list(pair.rejected_ids)
    n_p, n_c, n_r = len(p), len(c), len(r)
    pad = width - n_p - n_c - n_r
    seg = [PROMPT] * n_p + [CHOSEN] * n_c + [REJECTED] * n_r + [PAD] * pad
    pos = list(range(n_p + n_c)) + list(range(n_p, n_p + n_r)) + [0] * pad
    return p + c + r, seg, pos


def collate_shared(
    pairs: Sequence[TokenizedPair], pad_token_id: int, *, pad_to_multiple_of: int | None = None
) -> SharedPairBatch:
    """Pack B pairs into a :class:`SharedPairBatch` (one row per pair)."""
    if not pairs:
        raise ValueError("collate_shared needs at least one pair")
    for pair in pairs:
        if not pair.prompt_ids:
            raise ValueError("the shared-prefix layout needs a non-empty prompt (its last token predicts "
                             "the first completion token); use pair_layout: separate")
    width = max(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    b = len(pairs)
    ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    seg = torch.full((b, width), PAD, dtype=torch.int8)
    pos = torch.zeros((b, width), dtype=torch.long)
    chosen_pred, chosen_tgt, rejected_pred, rejected_tgt = [], [], [], []
    for i, pair in enumerate(pairs):
        tokens, segments, positions = _row(pair, width)
        n_p, n_c, n_r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        seg[i] = torch.tensor(segments, dtype=torch.int8)
        pos[i] = torch.tensor(positions, dtype=torch.long)
        base = i * width
        # chosen token j sits at n_p + j and is predicted by n_p + j - 1
        chosen_pred.append([base + n_p + j - 1 for j in range(n_c)])
        chosen_tgt.append(pair.chosen_ids)
        # rejected token j sits at n_p + n_c + j; token 0 is predicted by the last prompt position
        rejected_pred.append([base + (n_p - 1 if j == 0 else n_p + n_c + j - 1) for j in range(n_r)])
        rejected_tgt.append(pair.rejected_ids)
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
