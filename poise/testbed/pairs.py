"""Preference data for the testbed task: SFT rows, off-policy and on-policy pairs, probes, splits.

Every function here is deterministic for its ``seed``: the randomness of a prompt's row comes from
a ``random.Random`` seeded with the seed and the prompt, so a prompt's row does not depend on which
other prompts are in the list.

The labeller. Pairs are labelled by a simulated annotator that prefers response ``a`` over ``b`` iff

    gold_reward(a) + length_bias * len(a)  >  gold_reward(b) + length_bias * len(b)

(lengths in words), and then flips its label with probability ``label_noise``. With
``length_bias > 0`` it likes long responses, which the gold reward penalises (see
:mod:`poise.testbed.task`); with ``label_noise > 0`` some chosen responses are worse than the
rejected ones. Pair rows carry ``chosen_gold``, ``rejected_gold`` and ``flipped`` next to
``prompt``, ``chosen`` and ``rejected``; the trainer reads only the last three.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poise.model.generate import generate
from poise.testbed.task import (
    NUMBERS,
    OPS,
    WORDS,
    answer_words,
    as_response,
    gold_answer,
    gold_reward,
    make_prompts,
    parse_prompt,
    random_words,
)

#: Off-policy responses: how many random edits (drop / substitute / insert / swap) a response gets,
#: drawn uniformly from this tuple, ...
OFFPOLICY_EDITS = (0, 1, 1, 2, 2, 3)
#: ... the probability that 1..MAX_EXTRA extra words are appended (a long, padded response), ...
OFFPOLICY_EXTRA_P = 0.35
MAX_EXTRA = 4
#: ... and how many times the second response is redrawn when it ties with or equals the first.
MAX_REDRAWS = 20
_TIE = 1e-9


def _rng(kind: str, seed: int, prompt: str) -> random.Random:
    return random.Random(f"poise-testbed-{kind}:{seed}:{prompt}")


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as JSON Lines (parent folders are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSON Lines file written by :func:`write_jsonl`."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# -- corruption ------------------------------------------------------------------------------------


def corrupt(words: list[str], rng: random.Random, *, edits: int, extra: int = 0, op: str = "copy") -> list[str]:
    """Apply ``edits`` random edits to ``words``, then append ``extra`` random words.

    An edit is one of: drop a word, substitute a word, insert a word, swap two adjacent words (swaps
    need two words, drops leave at least one). Substitutes are number words when ``op`` is
    ``count`` (a wrong count) and animal names otherwise. The result is never empty.
    """
    out = list(words)
    pool = tuple(NUMBERS.values()) if op == "count" else WORDS
    for _ in range(edits):
        kinds = ["substitute", "insert"] + (["drop", "swap"] if len(out) >= 2 else [])
        kind, i = rng.choice(kinds), rng.randrange(max(len(out), 1))
        if kind == "drop":
            del out[i]
        elif kind == "substitute" and out:
            out[i] = rng.choice([w for w in pool if w != out[i]])
        elif kind == "swap":
            i = min(i, len(out) - 2)
            out[i], out[i + 1] = out[i + 1], out[i]
        else:
            out.insert(rng.randrange(len(out) + 1), rng.choice(WORDS))
    return out + random_words(rng, extra)


def _offpolicy_response(prompt: str, rng: random.Random) -> str:
    op, words = parse_prompt(prompt)
    extra = rng.randint(1, MAX_EXTRA) if rng.random() < OFFPOLICY_EXTRA_P else 0
    return as_response(corrupt(answer_words(op, words), rng, edits=rng.choice(OFFPOLICY_EDITS),
                               extra=extra, op=op))


# -- SFT rows --------------------------------------------------------------------------------------


def sft_rows(prompts: Sequence[str], seed: int = 0) -> list[dict[str, str]]:
    """Rows for ``stage: sft``: chosen = the gold answer, rejected = it with 1-2 random edits."""
    rows = []
    for prompt in prompts:
        rng = _rng("sft", seed, prompt)
        op, words = parse_prompt(prompt)
        gold = answer_words(op, words)
        rejected = gold
        while rejected == gold:
            rejected = corrupt(gold, rng, edits=rng.randint(1, 2), op=op)
        rows.append({"prompt": prompt, "chosen": as_response(gold), "rejected": as_response(rejected)})
    return rows


# -- the labeller ----------------------------------------------------------------------------------


def labeller_score(prompt: str, response: str, length_bias: float = 0.0) -> float:
    """What the simulated labeller maximises: ``gold_reward + length_bias * words``."""
    return gold_reward(prompt, response) + length_bias * len(response.split())


def _pair_row(prompt: str, better: str, worse: str, rng: random.Random, label_noise: float) -> dict[str, Any]:
    flipped = rng.random() < label_noise
    chosen, rejected = (worse, better) if flipped else (better, worse)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "chosen_gold": gold_reward(prompt, chosen), "rejected_gold": gold_reward(prompt, rejected),
            "flipped": flipped}


def _check_labeller(label_noise: float, length_bias: float) -> None:
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    if length_bias < 0:
        raise ValueError(f"length_bias must be >= 0, got {length_bias}")


# -- off-policy pairs ------------------------------------------------------------------------------


def offpolicy_pairs(
    prompts: Sequence[str], *, seed: int = 0, label_noise: float = 0.0, length_bias: float = 0.0
) -> list[dict[str, Any]]:
    """Pairs of two responses written without any model, labelled by the labeller (module doc).

    Each response is the gold answer with ``e`` random edits (``e`` uniform over
    :data:`OFFPOLICY_EDITS`) and, with probability :data:`OFFPOLICY_EXTRA_P`, 1..4 extra words
    appended. The second response is redrawn (at most :data:`MAX_REDRAWS` times) while it equals
    the first or ties with it under the labeller; a prompt that still ties is left out, so the rows
    may be fewer than the prompts. These are Gate-DPO's off-policy pairs: the rejected responses
    are unlikely under the policy, where squeezing is strongest.
    """
    _check_labeller(label_noise, length_bias)
    rows = []
    for prompt in prompts:
        rng = _rng("offpolicy", seed, prompt)
        a = _offpolicy_response(prompt, rng)
        score_a = labeller_score(prompt, a, length_bias)
        for _ in range(MAX_REDRAWS):
            b = _offpolicy_response(prompt, rng)
            score_b = labeller_score(prompt, b, length_bias)
            if b != a and abs(score_a - score_b) > _TIE:
                better, worse = (a, b) if score_a > score_b else (b, a)
                rows.append(_pair_row(prompt, better, worse, rng, label_noise))
                break
    return rows


# -- on-policy pairs -------------------------------------------------------------------------------


def onpolicy_pairs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    samples_per_prompt: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 12,
    label_noise: float = 0.0,
    length_bias: float = 0.0,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Pairs sampled from ``model``: the labeller's best and worst of ``samples_per_prompt`` samples.

    Responses are sampled with :func:`poise.model.generate.generate` (seeded by ``seed``; each
    prompt repeated ``samples_per_prompt`` times in a row). Empty responses are dropped; a prompt
    whose remaining distinct samples are fewer than two, or whose best and worst tie under the
    labeller, is left out. The label is then flipped with probability ``label_noise``.
    """
    _check_labeller(label_noise, length_bias)
    if samples_per_prompt < 2:
        raise ValueError(f"samples_per_prompt must be at least 2, got {samples_per_prompt}")
    repeated = [prompt for prompt in prompts for _ in range(samples_per_prompt)]
    samples = generate(model, tokenizer, repeated, max_new_tokens=max_new_tokens, temperature=temperature,
                       seed=seed, batch_size=batch_size)
    rows = []
    for k, prompt in enumerate(prompts):
        group = samples[k * samples_per_prompt : (k + 1) * samples_per_prompt]
        picked = best_and_worst(group, lambda s, p=prompt: labeller_score(p, s, length_bias))
        if picked is not None:
            rows.append(_pair_row(prompt, *picked, _rng("onpolicy", seed, prompt), label_noise))
    return rows


def best_and_worst(samples: Sequence[str], key: Callable[[str], float]) -> tuple[str, str] | None:
    """``(best, worst)`` of the distinct non-empty ``samples`` under ``key``, or None.

    None when fewer than two distinct non-empty samples remain or when the best ties with the worst
    (within 1e-9). Among equal scores the order of ``samples`` decides: the worst is the first drawn
    of the lowest, the best the last drawn of the highest.
    """
    samples = list(samples)
    candidates = sorted({s for s in samples if s.strip()}, key=samples.index)
    if len(candidates) < 2:
        return None
    scored = sorted(candidates, key=key)
    worse, better = scored[0], scored[-1]
    if key(better) - key(worse) <= _TIE:
        return None
    return better, worse


# -- probes and splits -----------------------------------------------------------------------------


def probe_rows(prompts: Sequence[str], seed: int = 0) -> list[dict[str, str]]:
    """One probe response per prompt, unrelated to any training pair, to measure squeezing.

    The response is the well-formed gold answer of ANOTHER random instruction (random operation and
    words), fluent in the task's language but not an answer to this prompt (its gold reward here is
    below 1). Use held-out prompts (:func:`split_prompts`) so that no probe shares a training
    prompt. Rows are ``{"prompt", "response"}``.
    """
    rows = []
    for prompt in prompts:
        rng = _rng("probe", seed, prompt)
        response = gold_answer(prompt)
        while gold_reward(prompt, response) >= 1.0:
            response = as_response(answer_words(rng.choice(OPS), random_words(rng)))
        rows.append({"prompt": prompt, "response": response})
    return rows


@dataclass(frozen=True)
class PromptSplits:
    """Disjoint train / eval / probe prompt lists."""

    train: list[str]
    eval: list[str]
    probe: list[str]


def split_prompts(n_train: int, n_eval: int, n_probe: int, *, seed: int = 0) -> PromptSplits:
    """``n_train + n_eval + n_probe`` distinct prompts (:func:`make_prompts`) cut into three splits.

    No prompt is in two splits; the same seed and sizes give the same splits.
    """
    prompts = make_prompts(n_train + n_eval + n_probe, seed)
    return PromptSplits(prompts[:n_train], prompts[n_train : n_train + n_eval], prompts[n_train + n_eval :])
