"""``poise sweep SWEEP.yaml``: a grid of methods x hyperparameters, each cell an independent run.

A sweep file::

    output_dir: sweeps/grid
    base: {model: ..., train_file: ..., eval_file: ..., epochs: 1}   # any config keys
    methods:                                                        # label -> config keys
      dpo: {method: dpo}
      adadpo: {method: adadpo}
    grid: {learning_rate: [5.0e-4, 1.0e-3], beta: [0.05, 0.1]}      # the cells: every combination
    seeds: [0, 1, 2]                                                 # optional: each run once per seed
    eval: {gold: testbed, prompts: 128, max_new_tokens: 8}           # optional: poise eval of each run

Every (cell, method) is a run folder ``output_dir/<cell>/<label>`` trained with ``poise train`` and
evaluated with ``poise eval`` (with ``seeds``: ``output_dir/<cell>/<label>/seed-<s>``, the config's
``seed`` set, and ``poise report`` gives each figure as a mean and 95% interval over the seeds and
says where a method beats the baseline significantly); a run whose ``eval.json`` exists is skipped, so a sweep resumes where
it stopped. ``--list`` prints one command per run (``poise sweep SWEEP.yaml --only ID``) for a cluster
scheduler; ``poise report output_dir/*/*`` (``output_dir/*/*/*`` with seeds) then compares them cell by cell.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from poise.errors import ConfigError
from poise.training.config import from_dict, parse_yaml

SWEEP_KEYS = {"output_dir", "base", "methods", "grid", "seeds", "eval"}


@dataclass
class Cell:
    id: str  # "<cell>/<label>" (or "<cell>/<label>/seed-<s>")
    cell: str
    label: str
    config: dict[str, Any]
    seed: int | None = None


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def load_sweep(path: str | Path) -> tuple[dict[str, Any], list[Cell]]:
    """Read and validate a sweep file; every run's config is validated before anything trains."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the sweep file ({e.strerror or e}).") from None
    spec = parse_yaml(text, str(path)) or {}  # duplicate keys and tabs refused with the line, as configs
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with the keys {sorted(SWEEP_KEYS)}.")
    unknown = set(spec) - SWEEP_KEYS
    if unknown or not spec.get("methods"):
        raise ConfigError(f"{path}: a sweep has the keys {sorted(SWEEP_KEYS)} (methods required); "
                          f"unknown: {sorted(unknown)}.")
    grid = spec.get("grid") or {}
    names = list(grid)
    cells = []
    out = Path(spec.get("output_dir", "sweeps/" + path.stem))
    seeds = spec.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or
                              not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
                              or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"{path}: seeds is a list of distinct integers, e.g. seeds: [0, 1, 2]; got {seeds!r}.")
    if seeds is not None and "seed" in names:
        raise ConfigError(f"{path}: seed is both a grid axis and the seeds list; keep one (seeds: [...]).")
    for values in itertools.product(*(grid[n] for n in names)) if names else [()]:
        cell = ",".join(f"{n}={_fmt(v)}" for n, v in zip(names, values)) or "default"
        for label, keys in spec["methods"].items():
            for seed in seeds or [None]:
                cfg = {**(spec.get("base") or {}), **(keys or {}), **dict(zip(names, values))}
                run_id = f"{cell}/{label}" + (f"/seed-{seed}" if seed is not None else "")
                if seed is not None:
                    cfg["seed"] = seed
                cfg["output_dir"] = str(out / run_id)
                from_dict(cfg, source=f"{path} [{run_id}]")
                cells.append(Cell(run_id, cell, label, cfg, seed))
    return spec, cells


def run_cell(c: Cell, eval_opts: dict[str, Any] | None) -> Path:
    from poise.eval.run import evaluate_run
    from poise.training.loop import train

    run = Path(c.config["output_dir"])
    if (run / "eval.json").is_file():
        return run
    cfg = dict(c.config, resume=True)  # an empty folder starts at step 0; a killed cell resumes
    train(from_dict(cfg))
    result = {}
    if eval_opts is not None:
        result = evaluate_run(run, gold=eval_opts.get("gold"), num_prompts=eval_opts.get("prompts", 64),
                              max_new_tokens=eval_opts.get("max_new_tokens", 64))
    result.update({"label": c.label, "cell": c.cell, "method": c.config.get("method")})
    if c.seed is not None:
        result["seed"] = c.seed
    (run / "eval.json").write_text(json.dumps(result, indent=1))
    return run


def sweep_main(path: str, *, only: str | None = None, list_only: bool = False) -> list[Path]:
    spec, cells = load_sweep(path)
    if list_only:
        for c in cells:
            print(f"poise sweep {path} --only '{c.id}'")
        return []
    if only is not None:
        cells = [c for c in cells if c.id == only]
        if not cells:
            raise ConfigError(f"{path}: no run {only!r}; `poise sweep {path} --list` lists them.")
    done = []
    for c in tqdm(cells, desc="sweep", unit="run"):
        done.append(run_cell(c, spec.get("eval")))
    return done
