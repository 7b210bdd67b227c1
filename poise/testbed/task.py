"""A synthetic instruction task with a known gold reward, small enough for a tiny model on a CPU.

Prompts ask for one of four operations on a short list of animal names::

    prompt   "reverse: cat owl yak ="        gold answer " yak owl cat"
    prompt   "sort: pig ant hen ="           gold answer " ant hen pig"
    prompt   "copy: eel fox ="               gold answer " eel fox"
    prompt   "count: bee dog dog jay ="      gold answer " four"

The prompt ends with ``" ="`` and every response starts with a space, so the prompt is a prefix of
prompt + response and every word, in the prompt or the response, is the same single token
(``" cat"``) of the testbed tokenizer (:func:`build_testbed_tokenizer`). A prompt has at most 9
tokens (BOS, operation, ``:``, up to five words, ``" ="``) and a gold answer at most 6 (five words
and EOS).

The vocabulary is closed: 16 animal names (:data:`WORDS`), four operations (:data:`OPS`) and the
number words two..five (:data:`NUMBERS`).

Gold reward (:func:`gold_reward`): one minus the word-level Levenshtein distance between the response
and the gold answer, divided by the longer of the two lengths::

    gold_reward = 1 - lev(words(response), words(gold)) / max(len(words(response)), len(words(gold)))

It is 1 exactly for the gold answer, 0 for an empty response or one sharing no aligned word, and
gives partial credit for partial answers. Extra words always cost: appending k words to the gold
answer of n words gives n / (n + k). A labeller biased towards length can therefore be exploited by
padding, which the gold reward never rewards.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

#: The 16 content words (distinct first letters, so that sorting is plain alphabetical order).
WORDS = (
    "ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen",
    "jay", "owl", "pig", "ram", "seal", "toad", "wolf", "yak",
)
#: The operations, in the order :func:`make_prompts` cycles through them.
OPS = ("copy", "reverse", "sort", "count")
#: Answers of ``count`` for lists of 2..5 words.
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}
MIN_WORDS, MAX_WORDS = 2, 5
SEPARATOR = " ="

#: Testbed model size: 2 layers of width 64 learn the task in about a minute of SFT on 2 CPU cores.
MODEL_SIZE = {"hidden_size": 64, "num_layers": 2, "num_heads": 4}
TOKENIZER_VOCAB_SIZE = 384


def format_prompt(op: str, words: list[str] | tuple[str, ...]) -> str:
    """``format_prompt("sort", ["pig", "ant"]) == "sort: pig ant ="``."""
    if op not in OPS:
        raise ValueError(f"unknown operation {op!r}; expected one of {OPS}")
    return f"{op}: {' '.join(words)}{SEPARATOR}"


def parse_prompt(prompt: str) -> tuple[str, list[str]]:
    """The operation and word list of a testbed prompt (the inverse of :func:`format_prompt`)."""
    head, sep, rest = prompt.partition(":")
    if not sep or head not in OPS or not rest.endswith(SEPARATOR):
        raise ValueError(f"not a testbed prompt: {prompt!r} (expected e.g. 'sort: pig ant =')")
    return head, rest[: -len(SEPARATOR)].split()


def answer_words(op: str, words: list[str]) -> list[str]:
    """The gold answer of an operation on a word list, as a list of words."""
    if op == "copy":
        return list(words)
    if op == "reverse":
        return list(reversed(words))
    if op == "sort":
        return sorted(words)
    if op == "count":
        return [NUMBERS[len(words)]]
    raise ValueError(f"unknown operation {op!r}")


def as_response(words: list[str]) -> str:
    """Words joined as a response: ``["ant", "hen"] -> " ant hen"`` (leading space, see module doc)."""
    return "".join(" " + word for word in words)


def gold_answer(prompt: str) -> str:
    """The unique gold response of a prompt, e.g. ``gold_answer("sort: pig ant =") == " ant pig"``."""
    return as_response(answer_words(*parse_prompt(prompt)))


def edit_distance(a: list[str], b: list[str]) -> int:
    """Levenshtein distance between two word sequences (unit cost insert / delete / substitute)."""
    previous = list(range(len(b) + 1))
    for i, word_a in enumerate(a, start=1):
        current = [i]
        for j, word_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word_a != word_b)))
        previous = current
    return previous[-1]


def word_reward(response_words: list[str], gold_words: list[str]) -> float:
    """``1 - lev(response, gold) / max(len(response), len(gold))`` on word lists (1.0 if both empty)."""
    longest = max(len(response_words), len(gold_words))
    if longest == 0:
        return 1.0
    return 1.0 - edit_distance(response_words, gold_words) / longest


def gold_reward(prompt: str, response: str) -> float:
    """Gold reward in [0, 1] of any response to a testbed prompt (definition in the module doc).

    The response is split on whitespace; leading/trailing whitespace and line breaks do not matter,
    every other character does (``"cat."`` is not ``"cat"``).
    """
    return word_reward(response.split(), answer_words(*parse_prompt(prompt)))


def random_words(rng: random.Random, n: int | None = None) -> list[str]:
    """``n`` words drawn with replacement (a length in ``[MIN_WORDS, MAX_WORDS]`` when None)."""
    n = rng.randint(MIN_WORDS, MAX_WORDS) if n is None else n
    return [rng.choice(WORDS) for _ in range(n)]


def make_prompts(n: int, seed: int = 0, *, ops: tuple[str, ...] = OPS) -> list[str]:
    """``n`` distinct prompts, deterministic for ``seed``.

    Operations cycle through ``ops`` (so each gets n / len(ops) prompts, in a seeded random order);
    the word lists have 2..5 words drawn uniformly with replacement.
    """
    capacity = len(ops) * sum(len(WORDS) ** k for k in range(MIN_WORDS, MAX_WORDS + 1))
    if n > capacity:
        raise ValueError(f"only {capacity} distinct prompts exist for operations {ops}, asked for {n}")
    rng = random.Random(f"poise-testbed-prompts:{seed}")
    schedule = [ops[i % len(ops)] for i in range(n)]
    rng.shuffle(schedule)
    prompts: list[str] = []
    seen: set[str] = set()
    for op in schedule:
        prompt = format_prompt(op, random_words(rng))
        while prompt in seen:
            prompt = format_prompt(op, random_words(rng))
        seen.add(prompt)
        prompts.append(prompt)
    return prompts


def vocabulary_corpus() -> list[str]:
    """Texts to train the testbed tokenizer on: every word, operation and number many times."""
    rng = random.Random("poise-testbed-corpus")
    every_word = " ".join((*OPS, *NUMBERS.values(), *WORDS))
    texts = [f"{every_word} {every_word}"] * 50
    for _ in range(400):
        prompt = format_prompt(rng.choice(OPS), random_words(rng))
        texts.append(prompt + gold_answer(prompt))
    return texts


def build_testbed_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny BPE tokenizer trained on :func:`vocabulary_corpus` (each word one token)."""
    from poise.model.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(vocabulary_corpus(), vocab_size=TOKENIZER_VOCAB_SIZE)


def build_testbed_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, **size: int) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama for the testbed (sizes :data:`MODEL_SIZE`, overridable)."""
    from poise.model.tiny import build_tiny_model

    return build_tiny_model(tokenizer, seed=seed, **{**MODEL_SIZE, **size})


def save_testbed_model(folder: str, *, seed: int = 0, **size: int) -> str:
    """Write a fresh testbed model and its tokenizer to ``folder`` (what ``TrainConfig.model`` reads)."""
    tokenizer = build_testbed_tokenizer()
    model = build_testbed_model(tokenizer, seed, **size)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
