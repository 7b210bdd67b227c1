"""Runs survive crashes: a process SIGKILLed at any moment (between steps or in the middle of writing
a checkpoint) resumes from its last good checkpoint and ends with the same weights as a run that was
never interrupted; SIGTERM saves a checkpoint and exits cleanly, and the run resumes exactly; a failed
checkpoint write is a clean stop that keeps the previous checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from poise.training.checkpoint import KILL_ENV, latest_good
from poise.training.runlog import read_metrics

STEPS = 6


def write_cfg(make_cfg, tmp_path, name, **kw):
    cfg = make_cfg(name=name, method="gate-dpo", max_steps=STEPS, save_steps=1, save_total_limit=2,
                   gate_calibration_pairs=8, diagnostics=False, **kw).to_dict()
    cfg["output_dir"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp_path / name


def run(path, *extra, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "poise", "train", str(path), *extra], capture_output=True,
                          text=True, env=env, timeout=300)


def weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, assets):
    """The uninterrupted run (module-scoped: computed once)."""
    from poise.training.config import from_dict

    tmp = tmp_path_factory.mktemp("ref")

    def make_cfg(name, **kw):
        raw = dict(model=str(assets / "model"), train_file=str(assets / "train.jsonl"), output_dir=str(tmp / name),
                   cache_dir=str(tmp / "cache"), batch_size=8, micro_batch_size=8, learning_rate=1e-3,
                   warmup_ratio=0.0, scheduler="constant", max_length=64, max_prompt_length=32, **kw)
        return from_dict(raw)

    path, run_dir = write_cfg(make_cfg, tmp, "full")
    out = run(path)
    assert out.returncode == 0, out.stderr[-2000:]
    return make_cfg, weights(run_dir), run_dir


def assert_same(a, b):
    for k in a:
        assert torch.equal(a[k], b[k]), k


def kill_and_resume(reference, tmp_path, moment):
    make_cfg, expect, _ = reference
    path, run_dir = write_cfg(make_cfg, tmp_path, "killed")
    out = run(path, env={KILL_ENV: moment})
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    out = run(path, "resume=true")
    assert out.returncode == 0, out.stderr[-2000:]
    assert_same(weights(run_dir), expect)


@pytest.mark.parametrize("moment", ["manifest:3"])
def test_kill_while_checkpointing_resumes_exactly(reference, tmp_path, moment):
    kill_and_resume(reference, tmp_path, moment)


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["model:1", "state:1", "rename:1", "model:2", "state:2", "rename:2", "model:3",
                                    "rename:4",
                                    "state:3", "manifest:4", "model:5", "state:5", "manifest:5", "rename:5"])
def test_kill_at_many_moments_resumes_exactly(reference, tmp_path, moment):
    kill_and_resume(reference, tmp_path, moment)


#: ``poise train`` in a child that, once the row of its first training step is written, holds until
#: SIGTERM has reached poise's handler: the run can neither finish nor take step 2 before the signal,
#: so the test does not depend on how fast the machine is. The relay is installed before the row is
#: written, so a signal sent as soon as the row appears cannot be missed.
HOLD_AFTER_FIRST_STEP = r"""
import os, signal, sys, time
from poise.training.runlog import RunLogger

write, seen = RunLogger.write, []


def write_then_hold(self, step, metrics):
    if step < 1 or seen:
        return write(self, step, metrics)
    poise_handler = signal.getsignal(signal.SIGTERM)

    def relay(signum, frame):
        seen.append(signum)
        if callable(poise_handler):
            poise_handler(signum, frame)
        else:  # poise installed no handler: die of the signal, as poise alone would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, relay)
    write(self, step, metrics)
    deadline = time.monotonic() + 240
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    signal.signal(signal.SIGTERM, poise_handler)
    if not seen:
        sys.exit("test harness: no SIGTERM within 240 s of the first step")


RunLogger.write = write_then_hold
from poise.cli import main

sys.exit(main(sys.argv[1:]))
"""


def logged_steps(run_dir):
    """Steps of the complete rows of metrics.jsonl (a row being written is not read)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().split("\n")[:-1] if line.strip()]


def test_sigterm_saves_and_exits_cleanly_then_resumes(reference, tmp_path):
    """SIGTERM sent once step 1 is logged: exit code 130, a good checkpoint of step 1, no final model;
    resuming gives the uninterrupted run's metrics for steps 2..6 and its exact weights."""
    make_cfg, expect, ref_dir = reference
    path, run_dir = write_cfg(make_cfg, tmp_path, "term")
    out, err = tmp_path / "term.out", tmp_path / "term.err"  # files: a full pipe would stall the child
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, "-c", HOLD_AFTER_FIRST_STEP, "train", str(path)],
                                stdout=fo, stderr=fe, text=True)
        try:
            deadline = time.monotonic() + 240
            while not any(s >= 1 for s in logged_steps(run_dir)):
                assert proc.poll() is None, f"the run ended before step 1: {err.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "no training step logged within 240 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = err.read_text()
    assert proc.returncode == 130, stderr[-2000:]
    assert f"stopped by signal {int(signal.SIGTERM)} at step 1;" in stderr
    assert "stopped early" in out.read_text()
    ckpt = latest_good(run_dir)
    assert ckpt is not None and ckpt.name == "step-00000001"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 1
    assert not (run_dir / "model").exists()  # stopped before the end: no final model
    assert logged_steps(run_dir) == [0, 1]

    resumed = run(path, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {ckpt} (step 1)" in resumed.stderr
    assert logged_steps(run_dir) == list(range(STEPS + 1))
    assert_same(weights(run_dir), expect)
    ref_rows, rows = read_metrics(ref_dir), read_metrics(run_dir)
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [r[key] for r in rows[1:]] == [r[key] for r in ref_rows[1:]], key


def test_failed_checkpoint_write_is_a_clean_stop(make_cfg, monkeypatch):
    import errno

    import poise.training.checkpoint as ck
    from poise.errors import PoiseError
    from poise.training.loop import train

    real = ck._write
    calls = {"n": 0}

    def full_disk(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **kw)

    monkeypatch.setattr(ck, "_write", full_disk)
    cfg = make_cfg(method="dpo", max_steps=4, save_steps=1, diagnostics=False)
    with pytest.raises(PoiseError, match="No space left.*previous checkpoint is kept"):
        train(cfg)
    ckpts = sorted(p.name for p in (Path(cfg.output_dir) / "checkpoints").iterdir())
    assert ckpts == ["step-00000001"]
