"""Checkpoints that survive crashes.

A checkpoint is a folder ``checkpoints/step-N`` holding the model (Hugging Face format, safetensors),
the optimizer and scheduler, RNG states, the data position and the objective's state (for example
the calibrated gate threshold), plus ``manifest.json`` with a SHA-256 of every file. It is written
under a temporary name, flushed, then renamed, so a process killed at any moment leaves either the
whole checkpoint or none. On resume the newest checkpoint whose checksums verify is used; a damaged
one is reported and skipped. Tensors are loaded with ``torch.load(weights_only=True)``.

An engine that shards the model (``distributed: fsdp``) writes a sharded checkpoint
(:func:`save_sharded_checkpoint`): every process writes its part of the model and optimizer state
(``torch.distributed.checkpoint``) into ``shards/`` of the same temporary folder, then the main process
adds the rest and finishes exactly as above: the manifest holds a checksum of every rank's file, and
one rename publishes the whole checkpoint or nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poise.fsutil import fsync_dir

log = logging.getLogger("poise")
MANIFEST = "manifest.json"
#: The folder of a sharded checkpoint that holds every rank's part (torch.distributed.checkpoint).
SHARDS = "shards"
#: Test hook: ``POISE_TEST_KILL_AT=<phase>:<step>`` SIGKILLs the process at that phase of writing that
#: step's checkpoint (phases: shards, model, state, manifest, rename), to test that a kill at any moment
#: leaves a resumable run; ``<phase>:<step>:<rank>`` kills only that rank; ``final_model:0`` kills the
#: process while it saves the final model (written, flushed, not yet renamed). Unset in normal use.
KILL_ENV = "POISE_TEST_KILL_AT"


def _kill_point(phase: str, step: int) -> None:
    if os.environ.get(KILL_ENV) in (f"{phase}:{step}", f"{phase}:{step}:{os.environ.get('RANK', '0')}"):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # plain types and tensors only, so that torch.load(weights_only=True) reads it back
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(run_dir: Path, step: int, *, model, tokenizer, optimizer, scheduler,
                    trainer_state: dict[str, Any], keep: int, tmp: Path | None = None) -> Path:
    """Write ``checkpoints/step-{step}`` atomically, verify it, and only then prune all but the newest
    ``keep``: no older checkpoint is deleted before a newer one is on disk whole."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    if final.is_dir() and verify(final) is None:  # this step is saved already: never rewrite a good one
        log.info("checkpoint %s is already saved and verifies; kept as it is", final)
        return final
    if tmp is None:  # else the temporary folder holds every rank's shards already (save_sharded_checkpoint)
        tmp = _new_tmp(root, step)
    try:
        final = _write(tmp, root, final, step, model, tokenizer, optimizer, scheduler, trainer_state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half written is left behind
        raise
    why = verify(final)
    if why is not None:  # read back wrong (a failing disk): keep every older checkpoint
        raise OSError(f"the checkpoint just written does not verify ({why}); older checkpoints are kept")
    prune(root, keep, newest=final)
    return final


def _new_tmp(root: Path, step: int) -> Path:
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _plan(root: Path, final: Path, step: int) -> tuple:
    """("kept",): this step is saved and verifies; ("write", temporary folder); ("error", why)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        if final.is_dir() and verify(final) is None:
            return ("kept",)
        return ("write", str(_new_tmp(root, step)))
    except OSError as e:
        return ("error", str(e.strerror or e))


def save_sharded_checkpoint(run_dir: Path, step: int, *, write_shards, comm, tokenizer, scheduler,
                            trainer_state: dict[str, Any], keep: int) -> Path:
    """Every process calls this. The main process picks the temporary folder (or finds this step saved
    already) and tells the others; ``write_shards(folder)`` (a collective: every rank writes its part of
    the model and optimizer state) fills ``shards/`` in it; then the main process writes the rest and
    finishes as :func:`save_checkpoint` does. ``comm`` has ``is_main``, ``broadcast(obj)`` (the main
    process's object on every rank) and ``barrier()``. A failure of the main process's part is raised
    on every rank."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    plan = comm.broadcast(_plan(root, final, step) if comm.is_main else None)
    if plan[0] == "error":
        raise OSError(plan[1])
    if plan[0] == "kept":
        log.info("checkpoint %s is already saved and verifies; kept as it is", final)
        return final
    tmp = Path(plan[1])
    try:
        write_shards(tmp / SHARDS)
        _kill_point("shards", step)
        comm.barrier()
    except BaseException:
        if comm.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    failure: Exception | None = None
    if comm.is_main:
        try:
            final = save_checkpoint(run_dir, step, model=None, tokenizer=tokenizer, optimizer=None,
                                    scheduler=scheduler, trainer_state=trainer_state, keep=keep, tmp=tmp)
        except Exception as e:  # every rank must hear of it, else the others wait here for ever
            failure = e
    told = comm.broadcast(None if failure is None else str(getattr(failure, "strerror", None) or failure))
    if failure is not None:
        raise failure
    if told is not None:
        raise OSError(f"the main process could not finish the checkpoint ({told})")
    return final


def prune(root: Path, keep: int, *, newest: Path | None = None) -> None:
    """Delete all but the ``keep`` newest checkpoints up to ``newest`` (the one just written and
    verified; default the newest there is), and half-written temporary folders. Checkpoints after
    ``newest`` (damaged ones a resume skipped) are left for the run to replace when it reaches them."""
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    if newest is not None:
        done = [p for p in done if p.name <= newest.name]
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(".old-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def verify(ckpt: Path) -> str | None:
    """None when every file matches its checksum, else why not."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"manifest unreadable ({e})"
    for rel, digest in manifest["files"].items():
        p = ckpt / rel
        if not p.is_file():
            return f"{rel} is missing"
        if sha256(p) != digest:
            return f"{rel} fails its checksum"
    return None


def latest_good(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are reported and skipped."""
    root = Path(run_dir) / "checkpoints"
    for ckpt in sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True):
        why = verify(ckpt)
        if why is None:
            return ckpt
        log.warning("checkpoint %s is damaged (%s); trying the previous one", ckpt, why)
    return None


def load_training_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(torch state with optimizer, scheduler, rng; trainer_state.json)."""
    state = torch.load(ckpt / "training_state.pt", weights_only=True, map_location="cpu")
    return state, json.loads((ckpt / "trainer_state.json").read_text())


def saved_objective_state(run_dir: Path) -> dict[str, Any] | None:
    """The objective's explicit state (e.g. Gate-DPO's calibrated tau) in the run's newest good
    checkpoint, or None when the run has no checkpoint. Reads only the JSON, no pickle."""
    ckpt = latest_good(Path(run_dir))
    if ckpt is None:
        return None
    return json.loads((ckpt / "trainer_state.json").read_text()).get("objective") or {}


def _write(tmp: Path, root: Path, final: Path, step: int, model, tokenizer, optimizer, scheduler,
           trainer_state: dict[str, Any]) -> Path:
    if model is not None:  # else the model is in the shards
        model.save_pretrained(tmp / "model", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / ("model" if model is not None else "tokenizer"))
    _kill_point("model", step)
    state = {"scheduler": scheduler.state_dict(), "rng": rng_state()}
    if optimizer is not None:  # else the optimizer's state is in the shards
        state["optimizer"] = optimizer.state_dict()
    torch.save(state, tmp / "training_state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1, default=str))
    _kill_point("state", step)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    for p in files:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    manifest = {str(p.relative_to(tmp)): sha256(p) for p in files}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": manifest}, indent=1))
    with open(tmp / MANIFEST, "rb") as f:
        os.fsync(f.fileno())
    _kill_point("manifest", step)
    old = None
    if final.exists():  # a damaged copy of this step (a good one is never rewritten): replaced
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _kill_point("rename", step)
    return final
