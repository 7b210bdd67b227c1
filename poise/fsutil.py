"""Atomic writes, and failures to write turned into a clear stop.

Bottom layer: the standard library and :mod:`poise.errors` only. Every file poise writes for the user
(the final model, the reference cache, eval.json, generations.jsonl, report.md, plots) is written under a
temporary name next to its target, flushed, and renamed over it with ``os.replace``: a process killed at
any moment, or a full disk, leaves the previous file (or none), never half of one. A folder (the final
model) is written into a temporary sibling folder and renamed the same way; an old folder of that name is
moved aside first and removed only after the rename succeeded.

Any failure to write (an ``OSError`` such as ENOSPC, EROFS, EDQUOT or EACCES, or the ``RuntimeError`` that
torch's and safetensors' writers raise on a full disk) is turned into a :class:`~poise.errors.PoiseError`
naming the path, the cause and what to do (:func:`write_error`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from poise.errors import PoiseError

#: Phrases of the RuntimeErrors that torch (``PytorchStreamWriter``) and safetensors raise when a write
#: fails (a full disk, a quota); a RuntimeError with none of them is not a write failure.
WRITE_FAILURE_PHRASES = ("pytorchstreamwriter failed", "no space left on device", "failed to write",
                         "file write failed", "disk quota exceeded", "read-only file system")


def is_write_failure(e: BaseException) -> bool:
    """An OSError, or a RuntimeError that torch's or safetensors' writer raises when the disk fails it."""
    if isinstance(e, OSError):
        return True
    return isinstance(e, RuntimeError) and any(p in str(e).lower() for p in WRITE_FAILURE_PHRASES)


def cause(e: BaseException) -> str:
    """The short cause of a write failure ("No space left on device"), for a message."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def write_error(what: str, path: str | Path, e: BaseException, *, kept: str = "",
                then: str = "run the command again") -> PoiseError:
    """The message for a failed write: what, where, why, what was kept and what to do."""
    kept = f" {kept}" if kept else ""
    return PoiseError(f"could not write {what} {path} ({cause(e)}).{kept} Free space (or choose another "
                      f"folder) and {then}.")


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename in it); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file under ``folder``, then the folders themselves."""
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            fsync_file(p)
    for p in sorted((q for q in folder.rglob("*") if q.is_dir()), reverse=True):
        fsync_dir(p)
    fsync_dir(folder)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; write it there. On success it is flushed and renamed over
    ``path``; on any failure it is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def tmp_folder_name(final: Path) -> Path:
    """The temporary sibling folder that :func:`atomic_folder` writes ``final`` into."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_folder(final: str | Path, before_rename=None) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of ``final``; fill it. On success every file is flushed, an
    old ``final`` is moved aside, the temporary folder renamed to ``final``, and only then the old one
    removed. On any failure the temporary folder is removed and an old ``final`` is left as it was.
    ``before_rename()``, when given, runs after the flush (a test's kill point)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_folder_name(final)
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        if before_rename is not None:
            before_rename()
        moved = False
        if final.exists():
            os.replace(final, old)
            moved = True
        try:
            os.replace(tmp, final)
        except BaseException:
            if moved:  # put the old one back
                os.replace(old, final)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale(parent: str | Path, name: str) -> None:
    """Remove the temporary folders or files of ``name`` that a killed process left in ``parent``, and
    set-aside old copies once ``name`` itself is there again (else the old copy is all there is: kept)."""
    parent = Path(parent)
    patterns = [f".{name}.tmp-*"] + ([f".{name}.old-*"] if (parent / name).exists() else [])
    for pattern in patterns:
        for p in parent.glob(pattern):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
