"""The training loop: one readable loop on accelerate (DDP, FSDP and DeepSpeed come with it).

    train(cfg)  ->  setup (data, model, reference, objective)  ->  for each optimizer step:
        the global batch (batch_size pairs, the same order on every rank) is cut into one slice per
        rank and micro-batches per slice; each micro-batch's loss is normalised by the counts of the
        WHOLE step (pairs, chosen tokens), so accumulation and data parallelism give the same gradient
        as one big batch; clip, step, log, checkpoint.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from poise.errors import NonFiniteError, PoiseError
from poise.training.build import Setup, build_setup
from poise.training.checkpoint import latest_good, load_training_state, save_checkpoint, set_rng_state
from poise.training.config import TrainConfig, dump_config
from poise.training.modelcard import write_model_card
from poise.training.runlog import MetricAccumulator, RunLogger, peak_memory_mb
from poise.training.schedule import Schedule

log = logging.getLogger("poise")


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    steps: int
    metrics: dict[str, float]
    stopped_early: bool = False


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to save a checkpoint and exit cleanly after the current step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _rank_slice(idx: list[int], rank: int, world: int) -> list[int]:
    per = len(idx) // world
    return idx[rank * per:(rank + 1) * per]


def _micro_batches(idx: list[int], size: int) -> list[list[int]]:
    return [idx[i:i + size] for i in range(0, len(idx), size)]


def _any_rank(acc, flag: bool) -> bool:
    """True on every rank when the flag is set on any (one all-reduce when distributed)."""
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor([float(flag)], device=acc.device), reduction="sum").item() > 0)


def train_step(s: Setup, idx: list[int]) -> dict[str, float]:
    """One optimizer step on the global batch ``idx``; returns the step's metrics over all ranks."""
    acc, task, cfg = s.accelerator, s.task, s.cfg
    t0 = time.perf_counter()
    mine = _rank_slice(idx, acc.process_index, acc.num_processes)
    micro = _micro_batches(mine, cfg.micro_batch_size)
    n_tokens = task.norm_tokens(idx)  # every rank knows the whole step's counts: no communication
    metrics = MetricAccumulator()
    bad: list[int] = []
    for j, mb in enumerate(micro):
        sync = j == len(micro) - 1
        with nullcontext() if sync else acc.no_sync(s.module):
            loss, m, per_pair = task.loss(s.module, mb, acc.device, num_items=len(idx), num_tokens=n_tokens)
            # DDP averages gradients over ranks; our loss is already a share of the global mean.
            acc.backward(loss * acc.num_processes)
        if per_pair is not None and not torch.isfinite(per_pair.detach()).all():
            bad += [mb[i] for i in (~torch.isfinite(per_pair.detach())).nonzero().flatten().tolist()]
        metrics.add(m, len(mb))
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
    grad_norm = float(acc.clip_grad_norm_(s.trainable, max_norm))  # the same on every rank
    if not math.isfinite(grad_norm) or _any_rank(acc, bool(bad)):
        s.optimizer.zero_grad(set_to_none=True)
        return {"nonfinite": 1.0, "nonfinite_pairs": bad}
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    out = metrics.reduce(acc)
    dt = time.perf_counter() - t0
    out.update({"grad_norm": grad_norm, "learning_rate": s.scheduler.get_last_lr()[0],
                "tokens_per_s": task.real_tokens(idx) / dt, "step_time_s": dt,
                "peak_memory_mb": peak_memory_mb(acc.device)})
    return out


def _trainer_state(s: Setup, step: int, sched: Schedule) -> dict[str, Any]:
    return {"step": step, "epoch": step / sched.per_epoch, "objective": s.objective_state(),
            "config": s.cfg.to_dict()}


def _save(s: Setup, step: int, sched: Schedule) -> None:
    s.accelerator.wait_for_everyone()
    if s.accelerator.is_main_process:
        try:
            save_checkpoint(s.run_dir, step, model=s.unwrapped_model(), tokenizer=s.tokenizer,
                            optimizer=s.optimizer, scheduler=s.scheduler,
                            trainer_state=_trainer_state(s, step, sched), keep=s.cfg.save_total_limit)
        except OSError as e:  # a full disk, a vanished folder: the previous checkpoint is intact
            raise PoiseError(f"could not write the checkpoint of step {step} in {s.run_dir} ({e.strerror or e}). "
                             "The previous checkpoint is kept; free space (or choose another output_dir) "
                             "and resume with resume=true.") from e
    s.accelerator.wait_for_everyone()


def _resume(s: Setup) -> int:
    ckpt = latest_good(s.run_dir)
    if ckpt is None:
        log.info("resume: no checkpoint in %s; starting from step 0", s.run_dir)
        return 0
    state, tstate = load_training_state(ckpt)
    s.load_model_weights(ckpt / "model")
    s.optimizer.load_state_dict(state["optimizer"])
    s.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    s.load_objective_state(tstate.get("objective") or {})
    log.info("resumed from %s (step %d)", ckpt, tstate["step"])
    return int(tstate["step"])


def _calibrate(s: Setup, sched: Schedule) -> None:
    """Gate's tau='auto': phat over the first training pairs under the initial policy, all ranks."""
    obj = s.task.objective
    step = 0
    while obj is not None and obj.needs_calibration and step < sched.total:
        mine = _rank_slice(sched.batch(step), s.accelerator.process_index, s.accelerator.num_processes)
        for mb in _micro_batches(mine, s.cfg.micro_batch_size):
            s.task.calibrate(s.module, mb, s.accelerator.device, s.accelerator.gather)
        step += 1
    if obj is not None and hasattr(obj, "balancers"):
        for b in obj.balancers:
            if getattr(b, "tau", None) is not None:
                log.info("gate calibrated: tau=%.4g sharpness=%.4g", b.tau, b.sharpness)


def _after_step(s: Setup, step: int, sched: Schedule, metrics: dict[str, float], logger: RunLogger) -> None:
    """Probe, log, evaluate and checkpoint on the steps the config asks for."""
    cfg = s.cfg
    if step == 1 and s.accelerator.num_processes > 1:
        s.check_replicas_agree()
    if (cfg.diagnostics_steps and step % cfg.diagnostics_steps == 0) or step == sched.total:
        metrics.update(s.probe_metrics())
    if step % cfg.logging_steps == 0 or step == sched.total:
        logger.write(step, {"epoch": step / sched.per_epoch, **metrics})
    if cfg.save_steps and step % cfg.save_steps == 0 and step < sched.total:
        _save(s, step, sched)
    if cfg.eval_steps and step % cfg.eval_steps == 0:
        logger.write(step, s.evaluate())


def _nonfinite(s: Setup, step: int, sched: Schedule, bad: list[int], logger: RunLogger) -> dict[str, float]:
    """Report a non-finite step; skip it or stop with a checkpoint of the last good weights."""
    task = s.task
    items = getattr(task, "pairs", None) or []
    where = ", ".join(f"{items[i].source} row {items[i].index}" for i in bad[:5]) if items else ""
    msg = (f"step {step}: the loss or gradient is not finite"
           + (f" (pairs: {where}{', ...' if len(bad) > 5 else ''})" if where else " (the pairs' losses are "
              "finite: the gradient overflowed)"))
    logger.write(step, {"nonfinite": 1.0})
    if s.cfg.on_nonfinite == "skip":
        log.warning("%s; the update was skipped (on_nonfinite: skip)", msg)
        return {"nonfinite": 1.0}
    _save(s, step - 1, sched)
    logger.close()
    raise NonFiniteError(f"{msg}. A checkpoint of the last good weights was saved (step {step - 1}); "
                         "lower the learning rate or inspect those rows, then resume with resume=true, or set "
                         "on_nonfinite: skip to drop such steps.")


def _loop(s: Setup, sched: Schedule, start: int, logger: RunLogger, stop: _StopFlag) -> tuple[int, dict]:
    bar = s.progress(sched.total, start)
    metrics: dict[str, float] = {}
    step = start
    try:
        while step < sched.total and stop.signal is None:
            metrics = train_step(s, sched.batch(step))
            step += 1
            if metrics.get("nonfinite"):
                metrics = _nonfinite(s, step, sched, metrics["nonfinite_pairs"], logger)
            _after_step(s, step, sched, metrics, logger)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}")
    finally:
        bar.close()
    return step, metrics


def train(cfg: TrainConfig) -> TrainResult:
    """Train as the config says; returns where the model and metrics are."""
    s = build_setup(cfg)
    sched = Schedule(s.task.lengths, cfg.batch_size, cfg.seed, cfg.epochs, cfg.max_steps)
    start = _resume(s) if cfg.resume else 0
    if s.accelerator.is_main_process:
        (s.run_dir / "config.yaml").write_text(dump_config(cfg))
    if start == 0:
        _calibrate(s, sched)
    logger = RunLogger(s.run_dir, cfg.report_to, cfg.to_dict(), main=s.accelerator.is_main_process,
                       resume=start > 0)
    if start == 0:
        logger.write(0, s.probe_metrics())  # the probes' start values
    stop = _StopFlag()
    try:
        step, metrics = _loop(s, sched, start, logger, stop)
    finally:
        stop.restore()
    _save(s, step, sched)
    if stop.signal is not None:
        log.warning("stopped by signal %d at step %d; checkpoint saved, resume with resume=true",
                    stop.signal, step)
        logger.close()
        return TrainResult(s.run_dir, s.run_dir / "model", step, metrics, stopped_early=True)
    final = s.evaluate() if cfg.eval_file else {}
    if final:
        logger.write(step, final)
    logger.close()
    model_dir = s.save_final_model()
    if s.accelerator.is_main_process:
        write_model_card(s.run_dir, cfg, {**metrics, **final})
    return TrainResult(s.run_dir, model_dir, step, {**metrics, **final})
