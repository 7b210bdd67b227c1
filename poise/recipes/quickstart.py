"""``poise quickstart``: the imbalance of DPO and what each balancer changes, offline, in minutes.

On the built-in testbed (poise.testbed: a synthetic instruction task with a known gold reward):
build a tiny model and tokenizer, run SFT, write off-policy preference pairs (labelled by a noisy,
slightly length-biased labeller; the setting where squeezing is strongest), then train DPO, AdaDPO
(with and without its floor), Gate-DPO and Balanced-DPO from the same SFT start, evaluate each
against the SFT model with the gold reward, and write a comparison table, PNG plots and a Markdown
report into the output folder. Every run is an ordinary ``poise train`` run folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poise.eval.run import evaluate_run
from poise.training.config import from_dict
from poise.training.loop import train

log = logging.getLogger("poise")

#: (label, method, extra hyperparameters): every comparison poise ships runs AdaDPO with and without
#: its floor (docs/methods.md explains when the floor matters).
METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("dpo", "dpo", {}),
    ("adadpo", "adadpo", {}),
    ("adadpo-floor1", "adadpo", {"ada_floor": 1.0}),
    ("gate-dpo", "gate-dpo", {}),
    ("balanced-dpo", "balanced-dpo", {}),
]


@dataclass
class Options:
    out: str = "quickstart"
    seed: int = 0
    sft_prompts: int = 4000
    sft_epochs: float = 4.0
    pairs: int = 2000
    epochs: float = 2.0
    eval_prompts: int = 128
    probe_prompts: int = 32
    beta: float = 0.1
    learning_rate: float = 1e-3
    label_noise: float = 0.1
    length_bias: float = 0.02
    methods: list[tuple[str, str, dict[str, Any]]] = field(default_factory=lambda: list(METHODS))


def _common(o: Options, root: Path) -> dict[str, Any]:
    # fp32 on every CPU (mixed_precision: auto would take bf16 autocast where the CPU has native bf16):
    # the quickstart's figures are the same on every machine
    return dict(max_length=32, max_prompt_length=16, batch_size=16, micro_batch_size=16, scheduler="cosine",
                warmup_ratio=0.05, seed=o.seed, save_steps=0, cache_dir=str(root / "cache"), mixed_precision="no",
                diagnostics_budget=0.0,  # the quickstart is about the curves: every probe runs
                batch_grouping="length")  # the batches of the figures in docs/results.md


def prepare_data(o: Options, root: Path) -> dict[str, Path]:
    """Prompts split three ways, SFT rows, off-policy pairs, held-out pairs and squeezing probes."""
    from poise.testbed import offpolicy_pairs, probe_rows, sft_rows, split_prompts, write_jsonl

    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    split = split_prompts(o.sft_prompts, o.eval_prompts, o.probe_prompts, seed=o.seed)
    pairs = offpolicy_pairs(split.train[:o.pairs], seed=o.seed + 1, label_noise=o.label_noise,
                            length_bias=o.length_bias)
    held_out = offpolicy_pairs(split.eval, seed=o.seed + 2)
    return {
        "sft": write_jsonl(sft_rows(split.train, seed=o.seed), data / "sft.jsonl"),
        "pairs": write_jsonl(pairs, data / "pairs.jsonl"),
        "eval": write_jsonl(held_out, data / "eval.jsonl"),
        "probes": write_jsonl(probe_rows(split.probe, seed=o.seed + 3), data / "probes.jsonl"),
    }


def run_sft(o: Options, root: Path, files: dict[str, Path]) -> Path:
    from poise.testbed.task import save_testbed_model

    base = root / "base"
    if not (base / "config.json").is_file():
        save_testbed_model(str(base), seed=o.seed)
    sft_dir = root / "sft"
    if (sft_dir / "model" / "config.json").is_file():
        return sft_dir / "model"
    cfg = from_dict(dict(model=str(base), train_file=str(files["sft"]), stage="sft", output_dir=str(sft_dir),
                         epochs=o.sft_epochs, learning_rate=3e-3, **_common(o, root)))
    return train(cfg).model_dir


def train_and_evaluate(run: Path, settings: dict[str, Any], *, label: str, gold: str, eval_prompts: int,
                       max_new_tokens: int, seed: int, drop_checkpoints: bool = False) -> Path:
    """Train one run folder (``settings``: a config as a dict), then write its eval.json with ``label``.
    Resumable: a run with an eval.json is not trained again; one with checkpoints resumes.
    ``drop_checkpoints``: delete ``checkpoints/`` once eval.json is written (``model/`` stays); for
    real models, whose checkpoints (weights and optimizer state) take gigabytes."""
    if (run / "eval.json").is_file():
        return run
    train(from_dict(dict(settings, output_dir=str(run), resume=True)))  # a killed run resumes, a new one starts
    result = evaluate_run(run, gold=gold, num_prompts=eval_prompts, max_new_tokens=max_new_tokens, seed=seed)
    result["label"] = label
    (run / "eval.json").write_text(json.dumps(result, indent=1))
    if drop_checkpoints:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return run


def run_method(o: Options, root: Path, files: dict[str, Path], sft_model: Path, label: str, method: str,
               extra: dict[str, Any]) -> Path:
    settings = dict(model=str(sft_model), train_file=str(files["pairs"]), eval_file=str(files["eval"]),
                    probe_file=str(files["probes"]), method=method, beta=o.beta, epochs=o.epochs,
                    learning_rate=o.learning_rate, diagnostics_steps=10, probe_pairs=32, **extra, **_common(o, root))
    return train_and_evaluate(root / "runs" / label, settings, label=label, gold="testbed",
                              eval_prompts=o.eval_prompts, max_new_tokens=8, seed=o.seed)


def write_report(root: Path, runs: list[Path], t0: float) -> Path:
    """report.md and plots/ in ``root``; prints the comparison table and where everything is."""
    from poise.eval.plot import plot_main
    from poise.eval.report import comparison_table, load_runs, report_main

    report = root / "report.md"
    report_main([str(r) for r in runs], str(report))
    pngs = plot_main([str(r) for r in runs], str(root / "plots"))
    print(comparison_table(load_runs([str(r) for r in runs])))
    print(f"\nquickstart finished in {time.time() - t0:.0f} s: report {report}, plots {root / 'plots'} "
          f"({len(pngs)} PNG files), runs {root / 'runs'}")
    return report


def run_quickstart(o: Options) -> Path:
    """Everything above; returns the path of the Markdown report."""
    t0 = time.time()
    root = Path(o.out)
    files = prepare_data(o, root)
    log.info("quickstart: data in %s", root / "data")
    sft_model = run_sft(o, root, files)
    runs = [run_method(o, root, files, sft_model, *m) for m in o.methods]
    return write_report(root, runs, t0)
