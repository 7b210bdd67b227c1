"""A run folder belongs to one run (the lock), and a resume never loses or silently rewrites what is in it:
a folder in use, a fresh run into a run's output, a resume without a checkpoint that verifies and a resume
with a config that changes the trajectory are refused before anything is written; checkpoints are pruned
only after a newer one verifies; metrics after the resumed step go to a backup; accepted config changes
are recorded and shown in the model card."""

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from poise.errors import ConfigError, PoiseError
from poise.model.tiny import build_tiny_model
from poise.training import runfolder
from poise.training.checkpoint import save_checkpoint, verify
from poise.training.config import from_dict, replace
from poise.training.modelcard import model_card
from poise.training.runfolder import (
    LOCK_NAME,
    RUN_OUTPUTS,
    acquire,
    compare,
    open_run,
    precheck,
    release,
    settle_metrics,
)

HOST = socket.gethostname()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time: equal snapshots mean nothing was
    written, deleted or rewritten."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def base_cfg(tmp_path, **kw):
    raw = dict(model="m", train_file="t.jsonl", output_dir=str(tmp_path / "run"), method="gate-dpo",
               learning_rate=1e-3, max_steps=6, scheduler="constant", warmup_ratio=0.0, batch_size=8,
               micro_batch_size=8, save_steps=1)
    raw.update(kw)
    return from_dict(raw)


def fake_run(run_dir: Path, cfg, steps=(1, 2), keep=3):
    """A run folder with real checkpoints (tiny model) whose trainer_state holds ``cfg`` resolved as the
    loop writes it (gate_tau calibrated to a number)."""
    model = build_tiny_model(40, hidden_size=16, num_layers=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    resolved = {**cfg.to_dict(), "gate_tau": 0.0123}
    for step in steps:
        save_checkpoint(run_dir, step, model=model, tokenizer=None, optimizer=opt, scheduler=sched,
                        trainer_state={"step": step, "objective": {}, "config": resolved}, keep=keep)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n"
                                                   for s in range(max(steps) + 1)))
    return run_dir


# -- the lock -------------------------------------------------------------------------------------------

def test_lock_names_its_holder_and_refuses_a_second_taker(tmp_path):
    lock = acquire(tmp_path)
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == HOST and holder["since"]
    with pytest.raises(ConfigError) as e:
        acquire(tmp_path)
    msg = str(e.value)
    assert f"is in use by another poise run (pid {os.getpid()} on host {HOST}, since {holder['since']})" in msg
    assert "Wait for it to finish or stop it, or choose another output_dir" in msg
    release(lock)
    assert not (tmp_path / LOCK_NAME).exists()
    release(acquire(tmp_path))  # free again
    assert not (tmp_path / LOCK_NAME).exists()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    lock = acquire(tmp_path)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "then"}))
    release(lock)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "elsewhere"


def test_stale_lock_on_this_host_is_taken_over_and_logged(tmp_path, caplog):
    pid = dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": HOST, "since": "2020-01-01T00:00:00"}))
    with caplog.at_level(logging.WARNING, logger="poise"):
        lock = acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert any(f"took over the lock of a run that no longer runs (pid {pid} on host {HOST}, since "
               "2020-01-01T00:00:00)" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # nothing left aside
    release(lock)


def test_lock_from_another_host_is_never_taken_over(tmp_path):
    text = json.dumps({"pid": dead_pid(), "host": "gpu-node-7", "since": "2020-01-01T00:00:00"})
    (tmp_path / LOCK_NAME).write_text(text)
    with pytest.raises(ConfigError) as e:
        acquire(tmp_path)
    msg = str(e.value)
    assert "on host gpu-node-7, since 2020-01-01T00:00:00" in msg
    assert f"If you are sure it has stopped, delete {tmp_path / LOCK_NAME} and start again" in msg
    assert (tmp_path / LOCK_NAME).read_text() == text


def test_unreadable_lock_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text("{not json")
    with pytest.raises(ConfigError, match=f"unreadable lock file {tmp_path / LOCK_NAME}.*delete"):
        acquire(tmp_path)
    assert (tmp_path / LOCK_NAME).read_text() == "{not json"


# -- a fresh run ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", RUN_OUTPUTS)
def test_fresh_run_into_a_folder_with_run_output_is_refused(tmp_path, name):
    cfg = base_cfg(tmp_path)
    run = Path(cfg.output_dir)
    run.mkdir()
    if name in ("model", "checkpoints"):
        (run / name).mkdir()
        (run / name / "x").write_text("x")
    else:
        (run / name).write_text("{}\n")
    before = snapshot(run)
    for check in (precheck, open_run):
        with pytest.raises(ConfigError) as e:
            check(cfg)
        msg = str(e.value)
        assert f"output_dir {run} already holds the output of a run ({name}" in msg
        assert "resume with resume=true, or choose another output_dir" in msg
        assert snapshot(run) == before and not (run / LOCK_NAME).exists()


def test_fresh_run_into_an_empty_folder_or_one_with_other_files_is_fine(tmp_path):
    cfg = base_cfg(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    (tmp_path / "run" / "checkpoints").mkdir()  # empty: a run that died before writing any
    folder = open_run(cfg)
    assert folder.checkpoint is None and (tmp_path / "run" / LOCK_NAME).exists()
    release(folder.lock)


# -- a resume -------------------------------------------------------------------------------------------

def test_resume_with_no_checkpoint_that_verifies_stops_and_deletes_nothing(tmp_path):
    cfg = base_cfg(tmp_path, resume=True)
    run = fake_run(tmp_path / "run", cfg, steps=(1, 2))
    (run / "checkpoints" / "step-00000001" / "manifest.json").unlink()
    weights = run / "checkpoints" / "step-00000002" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    before = snapshot(run)
    with pytest.raises(ConfigError) as e:
        open_run(cfg)
    msg = str(e.value)
    assert f"output_dir {run}: resume=true, but no checkpoint verifies" in msg
    assert "step-00000002: model/model.safetensors fails its checksum" in msg
    assert "step-00000001: manifest.json is missing" in msg
    assert "Nothing was changed or deleted" in msg and "Restore the missing or damaged files" in msg
    assert "start over with resume=false in a new output_dir" in msg
    assert snapshot(run) == before


def test_resume_without_any_manifest_is_refused_before_loading(tmp_path):
    cfg = base_cfg(tmp_path, resume=True)
    run = fake_run(tmp_path / "run", cfg, steps=(1,))
    (run / "checkpoints" / "step-00000001" / "manifest.json").unlink()
    before = snapshot(run)
    with pytest.raises(ConfigError, match="step-00000001: manifest.json is missing"):
        precheck(cfg)
    assert snapshot(run) == before


def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, caplog):
    cfg = base_cfg(tmp_path, resume=True)
    run = fake_run(tmp_path / "run", cfg, steps=(1, 2))
    (run / "checkpoints" / "step-00000002" / "trainer_state.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="poise"):
        folder = open_run(cfg)
    release(folder.lock)
    assert folder.checkpoint == run / "checkpoints" / "step-00000001"
    assert any("step-00000002 is damaged (trainer_state.json fails its checksum); resuming from the previous "
               "one, step-00000001" in r.getMessage() for r in caplog.records)
    assert (run / "checkpoints" / "step-00000002").is_dir()  # kept


def test_resume_of_a_folder_without_a_run_starts_from_step_0_and_says_so(tmp_path, caplog):
    cfg = base_cfg(tmp_path, resume=True)
    with caplog.at_level(logging.INFO, logger="poise"):
        folder = open_run(cfg)
    release(folder.lock)
    assert folder.checkpoint is None
    assert any(f"resume: no checkpoint in {tmp_path / 'run'}; starting from step 0" in r.getMessage()
               for r in caplog.records)


def test_resume_over_a_final_model_without_checkpoints_is_refused(tmp_path):
    cfg = base_cfg(tmp_path, resume=True)
    (tmp_path / "run" / "model").mkdir(parents=True)
    (tmp_path / "run" / "model" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds a final model .model/. but no checkpoint to resume from"):
        open_run(cfg)
    assert not (tmp_path / "run" / LOCK_NAME).exists()


# -- the config on resume -------------------------------------------------------------------------------

#: (key, new value): each alters the trajectory and is refused without allow_config_change
TRAJECTORY = [
    ("model", "other-model"), ("tokenizer", "other-tok"), ("tokenizer_class", "PreTrainedTokenizerFast"),
    ("train_file", "other.jsonl"), ("split", "test"), ("columns", {"chosen": "good"}), ("method", "dpo"),
    ("beta", 0.2), ("gate_quantile", 0.2), ("gate_tau", 0.5), ("balance", ["ada"]), ("batch_size", 16),
    ("micro_batch_size", 4), ("seed", 1), ("dtype", "bfloat16"), ("mixed_precision", "bf16"),
    ("learning_rate", 1e-4), ("scheduler", "cosine"), ("warmup_ratio", 0.1), ("weight_decay", 0.1),
    ("adam_betas", [0.9, 0.99]), ("max_grad_norm", 0.5), ("max_length", 2048), ("max_prompt_length", 128),
    ("prompt_truncation", "error"), ("on_bad_row", "skip"), ("pair_layout", "separate"),
    ("reference_model", "ref"), ("precompute_reference", False), ("lora_r", 8), ("lora_alpha", 32.0),
    ("lora_dropout", 0.1), ("lora_target_modules", ["q_proj"]), ("gradient_checkpointing", False),
    ("chunk_size", 64), ("stage", "sft"), ("cpu", True),
]
#: (key, new value): none alters the trajectory; accepted and recorded
NOT_TRAJECTORY = [
    ("logging_steps", 5), ("save_steps", 50), ("save_total_limit", 5), ("report_to", ["tensorboard"]),
    ("eval_file", "eval.jsonl"), ("eval_steps", 10), ("diagnostics", False), ("diagnostics_steps", 3),
    ("probe_pairs", 4), ("probe_file", "probe.jsonl"), ("on_nonfinite", "skip"), ("cache_dir", "/elsewhere"),
    ("distributed_timeout", 60),
    ("max_steps", 10),  # the schedule is constant without warmup: a longer run is the same run, continued
]


def _changes(tmp_path, key, value):
    old = base_cfg(tmp_path)
    resolved = {**old.to_dict(), "gate_tau": 0.0123}
    raw = {**old.to_dict(), key: value}
    if key == "method":
        raw = {k: v for k, v in raw.items() if not k.startswith("gate_")}
    if key == "stage":
        raw = {k: v for k, v in raw.items() if not k.startswith("gate_")} | {"method": "dpo"}
    return compare(resolved, from_dict(raw))


@pytest.mark.parametrize("key,value", TRAJECTORY, ids=[k for k, _ in TRAJECTORY])
def test_a_change_that_alters_the_trajectory_is_flagged(tmp_path, key, value):
    changes = {c.key: c for c in _changes(tmp_path, key, value)}
    assert key in changes and changes[key].alters_trajectory, changes


@pytest.mark.parametrize("key,value", NOT_TRAJECTORY, ids=[k for k, _ in NOT_TRAJECTORY])
def test_a_change_that_does_not_alter_the_trajectory_is_accepted(tmp_path, key, value):
    changes = _changes(tmp_path, key, value)
    assert [(c.key, c.alters_trajectory) for c in changes] == [(key, False)]


def test_a_calibrated_number_equals_auto_and_unchanged_settings_are_no_change(tmp_path):
    old = base_cfg(tmp_path)
    assert old.build_objective().hyperparameters["gate_tau"] == "auto"
    assert compare({**old.to_dict(), "gate_tau": 0.0123, "gate_sharpness": 7.5}, old) == []
    # a default written out is the default; a path written another way is the same file
    (tmp_path / "t.jsonl").write_text("")
    same = from_dict({**old.to_dict(), "beta": 0.1, "train_file": str(tmp_path / "." / "t.jsonl")})
    assert compare({**old.to_dict(), "train_file": str(tmp_path / "t.jsonl")}, same) == []


def test_the_run_length_alters_the_trajectory_when_the_schedule_depends_on_it(tmp_path):
    cosine = base_cfg(tmp_path, scheduler="cosine")
    (change,) = compare(cosine.to_dict(), replace(cosine, max_steps=10))
    assert change.key == "max_steps" and change.alters_trajectory
    warm = base_cfg(tmp_path, warmup_ratio=0.1)
    assert compare(warm.to_dict(), replace(warm, max_steps=10))[0].alters_trajectory
    # epochs are inert while max_steps is set in both configs
    (change,) = compare(cosine.to_dict(), replace(cosine, epochs=3.0))
    assert change.key == "epochs" and not change.alters_trajectory


def test_resume_with_changes_lists_every_one_and_opts_in_with_one_key(tmp_path, caplog):
    cfg = base_cfg(tmp_path)
    run = fake_run(tmp_path / "run", cfg, steps=(2,))
    new = replace(cfg, resume=True, learning_rate=1e-2, batch_size=16, logging_steps=3,
                  hyperparameters={**cfg.hyperparameters, "beta": 0.3})
    before = snapshot(run)
    for check in (precheck, open_run):
        with pytest.raises(ConfigError) as e:
            check(new)
        msg = str(e.value)
        assert (f"resume from {run / 'checkpoints' / 'step-00000002'}: the config differs from the run's in "
                "settings that change the training trajectory: batch_size: 8 -> 16; learning_rate: 0.001 -> "
                "0.01; beta: 0.1 -> 0.3.") in msg
        assert "logging_steps" not in msg  # accepted, not an obstacle
        assert "set allow_config_change: true" in msg and "config_changes.jsonl" in msg
        assert snapshot(run) == before and not (run / LOCK_NAME).exists()
    with caplog.at_level(logging.WARNING, logger="poise"):
        folder = open_run(replace(new, allow_config_change=True))
    release(folder.lock)
    assert [(c.key, c.old, c.new, c.alters_trajectory) for c in folder.changes] == [
        ("batch_size", 8, 16, True), ("learning_rate", 1e-3, 1e-2, True), ("logging_steps", 1, 3, False),
        ("beta", 0.1, 0.3, True)]
    assert any("config change accepted at step 2: learning_rate: 0.001 -> 0.01 (alters the trajectory; "
               "allow_config_change: true)" in r.getMessage() for r in caplog.records)


def test_max_steps_below_the_checkpoint_is_refused(tmp_path):
    cfg = base_cfg(tmp_path)
    fake_run(tmp_path / "run", cfg, steps=(4,))
    with pytest.raises(ConfigError, match="max_steps=3 is below the step of the checkpoint .* step 4"):
        open_run(replace(cfg, resume=True, max_steps=3, allow_config_change=True))


def test_accepted_changes_are_recorded_once_and_shown_in_the_model_card(tmp_path):
    cfg = base_cfg(tmp_path)
    run = fake_run(tmp_path / "run", cfg, steps=(2,))
    folder = open_run(replace(cfg, resume=True, logging_steps=4, max_steps=9))
    release(folder.lock)
    runfolder.record_changes(folder, 2)
    runfolder.record_changes(folder, 2)  # the same resume again after a crash: not written twice
    rows = runfolder.read_changes(run)
    assert rows == [{"step": 2, "key": "logging_steps", "old": 1, "new": 4, "alters_trajectory": False},
                    {"step": 2, "key": "max_steps", "old": 6, "new": 9, "alters_trajectory": False}]
    card = model_card(cfg, {}, changes=rows)
    assert "## Config changes during the run" in card
    assert "| 2 | `max_steps` | 6 | 9 | no |" in card
    assert "Config changes" not in model_card(cfg, {})


# -- metrics.jsonl on resume ----------------------------------------------------------------------------

def _rows(steps):
    return "".join(json.dumps({"step": s, "loss": 0.1 * s}) + "\n" for s in steps)


def test_metrics_after_the_resumed_step_go_to_a_backup_not_away(tmp_path):
    old = _rows([0, 1, 2, 3, 4]) + '{"step": 5, "lo'  # the interrupted run died writing step 5
    (tmp_path / "metrics.jsonl").write_text(old)
    bak = settle_metrics(tmp_path, 2)
    assert bak == tmp_path / "metrics.jsonl.bak-2" and bak.read_text() == old
    assert (tmp_path / "metrics.jsonl").read_text() == _rows([0, 1, 2])
    # a second resume from the same step: the first backup stays, the new one gets its own name
    (tmp_path / "metrics.jsonl").write_text(_rows([0, 1, 2, 3]))
    assert settle_metrics(tmp_path, 2) == tmp_path / "metrics.jsonl.bak-2.1"
    assert (tmp_path / "metrics.jsonl.bak-2").read_text() == old


def test_metrics_up_to_the_resumed_step_are_left_alone(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(_rows([0, 1, 2]))
    assert settle_metrics(tmp_path, 2) is None
    assert (tmp_path / "metrics.jsonl").read_text() == _rows([0, 1, 2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_resume_from_step_0_moves_the_old_metrics_aside(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(_rows([0, 1]))
    assert settle_metrics(tmp_path, 0) == tmp_path / "metrics.jsonl.bak-0"
    assert not (tmp_path / "metrics.jsonl").exists()
    assert (tmp_path / "metrics.jsonl.bak-0").read_text() == _rows([0, 1])


# -- checkpoints are pruned only after a newer one verifies ---------------------------------------------

def _save(run, step, keep, model=None):
    model = model or build_tiny_model(40, hidden_size=16, num_layers=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_checkpoint(run, step, model=model, tokenizer=None, optimizer=opt, scheduler=sched,
                           trainer_state={"step": step}, keep=keep)


def test_nothing_is_pruned_when_the_new_checkpoint_does_not_verify(tmp_path, monkeypatch):
    import poise.training.checkpoint as ck

    _save(tmp_path, 1, keep=1)
    real = ck.verify
    monkeypatch.setattr(ck, "verify", lambda c: "model.safetensors fails its checksum" if c.name.endswith("2")
                        else real(c))
    with pytest.raises(OSError, match="does not verify .*older checkpoints are kept"):
        _save(tmp_path, 2, keep=1)
    assert verify(tmp_path / "checkpoints" / "step-00000001") is None


def test_pruning_keeps_the_new_checkpoint_when_a_damaged_newer_one_is_there(tmp_path):
    """A resume that skipped a damaged step 5 saves step 4 with save_total_limit 1: step 4 stays (the old
    rule, the newest names, kept only the damaged step 5)."""
    _save(tmp_path, 3, keep=1)
    damaged = _save(tmp_path, 5, keep=5)
    (damaged / "manifest.json").unlink()
    new = _save(tmp_path, 4, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]
    assert verify(new) is None
    again = _save(tmp_path, 5, keep=1)  # the run reaches step 5: the damaged copy is replaced
    assert verify(again) is None
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000005"]


def test_a_good_checkpoint_is_never_rewritten(tmp_path):
    first = _save(tmp_path, 2, keep=2)
    before = snapshot(first)
    _save(tmp_path, 2, keep=2, model=build_tiny_model(40, hidden_size=16, num_layers=1, seed=1))
    assert snapshot(first) == before


# -- end to end -----------------------------------------------------------------------------------------

def test_resume_with_a_changed_config_end_to_end(make_cfg):
    from poise.training.loop import train

    cfg = make_cfg(method="gate-dpo", max_steps=3, save_steps=1, gate_calibration_pairs=8, diagnostics=False)
    train(cfg)
    run = Path(cfg.output_dir)
    with pytest.raises(PoiseError, match="learning_rate: 0.001 -> 0.002"):
        train(replace(cfg, resume=True, learning_rate=2e-3))
    assert not (run / "config_changes.jsonl").exists()
    res = train(replace(cfg, resume=True, max_steps=4, logging_steps=2))
    assert res.steps == 4 and not (run / LOCK_NAME).exists()
    assert runfolder.read_changes(run) == [
        {"step": 3, "key": "logging_steps", "old": 1, "new": 2, "alters_trajectory": False},
        {"step": 3, "key": "max_steps", "old": 3, "new": 4, "alters_trajectory": False}]
    assert "| 3 | `max_steps` | 3 | 4 | no |" in (run / "model" / "README.md").read_text()
    train(replace(cfg, resume=True, max_steps=5, learning_rate=2e-3, allow_config_change=True))
    assert runfolder.read_changes(run)[2:] == [
        {"step": 4, "key": "learning_rate", "old": 1e-3, "new": 2e-3, "alters_trajectory": True},
        {"step": 4, "key": "logging_steps", "old": 2, "new": 1, "alters_trajectory": False},
        {"step": 4, "key": "max_steps", "old": 4, "new": 5, "alters_trajectory": False}]


# -- two real processes into one folder -----------------------------------------------------------------

#: ``poise train`` that, once its step-1 row is written, holds until the file POISE_TEST_GO exists (the
#: test runs the second process meanwhile), then goes on.
HOLD_UNTIL_GO = r"""
import os, sys, time
from pathlib import Path
from poise.training.runlog import RunLogger

write, go, mark = RunLogger.write, Path(os.environ["POISE_TEST_GO"]), Path(os.environ["POISE_TEST_MARK"])


def write_then_hold(self, step, metrics):
    write(self, step, metrics)
    if step == 1 and not mark.exists():
        mark.write_text("held")
        deadline = time.monotonic() + 240
        while not go.exists():
            if time.monotonic() > deadline:
                sys.exit("test harness: no go file within 240 s")
            time.sleep(0.02)


RunLogger.write = write_then_hold
from poise.cli import main

sys.exit(main(sys.argv[1:]))
"""

STEPS = 4


def write_cfg(make_cfg, tmp_path, name="shared"):
    cfg = make_cfg(name=name, method="dpo", max_steps=STEPS, save_steps=1, diagnostics=False).to_dict()
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, Path(cfg["output_dir"])


def logged_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def poise_train(path, *extra):
    return subprocess.run([sys.executable, "-m", "poise", "train", str(path), *extra], capture_output=True,
                          text=True, timeout=300)


def test_a_second_run_into_a_folder_in_use_is_refused(make_cfg, tmp_path):
    """The first run holds after step 1; a second `poise train` into its folder (fresh, and with
    resume=true) is refused with exit 2 naming the first; the first then finishes untouched."""
    path, run_dir = write_cfg(make_cfg, tmp_path)
    go, mark = tmp_path / "go", tmp_path / "held"
    env = {**os.environ, "POISE_TEST_GO": str(go), "POISE_TEST_MARK": str(mark)}
    with open(tmp_path / "a.out", "w") as fo, open(tmp_path / "a.err", "w") as fe:
        first = subprocess.Popen([sys.executable, "-c", HOLD_UNTIL_GO, "train", str(path)], stdout=fo,
                                 stderr=fe, env=env)
        try:
            deadline = time.monotonic() + 240
            while not mark.exists():
                assert first.poll() is None, (tmp_path / "a.err").read_text()[-2000:]
                assert time.monotonic() < deadline, "the first run logged no step within 240 s"
                time.sleep(0.05)
            holder = json.loads((run_dir / LOCK_NAME).read_text())
            assert holder["pid"] == first.pid and holder["host"] == HOST
            before = snapshot(run_dir)
            for extra in ((), ("resume=true",)):
                second = poise_train(path, *extra)
                assert second.returncode == 2, second.stderr[-2000:]
                assert (f"poise: error: output_dir {run_dir} is in use by another poise run (pid {first.pid} on "
                        f"host {HOST}, since {holder['since']})") in second.stderr
                assert "choose another output_dir" in second.stderr and "Traceback" not in second.stderr
                assert snapshot(run_dir) == before
            go.touch()
            assert first.wait(timeout=240) == 0, (tmp_path / "a.err").read_text()[-2000:]
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
    assert logged_steps(run_dir) == list(range(STEPS + 1))
    assert (run_dir / "model" / "model.safetensors").is_file() and not (run_dir / LOCK_NAME).exists()


def test_two_runs_started_together_one_trains_the_other_is_refused(make_cfg, tmp_path):
    """Started at the same moment (both pass the early check, then race for the lock): exactly one trains,
    the other exits 2 without writing a metric."""
    path, run_dir = write_cfg(make_cfg, tmp_path)
    procs = [subprocess.Popen([sys.executable, "-m", "poise", "train", str(path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-1500:] for o in outs]
    loser = outs[[p.returncode for p in procs].index(2)][1]
    assert ("is in use by another poise run" in loser or "already holds the output of a run" in loser), loser
    assert logged_steps(run_dir) == list(range(STEPS + 1))
    assert not (run_dir / LOCK_NAME).exists()
