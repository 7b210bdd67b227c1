"""Metrics of a run: averaged correctly over accumulation steps and ranks, written to
``metrics.jsonl`` in the run folder, and to TensorBoard / Weights & Biases when asked for.

Reduction: a metric is a mean over pairs, weighted by each micro-batch's pair count, over all
micro-batches of the step and all ranks; keys ending in ``_min``/``_max`` reduce by min/max.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from poise.errors import PoiseError

log = logging.getLogger("poise")


#: Metric names reduced by min / max (over micro-batches and ranks) instead of a pair-weighted mean:
#: ``balance/kappa_min`` and ``gate/min`` alike.
MIN_SUFFIXES = ("_min", "/min")
MAX_SUFFIXES = ("_max", "/max")


class MetricAccumulator:
    """Collects metric dicts of micro-batches, each with a weight (its pair count)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)
        self.mins: dict[str, float] = {}
        self.maxs: dict[str, float] = {}

    def add(self, metrics: dict[str, Any], weight: float) -> None:
        for k, v in metrics.items():
            v = float(v)
            if k.endswith(MIN_SUFFIXES):
                self.mins[k] = min(v, self.mins.get(k, math.inf))
            elif k.endswith(MAX_SUFFIXES):
                self.maxs[k] = max(v, self.maxs.get(k, -math.inf))
            else:
                self.sums[k] += v * weight
                self.weights[k] += weight

    def reduce(self, accelerator=None) -> dict[str, float]:
        """The step's metrics over every rank (one all-reduce per kind when distributed)."""
        keys = sorted(self.sums)
        mean_keys, min_keys, max_keys = keys, sorted(self.mins), sorted(self.maxs)
        if accelerator is not None and accelerator.num_processes > 1:
            dev = accelerator.device
            s = torch.tensor([self.sums[k] for k in keys] + [self.weights[k] for k in keys], device=dev,
                             dtype=torch.float64)
            s = accelerator.reduce(s, reduction="sum")
            sums, weights = s[:len(keys)].tolist(), s[len(keys):].tolist()
            mins = _reduce_extreme(accelerator, [self.mins[k] for k in min_keys], torch.min)
            maxs = _reduce_extreme(accelerator, [self.maxs[k] for k in max_keys], torch.max)
        else:
            sums, weights = [self.sums[k] for k in keys], [self.weights[k] for k in keys]
            mins, maxs = [self.mins[k] for k in min_keys], [self.maxs[k] for k in max_keys]
        out = {k: s / w for k, s, w in zip(mean_keys, sums, weights) if w > 0}
        out.update(zip(min_keys, mins))
        out.update(zip(max_keys, maxs))
        return out


def _reduce_extreme(accelerator, values: list[float], fn) -> list[float]:
    if not values:
        return []
    t = accelerator.gather(torch.tensor(values, device=accelerator.device, dtype=torch.float64)[None])
    return fn(t, dim=0).values.tolist()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory: CUDA's max allocated on a GPU, the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except ImportError:  # pragma: no cover - not on POSIX
        return float("nan")


class RunLogger:
    """metrics.jsonl (always, main process) plus optional TensorBoard and W&B."""

    def __init__(self, run_dir: Path, report_to: list[str], config: dict[str, Any], *, main: bool,
                 resume: bool):
        self.main = main
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = self.wandb = None
        if not main:
            return
        if not resume and self.path.exists():
            self.path.unlink()
        if "tensorboard" in report_to:
            self.tb = _tensorboard(Path(run_dir) / "tensorboard")
        if "wandb" in report_to:
            self.wandb = _wandb(config, run_dir)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.main:
            return
        row = {"step": step, **{k: (round(v, 8) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _tensorboard(folder: Path):
    """A TensorBoard writer (event files in ``run_dir/tensorboard``; view them with
    ``tensorboard --logdir RUN_DIR``)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise PoiseError("report_to: tensorboard is asked for, but the tensorboard package is not installed. "
                         "Install the logging extra: pip install 'poise[logging]' (or pip install tensorboard), "
                         "or remove tensorboard from report_to.") from None
    return SummaryWriter(str(folder))


def _wandb(config: dict[str, Any], run_dir: Path):
    """A W&B run (files under ``run_dir/wandb``; project from WANDB_PROJECT, offline with
    WANDB_MODE=offline)."""
    try:
        import wandb
    except ImportError:
        raise PoiseError("report_to: wandb is asked for, but the wandb package is not installed. Install the "
                         "logging extra: pip install 'poise[logging]' (or pip install wandb), or remove wandb "
                         "from report_to.") from None
    try:
        return wandb.init(config=config, dir=str(run_dir), name=os.path.basename(os.path.abspath(str(run_dir))))
    except Exception as e:  # no API key, no network, a bad WANDB_* setting: wandb's own error types
        raise PoiseError(f"report_to: W&B could not start a run ({type(e).__name__}: {e}). Log in with `wandb "
                         "login` (or set WANDB_API_KEY), or log offline with WANDB_MODE=offline, or remove wandb "
                         "from report_to.") from None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Rows of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
