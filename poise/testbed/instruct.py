"""The testbed task asked in plain English, for a real instruct model, and its rule-based gold reward.

A testbed prompt (:mod:`poise.testbed.task`) becomes an instruction (:func:`instruction`)::

    "reverse: cat owl yak ="   ->  "Reverse the order of these words: cat owl yak. Reply with the words only."
    "count: bee dog dog ="     ->  "How many words are in this list: bee dog dog? Reply with a number only."

and, with a short system message (:data:`SYSTEM`; SmolLM2's template otherwise adds a long one), is
rendered with the tokenizer's chat template (:func:`render_prompt`) into the prompt string that the
model continues and that the preference rows hold.

Gold reward (:func:`gold_reward`) of a free-form reply. The reply is read as words
(:func:`reply_words`): lower-cased, every run of characters other than ``a-z`` and ``0-9`` is a
separator (punctuation, quotes, list markers, line breaks), and numbers written in digits become words
(``"4"`` -> ``"four"``, 0 to 20), so that ``"4"``, ``"Four."`` and ``"four"`` all answer a count. The
reward is the testbed's word-level Levenshtein reward against the gold answer's words::

    gold_reward = 1 - lev(reply_words, gold_words) / max(len(reply_words), len(gold_words))

so ``"Yak, owl, cat."`` scores 1 on the example above, ``"yak owl"`` 2/3 and a preamble costs one
word each: ``"The reversed list is: yak, owl, cat."`` scores 1 - 4/7 = 3/7. The instruction asks
for the words only; the reward holds the model to that.

The functions take either the instruction itself or any text that contains it (a rendered chat
prompt), so a run's held-out prompts can be scored as they are stored.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from poise.model.generate import generate
from poise.testbed.evaluate import score as _score
from poise.testbed.evaluate import win_rate as _win_rate
from poise.testbed.task import answer_words, parse_prompt, word_reward

#: The default system message: short, so that prompts stay short (SmolLM2's own default is 20 tokens).
SYSTEM = "Answer briefly."

#: One instruction per testbed operation; ``{words}`` is the word list, separated by spaces.
INSTRUCTIONS = {
    "copy": "Repeat these words exactly: {words}. Reply with the words only.",
    "reverse": "Reverse the order of these words: {words}. Reply with the words only.",
    "sort": "Sort these words in alphabetical order: {words}. Reply with the words only.",
    "count": "How many words are in this list: {words}? Reply with a number only.",
}

#: Numbers in digits read as words by :func:`reply_words`.
DIGIT_WORDS = dict(enumerate((
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")))
_DIGITS = {str(k): v for k, v in DIGIT_WORDS.items()}
_WORD_LIST = r"([a-z]+(?: [a-z]+)*)"
_PATTERNS = {op: re.compile(re.escape(text).replace(re.escape("{words}"), _WORD_LIST))
             for op, text in INSTRUCTIONS.items()}


def instruction(prompt: str) -> str:
    """The plain-English instruction of a testbed prompt (``"sort: pig ant ="`` -> ``"Sort these ..."``)."""
    op, words = parse_prompt(prompt)
    return INSTRUCTIONS[op].format(words=" ".join(words))


def parse_instruction(text: str) -> tuple[str, list[str]]:
    """The operation and word list of the instruction in ``text`` (the instruction, or a chat
    rendering holding it); the last instruction wins when there are several. ValueError if none."""
    found = [(m.start(), op, m.group(1).split()) for op, pattern in _PATTERNS.items()
             for m in pattern.finditer(text)]
    if not found:
        raise ValueError(f"no testbed instruction in {text[-120:]!r} (expected e.g. {INSTRUCTIONS['copy']!r})")
    _, op, words = max(found)
    return op, words


def chat_messages(prompt: str, system: str | None = SYSTEM) -> list[dict[str, str]]:
    """The conversation of a testbed prompt: the system message (unless None) and the instruction."""
    user = [{"role": "user", "content": instruction(prompt)}]
    return ([{"role": "system", "content": system}] if system is not None else []) + user


def render_prompt(tokenizer: Any, prompt: str, system: str | None = SYSTEM) -> str:
    """The prompt string of a testbed prompt: its conversation through the tokenizer's chat template,
    ending with the assistant's turn (``add_generation_prompt=True``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; the instruct rendering needs one")
    return tokenizer.apply_chat_template(chat_messages(prompt, system), tokenize=False, add_generation_prompt=True)


def reply_words(reply: str) -> list[str]:
    """A free-form reply as words: lower case, split on anything but ``a-z0-9``, digits 0-20 as words."""
    return [_DIGITS.get(w, w) for w in re.findall(r"[a-z0-9]+", reply.lower())]


def gold_words(text: str) -> list[str]:
    """The gold answer's words for the instruction in ``text``."""
    return answer_words(*parse_instruction(text))


def gold_answer(text: str) -> str:
    """The gold reply, e.g. ``"yak owl cat"`` for "Reverse the order of these words: cat owl yak. ..."."""
    return " ".join(gold_words(text))


def gold_reward(text: str, reply: str) -> float:
    """Gold reward in [0, 1] of a free-form reply to the instruction in ``text`` (module doc)."""
    return word_reward(reply_words(reply), gold_words(text))


def score(prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
    """:func:`poise.testbed.evaluate.score` under this module's gold reward (length: whitespace words)."""
    return _score(prompts, responses, reward=gold_reward, answer=gold_answer)


def win_rate(prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]) -> dict[str, float]:
    """:func:`poise.testbed.evaluate.win_rate` (raw and length-controlled) under this module's gold reward."""
    return _win_rate(prompts, responses_a, responses_b, reward=gold_reward)


# -- preference pairs from the model's own samples ---------------------------------------------------


def sample_replies(model: Any, tokenizer: Any, texts: Sequence[str], *, samples: int, temperature: float,
                   max_new_tokens: int, seed: int = 0, batch_size: int = 32) -> list[list[str]]:
    """``samples`` replies per prompt string, drawn at ``temperature`` (seeded; each prompt repeated
    ``samples`` times in a row) by :func:`poise.model.generate.generate`, which tokenizes the rendered
    prompts as the data pipeline does (:func:`poise.model.generate.prompt_ids`), decoded without special
    tokens and stripped of surrounding whitespace."""
    repeated = [t for t in texts for _ in range(samples)]
    out = generate(model, tokenizer, repeated, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                   batch_size=batch_size)
    replies = [reply.strip() for reply in out]
    return [replies[k * samples:(k + 1) * samples] for k in range(len(texts))]


def pair_row(text: str, replies: Sequence[str]) -> dict[str, Any] | None:
    """The preference row of one prompt string and its sampled replies: chosen = the reply of highest
    gold reward, rejected = the lowest (:func:`poise.testbed.pairs.best_and_worst`); None when the
    distinct non-empty replies are fewer than two or all have the same gold reward."""
    from poise.testbed.pairs import best_and_worst

    picked = best_and_worst(replies, lambda r: gold_reward(text, r))
    if picked is None:
        return None
    chosen, rejected = picked
    return {"prompt": text, "chosen": chosen, "rejected": rejected,
            "chosen_gold": gold_reward(text, chosen), "rejected_gold": gold_reward(text, rejected)}


def self_pairs(model: Any, tokenizer: Any, prompts: Sequence[str], *, system: str | None = SYSTEM,
               samples_per_prompt: int = 4, temperature: float = 0.7, max_new_tokens: int = 24, seed: int = 0,
               batch_size: int = 32) -> list[dict[str, Any]]:
    """On-policy preference rows for testbed prompts, ranked by the gold reward.

    Each prompt is rendered (:func:`render_prompt`), ``samples_per_prompt`` replies are sampled from
    ``model`` (:func:`sample_replies`), and :func:`pair_row` picks the best and the worst; prompts
    whose replies all tie are left out, so the rows may be fewer than the prompts. Rows are
    ``{"prompt" (the rendered string), "chosen", "rejected", "chosen_gold", "rejected_gold", "task"
    (the testbed prompt)}``; the trainer reads the first three.
    """
    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be at least 2, got {samples_per_prompt}")
    texts = [render_prompt(tokenizer, p, system) for p in prompts]
    replies = sample_replies(model, tokenizer, texts, samples=samples_per_prompt, temperature=temperature,
                             max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    rows = []
    for prompt, text, group in zip(prompts, texts, replies):
        row = pair_row(text, group)
        if row is not None:
            rows.append({**row, "task": prompt})
    return rows


def probe_rows(tokenizer: Any, prompts: Sequence[str], *, seed: int = 0,
               system: str | None = SYSTEM) -> list[dict[str, str]]:
    """Squeezing probes: each rendered prompt with a well-formed reply to ANOTHER instruction
    (:func:`poise.testbed.pairs.probe_rows`; its gold reward here is below 1)."""
    from poise.testbed.pairs import probe_rows as testbed_probes

    return [{"prompt": render_prompt(tokenizer, r["prompt"], system), "response": r["response"].strip()}
            for r in testbed_probes(prompts, seed=seed)]


def prompt_rows(prompts: Sequence[str], system: str | None = SYSTEM) -> list[dict[str, Any]]:
    """Prompt-file rows of testbed prompts for ``poise iterate`` and ``poise eval --prompts-file``: the
    conversation (:func:`chat_messages`: the system message and the instruction) as ``messages``, which
    any model's chat template renders, and the testbed prompt as ``task``."""
    return [{"messages": chat_messages(p, system), "task": p} for p in prompts]


def write_prompt_files(folder: str | Path, *, train: int = 256, eval: int = 64, seed: int = 0) -> dict[str, Path]:
    """``folder/instruct-train.jsonl`` and ``folder/instruct-eval.jsonl``: the instruct testbed's prompts
    (:func:`poise.testbed.pairs.split_prompts`, disjoint) as :func:`prompt_rows`; the files shipped in
    ``configs/iterate/`` are ``write_prompt_files("configs/iterate")``."""
    from poise.testbed.pairs import split_prompts, write_jsonl

    split = split_prompts(train, eval, 0, seed=seed)
    folder = Path(folder)
    return {"train": write_jsonl(prompt_rows(split.train), folder / "instruct-train.jsonl"),
            "eval": write_jsonl(prompt_rows(split.eval), folder / "instruct-eval.jsonl")}
