"""Turn a preference row into three texts: prompt, chosen completion, rejected completion.

Four row formats are understood (the TRL preference formats):

* **standard**: ``prompt``, ``chosen`` and ``rejected`` are strings; the completions are used as
  they are (start them with a space or newline if the prompt does not end with one).
* **standard, implicit prompt**: only ``chosen`` and ``rejected`` strings, each holding prompt and
  answer. The prompt is their longest common prefix, cut back so that no word is split: to the
  start of the last run of whitespace in the prefix, unless both strings go on with whitespace
  right after the prefix (then it already ends with a whole word). Trailing whitespace stays with
  the completions, which therefore begin with it (TRL does the same with a single space).
  ``"Q: 2+2? A: 4"`` / ``"Q: 2+2? A: 5"`` gives prompt ``"Q: 2+2? A:"`` and completions ``" 4"`` /
  ``" 5"``; ``"The cat"`` / ``"The car"`` gives ``"The"`` and ``" cat"`` / ``" car"``; ``"Hi there"``
  / ``"Hi\tyou"`` gives ``"Hi"``. Without a shared word the prompt is empty.
* **conversational**: ``prompt`` is a list of messages ``{"role": ..., "content": ...}`` and
  ``chosen``/``rejected`` are lists of messages starting with an ``assistant`` message.
* **conversational, implicit prompt**: only ``chosen`` and ``rejected``, each a full conversation;
  the prompt is the longest run of identical leading messages.

Whether a source has explicit prompts is decided per source file: if any of its rows has a
``prompt`` field, every row of it needs one.

Conversational rows are rendered with the tokenizer's chat template: the prompt with
``add_generation_prompt=True``, and each completion as the rendering of prompt + completion minus
the prompt's rendering. A template whose prompt rendering is not a prefix of the full rendering is
rejected with a :class:`~poise.errors.DataError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from poise.errors import DataError

MISSING = "missing field"
NOT_A_STRING = "not a string"
MALFORMED = "malformed messages"
EMPTY = "empty completion"
IDENTICAL = "identical chosen and rejected"
TEMPLATE_FAILED = "chat template failed"


class BadRowError(Exception):
    """A row that cannot be used; caught by the tokenizer and turned into a BadRow."""

    def __init__(self, field: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason, self.detail = field, reason, detail


@dataclass(frozen=True)
class RowText:
    """A row reduced to text: the completions are continuations of ``prompt``."""

    prompt: str
    chosen: str
    rejected: str


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Implicit prompt of two strings: ``(prompt, chosen_rest, rejected_rest)``.

    The prompt is the longest common prefix cut back to a word boundary (see the module docstring).
    """
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    cut = shared
    ends_a_word = chosen[shared : shared + 1].isspace() and rejected[shared : shared + 1].isspace()
    while cut > 0 and not ends_a_word and not chosen[cut - 1].isspace():
        cut -= 1
    while cut > 0 and chosen[cut - 1].isspace():
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def split_shared_messages(chosen: list, rejected: list) -> tuple[list, list, list]:
    """Implicit prompt of two conversations: ``(shared leading messages, chosen_rest, rejected_rest)``."""
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def row_text(data: dict, tokenizer: Any, *, explicit_prompt: bool, where: str) -> RowText:
    """Render one row to text, or raise :class:`BadRowError` naming the faulty field."""
    chosen, rejected = _get(data, "chosen"), _get(data, "rejected")
    prompt = _get(data, "prompt") if explicit_prompt else None
    conversational = (
        _is_conversation(prompt, "prompt") if explicit_prompt else _is_conversation(chosen, "chosen")
    )
    if not conversational:
        _require_strings(chosen=chosen, rejected=rejected)
        if not explicit_prompt:
            if chosen == rejected:
                raise BadRowError("rejected", IDENTICAL)
            prompt, chosen, rejected = split_shared_prefix(chosen, rejected)
        _check_completions(chosen, rejected, chosen.strip(), rejected.strip())
        return RowText(prompt, chosen, rejected)
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        _check_messages(value, name)
    if not explicit_prompt:
        if chosen == rejected:
            raise BadRowError("rejected", IDENTICAL)
        prompt, chosen, rejected = split_shared_messages(chosen, rejected)
    return _render_conversation(prompt, chosen, rejected, tokenizer, where)


def _get(data: dict, name: str) -> Any:
    value = data.get(name)
    if value is None:
        raise BadRowError(name, MISSING)
    return value


def _is_conversation(value: Any, name: str) -> bool:
    if isinstance(value, str):
        return False
    if isinstance(value, list):
        _check_messages(value, name, allow_empty=True)
        return True
    raise BadRowError(
        name, NOT_A_STRING, f"expected a string or a list of messages, got {type(value).__name__}"
    )


def _require_strings(**values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, str):
            raise BadRowError(
                name,
                NOT_A_STRING,
                f"got {type(value).__name__}; in the standard format every field is a string",
            )


def _check_messages(value: Any, name: str, *, allow_empty: bool = False) -> None:
    if not isinstance(value, list):
        raise BadRowError(name, MALFORMED, f"got {type(value).__name__}; expected a list of messages")
    if not value and not allow_empty:
        raise BadRowError(name, EMPTY, "no messages")
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            raise BadRowError(name, MALFORMED, f"message {number} is {type(message).__name__}, not an object")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise BadRowError(name, MALFORMED, f"message {number} has no string '{key}'")


def _check_completions(chosen: Any, rejected: Any, chosen_key: Any, rejected_key: Any) -> None:
    if not chosen_key:
        raise BadRowError("chosen", EMPTY)
    if not rejected_key:
        raise BadRowError("rejected", EMPTY)
    if chosen == rejected:
        raise BadRowError("rejected", IDENTICAL)


def _content(messages: list) -> str:
    return "".join(message["content"] for message in messages).strip()


def _render_conversation(prompt: list, chosen: list, rejected: list, tokenizer: Any, where: str) -> RowText:
    _check_completions(chosen, rejected, _content(chosen), _content(rejected))
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[0]["role"] != "assistant":
            raise BadRowError(
                name,
                MALFORMED,
                f"the completion starts with a '{messages[0]['role']}' message, not 'assistant'",
            )
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"{where}: the data is conversational (lists of messages) but the tokenizer has no chat "
            f"template. Use the tokenizer of a chat/instruct model, set tokenizer.chat_template, or "
            f"convert the data to plain prompt/chosen/rejected strings."
        )
    prompt_text = _apply(tokenizer, prompt, "prompt", add_generation_prompt=True)
    completions = []
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        full = _apply(tokenizer, prompt + messages, name, add_generation_prompt=False)
        if not full.startswith(prompt_text):
            raise DataError(
                f"{where}, field '{name}': the chat template does not render the prompt as a prefix of "
                f"prompt + {name} (prompt renders as {prompt_text[-60:]!r}, the full conversation as "
                f"{full[: len(prompt_text) + 20][-80:]!r}), so the completion tokens cannot be separated. "
                f"Templates that rewrite earlier turns (for example dropping reasoning) cause this; use "
                f"a template without that behaviour or plain prompt/chosen/rejected strings."
            )
        completions.append(full[len(prompt_text) :])
    return RowText(prompt_text, completions[0], completions[1])


def _apply(tokenizer: Any, messages: list, name: str, *, add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # jinja's TemplateError and raise_exception() in templates
        raise BadRowError(name, TEMPLATE_FAILED, str(err)) from None
    return text


STANDARD, CONVERSATIONAL = "standard", "conversational"


def row_format(data: dict) -> str | None:
    """``"standard"`` (strings), ``"conversational"`` (lists of messages), or None when the row is too
    broken to say (it is reported as a bad row later)."""
    kinds = {STANDARD if isinstance(v, str) else CONVERSATIONAL
             for v in (data.get(k) for k in ("prompt", "chosen", "rejected", "completion", "response", "messages"))
             if isinstance(v, (str, list))}
    return kinds.pop() if len(kinds) == 1 else None


def check_one_format(rows: Any) -> str | None:
    """The format of each source's rows; a source mixing standard and conversational rows is a
    :class:`~poise.errors.DataError` naming the first row of each kind. Returns the format of the rows
    (None when no row says)."""
    first: dict[tuple[str, str], Any] = {}
    for row in rows:
        kind = row_format(row.data)
        if kind is not None:
            first.setdefault((row.source, kind), row)
    sources = {source for source, _ in first}
    for source in sources:
        if (source, STANDARD) in first and (source, CONVERSATIONAL) in first:
            a, b = first[(source, STANDARD)], first[(source, CONVERSATIONAL)]
            raise DataError(
                f"{source}: mixes standard rows (plain strings; first at {a.unit} {a.index}) and conversational "
                f"rows (lists of messages; first at {b.unit} {b.index}), which are tokenized differently (only "
                f"conversational rows get the chat template). Convert the file to one format: strings, or "
                f'messages ({{"prompt": [{{"role": "user", "content": ...}}], "chosen": [{{"role": "assistant", '
                f'"content": ...}}], ...}}).'
            )
    kinds = {kind for _, kind in first}
    return kinds.pop() if len(kinds) == 1 else None


def completion_text(data: dict, tokenizer: Any, *, chat: bool, where: str) -> tuple[str, str]:
    """A (prompt, response) row of a probe file, rendered as a training row would be: ``{prompt,
    completion}`` (or ``response``), ``{messages}`` (the last message the response, from the assistant),
    or a preference row ``{prompt, chosen, rejected}`` (the chosen response). Strings stay strings unless
    ``chat`` (the training rows are conversational): then the prompt is a user message and the response
    an assistant message, rendered with the chat template as the training rows are."""
    if "chosen" in data and "rejected" in data and not any(k in data for k in ("completion", "response")):
        text = row_text(data, tokenizer, explicit_prompt="prompt" in data, where=where)
        return text.prompt, text.chosen
    if "messages" in data and "prompt" not in data:
        prompt, response = _split_messages(data["messages"])
    else:
        name = "completion" if "completion" in data or "response" not in data else "response"
        prompt, response = _get(data, "prompt"), _get(data, name)
        if isinstance(prompt, str) and isinstance(response, str):
            if not response.strip():
                raise BadRowError(name, EMPTY)
            if not (chat and getattr(tokenizer, "chat_template", None)):
                return prompt, response
        prompt, response = _as_messages(prompt, "user"), _as_messages(response, "assistant")
        _check_messages(prompt, "prompt")
        _check_messages(response, name)
    return _render_completion(prompt, response, tokenizer, where)


def _split_messages(messages: Any) -> tuple[list, list]:
    _check_messages(messages, "messages")
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise BadRowError("messages", MALFORMED, "the last message must be the assistant's response, after at "
                                                 "least one message of the prompt")
    return messages[:-1], messages[-1:]


def _as_messages(value: Any, role: str) -> Any:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _render_completion(prompt: list, response: list, tokenizer: Any, where: str) -> tuple[str, str]:
    if not _content(response):
        raise BadRowError("completion", EMPTY)
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: the row is conversational (lists of messages) but the tokenizer has no chat "
                        "template. Use the tokenizer of a chat/instruct model, or plain prompt/completion strings.")
    prompt_text = _apply(tokenizer, prompt, "prompt", add_generation_prompt=True)
    full = _apply(tokenizer, prompt + response, "completion", add_generation_prompt=False)
    if not full.startswith(prompt_text):
        raise BadRowError("completion", TEMPLATE_FAILED, "the chat template does not render the prompt as a "
                                                         "prefix of prompt + response")
    return prompt_text, full[len(prompt_text):]
