"""The sharded part of a checkpoint: the model's and the optimizer's state as every rank holds it,
written and read with ``torch.distributed.checkpoint`` (DCP), which reshards on load (a checkpoint of
N processes resumes on M, or on one).

Loading reads no pickle beyond an allow-list: DCP's tensor data and its non-tensor values go through
``torch.load(weights_only=True)``, but its ``.metadata`` index is a plain pickle; :class:`SafeReader`
reads it with an unpickler that accepts only DCP's own metadata classes (listed in :data:`ALLOWED`),
``torch.Size``, torch dtypes and paths, and refuses anything else.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from poise.errors import PoiseError

#: (module, names) the metadata of a DCP checkpoint may reference; ``"*"``: every class the module
#: defines (DCP's metadata dataclasses and enums).
ALLOWED: dict[str, tuple[str, ...]] = {
    "torch.distributed.checkpoint.metadata": ("*",),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
    "torch.serialization": ("_get_layout",),
    "torch": ("Size",),  # and every torch dtype (below)
    "pathlib": ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"),
    "collections": ("OrderedDict",),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        names = ALLOWED.get(module, ())
        obj = getattr(__import__(module, fromlist=[name]), name, None) if names else None
        if module == "torch" and isinstance(obj, torch.dtype):
            return obj
        if obj is not None and (name in names or ("*" in names and isinstance(obj, type))):
            return obj
        raise pickle.UnpicklingError(f"the checkpoint's index references {module}.{name}, which a DCP index "
                                     "never holds; refusing to load it (a damaged or foreign checkpoint)")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, with the ``.metadata`` pickle read through the allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _reason(e: BaseException) -> str:
    """The first rank's error inside DCP's CheckpointException (a BaseException), in one line."""
    for rank, failure in sorted((getattr(e, "failures", None) or {}).items()):
        exc = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {str(exc).splitlines()[-1] if str(exc) else type(exc).__name__}"
    return str(e).splitlines()[0]


def save(module, optimizer, folder: Path) -> None:
    """Every rank writes its part of ``module``'s and ``optimizer``'s state into ``folder`` (collective).
    A failure on any rank is an OSError on every rank (DCP gathers the failures)."""
    msd, osd = get_state_dict(module, optimizer)
    try:
        dcp.save({"model": msd, "optimizer": osd}, storage_writer=dcp.FileSystemWriter(str(folder)))
    except CheckpointException as e:
        raise OSError(f"writing the shards failed ({_reason(e)})") from None


def load(module, optimizer, folder: Path) -> None:
    """Every rank reads its part of the state in ``folder`` into ``module`` and ``optimizer``, whatever
    the number of processes that wrote it (collective when distributed)."""
    msd, osd = get_state_dict(module, optimizer)
    state = {"model": msd, "optimizer": osd}
    try:
        dcp.load(state, storage_reader=SafeReader(str(folder)))
    except CheckpointException as e:
        raise PoiseError(f"the shards in {folder} cannot be read into this run ({_reason(e)}): a checkpoint of "
                         "another model, or damaged after its checksums were taken. Resume with the run's own "
                         "config, or start a new run in another output_dir.") from None
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_model_state(module) -> dict[str, torch.Tensor]:
    """The whole model's state on the main process, in CPU memory (empty elsewhere); a collective."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
