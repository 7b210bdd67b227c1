"""Rewards for evaluation: any scorer of (prompt, response) -> float, named by one string; and pairwise
judges, which say which of two responses to a prompt is better.

=================================  ==============================================================
``testbed``, ``instruct``          the built-in gold rewards (poise.testbed, poise.testbed.instruct)
``module:function``                a Python callable ``function(prompt, response) -> float`` in an
                                   importable module (``mypkg.rewards:helpful``)
``path/to/file.py:function``       the same, from a file
``rm:FOLDER`` (or a FOLDER whose   a local Hugging Face sequence-classification reward model, scored
config is a ...ForSequence-        in batches on the given device: the prompt and the response as the
Classification)                    chat template renders them when the tokenizer has one, else the
                                   prompt text followed by the response; the reward is the logit of
                                   the model's single label (or the last label)
``judge:module:function``,         a pairwise judge: a Python callable
``judge:path/file.py:function``    ``function(prompt, response_a, response_b) -> float``, the
                                   probability that response a is better, in [0, 1]
``judge:FOLDER``                   a pairwise judge: a local Hugging Face causal LM (loaded by
                                   poise.model.load, never ``trust_remote_code``, no network) asked
                                   :data:`JUDGE_PROMPT`; P(A) is read from its next-token logits
                                   (:func:`letter_ids`), in batches on the given device
=================================  ==============================================================

:func:`score_all` scores a list of (prompt, response) with a pointwise reward and follows
``on_bad_row``: a reward that raises or returns something that is not a finite number on a row is a
:class:`DataError` naming the row (``error``), or that row is left out and counted (``skip``).

**Judges.** Every comparison is judged in both orders and averaged, against the judge's position bias:
``p(a, b) = (P(a over b) + 1 - P(b over a)) / 2``, computed so that ``p(a, b) + p(b, a) == 1``
exactly. A judge that raises, or returns something that is not a finite number in [0, 1], in either
order fails that comparison (``error``: a DataError naming the row; ``skip``: left out and counted).
Both consumers work with either kind of reward:

* :func:`score_groups` (``poise iterate``, K replies per prompt): one score per reply. Pointwise, it
  is :func:`score_all`; with a judge, a reply's score is its mean preference ``p(reply, other)`` over
  the K - 1 other replies to the same prompt (a round robin, each comparison in both orders).
* :func:`compare_sides` (``poise eval --prompts-file``): per-prompt outcomes of side a against side b
  in [0, 1]: pointwise 1 / 0.5 / 0 as the rewards compare (with both score lists); with a judge,
  ``p(a, b)`` (soft).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from poise.errors import ConfigError, DataError

BUILT_IN = ("testbed", "instruct")
JUDGE_PREFIX = "judge:"

#: What ``judge:FOLDER`` asks the judge model (``str.format`` fields ``prompt``, ``response_a``,
#: ``response_b``), as the user's message of its chat template with the assistant's turn opened
#: (``add_generation_prompt``), or, for a tokenizer without a chat template, this text followed by
#: :data:`JUDGE_ANSWER_CUE`. The next token is the verdict: A or B.
JUDGE_PROMPT = (
    "Which of the two responses below better answers the prompt? Judge helpfulness, correctness and "
    "clarity; ignore the order in which the responses are shown.\n\n"
    "[Prompt]\n{prompt}\n\n"
    "[Response A]\n{response_a}\n\n"
    "[Response B]\n{response_b}\n\n"
    "Answer with a single letter: A if Response A is better, B if Response B is better."
)
#: Appended to :data:`JUDGE_PROMPT` when the judge's tokenizer has no chat template.
JUDGE_ANSWER_CUE = "\n\nThe better response is:"

ACCEPTED = ("Give 'testbed' or 'instruct' (built in), 'module:function' or 'path/file.py:function' (a function "
            "(prompt, response) -> float), 'rm:FOLDER' (a local sequence-classification reward model), "
            "'judge:module:function' or 'judge:path/file.py:function' (a pairwise judge: a function "
            "(prompt, response_a, response_b) -> the probability that a is better, in [0, 1]), or 'judge:FOLDER' "
            "(a local causal LM asked which response is better).")


@dataclass
class Reward:
    """A named reward; ``batch(prompts, responses)`` scores many at once (a reward model's batches)."""

    name: str
    one: Callable[[str, str], float] | None = None
    many: Callable[[Sequence[str], Sequence[str]], list[float]] | None = None

    def batch(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Any]:
        if self.many is not None:
            return list(self.many(prompts, responses))
        return [self.one(p, r) for p, r in zip(prompts, responses)]


@dataclass
class Judge:
    """A named pairwise judge; ``batch(prompts, a, b)`` gives P(a_i is better than b_i) in the order shown
    (one order: :func:`compare_sides` and :func:`score_groups` ask both and average)."""

    name: str
    one: Callable[[str, str, str], float] | None = None
    many: Callable[[Sequence[str], Sequence[str], Sequence[str]], list[Any]] | None = None

    def batch(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[Any]:
        if self.many is not None:
            return list(self.many(prompts, a, b))
        return [self.one(p, x, y) for p, x, y in zip(prompts, a, b)]


def load_reward(spec: str, *, device: Any = None, batch_size: int = 16) -> Reward | Judge:
    """The reward or judge ``spec`` names (module docstring); a ConfigError that says what is accepted
    otherwise."""
    if spec.startswith(JUDGE_PREFIX):
        return _load_judge(spec, device, batch_size)
    if spec in BUILT_IN:
        if spec == "testbed":
            from poise.testbed.task import gold_reward
        else:
            from poise.testbed.instruct import gold_reward
        return Reward(spec, one=gold_reward)
    folder = Path(spec.removeprefix("rm:")).expanduser()
    if spec.startswith("rm:") or (folder.is_dir() and _is_classifier(folder)):
        return _reward_model(folder, spec, device, batch_size)
    if ":" in spec:
        return Reward(spec, one=_callable(spec))
    raise ConfigError(f"reward {spec!r}: not a reward. {ACCEPTED}")


def _load_judge(spec: str, device: Any, batch_size: int) -> Judge:
    target = spec[len(JUDGE_PREFIX):]
    folder = Path(target).expanduser()
    if target and folder.is_dir():
        return _judge_model(folder, spec, device, batch_size)
    if ":" in target and target.rpartition(":")[0]:
        return Judge(spec, one=_callable(target, spec))
    if not target:
        raise ConfigError(f"reward {spec!r}: no judge after 'judge:'. {ACCEPTED}")
    raise ConfigError(f"reward {spec!r}: {folder} is not a folder, and not a 'module:function' or "
                      f"'path/file.py:function'. {ACCEPTED}")


def _callable(target: str, spec: str | None = None) -> Callable[..., float]:
    spec = spec or target
    where, _, name = target.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser()
            if not path.is_file():
                raise ConfigError(f"reward {spec!r}: the file {path} does not exist.")
            module_spec = importlib.util.spec_from_file_location(f"poise_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as e:  # ImportError, a SyntaxError in the user's file, what it raises on import
        raise ConfigError(f"reward {spec!r}: importing {where} failed ({type(e).__name__}: {e}).") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        found = ", ".join(n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_"))
        raise ConfigError(f"reward {spec!r}: {where} has no function {name!r} (its functions: {found or 'none'}).")
    return fn


def _is_classifier(folder: Path) -> bool:
    try:
        archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def _reward_model(folder: Path, spec: str, device: Any, batch_size: int) -> Reward:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise ConfigError(f"reward {spec!r}: {folder} is not a model folder (no config.json).")
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    except Exception as e:
        raise ConfigError(f"reward {spec!r}: could not load a sequence-classification model from {folder} "
                          f"({type(e).__name__}: {e}).") from None
    device = torch.device(device or "cpu")
    model.to(device)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id

    def text(prompt: str, response: str) -> str:
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template([{"role": "user", "content": prompt},
                                            {"role": "assistant", "content": response}], tokenize=False)
        return prompt + response

    @torch.no_grad()
    def many(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(prompts), batch_size):
            texts = [text(p, r) for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
            enc = tok(texts, return_tensors="pt", padding=True, truncation=True).to(device)
            logits = model(**enc).logits.float()
            out += logits[:, -1].tolist()
        return out

    return Reward(spec, many=many)


def score_all(reward: Reward, prompts: Sequence[str], responses: Sequence[str], *, on_bad_row: str = "error",
              where: Sequence[str] | None = None) -> tuple[list[float | None], int]:
    """Scores of every (prompt, response), None where a row was skipped; and how many were skipped.
    ``where[i]`` names row i in messages (default: "row i"). A pointwise reward only: a judge scores
    with :func:`score_groups` or :func:`compare_sides`."""
    if isinstance(reward, Judge):
        raise ConfigError(f"reward {reward.name!r} is a pairwise judge: it compares two responses and cannot score "
                          "one alone (use score_groups or compare_sides).")
    names = list(where) if where is not None else [f"row {i}" for i in range(len(prompts))]
    try:
        values = reward.batch(prompts, responses)
        if len(values) != len(prompts):
            raise DataError(f"reward {reward.name!r} returned {len(values)} scores for {len(prompts)} responses.")
    except DataError:
        raise
    except Exception:  # score one by one to find the row
        values = []
        for p, r in zip(prompts, responses):
            try:
                values.append(reward.batch([p], [r])[0])
            except Exception as e:
                values.append(_Failure(f"{type(e).__name__}: {e}"))
    out: list[float | None] = []
    skipped = 0
    for v, name in zip(values, names):
        problem = v.why if isinstance(v, _Failure) else _not_a_number(v)
        if problem is None:
            out.append(float(v))
            continue
        if on_bad_row != "skip":
            raise DataError(f"{name}: the reward {reward.name!r} failed ({problem}). Fix the reward, or set "
                            "on_bad_row: skip to leave such rows out of the comparison.")
        out.append(None)
        skipped += 1
    return out, skipped


@dataclass
class _Failure:
    why: str


def _not_a_number(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
        return f"it returned {v!r}, not a number"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return f"it returned {v!r}, not a number"
    return None if math.isfinite(f) else f"it returned {f}"


def _not_a_probability(v: Any) -> str | None:
    if isinstance(v, _Failure):
        return v.why
    problem = _not_a_number(v)
    if problem is not None:
        return problem
    return None if 0.0 <= float(v) <= 1.0 else f"it returned {float(v)!r}, not a probability in [0, 1]"


# -- pairwise judges ------------------------------------------------------------------------------------


def letter_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The token ids whose next-token logits give a judge model's verdict: for A, the first token id of
    ``" A"`` and of ``"A"`` (encoded without special tokens), for B those of ``" B"`` and ``"B"``. A
    variant (with the space, or without) is used only when the first token of both letters is the letter
    itself (it decodes to "A", resp. "B", spaces aside): a tokenizer that splits the space off gives the
    space token first, which says nothing. An id that repeats within a letter counts once. A ConfigError
    when no variant is left."""
    a_ids: list[int] = []
    b_ids: list[int] = []
    for a, b in ((" A", " B"), ("A", "B")):
        ia = tokenizer.encode(a, add_special_tokens=False)[:1]
        ib = tokenizer.encode(b, add_special_tokens=False)[:1]
        if ia and ib and tokenizer.decode(ia).strip() == "A" and tokenizer.decode(ib).strip() == "B":
            a_ids += [i for i in ia if i not in a_ids]
            b_ids += [i for i in ib if i not in b_ids]
    if not a_ids or set(a_ids) & set(b_ids):
        raise ConfigError("the judge's tokenizer has no separate tokens for the letters A and B (the first token of "
                          "' A' or 'A' against ' B' or 'B'), so its verdict cannot be read; use another judge model.")
    return a_ids, b_ids


def judge_text(tokenizer: Any, prompt: str, response_a: str, response_b: str) -> str:
    """What a judge model reads: :data:`JUDGE_PROMPT` as the user's message of its chat template, the
    assistant's turn opened; without a chat template, the text followed by :data:`JUDGE_ANSWER_CUE`."""
    content = JUDGE_PROMPT.format(prompt=prompt, response_a=response_a, response_b=response_b)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return content + JUDGE_ANSWER_CUE


def _judge_model(folder: Path, spec: str, device: Any, batch_size: int) -> Judge:
    import inspect

    import torch
    from tqdm.auto import tqdm

    from poise.model.generate import prompt_ids
    from poise.model.load import load_model, load_tokenizer

    if not (folder / "config.json").is_file():
        raise ConfigError(f"reward {spec!r}: {folder} is not a model folder (no config.json).")
    key = f"reward {spec!r}"
    device = torch.device(device or "cpu")
    tok = load_tokenizer(str(folder), key=key)  # a local folder: no network, trust_remote_code off
    model = load_model(str(folder), device=device, key=key).to(device).eval()
    try:
        a_ids, b_ids = letter_ids(tok)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    letters = torch.tensor(a_ids + b_ids, device=device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    context = getattr(model.config, "max_position_embeddings", None)
    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    positions = "position_ids" in params

    @torch.no_grad()
    def many(prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[Any]:
        ids = [prompt_ids(tok, judge_text(tok, p, x, y)) for p, x, y in zip(prompts, a, b)]
        out: list[Any] = [None] * len(ids)
        todo = []
        for i, row in enumerate(ids):
            if context and len(row) > context:
                out[i] = _Failure(f"the judge's input is {len(row)} tokens, more than its context of {context}")
            else:
                todo.append(i)
        # batches by length (little padding); the order depends on the rows alone, not on their order in
        # the call, so the same comparisons asked in another order get the same numbers
        todo.sort(key=lambda i: (len(ids[i]), ids[i]))
        bar = tqdm(total=len(todo), desc="judge", unit="comparison", dynamic_ncols=True, leave=False,
                   disable=len(todo) <= batch_size)
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            width = max(len(ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):  # left padding: every row's last position predicts its verdict
                input_ids[r, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[r, width - len(ids[i]):] = 1
            kw = dict(extra)
            if positions:
                kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kw).logits[:, -1]
            probs = torch.softmax(logits.double()[:, letters], dim=-1)[:, :len(a_ids)].sum(-1)
            for r, i in enumerate(chunk):
                out[i] = probs[r].item()
            bar.update(len(chunk))
        bar.close()
        return out

    return Judge(spec, many=many)


def _batch_or_rows(call: Callable[..., list[Any]], name: str, columns: Sequence[Sequence[str]]) -> list[Any]:
    """``call(*columns)``; when it raises, row by row, a failing row becoming a _Failure."""
    n = len(columns[0])
    try:
        values = call(*columns)
        if len(values) != n:
            raise DataError(f"the judge {name!r} returned {len(values)} values for {n} comparisons.")
    except DataError:
        raise
    except Exception:  # one by one to find the row
        values = []
        for row in zip(*columns):
            try:
                values.append(call(*([v] for v in row))[0])
            except Exception as e:
                values.append(_Failure(f"{type(e).__name__}: {e}"))
    return values


def _both_orders(p_ab: float, p_ba: float) -> float:
    """``(p_ab + 1 - p_ba) / 2``, computed so that ``_both_orders(x, y) + _both_orders(y, x) == 1`` and
    ``_both_orders(y, x) == 1 - _both_orders(x, y)`` exactly (the larger side is in [0.5, 1], where 1 - q
    is exact)."""
    if p_ab >= p_ba:
        return 0.5 + (p_ab - p_ba) / 2
    return 1.0 - (0.5 + (p_ba - p_ab) / 2)


def judge_both_orders(judge: Judge, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], *,
                      on_bad_row: str = "error", where: Sequence[str] | None = None) -> list[float | None]:
    """``p(a_i, b_i) = (P(a_i over b_i) + 1 - P(b_i over a_i)) / 2`` for every row, the judge asked in
    both orders (each distinct ordered comparison once, all in one batch); None for a row skipped
    (``on_bad_row: skip``) where the judge raised or gave no probability in [0, 1] in either order, a
    DataError naming the row (``where[i]``, default "row i") otherwise."""
    names = list(where) if where is not None else [f"row {i}" for i in range(len(prompts))]
    index: dict[tuple[str, str, str], int] = {}
    rows: list[tuple[str, str, str]] = []

    def row(key: tuple[str, str, str]) -> int:
        if key not in index:
            index[key] = len(rows)
            rows.append(key)
        return index[key]

    pairs = [(row((p, x, y)), row((p, y, x))) for p, x, y in zip(prompts, a, b)]
    values = _batch_or_rows(judge.batch, judge.name, list(zip(*rows))) if rows else []
    out: list[float | None] = []
    for (i, j), name in zip(pairs, names):
        problem = _not_a_probability(values[i])
        if problem is None and (problem := _not_a_probability(values[j])) is not None:
            problem += ", with the two responses swapped"
        if problem is None:
            out.append(_both_orders(float(values[i]), float(values[j])))
            continue
        if on_bad_row != "skip":
            raise DataError(f"{name}: the judge {judge.name!r} failed ({problem}). Fix the judge, or set "
                            "on_bad_row: skip to leave such rows out of the comparison.")
        out.append(None)
    return out


class SideComparison(NamedTuple):
    """:func:`compare_sides`: per-prompt outcomes of side a against side b (None: skipped), the rewards
    of both sides (a pointwise reward; None for a judge) and how many prompts were skipped."""

    outcomes: list[float | None]
    scores_a: list[float | None] | None
    scores_b: list[float | None] | None
    skipped: int


def compare_sides(reward: Reward | Judge, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], *,
                  on_bad_row: str = "error", where: Sequence[str] | None = None) -> SideComparison:
    """Per prompt, how response a_i fares against b_i, in [0, 1]. A pointwise reward scores both sides
    (:func:`score_all`): 1 when a's reward is higher, 0.5 on a tie, 0 when lower. A judge gives its
    preference for a, asked in both orders (:func:`judge_both_orders`). A prompt skipped on either side
    is None and counted."""
    if not len(prompts) == len(a) == len(b):
        raise ValueError(f"{len(prompts)} prompts, {len(a)} responses a and {len(b)} responses b")
    if isinstance(reward, Judge):
        outcomes = judge_both_orders(reward, prompts, a, b, on_bad_row=on_bad_row, where=where)
        return SideComparison(outcomes, None, None, sum(o is None for o in outcomes))
    ga, _ = score_all(reward, prompts, a, on_bad_row=on_bad_row, where=where)
    gb, _ = score_all(reward, prompts, b, on_bad_row=on_bad_row, where=where)
    outcomes = [None if x is None or y is None else 1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(ga, gb)]
    return SideComparison(outcomes, ga, gb, sum(o is None for o in outcomes))


def score_groups(reward: Reward | Judge, prompts: Sequence[str], replies: Sequence[str], k: int, *,
                 on_bad_row: str = "error", where: Sequence[str] | None = None) -> tuple[list[float | None], int]:
    """One score per reply for groups of ``k`` replies to the same prompt (``prompts[i]`` is reply i's
    prompt, so both lists hold ``n * k`` items, group g at ``g*k:(g+1)*k``); and how many replies were
    skipped. A pointwise reward: :func:`score_all`. A judge: a round robin, reply i's score is the mean of
    ``p(i, j)`` (:func:`judge_both_orders`) over the other replies j of its group, so a group's scores add
    up to k / 2. A comparison the judge fails on stops with a DataError naming the row and the two replies
    (``on_bad_row: error``) or is left out (``skip``): a reply's score is then its mean over the
    comparisons that were judged, None (and counted) when none was."""
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    if k < 1 or len(replies) % k:
        raise ValueError(f"{len(replies)} replies are not groups of k = {k}")
    if not isinstance(reward, Judge):
        return score_all(reward, prompts, replies, on_bad_row=on_bad_row, where=where)
    if k < 2:
        raise ConfigError(f"reward {reward.name!r} is a pairwise judge: it needs at least 2 replies per prompt to "
                          f"compare, got {k}.")
    names = list(where) if where is not None else [f"row {i}" for i in range(len(prompts))]
    items: list[tuple[int, int]] = []
    for g in range(0, len(replies), k):
        if any(p != prompts[g] for p in prompts[g:g + k]):
            raise ValueError(f"the replies {g}..{g + k - 1} are one group but their prompts differ")
        items += [(g + i, g + j) for i in range(k) for j in range(i + 1, k)]
    prefs = judge_both_orders(reward, [prompts[i] for i, _ in items], [replies[i] for i, _ in items],
                              [replies[j] for _, j in items], on_bad_row=on_bad_row,
                              where=[f"{names[i]} (replies {i % k} and {j % k} of its {k})" for i, j in items])
    total = [0.0] * len(replies)
    count = [0] * len(replies)
    for (i, j), p in zip(items, prefs):
        if p is not None:
            total[i] += p
            total[j] += 1.0 - p  # p(j, i), exactly
            count[i] += 1
            count[j] += 1
    scores = [t / c if c else None for t, c in zip(total, count)]
    return scores, sum(s is None for s in scores)
