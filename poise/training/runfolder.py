"""A run folder belongs to one run, and a resume never loses or silently rewrites what is in it.

:func:`prepare` (called by ``build_run`` once the inputs are known good) makes ``output_dir`` ready:

* **The lock.** ``output_dir/.poise.lock`` is created atomically (``O_CREAT | O_EXCL``) before
  anything else is written there; it holds the holder's pid, host and start time (JSON) and is
  removed when the run ends, however it ends (normal end, error, Ctrl-C, SIGTERM; an ``atexit``
  hook as the last resort). A second run into the folder is refused with the holder's pid, host and
  start time. A lock left by a process that no longer runs *on this host* is stale: it is taken over
  and the takeover is logged. A lock written on another host is never taken over: the message says
  how to remove it when the user is sure that run is gone.
* **A fresh run** (``resume: false``) into a folder that already holds the output of a run
  (:data:`RUN_OUTPUTS`) is refused.
* **A resume** (``resume: true``) uses the newest checkpoint whose checksums verify. When there are
  checkpoints and none verifies it stops, lists each one with what is wrong, and deletes nothing.
  A folder without a checkpoint (and without a final model) starts from step 0 and says so.
* **The config.** A resume compares the new config with the one stored in the checkpoint
  (``trainer_state.json``: the resolved config, so ``gate_tau`` holds the calibrated number where the
  user's file says ``auto``; the two are equal). A difference that alters the trajectory is refused
  with every difference listed, unless ``allow_config_change: true``; one that does not (logging,
  saving, evaluation, diagnostics) is accepted. Accepted differences are appended to
  ``config_changes.jsonl`` (``{"step", "key", "old", "new", "alters_trajectory"}``) and listed by the
  model card.
* **metrics.jsonl** on resume from step N: rows after step N (written by the interrupted run after
  its last checkpoint) and torn lines are not truncated away: the whole old file is first kept as
  ``metrics.jsonl.bak-N``, then ``metrics.jsonl`` is rewritten with the rows up to step N. A resume
  that starts from step 0 moves the old file to ``metrics.jsonl.bak-0``.

Multi-process runs: the main process (global rank 0) takes the lock and makes every decision; the
others receive it (one broadcast), so all ranks resume from the same checkpoint or fail with the
same message.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poise.errors import ConfigError

log = logging.getLogger("poise")

LOCK_NAME = ".poise.lock"
CHANGES_NAME = "config_changes.jsonl"
#: What a run writes into its folder that a new run would overwrite; a fresh run (resume: false) into a
#: folder holding any of them is refused. (data_summary.json is not one: each run writes it again from
#: its data, so a run interrupted before its first step can be started again as it was.)
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "model", "checkpoints", CHANGES_NAME)

#: Config keys whose change does not alter the training trajectory: accepted on resume (and recorded).
NOT_TRAJECTORY = frozenset({
    "logging_steps", "save_steps", "save_total_limit", "eval_steps", "eval_file", "report_to", "diagnostics",
    "diagnostics_steps", "probe_pairs", "probe_file", "on_nonfinite", "cache_dir",
    # how the processes are run, not what they compute (the engines agree to float rounding; tests)
    "distributed_timeout", "fsdp_reshard_after_forward", "fsdp_cpu_offload"})
#: Keys never compared: the folder itself, the resume switch, the opt-in.
NOT_COMPARED = frozenset({"output_dir", "resume", "allow_config_change"})
#: The run's length: it alters the trajectory only through the learning-rate schedule (warmup and decay
#: are fractions of the total), so a change is accepted when the schedule does not depend on the total
#: (scheduler: constant and warmup_ratio: 0 in both configs).
LENGTH_KEYS = ("max_steps", "epochs")


# -- the lock -----------------------------------------------------------------------------------------

@dataclass
class Lock:
    path: Path
    content: bytes


def _holder_text(h: dict[str, Any]) -> str:
    return f"pid {h.get('pid', '?')} on host {h.get('host', '?')}, since {h.get('since', '?')}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_lock(path: Path) -> tuple[bytes, dict[str, Any] | None]:
    """(raw bytes, holder) of a lock file; the holder is None while unreadable. A lock being created
    right now is empty for a moment: read it again for up to 2 s before calling it unreadable."""
    deadline = time.monotonic() + 2.0
    while True:
        raw = path.read_bytes()
        try:
            holder = json.loads(raw)
            if isinstance(holder, dict) and "pid" in holder and "host" in holder:
                return raw, holder
        except ValueError:
            pass
        if time.monotonic() > deadline:
            return raw, None
        time.sleep(0.05)


def _not_writable(run_dir: Path, e: OSError) -> ConfigError:
    return ConfigError(f"output_dir {run_dir} is not writable ({e.strerror or e}); choose another folder.")


def acquire(run_dir: Path) -> Lock:
    """Take ``run_dir/.poise.lock`` or raise a ConfigError naming its holder."""
    path = run_dir / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv)[:500]}
    content = json.dumps(me).encode()
    for _ in range(20):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _take_over_if_stale(path)
            continue
        except OSError as e:
            raise _not_writable(run_dir, e) from None
        try:
            os.write(fd, content)
            os.fsync(fd)
        except BaseException as e:  # a full disk, or Ctrl-C while writing it: no half-taken lock stays
            os.close(fd)
            path.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise _not_writable(run_dir, e) from None
            raise
        os.close(fd)
        return Lock(path, content)
    raise ConfigError(f"output_dir {run_dir}: could not take {path}: other runs keep taking it. Run one "
                      "poise train per output_dir.")


def _live_holder(path: Path) -> tuple[bytes, dict[str, Any]] | None:
    """(raw, holder) of a stale lock (its process no longer runs on this host); None when there is no
    lock; a ConfigError naming the holder when the lock is live, from another host, or unreadable."""
    run_dir = path.parent
    try:
        raw, holder = _read_lock(path)
    except FileNotFoundError:
        return None
    if holder is None:
        raise ConfigError(f"output_dir {run_dir} holds an unreadable lock file {path}: another poise run may "
                          f"be using this folder. If you are sure none is, delete {path} and start again; "
                          "else choose another output_dir.")
    here = socket.gethostname()
    if holder["host"] != here:
        raise ConfigError(f"output_dir {run_dir} is in use by another poise run ({_holder_text(holder)}); "
                          f"from {here}, poise cannot tell whether it still runs. If you are sure it has "
                          f"stopped, delete {path} and start again; else choose another output_dir.")
    if _pid_alive(int(holder["pid"])):
        raise ConfigError(f"output_dir {run_dir} is in use by another poise run ({_holder_text(holder)}); "
                          "two runs in one folder would mix their checkpoints and metrics. Wait for it to "
                          "finish or stop it, or choose another output_dir.")
    return raw, holder


def _take_over_if_stale(path: Path) -> None:
    """Remove a stale lock (its process no longer runs on this host) or raise naming the holder."""
    run_dir = path.parent
    found = _live_holder(path)
    if found is None:  # released meanwhile: try again
        return
    raw, holder = found
    # Stale. Move it aside under a name of our own, then check that what we moved is what we judged: a
    # process that took it over between our read and the rename has a live lock, which goes back.
    aside = path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if aside.read_bytes() != raw:
        try:
            os.link(aside, path)
        except FileExistsError:
            raise ConfigError(f"output_dir {run_dir}: several runs are starting in this folder at once; run "
                              "one poise train per output_dir.") from None
        finally:
            aside.unlink(missing_ok=True)
        return
    aside.unlink(missing_ok=True)
    log.warning("output_dir %s: took over the lock of a run that no longer runs (%s): it crashed or was "
                "killed", run_dir, _holder_text(holder))


def release(lock: Lock) -> None:
    """Remove the lock file if it is still ours."""
    try:
        if lock.path.read_bytes() == lock.content:
            lock.path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:  # pragma: no cover - a vanished or read-only folder at exit
        log.warning("could not remove the lock %s (%s); delete it before the next run", lock.path, e)


# -- what is in the folder ----------------------------------------------------------------------------

def outputs(run_dir: Path) -> list[str]:
    """The run outputs present in ``run_dir`` (an empty checkpoints/ does not count)."""
    found = []
    for name in RUN_OUTPUTS:
        p = run_dir / name
        if name == "checkpoints":
            if p.is_dir() and any(p.iterdir()):
                found.append(name + "/")
        elif p.exists():
            found.append(name + ("/" if p.is_dir() else ""))
    return found


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders (``step-N``), newest first."""
    root = run_dir / "checkpoints"
    return sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)


def why_bad(ckpt: Path) -> str | None:
    """None when the checkpoint verifies, else what is wrong with it."""
    from poise.training.checkpoint import MANIFEST, verify

    if not (ckpt / MANIFEST).is_file():
        return f"{MANIFEST} is missing"
    try:
        return verify(ckpt)
    except (KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is malformed ({e!r})"


def _manifest_missing(ckpt: Path) -> str | None:
    from poise.training.checkpoint import MANIFEST

    return None if (ckpt / MANIFEST).is_file() else f"{MANIFEST} is missing"


def _step_of(ckpt: Path) -> int:
    try:
        return int(json.loads((ckpt / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return int(ckpt.name.split("-")[-1])


# -- the config ---------------------------------------------------------------------------------------

@dataclass
class Change:
    key: str
    old: Any
    new: Any
    alters_trajectory: bool

    def text(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def _show(v: Any) -> str:
    return "(unset)" if v is _UNSET else json.dumps(v, default=str)


_UNSET = object()


def _same(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    # what calibration decided (a number in the checkpoint's resolved config) against "auto"
    if new == "auto" and isinstance(old, (int, float)) and not isinstance(old, bool):
        return True
    if isinstance(old, str) and isinstance(new, str) and old and new:
        a, b = Path(old).expanduser(), Path(new).expanduser()
        if a.exists() and b.exists():
            return os.path.realpath(a) == os.path.realpath(b)
    return False


def _resolved(raw: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(trainer fields, every method hyperparameter with its default) of a config dict, or None when it
    no longer validates."""
    from poise.training.config import from_dict

    try:
        cfg = from_dict(dict(raw), source=source)
        obj = cfg.build_objective()
    except ConfigError:
        return None
    trainer = {k: v for k, v in cfg.to_dict().items() if k not in cfg.hyperparameters}
    return trainer, dict(obj.hyperparameters) if obj is not None else {}


def compare(old: dict[str, Any], new: Any, *, source: str = "checkpoint") -> list[Change]:
    """The differences between a checkpoint's config (a dict) and the new TrainConfig, each marked
    with whether it alters the training trajectory."""
    new_raw = new.to_dict()
    a, b = _resolved(old, source), _resolved(new_raw, "config")
    if a is None or b is None:  # the old config no longer validates: compare the keys as written
        olds, news = {"": old}, {"": new_raw}
    else:
        olds, news = {"": a[0], "hp": a[1]}, {"": b[0], "hp": b[1]}
    constant = all(c.get("scheduler") == "constant" and not c.get("warmup_ratio")
                   for c in (olds[""], news[""]))
    both_max_steps = olds[""].get("max_steps") is not None and news[""].get("max_steps") is not None
    changes = []
    for part in olds:
        o, n = olds[part], news[part]
        for key in sorted(set(o) | set(n)):
            if key in NOT_COMPARED:
                continue
            ov, nv = o.get(key, _UNSET), n.get(key, _UNSET)
            if _same(key, ov, nv):
                continue
            if key in LENGTH_KEYS:
                alters = not constant and not (key == "epochs" and both_max_steps)
            else:
                alters = key not in NOT_TRAJECTORY
            changes.append(Change(key, ov, nv, alters))
    return changes


# -- the run folder -----------------------------------------------------------------------------------

@dataclass
class RunFolder:
    """What :func:`prepare` decided for one run: the lock (main process), the checkpoint to resume
    from (None: step 0), the accepted config changes, and the newest checkpoint step found."""

    run_dir: Path
    lock: Lock | None = None
    checkpoint: Path | None = None
    changes: list[Change] = field(default_factory=list)
    newest_at_open: int | None = None


_OPEN: dict[Path, RunFolder] = {}
_LAST: list[RunFolder] = []  # the run folder most recently opened in this process (for the Ctrl-C message)


def _key(run_dir: str | Path) -> Path:
    return Path(os.path.abspath(Path(run_dir).expanduser()))


def open_run(cfg: Any) -> RunFolder:
    """Main process: create the folder, take the lock, check what is in it; raises ConfigError (the
    lock released, nothing written but the folder) when the run must not start."""
    run_dir = Path(cfg.output_dir).expanduser()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _not_writable(run_dir, e) from None
    lock = acquire(run_dir)
    try:
        folder = _decide(cfg, run_dir)
    except BaseException:
        release(lock)
        raise
    folder.lock = lock
    return folder


def precheck(cfg: Any) -> None:
    """The checks of :func:`open_run` that read only, before any model is loaded, so that a run that
    will be refused is refused in seconds: the folder in use, a fresh run into a run's output, a resume
    without a checkpoint or with a changed config. Checksums are verified later, under the lock (a
    damaged checkpoint found then is reported there). Main process only (RANK unset or 0)."""
    if os.environ.get("RANK", "0") != "0":
        return
    run_dir = Path(cfg.output_dir).expanduser()
    if not run_dir.is_dir():
        return
    _live_holder(run_dir / LOCK_NAME)
    _decide(cfg, run_dir, verify=False)


def _decide(cfg: Any, run_dir: Path, *, verify: bool = True) -> RunFolder:
    found = outputs(run_dir)
    ckpts = checkpoints(run_dir)
    newest = int(ckpts[0].name.split("-")[-1]) if ckpts else None
    if not cfg.resume:
        if found:
            raise ConfigError(f"output_dir {run_dir} already holds the output of a run ({', '.join(found)}); a "
                              "new run would overwrite it. Continue that run: resume with resume=true, or "
                              "choose another output_dir.")
        return RunFolder(run_dir, newest_at_open=newest)
    if not ckpts:
        if (run_dir / "model").exists():
            raise ConfigError(f"output_dir {run_dir} holds a final model (model/) but no checkpoint to resume "
                              "from: resume=true would train again over it. Choose another output_dir (or move "
                              "model/ away to train this one again).")
        if verify:
            log.info("resume: no checkpoint in %s; starting from step 0%s", run_dir,
                     " (the run there stopped before its first checkpoint)" if found else "")
        return RunFolder(run_dir)
    reasons: dict[Path, str] = {}
    for ckpt in ckpts:
        why = why_bad(ckpt) if verify else _manifest_missing(ckpt)
        if why is None:
            break
        reasons[ckpt] = why
    else:
        listing = "; ".join(f"{c.name}: {w}" for c, w in reasons.items())
        raise ConfigError(f"output_dir {run_dir}: resume=true, but no checkpoint verifies, so there is nothing "
                          f"safe to resume from ({listing}). Nothing was changed or deleted. Restore the "
                          "missing or damaged files (from a backup or a copy of the run) and resume again, "
                          "or start over with resume=false in a new output_dir.")
    for bad, why in reasons.items() if verify else ():
        log.warning("checkpoint %s is damaged (%s); resuming from the previous one, %s (the damaged one is "
                    "kept and replaced when the run saves that step again)", bad, why, ckpt.name)
    changes = _check_config(cfg, ckpt, quiet=not verify)
    return RunFolder(run_dir, checkpoint=ckpt, changes=changes, newest_at_open=newest)


def _check_config(cfg: Any, ckpt: Path, *, quiet: bool = False) -> list[Change]:
    state_file = ckpt / "trainer_state.json"
    try:
        old = json.loads(state_file.read_text()).get("config")
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict):
        if quiet:
            return []
        log.warning("checkpoint %s holds no config to compare with (written by an older poise); resuming "
                    "without the check", ckpt)
        return []
    step = _step_of(ckpt)
    if cfg.max_steps is not None and cfg.max_steps < step:
        raise ConfigError(f"max_steps={cfg.max_steps} is below the step of the checkpoint to resume from "
                          f"({ckpt}, step {step}); a resume cannot undo steps. Set max_steps to {step} or more.")
    changes = compare(old, cfg, source=str(state_file))
    altering = [c for c in changes if c.alters_trajectory]
    if altering and not getattr(cfg, "allow_config_change", False):
        raise ConfigError(
            f"resume from {ckpt}: the config differs from the run's in settings that change the training "
            f"trajectory: {'; '.join(c.text() for c in altering)}. Resume with the run's config (its "
            f"config.yaml), or set allow_config_change: true to continue with the new values (each change "
            f"is recorded in {CHANGES_NAME} and the model card), or start a new run in another output_dir.")
    for c in changes if not quiet else ():
        log.warning("resume: config change accepted at step %d: %s%s", step, c.text(),
                    " (alters the trajectory; allow_config_change: true)" if c.alters_trajectory else "")
    return changes


def prepare(cfg: Any) -> Path:
    """Make ``cfg.output_dir`` ready for this run (see the module docstring) on every process; returns
    the run folder. The main process decides; the others receive its decision or its error."""
    import torch.distributed as dist

    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    payload: dict[str, Any]
    error: BaseException | None = None
    folder: RunFolder | None = None
    if not multi or dist.get_rank() == 0:
        try:
            folder = open_run(cfg)
            _OPEN[_key(folder.run_dir)] = folder  # at once: a Ctrl-C from here on releases the lock (close)
            payload = {"checkpoint": folder.checkpoint and str(folder.checkpoint)}
        except BaseException as e:  # every rank must hear of it, then fail alike
            error, payload = e, {"error": str(e), "config_error": isinstance(e, ConfigError)}
    if multi:
        box = [payload if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        payload = box[0]
    if error is not None:
        raise error
    if "error" in payload:
        raise (ConfigError if payload["config_error"] else RuntimeError)(payload["error"])
    if folder is None:
        ckpt = payload["checkpoint"]
        folder = RunFolder(Path(cfg.output_dir).expanduser(), checkpoint=Path(ckpt) if ckpt else None)
    _OPEN[_key(folder.run_dir)] = folder
    _LAST[:] = [folder]
    return folder.run_dir


def begin(run_dir: str | Path) -> None:
    """Note that this process starts a run into ``run_dir`` (nothing is written): what
    :func:`saved_summary` compares against if the run is interrupted before its folder is opened."""
    run_dir = Path(run_dir).expanduser()
    ckpts = checkpoints(run_dir)
    _LAST[:] = [RunFolder(run_dir, newest_at_open=int(ckpts[0].name.split("-")[-1]) if ckpts else None)]


def current(run_dir: str | Path) -> RunFolder | None:
    """The decision :func:`prepare` took for ``run_dir`` in this process, while the run is open."""
    return _OPEN.get(_key(run_dir))


def close(run_dir: str | Path) -> None:
    """Release the lock of ``run_dir`` if this process holds it (safe to call more than once)."""
    folder = _OPEN.pop(_key(run_dir), None)
    if folder is not None and folder.lock is not None:
        release(folder.lock)


@atexit.register
def _close_all() -> None:
    for key in list(_OPEN):
        close(key)


# -- on resume ----------------------------------------------------------------------------------------

def record_changes(folder: RunFolder, step: int) -> None:
    """Append the accepted config changes to ``config_changes.jsonl`` (a row already there is not
    written twice: a resume repeated after a crash)."""
    if not folder.changes:
        return
    path = folder.run_dir / CHANGES_NAME
    seen = set()
    if path.exists():
        seen = {line.strip() for line in path.read_text().splitlines() if line.strip()}
    with open(path, "a") as f:
        for c in folder.changes:
            row = json.dumps({"step": step, "key": c.key, "old": None if c.old is _UNSET else c.old,
                              "new": None if c.new is _UNSET else c.new,
                              "alters_trajectory": c.alters_trajectory}, default=str)
            if row not in seen:
                f.write(row + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_changes(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's config_changes.jsonl (none when there is no such file)."""
    path = Path(run_dir) / CHANGES_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _backup_name(path: Path, step: int) -> Path:
    bak = path.with_name(f"{path.name}.bak-{step}")
    n = 1
    while bak.exists():
        bak = path.with_name(f"{path.name}.bak-{step}.{n}")
        n += 1
    return bak


def settle_metrics(run_dir: Path, step: int) -> Path | None:
    """Before a resumed run from ``step`` appends to metrics.jsonl: keep the old file whole as
    ``metrics.jsonl.bak-<step>`` when it has rows after ``step`` or torn lines (a kill mid-write), and
    rewrite it with the rows up to ``step``; from step 0, move it aside. Returns the backup, if any."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    text = path.read_text()
    if step == 0:
        bak = _backup_name(path, 0)
        os.replace(path, bak)
        log.warning("resume from step 0: the old metrics.jsonl was moved to %s", bak.name)
        return bak
    lines = text.split("\n")
    torn = lines[-1] != ""  # the last line has no newline: the interrupted run died writing it
    keep, dropped = [], int(torn)
    for line in lines[:-1]:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step
        except ValueError:
            ok = False
        if ok:
            keep.append(line)
        else:
            dropped += 1
    if not dropped:
        return None
    bak = _backup_name(path, step)
    bak.write_text(text)
    with open(bak, "rb") as f:
        os.fsync(f.fileno())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in keep))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    log.warning("resume from step %d: metrics.jsonl had %d row(s) after that step (or torn) from the "
                "interrupted run; the old file is kept whole as %s and metrics.jsonl now holds the rows up to "
                "step %d", step, dropped, bak.name, step)
    return bak


# -- what was saved (for the Ctrl-C message) -----------------------------------------------------------

def saved_summary(run_dir: str | Path | None = None) -> str:
    """One phrase saying what the most recent run of this process left to resume from: ``checkpoint
    step N in PATH`` or ``nothing saved yet``. Reads only folder names (no checksums: it runs after
    Ctrl-C)."""
    folder = _LAST[0] if _LAST else None
    if run_dir is None:
        if folder is None:
            return "nothing saved yet"
        run_dir = folder.run_dir
    run_dir = Path(run_dir)
    before = folder.newest_at_open if folder is not None and _key(folder.run_dir) == _key(run_dir) else None
    done = [c for c in checkpoints(run_dir) if (c / "manifest.json").is_file()]
    if not done:
        return "nothing saved yet"
    step = int(done[0].name.split("-")[-1])
    if before is not None and step <= before:
        return f"nothing new saved; the newest checkpoint is still step {step} in {done[0]}"
    return f"checkpoint step {step} in {done[0]}"
