"""Sharded checkpoints (checkpoint.save_sharded_checkpoint, sharded.SafeReader) without a process group:
two ranks as threads with a fake communicator, so that the protocol (the main process picks the folder,
every rank writes its part, the main process finishes, a failure reaches every rank) is tested here in
milliseconds; tests/training/test_engines.py runs it for real over gloo."""

import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from poise.training.checkpoint import (
    SHARDS,
    latest_good,
    load_training_state,
    save_sharded_checkpoint,
    verify,
)
from poise.training.sharded import SafeReader


class Comm:
    """What save_sharded_checkpoint needs of the processes, for ``world`` ranks running as threads."""

    def __init__(self, world: int = 2):
        self.world, self.slot = world, None
        self.barrier_ = threading.Barrier(world, timeout=30)

    def rank(self, r: int):
        comm = self

        class Rank:
            is_main = r == 0

            def barrier(self):
                comm.barrier_.wait()

            def broadcast(self, obj):
                if r == 0:
                    comm.slot = obj
                comm.barrier_.wait()
                out = comm.slot
                comm.barrier_.wait()
                return out
        return Rank()


def _save(tmp_path, step, *, world=2, shards=None, scheduler=None):
    comm = Comm(world)
    sched = scheduler or torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))]),
                                                          lambda s: 1.0)

    def write(r):
        def shards_of(folder):
            folder.mkdir(exist_ok=True)
            (shards or (lambda f, r: (f / f"__{r}_0.distcp").write_bytes(bytes([r]) * 8)))(folder, r)
        return save_sharded_checkpoint(tmp_path, step, write_shards=shards_of, comm=comm.rank(r), tokenizer=None,
                                       scheduler=sched, trainer_state={"step": step}, keep=2)

    with ThreadPoolExecutor(world) as pool:
        futures = [pool.submit(write, r) for r in range(world)]
        return [f.exception(timeout=60) or f.result() for f in futures]


def test_every_rank_writes_into_one_folder_that_one_manifest_covers(tmp_path):
    out = _save(tmp_path, 2)
    assert out[0] == out[1] == tmp_path / "checkpoints" / "step-00000002"
    ckpt = out[0]
    assert verify(ckpt) is None and latest_good(tmp_path) == ckpt
    assert sorted(p.name for p in (ckpt / SHARDS).iterdir()) == ["__0_0.distcp", "__1_0.distcp"]
    (ckpt / SHARDS / "__1_0.distcp").write_bytes(b"\0" * 8)  # rank 1's part damaged: the checkpoint is
    assert "fails its checksum" in verify(ckpt)
    state, tstate = load_training_state(ckpt)  # weights_only; no optimizer: it is in the shards
    assert "optimizer" not in state and tstate["step"] == 2
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_a_saved_step_is_kept_and_a_failure_reaches_every_rank(tmp_path):
    good = _save(tmp_path, 1)[0]
    assert _save(tmp_path, 1) == [good, good]  # already saved and verifies: kept, nothing written

    class Broken:
        def state_dict(self):
            raise OSError(28, "No space left on device")

    out = _save(tmp_path, 2, scheduler=Broken())  # the main process's part fails
    assert isinstance(out[0], OSError) and isinstance(out[1], OSError)
    assert "No space left on device" in str(out[1])
    assert latest_good(tmp_path) == good and not list((tmp_path / "checkpoints").glob(".tmp-*"))

    def bad_shards(folder, r):
        raise OSError(5, f"rank {r} cannot write")

    out = _save(tmp_path, 3, world=1, shards=bad_shards)
    assert isinstance(out[0], OSError) and not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_the_dcp_index_is_read_through_an_allow_list(tmp_path):
    """A real DCP checkpoint loads; an index that references anything else is refused, not executed."""
    from torch.distributed import checkpoint as dcp

    state = {"w": torch.arange(6.0).reshape(2, 3), "step": 3}
    dcp.save(state, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    back = {"w": torch.zeros(2, 3), "step": 0}
    dcp.load(back, storage_reader=SafeReader(str(tmp_path / "ok")), no_dist=True)
    assert torch.equal(back["w"], state["w"]) and back["step"] == 3

    (tmp_path / "bad").mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "bad" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="references builtins.print"):
        SafeReader(str(tmp_path / "bad")).read_metadata()
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException, match="CheckpointException"):  # DCP's wrapper of the refusal
        dcp.load({"w": torch.zeros(2, 3)}, storage_reader=SafeReader(str(tmp_path / "bad")), no_dist=True)


def test_shards_round_trip_and_a_foreign_checkpoint_is_a_clean_error(tmp_path):
    """One process (no group): what sharded.save wrote, sharded.load reads back, optimizer state too; the
    shards of another model are a PoiseError naming the folder, not DCP's BaseException."""
    from poise.errors import PoiseError
    from poise.training import sharded

    def run(width):
        torch.manual_seed(0)
        m = torch.nn.Linear(width, 2)
        opt = torch.optim.AdamW(m.parameters(), lr=0.1)
        m(torch.ones(1, width)).sum().backward()
        opt.step()
        return m, opt

    m, opt = run(3)
    sharded.save(m, opt, tmp_path / "s")
    m2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=0.1)
    sharded.load(m2, opt2, tmp_path / "s")
    assert torch.equal(m2.weight, m.weight)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    other, other_opt = run(4)
    with pytest.raises(PoiseError, match="cannot be read into this run"):
        sharded.load(other, other_opt, tmp_path / "s")
