"""``poise iterate ITERATE.yaml``: rounds of on-policy preference training.

An iterate file::

    output_dir: iter/dpo                   # every round's prompts, samples, rewards, pairs, run and model
    prompts_file: data/prompts.jsonl       # any data format: {prompt} text or messages, {messages}, preference rows
    reward: mymod.rewards:helpful          # testbed, instruct, module:function, file.py:function, rm:FOLDER
    rounds: 3
    samples_per_prompt: 4                  # K replies per prompt from the current policy
    temperature: 0.8
    max_new_tokens: 64
    prompts_per_round: 256                 # the first N prompts (all: omit)
    pairs: best_worst                      # best_worst | all | best_random
    reference: fixed                       # fixed: the starting model throughout; updated: each round's start
    seed: 0
    train: {model: ..., method: adadpo, beta: 0.1, learning_rate: 5.0e-7, epochs: 1, batch_size: 8}

Round r (1-based) samples K replies per prompt from the policy of round r-1 (the ``train.model`` for round
1) with the model's chat template (Hugging Face ``generate``, seeded), scores them with the reward
(:mod:`poise.eval.rewards`; a row the reward fails on follows ``train.on_bad_row``), builds pairs (best
vs worst by default; ``all``: every pair of distinct rewards; ``best_random``: the best vs a random
other; pairs of equal reward are dropped and counted), and trains ``train`` on them from that policy.
Everything of round r is in ``output_dir/round-r/``: ``samples.jsonl`` (prompt, replies, rewards),
``pairs.jsonl`` (the training rows), ``round.json`` (counts: prompts, samples, pairs, ties dropped,
reward mean) and ``run/`` (the poise run: metrics, diagnostics, checkpoints, ``model/``). Each stage is
written atomically and skipped when it is there, and the training resumes from its checkpoint, so a run
killed in any round continues at the same place.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poise import fsutil
from poise.errors import ConfigError, DataError

log = logging.getLogger("poise")

PAIRINGS = ("best_worst", "all", "best_random")
REFERENCES = ("fixed", "updated")


@dataclass
class IterateConfig:
    output_dir: str
    prompts_file: str
    reward: str
    train: dict[str, Any]
    rounds: int = 3
    samples_per_prompt: int = 4
    temperature: float = 0.8
    max_new_tokens: int = 64
    prompts_per_round: int | None = None
    pairs: str = "best_worst"
    reference: str = "fixed"
    seed: int = 0
    _source: str = field(default="", repr=False)


def load_iterate(path: str | Path) -> IterateConfig:
    """Read and check an iterate file; the training section is validated as a training config."""
    from dataclasses import fields

    from poise.training.config import from_dict, parse_yaml

    path = Path(path)
    try:
        raw = parse_yaml(path.read_text(), str(path)) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the iterate file ({e.strerror or e}).") from None
    names = {f.name for f in fields(IterateConfig) if not f.name.startswith("_")}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: an iterate file is a mapping with the keys {sorted(names)}.")
    unknown = sorted(set(raw) - names)
    missing = sorted(n for n in ("output_dir", "prompts_file", "reward", "train") if n not in raw)
    if unknown or missing:
        import difflib

        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, names, 1)) else repr(k)
                 for k in unknown]
        raise ConfigError(f"{path}: " + "; ".join(
            ([f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}"] if unknown else [])
            + ([f"missing {', '.join(missing)}"] if missing else [])) + f". The keys are {sorted(names)}.")
    cfg = IterateConfig(**raw, _source=str(path))
    checks = [(isinstance(cfg.rounds, int) and cfg.rounds >= 1, "rounds is a whole number of rounds, at least 1"),
              (isinstance(cfg.samples_per_prompt, int) and cfg.samples_per_prompt >= 2,
               "samples_per_prompt is at least 2 (a pair needs two replies)"),
              (isinstance(cfg.temperature, (int, float)) and cfg.temperature > 0,
               "temperature is positive (sampling; 0 would give K equal replies)"),
              (isinstance(cfg.max_new_tokens, int) and cfg.max_new_tokens >= 1, "max_new_tokens is at least 1"),
              (cfg.prompts_per_round is None or (isinstance(cfg.prompts_per_round, int) and cfg.prompts_per_round >= 1),
               "prompts_per_round is a positive number of prompts (or omitted: all)"),
              (cfg.pairs in PAIRINGS, f"pairs is one of {', '.join(PAIRINGS)}"),
              (cfg.reference in REFERENCES, f"reference is one of {', '.join(REFERENCES)}"),
              (isinstance(cfg.train, dict) and "model" in cfg.train,
               "train is a training config (a mapping) with at least its model")]
    for ok, what in checks:
        if not ok:
            raise ConfigError(f"{path}: {what}.")
    for key in ("train_file", "output_dir", "resume", "reference_model"):
        if key in cfg.train:
            raise ConfigError(f"{path}: train.{key} is set by poise iterate for each round (the round's pairs, "
                              "folder and reference); remove it.")
    from_dict({**cfg.train, "train_file": "round-pairs.jsonl", "output_dir": "round-run"},
              source=f"{path} [train]")  # every key, type and method option checked now
    return cfg


def build_pairs(prompt: str, replies: list[str], rewards: list[float | None], how: str,
                rng: random.Random) -> tuple[list[dict[str, Any]], int]:
    """The preference rows of one prompt and the number of candidate pairs dropped as ties."""
    scored = [(r, s) for r, s in zip(replies, rewards) if s is not None and r.strip()]
    if len(scored) < 2:
        return [], 0
    order = sorted(range(len(scored)), key=lambda i: -scored[i][1])
    best, worst = scored[order[0]], scored[order[-1]]
    if how == "best_worst":
        if best[1] == worst[1]:
            return [], 1
        return [_row(prompt, best, worst)], 0
    if how == "best_random":
        others = [scored[i] for i in order[1:] if scored[i][1] < best[1]]
        if not others:
            return [], 1
        return [_row(prompt, best, rng.choice(others))], 0
    rows, ties = [], 0
    for a in range(len(scored)):
        for b in range(a + 1, len(scored)):
            (ra, sa), (rb, sb) = scored[a], scored[b]
            if sa == sb:
                ties += 1
            else:
                rows.append(_row(prompt, (ra, sa), (rb, sb)) if sa > sb else _row(prompt, (rb, sb), (ra, sa)))
    return rows, ties


def _row(prompt: str, chosen: tuple[str, float], rejected: tuple[str, float]) -> dict[str, Any]:
    return {"prompt": prompt, "chosen": chosen[0], "rejected": rejected[0], "chosen_reward": chosen[1],
            "rejected_reward": rejected[1]}


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _sample(cfg: IterateConfig, folder: Path, model_path: str, texts: list[str], where: list[str], r: int) -> list[dict]:
    from poise.eval.rewards import load_reward, score_all
    from poise.model.generate import generate
    from poise.model.load import load_model, load_tokenizer

    path = folder / "samples.jsonl"
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines()]
    tokenizer = load_tokenizer(model_path, gguf_file=cfg.train.get("gguf_file") if r == 1 else None)
    model = load_model(model_path, gguf_file=cfg.train.get("gguf_file") if r == 1 else None)
    k = cfg.samples_per_prompt
    repeated = [t for t in texts for _ in range(k)]
    log.info("round %d: sampling %d replies for each of %d prompts", r, k, len(texts))
    replies = generate(model, tokenizer, repeated, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                       seed=cfg.seed * 1000 + r)
    del model
    reward = load_reward(cfg.reward)
    scores, skipped = score_all(reward, repeated, replies, on_bad_row=cfg.train.get("on_bad_row", "error"),
                                where=[w for w in where for _ in range(k)])
    rows = [{"prompt": t, "replies": replies[i * k:(i + 1) * k], "rewards": scores[i * k:(i + 1) * k]}
            for i, t in enumerate(texts)]
    fsutil.atomic_write_text(path, _jsonl(rows))
    return rows


def run_round(cfg: IterateConfig, r: int, start_model: str, first_model: str, texts: list[str],
              where: list[str]) -> Path:
    """Round ``r`` from the policy in ``start_model``; returns its trained model folder."""
    from poise.training.config import from_dict
    from poise.training.loop import train

    folder = Path(cfg.output_dir).expanduser() / f"round-{r}"
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = folder / "run" / "model"
    if (folder / "round.json").is_file() and (model_dir / "config.json").is_file():
        return model_dir
    samples = _sample(cfg, folder, start_model, texts, where, r)
    rng = random.Random(cfg.seed * 1000 + r)
    pairs, ties = [], 0
    for row in samples:
        got, t = build_pairs(row["prompt"], row["replies"], row["rewards"], cfg.pairs, rng)
        pairs += got
        ties += t
    if not pairs:
        raise DataError(f"round {r}: no pair: every prompt's replies had equal rewards ({ties} ties) or too few "
                        "scored replies. Raise temperature or samples_per_prompt, or use a reward that tells "
                        "the replies apart.")
    fsutil.atomic_write_text(folder / "pairs.jsonl", _jsonl(pairs))
    scored = [s for row in samples for s in row["rewards"] if s is not None]
    info = {"round": r, "prompts": len(samples), "samples": sum(len(row["replies"]) for row in samples),
            "scored": len(scored), "pairs": len(pairs), "ties_dropped": ties,
            "reward_mean": sum(scored) / max(1, len(scored)), "start_model": start_model}
    log.info("round %d: %d pairs from %d prompts (%d ties dropped), mean reward %.4g", r, len(pairs),
             len(samples), ties, info["reward_mean"])
    settings = {**cfg.train, "model": start_model, "train_file": str(folder / "pairs.jsonl"),
                "output_dir": str(folder / "run"), "resume": True}
    if r > 1:
        settings.pop("gguf_file", None)  # later rounds start from the previous round's model folder
        if cfg.reference == "fixed":
            settings["reference_model"] = first_model
    train(from_dict(settings, source=f"{cfg._source} [round {r}]"))
    fsutil.atomic_write_text(folder / "round.json", json.dumps(info, indent=1))
    return model_dir


def iterate_main(path: str) -> list[Path]:
    """Run (or continue) every round of the iterate file ``path``; returns the round models."""
    from poise.data import load_rows
    from poise.eval.run import render_prompt
    from poise.model.load import load_tokenizer

    cfg = load_iterate(path)
    first = str(cfg.train["model"])
    rows = load_rows(cfg.prompts_file, required=())
    if cfg.prompts_per_round:
        rows = rows[:cfg.prompts_per_round]
    if cfg.reference == "fixed" and cfg.train.get("gguf_file"):
        raise ConfigError(f"{path}: reference: fixed with a GGUF model: convert it to a model folder first "
                          "(the fixed reference of later rounds is loaded as a folder), or use reference: updated.")
    tokenizer = load_tokenizer(first, gguf_file=cfg.train.get("gguf_file"))
    texts = [render_prompt(r.data, tokenizer, where=r.where) for r in rows]
    where = [r.where for r in rows]
    models, current = [], first
    for r in range(1, cfg.rounds + 1):
        current = str(run_round(cfg, r, current, first, texts, where))
        models.append(Path(current))
    return models
