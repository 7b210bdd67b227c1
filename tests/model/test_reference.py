"""The reference pass (poise/model/reference.py): sums, the cache, and the work split over processes."""

from pathlib import Path

import pytest
import torch

from poise.data import TokenizedPair
from poise.model.reference import cached_reference_sums, compute_reference_sums
from poise.model.tiny import build_tiny_model, build_tiny_tokenizer

KW = dict(pad_token_id=0, batch_size=3, chunk_size=4096, device=torch.device("cpu"))


def _pairs(n: int = 7) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(0)

    def ids(k):
        return torch.randint(3, 60, (k,), generator=g).tolist()

    return [TokenizedPair(prompt_ids=ids(3 + i % 3), chosen_ids=ids(2 + i % 4), rejected_ids=ids(4 - i % 3),
                          source="t.jsonl", index=i)
            for i in range(n)]


def _model():
    return build_tiny_model(build_tiny_tokenizer(), hidden_size=16, num_layers=1, seed=0).eval()


def test_the_sums_are_the_log_probs_of_each_response(tmp_path):
    model, pairs = _model(), _pairs(3)
    sums = compute_reference_sums(model, pairs, **KW)
    for i, p in enumerate(pairs):
        for j, resp in enumerate((p.chosen_ids, p.rejected_ids)):
            ids = torch.tensor([p.prompt_ids + resp])
            with torch.no_grad():
                logp = model(ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
            expected = logp[len(p.prompt_ids) - 1:].sum()
            assert sums[i, j].item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_cache_is_reused_and_a_damaged_file_recomputed(tmp_path):
    model, pairs = _model(), _pairs()
    a, path, hit = cached_reference_sums(model, pairs, cache_dir=str(tmp_path), **KW)
    assert not hit and path.is_file()
    b, _, hit = cached_reference_sums(model, pairs, cache_dir=str(tmp_path), **KW)
    assert hit and torch.equal(a, b)
    path.write_bytes(b"not safetensors")
    c, _, hit = cached_reference_sums(model, pairs, cache_dir=str(tmp_path), **KW)
    assert not hit and torch.equal(a, c)


def _worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    import poise.model.reference as ref

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    scored = []
    real = ref.compute_reference_sums
    ref.compute_reference_sums = lambda model, pairs, **kw: (scored.append(len(pairs)), real(model, pairs, **kw))[1]
    sums, path, hit = ref.cached_reference_sums(_model(), _pairs(), cache_dir=out, **KW)
    again, _, hit2 = ref.cached_reference_sums(_model(), _pairs(), cache_dir=out, **KW)
    torch.save({"sums": sums, "scored": scored, "hit": (hit, hit2), "again": again}, f"{out}/rank{rank}.pt")
    # both ranks reach the end before either closes its connections, as poise's own exit does
    # (poise/training/launch.py _destroy): a rank whose peer has already gone can abort in gloo's teardown
    dist.monitored_barrier()
    dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_split_the_reference_pass(tmp_path, monkeypatch):
    """Each rank scores its share (6 + 1 of 7 pairs: whole batches of 3 of the length-sorted order); both get
    all the sums, equal to one process's bit for bit (the same batches); one cache file, reused."""
    import torch.multiprocessing as mp

    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # the spawned processes import _worker from here
    monkeypatch.delenv("RANK", raising=False)
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    one = compute_reference_sums(_model(), _pairs(), **KW)
    for rank, share in ((0, 6), (1, 1)):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert r["scored"] == [share]  # its share, once: the second call read the cache
        assert r["hit"] == (False, True)
        assert torch.equal(r["sums"], one)
        assert torch.equal(r["again"], r["sums"])
    assert len(list((tmp_path / "reference").glob("*.safetensors"))) == 1


def test_only_the_needed_pairs_are_scored_and_a_later_run_extends_the_cache(tmp_path, monkeypatch):
    import poise.model.reference as ref

    model, pairs = _model(), _pairs()
    scored = []
    real = ref.compute_reference_sums
    monkeypatch.setattr(ref, "compute_reference_sums",
                        lambda m, ps, **kw: (scored.append(len(ps)), real(m, ps, **kw))[1])
    full = real(model, pairs, **KW)
    a, path, hit = cached_reference_sums(model, pairs, cache_dir=str(tmp_path), needed=[1, 4], **KW)
    assert not hit and scored == [2]
    assert torch.isnan(a[[0, 2, 3, 5, 6]]).all()
    torch.testing.assert_close(a[[1, 4]], full[[1, 4]], rtol=1e-5, atol=0)
    b, _, hit = cached_reference_sums(model, pairs, cache_dir=str(tmp_path), needed=[4, 1], **KW)
    assert hit and scored == [2]  # nothing scored again
    c, _, hit = cached_reference_sums(model, pairs, cache_dir=str(tmp_path), needed=[1, 2, 3], **KW)
    assert not hit and scored == [2, 2]  # the two missing ones, added to the file
    d, _, hit = cached_reference_sums(model, pairs, cache_dir=str(tmp_path), **KW)
    assert not hit and scored == [2, 2, 3] and torch.isfinite(d).all()
    torch.testing.assert_close(d, full, rtol=1e-5, atol=0)
    assert torch.equal(d[[1, 4]], a[[1, 4]])  # scored once, kept
    assert cached_reference_sums(model, pairs, cache_dir=str(tmp_path), **KW)[2]


def test_a_run_that_stops_early_scores_only_what_it_uses(make_cfg=None):
    from poise.compose import objective as make_objective
    from poise.training.build import needed_pairs
    from poise.training.config import from_dict

    pairs = _pairs(40)
    base = dict(model="m", train_file="t.jsonl", batch_size=4, micro_batch_size=4, probe_pairs=2, eval_file="e.jsonl")
    cfg = from_dict({**base, "max_steps": 3})
    used = needed_pairs(cfg, pairs, make_objective("dpo"))
    assert len(used) == 12  # 3 steps of 4 distinct pairs
    assert needed_pairs(from_dict(base), pairs, make_objective("dpo")) is None  # the whole epoch
    cal = needed_pairs(cfg, pairs, make_objective("gate-dpo"))  # calibration reads the first epoch
    assert cal is None
    no_eval = needed_pairs(from_dict({**base, "max_steps": 3, "eval_file": None}), pairs, make_objective("dpo"))
    assert set(no_eval) == set(used) | {0, 1}  # and the probe pairs
