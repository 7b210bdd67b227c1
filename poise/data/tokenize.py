"""Tokenize preference rows into prompt / chosen / rejected token ids.

Tokens:
    The prompt and each completion are tokenized separately (row formats and chat templates: see
    :mod:`poise.data.formats`). The prompt starts with the tokenizer's BOS token when the tokenizer
    adds one by default and the text (e.g. a chat rendering) does not already begin with it; no other
    special token is added to the prompt. Completions are tokenized without special tokens and end
    with the EOS token, which is appended unless the completion already ends with it.

Truncation (the same sides as TRL's DPO trainer):
    1. A prompt longer than ``max_prompt_length`` keeps its **end**, the tokens nearest the answer
       (``prompt_truncation="keep_end"``); a leading BOS token is kept in front. With
       ``prompt_truncation="error"`` such a row is a bad row instead.
    2. If the (cut) prompt alone has ``max_length`` tokens or more, the row is a bad row
       ("prompt too long"): no completion token would fit.
    3. Each completion keeps its **start**: it is cut to ``max_length - len(prompt)`` tokens (losing
       its EOS when cut).
    ``None`` switches a limit off.

Bad rows:
    A missing field, a field of the wrong type or malformed messages, an empty or whitespace-only
    completion, chosen identical to rejected (also when truncation makes them identical), a prompt
    that is too long, a completion empty after truncation (a completion that tokenizes to no
    tokens), or a chat template that fails on the row. Each is reported as a :class:`BadRow` with
    its file, row (or line) number and field. ``on_bad_row="error"`` raises a
    :class:`~poise.errors.DataError` for the first one; ``"skip"`` drops them and lists them in
    :attr:`TokenizedData.skipped`. If no row is usable a DataError is raised either way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from poise.data.formats import IDENTICAL, BadRowError, RowText, check_one_format, completion_text, row_text
from poise.data.load import Row
from poise.errors import ConfigError, DataError

PROMPT_TOO_LONG = "prompt too long"
EMPTY_AFTER_TRUNCATION = "empty completion after truncation"
PROMPT_TRUNCATION = ("keep_end", "error")
ON_BAD_ROW = ("error", "skip")
_CHUNK = 1024

Ids = tuple[int, ...]


@dataclass(frozen=True)
class TokenizedPair:
    """One tokenized preference pair; the completions continue ``prompt_ids``."""

    prompt_ids: Ids
    chosen_ids: Ids
    rejected_ids: Ids
    source: str
    index: int

    @property
    def length(self) -> int:
        """Tokens in the longer of prompt+chosen and prompt+rejected."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def tokens(self) -> int:
        """prompt + chosen + rejected: the width of the pair's row in the shared layout, and what the
        training batches are grouped by in either layout (so both layouts see the same batches, and the
        shared rows pad little: 0.5% against 8.7% when grouped by ``length``, on the benchmark's data)."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass(frozen=True)
class BadRow:
    """A row that was rejected: where it is, which field, and why.

    ``reason`` is a short category (``"empty completion"``) used for counting; ``detail`` adds
    specifics; ``unit`` is ``"line"`` or ``"row"`` as in :class:`~poise.data.load.Row`.
    """

    source: str
    index: int
    field: str
    reason: str
    detail: str = ""
    unit: str = "row"

    def message(self) -> str:
        """``"prefs.jsonl, row 12, field 'chosen': empty completion."``"""
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.source}, {self.unit} {self.index}, field '{self.field}': {self.reason}{detail}."


@dataclass
class TokenizedData:
    """The usable pairs, in row order, and the rows that were skipped."""

    pairs: list[TokenizedPair]
    skipped: list[BadRow] = field(default_factory=list)
    #: kept pairs whose chosen or rejected completion was cut to fit ``max_length``
    truncated: int = 0
    #: kept pairs whose prompt lost its start to fit ``max_prompt_length``
    prompt_truncated: int = 0
    #: tokens of the longest row before truncation (prompt + the longer completion)
    longest: int = 0

    def __len__(self) -> int:
        return len(self.pairs)

    def summary(self) -> str:
        """``"kept 98 of 100 rows; skipped 2 (1 identical chosen and rejected, 1 prompt too long)"``."""
        total = len(self.pairs) + len(self.skipped)
        text = f"kept {len(self.pairs)} of {total} rows"
        if self.skipped:
            counts = Counter(bad.reason for bad in self.skipped)
            parts = ", ".join(f"{count} {reason}" for reason, count in counts.most_common())
            text += f"; skipped {len(self.skipped)} ({parts})"
        cuts = [f"{n} {what}" for n, what in ((self.truncated, "with completions cut to max_length"),
                                             (self.prompt_truncated, "with prompts cut to max_prompt_length")) if n]
        if cuts:
            text += f"; {', '.join(cuts)}"
        return text


@dataclass(frozen=True)
class _Limits:
    max_length: int | None
    max_prompt_length: int | None
    prompt_truncation: str
    bos_id: int | None


def tokenize_rows(
    rows: Sequence[Row],
    tokenizer: Any,
    *,
    max_length: int | None = 1024,
    max_prompt_length: int | None = 512,
    prompt_truncation: str = "keep_end",
    on_bad_row: str = "error",
) -> TokenizedData:
    """Tokenize and truncate preference rows (rules in the module docstring).

    Args:
        rows: rows from :func:`~poise.data.load.load_rows`.
        tokenizer: a Hugging Face tokenizer (a chat template is needed for conversational rows).
        max_length: most tokens in prompt + completion; None for no limit.
        max_prompt_length: most prompt tokens; None for no limit.
        prompt_truncation: ``"keep_end"`` or ``"error"``.
        on_bad_row: ``"error"`` or ``"skip"``.

    Raises:
        DataError: a bad row with ``on_bad_row="error"``, no usable row, or conversational data
            whose chat template cannot be used.
        ConfigError: an option out of range.
    """
    _check_options(max_length, max_prompt_length, prompt_truncation, on_bad_row)
    limits = _Limits(max_length, max_prompt_length, prompt_truncation, _bos_to_add(tokenizer))
    check_one_format(rows)
    explicit = {row.source for row in rows if "prompt" in row.data}
    bad: list[tuple[int, BadRow]] = []
    texts: list[tuple[int, Row, RowText]] = []
    for position, row in enumerate(rows):
        try:
            text = row_text(row.data, tokenizer, explicit_prompt=row.source in explicit, where=row.where)
        except BadRowError as err:
            bad.append((position, _bad_row(row, err)))
        else:
            texts.append((position, row, text))
    pairs = []
    cut = {"completion": 0, "prompt": 0, "longest": 0}
    for (position, row, _), ids in zip(texts, _encode([text for _, _, text in texts], tokenizer, limits)):
        try:
            pair = TokenizedPair(*_truncate(*ids, limits), row.source, row.index)
        except BadRowError as err:
            bad.append((position, _bad_row(row, err)))
            continue
        pairs.append(pair)
        prompt, chosen, rejected = ids
        cut["completion"] += len(pair.chosen_ids) < len(chosen) or len(pair.rejected_ids) < len(rejected)
        cut["prompt"] += len(pair.prompt_ids) < len(prompt)
        cut["longest"] = max(cut["longest"], len(prompt) + max(len(chosen), len(rejected)))
    skipped = [bad_row for _, bad_row in sorted(bad, key=lambda item: item[0])]
    _raise_for_bad_rows(skipped, len(rows), len(pairs), on_bad_row)
    return TokenizedData(pairs, skipped, cut["completion"], cut["prompt"], cut["longest"])


def _check_options(
    max_length: int | None, max_prompt_length: int | None, prompt_truncation: str, on_bad_row: str
) -> None:
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(
                f"{name} must be a positive number of tokens or null for no limit, got {value!r}."
            )
    if prompt_truncation not in PROMPT_TRUNCATION:
        raise ConfigError(
            f"prompt_truncation must be 'keep_end' (cut the prompt's start) or 'error' (reject the row), "
            f"got {prompt_truncation!r}."
        )
    if on_bad_row not in ON_BAD_ROW:
        raise ConfigError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}.")


def _bos_to_add(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer prepends it by default, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    probe = tokenizer("a")["input_ids"]
    return bos if probe and probe[0] == bos else None


def _encode(
    texts: list[RowText], tokenizer: Any, limits: _Limits
) -> list[tuple[list[int], list[int], list[int]]]:
    """Batch-tokenize prompts and completions; add BOS to prompts and EOS to completions."""
    eos = getattr(tokenizer, "eos_token_id", None)
    encoded = []
    for start in range(0, len(texts), _CHUNK):
        chunk = texts[start : start + _CHUNK]
        columns = [
            tokenizer([getattr(text, name) for text in chunk], add_special_tokens=False)["input_ids"]
            for name in ("prompt", "chosen", "rejected")
        ]
        for prompt, chosen, rejected in zip(*columns):
            if limits.bos_id is not None and prompt[:1] != [limits.bos_id]:
                prompt = [limits.bos_id, *prompt]
            encoded.append((prompt, _with_eos(chosen, eos), _with_eos(rejected, eos)))
    return encoded


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids if eos is None or ids[-1:] == [eos] else [*ids, eos]


def _truncate(
    prompt: list[int], chosen: list[int], rejected: list[int], limits: _Limits
) -> tuple[Ids, Ids, Ids]:
    prompt, (chosen, rejected) = _cut(prompt, {"chosen": chosen, "rejected": rejected}, limits)
    if chosen == rejected:
        raise BadRowError(
            "rejected", IDENTICAL, f"the same after truncation to max_length {limits.max_length}"
        )
    return tuple(prompt), tuple(chosen), tuple(rejected)


def _cut(prompt: list[int], completions: dict[str, list[int]], limits: _Limits) -> tuple[Ids, list[Ids]]:
    """The prompt cut at its start, the completions at their end (rules in the module docstring)."""
    cap = limits.max_prompt_length
    if cap is not None and len(prompt) > cap:
        if limits.prompt_truncation == "error":
            raise BadRowError("prompt", PROMPT_TOO_LONG, f"{len(prompt)} tokens, max_prompt_length is {cap}")
        keep_bos = limits.bos_id is not None and prompt[:1] == [limits.bos_id] and cap > 1
        prompt = [prompt[0], *prompt[len(prompt) - cap + 1 :]] if keep_bos else prompt[len(prompt) - cap :]
    out = list(completions.values())
    if limits.max_length is not None:
        if len(prompt) >= limits.max_length:
            raise BadRowError(
                "prompt",
                PROMPT_TOO_LONG,
                f"{len(prompt)} tokens leave no room for a completion within max_length {limits.max_length}; "
                f"set max_prompt_length below max_length",
            )
        room = limits.max_length - len(prompt)
        out = [ids[:room] for ids in out]
    for name, ids in zip(completions, out):
        if not ids:
            raise BadRowError(name, EMPTY_AFTER_TRUNCATION, "the completion has no tokens")
    return tuple(prompt), [tuple(ids) for ids in out]


def tokenize_completions(
    rows: Sequence[Row],
    tokenizer: Any,
    *,
    max_length: int | None = 1024,
    max_prompt_length: int | None = 512,
    chat: bool = False,
    on_bad_row: str = "error",
) -> list[tuple[Ids, Ids]]:
    """``(prompt_ids, response_ids)`` of prompt/response rows (a probe file), tokenized and truncated as
    training rows are. Formats: see :func:`~poise.data.formats.completion_text`; ``chat`` renders plain
    strings with the chat template (when the training rows are conversational). Bad rows raise a
    DataError naming the row (``on_bad_row="error"``) or are dropped; no usable row is an error."""
    _check_options(max_length, max_prompt_length, "keep_end", on_bad_row)
    limits = _Limits(max_length, max_prompt_length, "keep_end", _bos_to_add(tokenizer))
    check_one_format(rows)
    eos = getattr(tokenizer, "eos_token_id", None)
    out: list[tuple[Ids, Ids]] = []
    skipped: list[BadRow] = []
    for row in rows:
        try:
            prompt_text, response_text = completion_text(row.data, tokenizer, chat=chat, where=row.where)
            prompt, response = tokenizer([prompt_text, response_text], add_special_tokens=False)["input_ids"]
            if limits.bos_id is not None and prompt[:1] != [limits.bos_id]:
                prompt = [limits.bos_id, *prompt]
            prompt, (response,) = _cut(prompt, {"completion": _with_eos(response, eos)}, limits)
        except BadRowError as err:
            skipped.append(_bad_row(row, err))
            continue
        out.append((prompt, response))
    _raise_for_bad_rows(skipped, len(rows), len(out), on_bad_row)
    return out


def _bad_row(row: Row, err: BadRowError) -> BadRow:
    return BadRow(row.source, row.index, err.field, err.reason, err.detail, row.unit)


def _raise_for_bad_rows(skipped: list[BadRow], total: int, kept: int, on_bad_row: str) -> None:
    if total == 0:
        raise DataError("no rows to tokenize. Check that the data source holds preference rows.")
    if skipped and on_bad_row == "error":
        more = len(skipped) - 1
        others = (
            f" {more} other row{'s' if more > 1 else ''} also {'have' if more > 1 else 'has'} problems."
            if more
            else ""
        )
        raise DataError(
            f"{skipped[0].message()} Fix the row or set on_bad_row: skip to drop such rows.{others}"
        )
    if kept == 0:
        summary = TokenizedData([], skipped).summary()
        raise DataError(
            f"none of the rows can be used ({summary}). First problem: {skipped[0].message()} "
            f"Check the data format and the column mapping."
        )


def sft_sequences(tokenized: TokenizedData, extended: bool = False) -> list[tuple[Ids, Ids]]:
    """``(prompt_ids, completion_ids)`` sequences for an SFT stage.

    Each pair gives ``(prompt, chosen)``; with ``extended=True`` also ``(prompt, rejected)``, right
    after it (the "extended SFT" of arXiv:2407.10490, which trains on both responses).
    """
    sequences = []
    for pair in tokenized.pairs:
        sequences.append((pair.prompt_ids, pair.chosen_ids))
        if extended:
            sequences.append((pair.prompt_ids, pair.rejected_ids))
    return sequences


def tokenize_sft_rows(
    rows: Sequence[Row], tokenizer: Any, *, extended: bool = False, **options: Any
) -> list[tuple[Ids, Ids]]:
    """:func:`tokenize_rows` (same ``options``) followed by :func:`sft_sequences`."""
    return sft_sequences(tokenize_rows(rows, tokenizer, **options), extended)
