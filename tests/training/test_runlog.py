"""poise.training.runlog.MetricAccumulator: a step's metrics are means over pairs, weighted by each
micro-batch's pair count, over the micro-batches and the ranks; keys ending in ``_min``/``_max``
reduce by min/max. Every expected value below is computed by hand in the comment beside it."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from poise.training.runlog import MetricAccumulator


def approx(expected: dict) -> dict:
    return {k: pytest.approx(v, rel=1e-12) for k, v in expected.items()}


class OneProcess:
    """An accelerator of a single process: reduce() must not touch the collectives."""

    num_processes = 1
    device = torch.device("cpu")

    def reduce(self, *a, **kw):
        raise AssertionError("reduce called with one process")

    def gather(self, *a, **kw):
        raise AssertionError("gather called with one process")


class Ranks:
    """The collectives of ``world`` ranks, each rank running in its own thread: a call blocks until
    every rank has made its own (like torch.distributed), then each gets the combined tensor."""

    def __init__(self, world: int = 2):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)  # a rank that never calls fails the test
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls: list[list[tuple[str, str]]] = [[] for _ in range(world)]

    def exchange(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = t.clone()
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out

    def accelerator(self, rank: int):
        return FakeAccelerator(self, rank)

    def reduce_all(self, accumulators: list[MetricAccumulator]) -> list[dict[str, float]]:
        assert len(accumulators) == self.world
        with ThreadPoolExecutor(self.world) as pool:
            futures = [pool.submit(a.reduce, self.accelerator(r)) for r, a in enumerate(accumulators)]
            return [f.result(timeout=60) for f in futures]


class FakeAccelerator:
    """The part of accelerate.Accelerator that MetricAccumulator.reduce uses, for one rank."""

    device = torch.device("cpu")

    def __init__(self, ranks: Ranks, rank: int):
        self.ranks, self.rank, self.num_processes = ranks, rank, ranks.world

    def reduce(self, t, reduction="sum"):
        self.ranks.calls[self.rank].append(("reduce", reduction))
        assert reduction == "sum"
        return torch.stack(self.ranks.exchange(self.rank, t)).sum(0)

    def gather(self, t):
        self.ranks.calls[self.rank].append(("gather", ""))
        return torch.cat(self.ranks.exchange(self.rank, t), dim=0)


def accumulate(*micro_batches):
    acc = MetricAccumulator()
    for metrics, weight in micro_batches:
        acc.add(metrics, weight)
    return acc


# Rank 0 ran two micro-batches (4 and 2 pairs), rank 1 one micro-batch (2 pairs).
RANK0 = [
    ({"loss": 1.0, "rewards/accuracies": 0.5, "margin_min": -2.0, "margin_max": 3.0}, 4),
    ({"loss": 4.0, "rewards/accuracies": 1.0, "margin_min": -1.0, "margin_max": 5.0}, 2),
]
RANK1 = [
    ({"loss": 2.5, "rewards/accuracies": 0.0, "margin_min": -3.5, "margin_max": 1.0}, 2),
]


def test_means_over_micro_batches_are_weighted_by_pair_counts():
    expected = {
        "loss": 2.0,  # (1.0*4 + 4.0*2) / 6 = 12/6; the unweighted mean would be 2.5
        "rewards/accuracies": 2 / 3,  # (0.5*4 + 1.0*2) / 6 = 4/6
        "margin_min": -2.0,  # min(-2, -1), not a mean
        "margin_max": 5.0,  # max(3, 5), not a mean
    }
    assert accumulate(*RANK0).reduce() == approx(expected)
    assert accumulate(*RANK0).reduce(OneProcess()) == approx(expected)  # no collective with one process


def test_min_max_keys_ignore_the_weights():
    """A tiny micro-batch holding the extreme still sets it; the weights do not enter."""
    acc = accumulate(({"x_min": 0.25, "x_max": 0.75}, 100), ({"x_min": 0.125, "x_max": 0.875}, 1))
    assert acc.reduce() == approx({"x_min": 0.125, "x_max": 0.875})


def test_tensor_values_are_accepted():
    """The objectives' metrics are 0-d tensors."""
    acc = accumulate(({"loss": torch.tensor(3.0), "m_max": torch.tensor(-1.5)}, 1),
                     ({"loss": torch.tensor(6.0), "m_max": torch.tensor(-0.5)}, 2))
    assert acc.reduce() == approx({"loss": 5.0, "m_max": -0.5})  # (3*1 + 6*2) / 3 = 15/3


def test_a_key_missing_from_a_micro_batch_is_averaged_over_the_pairs_that_have_it():
    """gate/tau, for instance, appears once the gate is calibrated."""
    acc = accumulate(({"loss": 2.0}, 3), ({"loss": 6.0, "gate/tau": 0.25}, 1))
    # loss: (2*3 + 6*1) / 4 = 3; gate/tau: 0.25*1 / 1 (not 0.25/4)
    assert acc.reduce() == approx({"loss": 3.0, "gate/tau": 0.25})


def test_micro_batches_of_no_pairs_contribute_nothing():
    acc = accumulate(({"loss": 100.0, "only_here": 7.0}, 0), ({"loss": 1.5}, 2))
    assert acc.reduce() == approx({"loss": 1.5})  # only_here has weight 0: no value at all
    assert MetricAccumulator().reduce() == {}


def test_two_ranks_reduce_to_the_same_weighted_means_and_extremes():
    ranks = Ranks(2)
    out = ranks.reduce_all([accumulate(*RANK0), accumulate(*RANK1)])
    expected = {
        "loss": 2.125,  # (1.0*4 + 4.0*2 + 2.5*2) / (4 + 2 + 2) = 17/8
        "rewards/accuracies": 0.5,  # (0.5*4 + 1.0*2 + 0.0*2) / 8 = 4/8
        "margin_min": -3.5,  # min(-2, -1, -3.5): rank 1's
        "margin_max": 5.0,  # max(3, 5, 1): rank 0's
    }
    assert out[0] == approx(expected)
    assert out[1] == approx(expected)  # every rank logs the same numbers
    # one gather of the keys' fingerprint (the ranks' keys agree: no second one), one all-reduce for the
    # sums and weights together, one gather per kind of extreme
    assert ranks.calls[0] == ranks.calls[1] == [("gather", ""), ("reduce", "sum"), ("gather", ""), ("gather", "")]


def test_two_ranks_equal_one_process_that_ran_every_micro_batch():
    ranks = Ranks(2)
    out = ranks.reduce_all([accumulate(*RANK0), accumulate(*RANK1)])
    assert out[0] == approx(accumulate(*RANK0, *RANK1).reduce())


def test_two_ranks_with_only_mean_keys_gather_no_extremes():
    ranks = Ranks(2)
    out = ranks.reduce_all([accumulate(({"loss": 1.0}, 1)), accumulate(({"loss": 4.0}, 3))])
    assert out[0] == out[1] == approx({"loss": 3.25})  # (1*1 + 4*3) / 4 = 13/4
    assert ranks.calls[0] == [("gather", ""), ("reduce", "sum")]


def test_unequal_rank_weights():
    """A rank with more pairs (an uneven eval split) counts more: pairs, not ranks, are averaged."""
    ranks = Ranks(2)
    out = ranks.reduce_all([accumulate(({"acc": 1.0, "d_min": 0.5}, 3)), accumulate(({"acc": 0.0, "d_min": 0.75}, 1))])
    assert out[0] == out[1] == approx({"acc": 0.75, "d_min": 0.5})  # (1*3 + 0*1) / 4; min(0.5, 0.75)


def test_slash_min_and_max_keys_are_extremes_too():
    """``gate/min``/``gate/max`` are the min/max over micro-batches, not a pair-weighted mean (0.375)."""
    acc = MetricAccumulator()
    acc.add({"gate/min": 0.25, "gate/max": 0.5}, 3)
    acc.add({"gate/min": 0.75, "gate/max": 0.9}, 1)
    out = acc.reduce()
    assert out["gate/min"] == 0.25 and out["gate/max"] == 0.9


def test_a_rank_without_items_reduces_the_same_keys_as_the_others():
    """An uneven evaluation split: rank 1 saw no pair (or only zero-weight padding work with other keys).
    Every rank still makes the same collectives over the union of the keys, and the numbers are those of
    the pairs seen: a rank without a value adds nothing, extremes included."""
    ranks = Ranks(2)
    rank0 = accumulate(({"loss": 1.0, "d_min": 0.5, "d_max": 2.0, "only0": 3.0}, 2))
    rank1 = accumulate(({"loss": 99.0, "d_min": -9.0, "d_max": 9.0, "pad_only": 5.0, "p_max": 7.0}, 0))
    out = ranks.reduce_all([rank0, rank1])
    assert out[0] == out[1] == approx({"loss": 1.0, "d_min": 0.5, "d_max": 2.0, "only0": 3.0})
    # the keys differ: a second gather (the keys' bytes) before the reductions
    assert ranks.calls[0] == ranks.calls[1] == [("gather", ""), ("gather", ""), ("reduce", "sum"),
                                                ("gather", ""), ("gather", "")]
    empty = ranks.reduce_all([accumulate(({"loss": 2.0, "x_min": 1.0}, 4)), MetricAccumulator()])
    assert empty[0] == empty[1] == approx({"loss": 2.0, "x_min": 1.0})
