"""Rewards for evaluation: any scorer of (prompt, response) -> float, named by one string.

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
=================================  ==============================================================

:func:`score_all` scores a list of (prompt, response) and follows ``on_bad_row``: a reward that raises
or returns something that is not a finite number on a row is a :class:`DataError` naming the row
(``error``), or that row is left out and counted (``skip``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poise.errors import ConfigError, DataError

BUILT_IN = ("testbed", "instruct")


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


def load_reward(spec: str, *, device: Any = None, batch_size: int = 16) -> Reward:
    """The reward ``spec`` names (module docstring); a ConfigError that says what is accepted otherwise."""
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
    raise ConfigError(f"reward {spec!r}: not a reward. Give 'testbed' or 'instruct' (built in), "
                      "'module:function' or 'path/file.py:function' (a function (prompt, response) -> float), or "
                      "'rm:FOLDER' (a local sequence-classification reward model).")


def _callable(spec: str) -> Callable[[str, str], float]:
    where, _, name = spec.rpartition(":")
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
    ``where[i]`` names row i in messages (default: "row i")."""
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
