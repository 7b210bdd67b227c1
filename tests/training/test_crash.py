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
from helpers import free_port
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
                   warmup_ratio=0.0, scheduler="constant", max_length=64, max_prompt_length=32)
        return from_dict({**raw, **kw})

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
    killed_metrics = (run_dir / "metrics.jsonl").read_text()
    ckpt = latest_good(run_dir)
    resumed_from = int(ckpt.name[5:]) if ckpt else 0
    out = run(path, "resume=true")
    assert out.returncode == 0, out.stderr[-2000:]
    assert_same(weights(run_dir), expect)
    # the rows the killed run wrote after its checkpoint are kept whole in a backup, and metrics.jsonl
    # holds every step once
    assert logged_steps(run_dir) == list(range(STEPS + 1))
    after = [s for s in (json.loads(line)["step"] for line in killed_metrics.splitlines()) if s > resumed_from]
    backup = run_dir / f"metrics.jsonl.bak-{resumed_from}"
    assert backup.is_file() == bool(after or resumed_from == 0)
    if backup.is_file():
        assert backup.read_text() == killed_metrics
    assert not (run_dir / ".poise.lock").exists()


@pytest.mark.parametrize("moment", ["manifest:3"])
def test_kill_while_checkpointing_resumes_exactly(reference, tmp_path, moment):
    kill_and_resume(reference, tmp_path, moment)


def test_kill_while_saving_the_final_model_leaves_no_model_and_resumes_exactly(reference, tmp_path):
    """SIGKILL after the final model is written and flushed, before its rename: no ``model/`` (nothing
    half written where from_pretrained looks), only a temporary folder; ``resume=true`` saves it again,
    removes the temporary folder and ends with the uninterrupted run's weights."""
    make_cfg, expect, _ = reference
    path, run_dir = write_cfg(make_cfg, tmp_path, "killed-final")
    out = run(path, env={KILL_ENV: "final_model:0"})
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert not (run_dir / "model").exists()
    assert [p.name.split("-")[0] for p in run_dir.glob(".model.tmp-*")] == [".model.tmp"]
    out = run(path, "resume=true")
    assert out.returncode == 0, out.stderr[-2000:]
    assert_same(expect, weights(run_dir))
    assert list(run_dir.glob(".model.*")) == []


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


# -- Ctrl-C at any moment ---------------------------------------------------------------------------------

#: ``poise train`` in a child with a place to be interrupted (POISE_TEST_HOLD); it writes the file
#: POISE_TEST_MARK when it gets there:
#:   main       main() has started: a signal sent now lands while poise imports and loads
#:   calibrate  the calibration step, before the loop (no handler of poise's there): holds until a signal
#:   step:N     the row of step N is written: holds until the signal has reached poise's handler (so
#:              the run cannot finish before the test has signalled it)
HOOKED = r"""
import os, signal, sys, time
from pathlib import Path

hold, mark = os.environ["POISE_TEST_HOLD"], Path(os.environ["POISE_TEST_MARK"])
if hold == "main":
    import poise.cli as cli

    build_parser = cli.build_parser

    def marked_build_parser():
        mark.write_text(hold)
        return build_parser()

    cli.build_parser = marked_build_parser
elif hold == "calibrate":
    import poise.training.loop as loop

    def held_calibrate(run):
        mark.write_text(hold)
        time.sleep(240)  # the signal interrupts this
        sys.exit("test harness: no signal within 240 s of the calibration step")

    loop.calibrate = held_calibrate
elif hold.startswith("step:"):
    from poise.training.runlog import RunLogger

    at, write, seen = int(hold[5:]), RunLogger.write, []

    def write_then_hold(self, step, metrics):
        if step != at or seen:
            return write(self, step, metrics)
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def relay(signum, frame):
            seen.append(signum)
            handlers[signum](signum, frame)

        for s in handlers:
            signal.signal(s, relay)
        write(self, step, metrics)
        mark.write_text(hold)
        deadline = time.monotonic() + 240
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        for s, h in handlers.items():
            signal.signal(s, h)
        if not seen:
            sys.exit("test harness: no signal within 240 s")

    RunLogger.write = write_then_hold
from poise.cli import main

sys.exit(main(sys.argv[1:]))
"""


def saved_on_disk(run_dir):
    """What the run folder holds to resume from, in poise's words."""
    ckpt = latest_good(run_dir)
    return f"checkpoint step {int(ckpt.name[5:])} in {ckpt}" if ckpt else "nothing saved yet"


#: (moment, hold, signal): the test signals once the mark exists (or, for "folder", once the run folder's
#: lock appears, with the run held before its end so that it cannot finish first)
MOMENTS = [("main", "main", signal.SIGINT), ("folder", f"step:{STEPS - 1}", signal.SIGINT),
           ("calibrate", "calibrate", signal.SIGTERM), ("step", "step:2", signal.SIGINT)]


@pytest.mark.parametrize("moment,hold,sig", MOMENTS, ids=[m[0] for m in MOMENTS])
def test_ctrl_c_at_any_moment_exits_130_with_the_truth(make_cfg, tmp_path, moment, hold, sig):
    """Exit code 130, no traceback, the lock released, no final model, and one line that says what is on
    disk: the checkpoint to resume from, or that nothing was saved."""
    path, run_dir = write_cfg(make_cfg, tmp_path, "ctrl-c")
    mark = run_dir / ".poise.lock" if moment == "folder" else tmp_path / "mark"
    env = {**os.environ, "POISE_TEST_HOLD": hold, "POISE_TEST_MARK": str(tmp_path / "mark")}
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, "-c", HOOKED, "train", str(path)], stdout=fo, stderr=fe, env=env)
        try:
            deadline = time.monotonic() + 240
            while not mark.exists():
                assert proc.poll() is None, f"the run ended before the moment: {err.read_text()[-2000:]}"
                assert time.monotonic() < deadline, f"{moment}: not reached within 240 s"
                time.sleep(0.02)
            proc.send_signal(sig)
            proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stdout, stderr = out.read_text(), err.read_text()
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not (run_dir / ".poise.lock").exists()
    assert not (run_dir / "model").exists()
    saved = saved_on_disk(run_dir)
    said = [line for line in (stdout + stderr).splitlines()
            if line.startswith(("poise: interrupted:", "stopped early at step"))]
    assert len(said) == 1, stdout + stderr[-2000:]
    assert saved in said[0], (saved, said)
    if moment in ("main", "calibrate"):
        assert said[0] == "poise: interrupted: nothing saved yet"
    if moment == "step":
        assert said[0].startswith(f"stopped early at step 2 by a signal: checkpoint step 2 in {run_dir}")
        assert "no final model; resume with resume=true" in said[0]
    if saved != "nothing saved yet":
        assert "resume with resume=true" in said[0]


# -- a rank killed in a multi-process run -----------------------------------------------------------------

#: Rank 1 of a torchrun launch holds after step 2 (its checkpoint written, every rank past the barrier)
#: and writes its pid to POISE_TEST_MARK; rank 0 goes on into step 3 and waits there for rank 1.
HOLD_RANK_1 = r"""
import os, sys, time
from pathlib import Path

if os.environ.get("RANK") == "1":
    import poise.training.loop as loop

    after_step, mark = loop._after_step, Path(os.environ["POISE_TEST_MARK"])

    def after_step_then_hold(run, step, metrics, logger):
        after_step(run, step, metrics, logger)
        if step == 2:
            mark.write_text(str(os.getpid()))
            time.sleep(240)
            sys.exit("test harness: rank 1 was not killed within 240 s")

    loop._after_step = after_step_then_hold
from poise.cli import main

sys.exit(main(sys.argv[1:]))
"""


#: the engines of the two-process crash tests: DDP (whole checkpoints), FSDP2 and ZeRO-3 (every rank's shards)
ENGINES = {"ddp": {}, "fsdp": dict(distributed="fsdp"), "zero3": dict(distributed="deepspeed", deepspeed_stage=3)}


def write_cfg_2(make_cfg, tmp_path, name, engine="ddp"):
    """The crash tests' config for two processes: 4 pairs per rank and micro-batch."""
    return write_cfg(make_cfg, tmp_path, name, micro_batch_size=4, **ENGINES[engine])


def torchrun(path, *extra, script=None, env=None, **kw):
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    target = [str(script)] if script else ["-m", "poise"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *target, "train", str(path), *extra]
    return subprocess.Popen(cmd, env=env, text=True, **kw)


def kill_rank_1(path, run_dir, tmp_path):
    """Launch two processes, SIGKILL rank 1 once it holds after step 2; returns (exit code of the launch,
    seconds from the kill to the launch's end, its stderr)."""
    script, mark = tmp_path / "hold_rank_1.py", tmp_path / "rank1.pid"
    script.write_text(HOLD_RANK_1)
    err = tmp_path / "launch.err"
    with open(err, "w") as fe:
        proc = torchrun(path, script=script, env={"POISE_TEST_MARK": str(mark)}, stdout=subprocess.DEVNULL,
                        stderr=fe)
        try:
            deadline = time.monotonic() + 240
            while not mark.exists() or not mark.read_text():
                assert proc.poll() is None, err.read_text()[-3000:]
                assert time.monotonic() < deadline, "rank 1 did not reach step 2 within 240 s"
                time.sleep(0.05)
            os.kill(int(mark.read_text()), signal.SIGKILL)
            killed = time.monotonic()
            proc.wait(timeout=180)  # the other rank must not hang: a bound far above the seconds it takes
            took = time.monotonic() - killed
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, took, err.read_text()


def test_killing_one_rank_ends_the_run_promptly(make_cfg, tmp_path):
    """Rank 1 SIGKILLed mid-run (after the step-2 checkpoint, rank 0 waiting for it in step 3): the launch
    ends within seconds instead of rank 0 waiting for the dead rank, rank 0 releases the lock, and the
    step-2 checkpoint verifies (the resume is tested with -m slow, below)."""
    path, run_dir = write_cfg_2(make_cfg, tmp_path, "ranks")
    code, took, err = kill_rank_1(path, run_dir, tmp_path)
    print(f"the launch ended {took:.1f} s after rank 1 was killed, exit code {code}")
    assert code != 0 and took < 60, (code, took, err[-3000:])
    assert not (run_dir / ".poise.lock").exists(), err[-3000:]
    assert latest_good(run_dir).name == "step-00000002" and not (run_dir / "model").exists()


@pytest.fixture(scope="module")
def reference_2(tmp_path_factory, reference):
    """engine -> the weights of the uninterrupted two-process run (trained on first use)."""
    make_cfg, done = reference[0], {}

    def get(engine: str):
        if engine not in done:
            tmp = tmp_path_factory.mktemp(f"ref2-{engine}")
            path, run_dir = write_cfg_2(make_cfg, tmp, "full2", engine)
            proc = torchrun(path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            done[engine] = weights(run_dir)
        return done[engine]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_killed_mid_run_resumes_exactly_with_two_processes(reference, reference_2, tmp_path, rank, engine):
    """Rank 0 (the one that publishes checkpoints) SIGKILLed just after publishing the step-2 checkpoint,
    or rank 1 SIGKILLed while held after step 2, under DDP, FSDP2 and ZeRO-3: the launch ends promptly,
    and resume=true with two processes ends with weights bit-for-bit equal to the uninterrupted
    two-process run (the lock a killed rank 0 leaves is stale and taken over)."""
    make_cfg = reference[0]
    path, run_dir = write_cfg_2(make_cfg, tmp_path, f"rank{rank}", engine)
    if rank == 0:
        start = time.monotonic()
        proc = torchrun(path, env={KILL_ENV: "rename:2"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = proc.communicate(timeout=300)
        code, took = proc.returncode, time.monotonic() - start
        assert json.loads((run_dir / ".poise.lock").read_text())["pid"]  # left behind by the killed rank
    else:
        code, took, err = kill_rank_1(path, run_dir, tmp_path)
    assert code != 0 and took < 180, (code, took, err[-3000:])
    assert latest_good(run_dir).name == "step-00000002"
    proc = torchrun(path, "resume=true", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    if rank == 0:
        assert "took over the lock of a run that no longer runs" in err
    assert logged_steps(run_dir) == list(range(STEPS + 1))
    assert_same(weights(run_dir), reference_2(engine))
