"""The data order and the learning-rate schedule of a run."""

from __future__ import annotations

import math

from poise.data import length_grouped_batches
from poise.errors import ConfigError
from poise.training.config import TrainConfig


class Schedule:
    """The data order: step -> the global batch of indices, the same on every rank, deterministic in
    (seed, epoch); length-grouped to waste little padding. A remainder smaller than a batch is left
    out of each epoch."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, epochs: float, max_steps: int | None):
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.per_epoch = len(lengths) // batch_size
        if self.per_epoch == 0:
            raise ConfigError(f"batch_size={batch_size} is larger than the training data ({len(lengths)} "
                              "usable items); lower batch_size.")
        # round first: 0.07 * 100 is 7.000000000000001 in floating point, which is 7 steps, not 8
        self.total = max_steps or max(1, math.ceil(round(epochs * self.per_epoch, 9)))
        self._epoch, self._batches = -1, []

    def batch(self, step: int) -> list[int]:
        epoch = step // self.per_epoch
        if epoch != self._epoch:
            batches = length_grouped_batches(self.lengths, self.batch_size, seed=self.seed + epoch)
            self._epoch, self._batches = epoch, [b for b in batches if len(b) == self.batch_size]
        return self._batches[step % self.per_epoch]


def lr_lambda(cfg: TrainConfig, total: int):
    warm = round(cfg.warmup_ratio * total)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total - warm)
        if cfg.scheduler == "linear":
            return max(0.0, 1 - progress)
        if cfg.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return f
