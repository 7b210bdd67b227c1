"""The training loop: one readable loop on accelerate.

    train(cfg)  ->  build_run (data, model, reference, task, schedule: one typed RunState)
                ->  calibrate (a step of its own: balancers' state from training pairs, initial policy)
                ->  for each optimizer step:
        the global batch (batch_size pairs, the same order on every rank) is cut into one slice per
        rank and micro-batches per slice; an objective that reads a statistic of the whole step
        (beta-DPO's mean margin) first scores the step's pairs without gradient (gathered over ranks)
        and begins the step with it; each micro-batch's loss is normalised by the counts of the WHOLE
        step (pairs, chosen tokens; the kept pairs when the step keeps only some), so accumulation and
        data parallelism give the same gradient as one big batch; clip, step, end the step (the
        objective's running statistics), log, checkpoint.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from poise import fsutil
from poise.errors import NonFiniteError, PoiseError
from poise.training import runfolder
from poise.training.build import RunState, build_run
from poise.training.checkpoint import latest_good, load_training_state, set_rng_state
from poise.training.config import TrainConfig, dump_config
from poise.training.modelcard import write_model_card
from poise.training.runlog import MetricAccumulator, RunLogger, peak_memory_mb

log = logging.getLogger("poise")


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    steps: int
    metrics: dict[str, float]
    stopped_early: bool = False


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to save a checkpoint and exit cleanly after the current step. With
    several processes the ranks agree on it each time it is read (one all-reduce), so that every rank
    stops after the same step even when the signal reached only some of them."""

    def __init__(self, accelerator=None) -> None:
        self._acc = accelerator
        self._seen: int | None = None
        self._agreed: int | None = None
        self._old = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame) -> None:
        self._seen = signum

    @property
    def signal(self) -> int | None:
        if self._agreed is None:
            acc = self._acc
            if acc is None or acc.num_processes == 1:
                self._agreed = self._seen
            else:
                seen = acc.gather(torch.tensor([float(self._seen or 0)], device=acc.device))
                self._agreed = int(seen.max().item()) or None
        return self._agreed

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def _terminate_as_interrupt():
    """SIGTERM outside the loop (loading, the reference pass, calibration) unwinds like Ctrl-C, so that
    the run folder's lock is released; a handler someone else installed is left alone."""
    old = None
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            old = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


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


def train_step(run: RunState, idx: list[int]) -> dict[str, float]:
    """One optimizer step on the global batch ``idx``; returns the step's metrics over all ranks."""
    acc, task, cfg = run.accelerator, run.task, run.cfg
    t0 = time.perf_counter()
    mine = _rank_slice(idx, acc.process_index, acc.num_processes)
    micro = _micro_batches(mine, cfg.micro_batch_size)
    state = run.state
    if task.needs_step_stats:  # a statistic of the whole step, before its forward (no gradient)
        with acc.autocast():  # the training precision
            stats = task.step_stats(run.module, mine, acc.device, cfg.micro_batch_size)
        state = task.begin_step(state, stats, acc.gather if acc.num_processes > 1 else None)
    sel = task.step_selection(state)  # (positions of the pairs the step's loss averages over, pairs); None: all
    kept = idx if sel is None else [idx[p] for p in sel[0]]
    n_tokens = task.norm_tokens(kept)  # every rank knows the whole step's counts: no communication
    first = acc.process_index * (len(idx) // acc.num_processes)  # this rank's first position in the step
    metrics = MetricAccumulator()
    bad: list[int] = []
    for j, mb in enumerate(micro):
        sync = j == len(micro) - 1
        pos = range(first + j * cfg.micro_batch_size, first + j * cfg.micro_batch_size + len(mb))
        with run.engine.accumulate(sync):  # gradients are reduced over ranks after the last micro-batch
            loss, m, per_pair = task.loss(run.module, mb, acc.device, state=state, num_items=len(kept),
                                         num_tokens=n_tokens, positions=pos)
            if per_pair is not None and not torch.isfinite(per_pair.detach()).all():
                bad += [mb[i] for i in (~torch.isfinite(per_pair.detach())).nonzero().flatten().tolist()]
                loss = loss * float("nan")  # a non-finite gradient: every engine skips this step's update
            run.engine.backward(loss)  # the loss is this rank's share of the global mean
        metrics.add(m, len(mb))
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
    skip = _any_rank(acc, bool(bad))
    grad_norm = run.engine.step(run.trainable, max_norm, skip)  # clip and step; the norm is the same on every rank
    if not math.isfinite(grad_norm) or skip:
        return {"nonfinite": 1.0, "nonfinite_pairs": bad}
    run.scheduler.step()
    run.state = task.end_step(state)  # a skipped step leaves the state as it was
    out = metrics.reduce(acc)
    dt = time.perf_counter() - t0
    out.update({"grad_norm": grad_norm, "learning_rate": run.scheduler.get_last_lr()[0],
                "tokens_per_s": task.real_tokens(idx) / dt, "step_time_s": dt,
                "peak_memory_mb": peak_memory_mb(acc.device)})
    return out


def _trainer_state(run: RunState, step: int) -> dict[str, Any]:
    return {"step": step, "epoch": step / run.schedule.per_epoch, "objective": run.state,
            "config": run.resolved_config().to_dict()}


def _save(run: RunState, step: int) -> None:
    run.accelerator.wait_for_everyone()
    try:  # every rank: the engine writes its format (the main process alone, or every rank's shards)
        run.engine.save_checkpoint(run.run_dir, step, tokenizer=run.tokenizer, scheduler=run.scheduler,
                                   trainer_state=_trainer_state(run, step), keep=run.cfg.save_total_limit)
    except Exception as e:  # a full disk, a vanished folder: the previous checkpoint is intact
        if not fsutil.is_write_failure(e):  # OSError, or torch's/safetensors' writer failing
            raise
        raise PoiseError(f"could not write the checkpoint of step {step} in {run.run_dir} ({fsutil.cause(e)}). "
                         "The previous checkpoint is kept; free space (or choose another output_dir) "
                         "and resume with resume=true.") from e
    run.accelerator.wait_for_everyone()


def _resume(run: RunState) -> int:
    """Load the checkpoint that the run folder's check chose (the newest that verifies, its config
    compared: poise/training/runfolder.py); 0 when there is none."""
    folder = runfolder.current(run.run_dir)
    ckpt = folder.checkpoint if folder is not None else latest_good(run.run_dir)
    if ckpt is None:
        return 0
    state, tstate = load_training_state(ckpt)
    run.load_checkpoint(ckpt, state)  # model and optimizer, in the engine's format
    run.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    saved = tstate.get("objective") or {}
    try:
        run.task.check_state(saved)
    except ValueError as e:
        raise PoiseError(f"checkpoint {ckpt} was written by another method: {e}. Resume with the config that "
                         "started the run, or start a new run in another output_dir.") from None
    run.state = saved
    log.info("resumed from %s (step %d)", ckpt, tstate["step"])
    return int(tstate["step"])


def calibrate(run: RunState) -> None:
    """The calibration step, before step 1: the balancers' state (Gate-DPO's tau for gate_tau: auto)
    from the training pairs in the order of the first epoch, under the initial policy, gathered over
    ranks (each rank scores its slice of each global batch; the gather restores the global order, so
    any number of processes sees the same pairs). Fewer pairs than asked for: all of them, logged."""
    task, acc, sched = run.task, run.accelerator, run.schedule
    if not task.needs_calibration(run.state):
        return
    gather = acc.gather if acc.num_processes > 1 else None
    state, seen, step = run.state, 0, 0
    bar = tqdm(total=None, desc="calibrate", unit="pair", disable=not acc.is_main_process, leave=False)
    while task.needs_calibration(state) and step < sched.per_epoch:
        idx = sched.batch(step)
        mine = _rank_slice(idx, acc.process_index, acc.num_processes)
        with acc.autocast():  # the training precision
            stats = task.calibration_stats(run.module, mine, acc.device, run.cfg.micro_batch_size)
        state = task.calibrate(state, stats, gather)
        seen, step = seen + len(idx), step + 1
        bar.update(len(idx))
    bar.close()
    if task.needs_calibration(state):
        state = task.finish_calibration(state)
        log.warning("calibration: the run has %d training pairs in an epoch, fewer than the calibration asks "
                    "for (gate_calibration_pairs); calibrated on all of them", seen)
    run.state = state
    values = ", ".join(f"{k}={v:.6g}" for k, v in task.calibrated_values(state).items())
    log.info("calibrated before step 1 on %d training pairs under the initial policy: %s", seen, values)


def _after_step(run: RunState, step: int, metrics: dict[str, float], logger: RunLogger) -> None:
    """Probe, log, evaluate and checkpoint on the steps the config asks for."""
    cfg, sched = run.cfg, run.schedule
    if step == 1 and run.accelerator.num_processes > 1:
        run.check_replicas_agree()
    if step in run.probe_steps:
        metrics.update(run.probe_metrics())
    if step % cfg.logging_steps == 0 or step == sched.total:
        logger.write(step, {"epoch": step / sched.per_epoch, **metrics})
    if cfg.save_steps and step % cfg.save_steps == 0 and step < sched.total:
        _save(run, step)
    if cfg.eval_steps and step % cfg.eval_steps == 0:
        logger.write(step, run.evaluate())


def _nonfinite(run: RunState, step: int, bad: list[int], logger: RunLogger) -> dict[str, float]:
    """Report a non-finite step; skip it or stop with a checkpoint of the last good weights."""
    items = getattr(run.task, "pairs", None) or []
    where = ", ".join(f"{items[i].source} row {items[i].index}" for i in bad[:5]) if items else ""
    msg = (f"step {step}: the loss or gradient is not finite"
           + (f" (pairs: {where}{', ...' if len(bad) > 5 else ''})" if where else " (the pairs' losses are "
              "finite: the gradient overflowed)"))
    logger.write(step, {"nonfinite": 1.0})
    if run.cfg.on_nonfinite == "skip":
        log.warning("%s; the update was skipped (on_nonfinite: skip)", msg)
        return {"nonfinite": 1.0}
    _save(run, step - 1)
    logger.close()
    raise NonFiniteError(f"{msg}. A checkpoint of the last good weights was saved (step {step - 1}); "
                         "lower the learning rate or inspect those rows, then resume with resume=true, or set "
                         "on_nonfinite: skip to drop such steps.")


def _loop(run: RunState, start: int, logger: RunLogger, stop: _StopFlag) -> tuple[int, dict]:
    sched = run.schedule
    bar = run.progress(sched.total, start)
    metrics: dict[str, float] = {}
    step = start
    try:
        while step < sched.total and stop.signal is None:
            metrics = train_step(run, sched.batch(step))
            step += 1
            if metrics.get("nonfinite"):
                metrics = _nonfinite(run, step, metrics["nonfinite_pairs"], logger)
            _after_step(run, step, metrics, logger)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}")
    finally:
        bar.close()
    return step, metrics


def train(cfg: TrainConfig) -> TrainResult:
    """Train as the config says; returns where the model and metrics are. The run folder is locked from
    before anything is written into it until the run ends, however it ends."""
    runfolder.begin(cfg.output_dir)
    try:
        with _terminate_as_interrupt():
            runfolder.precheck(cfg)  # a run that will be refused is refused before any model is loaded
            return _train(cfg)
    finally:
        runfolder.close(cfg.output_dir)  # the lock, however the run ends (Ctrl-C at any moment included)


def _train(cfg: TrainConfig) -> TrainResult:
    run = build_run(cfg)
    start = _resume(run) if cfg.resume else 0
    if start == 0:
        calibrate(run)
    if run.accelerator.is_main_process:
        folder = runfolder.current(run.run_dir)
        if cfg.resume:  # rows the interrupted run wrote after its checkpoint go to a backup, not away
            runfolder.settle_metrics(run.run_dir, start)
        if folder is not None:
            runfolder.record_changes(folder, start)
        # the resolved config: what calibration decided included
        fsutil.atomic_write_text(run.run_dir / "config.yaml", dump_config(run.resolved_config()))
    logger = RunLogger(run.run_dir, cfg.report_to, cfg.to_dict(), main=run.accelerator.is_main_process,
                       resume=start > 0)
    if start == 0:  # the probes' start values, when the plan has them (a row for step 0 either way)
        logger.write(0, run.probe_metrics() if 0 in run.probe_steps else {})
    stop = _StopFlag(run.accelerator)
    try:
        step, metrics = _loop(run, start, logger, stop)
    finally:
        stop.restore()
    if step > start:  # else the newest checkpoint already holds this step
        _save(run, step)
    if stop.signal is not None:
        log.warning("stopped by signal %d at step %d; %s, resume with resume=true", stop.signal, step,
                    "checkpoint saved" if step > start else "no step taken since the last checkpoint (if any)")
        logger.close()
        return TrainResult(run.run_dir, run.run_dir / "model", step, metrics, stopped_early=True)
    final = run.evaluate() if cfg.eval_file else {}
    if final:
        logger.write(step, final)
    logger.close()
    model_dir = run.save_final_model()
    if run.accelerator.is_main_process:
        write_model_card(run.run_dir, cfg, {**metrics, **final}, calibrated=run.task.calibrated_values(run.state))
    return TrainResult(run.run_dir, model_dir, step, {**metrics, **final})
