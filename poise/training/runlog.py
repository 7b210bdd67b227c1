"""Metrics of a run: averaged correctly over accumulation steps and ranks, written to
``metrics.jsonl`` in the run folder, and to TensorBoard / Weights & Biases when asked for.

Reduction: a metric is a mean over pairs, weighted by each micro-batch's pair count, over all
micro-batches of the step and all ranks; keys ending in ``_min``/``_max`` reduce by min/max. The ranks
reduce the union of their keys (a rank may have seen none: an uneven evaluation split), so that every
rank makes the same collectives.
"""

from __future__ import annotations

import hashlib
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
        """A micro-batch's metrics; with weight 0 (no pairs: work done only to keep the ranks in step)
        its keys are noted and its values ignored, extremes included."""
        for k, v in metrics.items():
            v = float(v)
            if k.endswith(MIN_SUFFIXES):
                self.mins[k] = min(v if weight > 0 else math.inf, self.mins.get(k, math.inf))
            elif k.endswith(MAX_SUFFIXES):
                self.maxs[k] = max(v if weight > 0 else -math.inf, self.maxs.get(k, -math.inf))
            else:
                self.sums[k] += v * weight
                self.weights[k] += weight

    def reduce(self, accelerator=None) -> dict[str, float]:
        """The step's metrics over every rank (when distributed: one gather of the keys' fingerprint,
        the keys themselves only when the ranks' differ, then one all-reduce per kind)."""
        mean_keys, min_keys, max_keys = sorted(self.sums), sorted(self.mins), sorted(self.maxs)
        if accelerator is not None and accelerator.num_processes > 1:
            mean_keys, min_keys, max_keys = _key_union(accelerator, [mean_keys, min_keys, max_keys])
            keys, dev = mean_keys, accelerator.device
            s = torch.tensor([self.sums.get(k, 0.0) for k in keys] + [self.weights.get(k, 0.0) for k in keys],
                             device=dev, dtype=torch.float64)
            s = accelerator.reduce(s, reduction="sum")
            sums, weights = s[:len(keys)].tolist(), s[len(keys):].tolist()
            mins = _reduce_extreme(accelerator, [self.mins.get(k, math.inf) for k in min_keys], torch.min)
            maxs = _reduce_extreme(accelerator, [self.maxs.get(k, -math.inf) for k in max_keys], torch.max)
        else:
            sums, weights = [self.sums[k] for k in mean_keys], [self.weights[k] for k in mean_keys]
            mins, maxs = [self.mins[k] for k in min_keys], [self.maxs[k] for k in max_keys]
        out = {k: s / w for k, s, w in zip(mean_keys, sums, weights) if w > 0}
        out.update((k, v) for k, v in zip(min_keys, mins) if v != math.inf)  # inf: no rank had a value
        out.update((k, v) for k, v in zip(max_keys, maxs) if v != -math.inf)
        return out


def _key_union(accelerator, groups: list[list[str]]) -> list[list[str]]:
    """Each group of keys united over the ranks (sorted), so that every rank reduces the same tensors.
    One gather of (length, digest) of the keys; a second, of the keys' bytes, only when they differ."""
    text = "\n".join("\t".join(g) for g in groups).encode()
    digest = int.from_bytes(hashlib.sha256(text).digest()[:7], "big")
    dev = accelerator.device
    prints = accelerator.gather(torch.tensor([[len(text), digest]], dtype=torch.int64, device=dev))
    if bool((prints == prints[0]).all()):
        return groups
    width = int(prints[:, 0].max())
    mine = torch.zeros((1, width), dtype=torch.int64, device=dev)
    mine[0, :len(text)] = torch.tensor(list(text), dtype=torch.int64, device=dev)
    everyone = accelerator.gather(mine).cpu()
    union: list[set[str]] = [set() for _ in groups]
    for row, n in zip(everyone.tolist(), prints[:, 0].tolist()):
        for i, part in enumerate(bytes(row[:n]).decode().split("\n")):
            union[i].update(k for k in part.split("\t") if k)
    return [sorted(u) for u in union]


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
