"""poise.training.schedule: the learning-rate multiplier of every scheduler the config allows, by hand
at chosen steps; and the data order of Schedule (every item once per epoch, seeded, length-grouped,
the step count from epochs or max_steps)."""

import math
import typing
from collections import Counter

import pytest
import torch

from poise.errors import ConfigError
from poise.training.config import TrainConfig, from_dict
from poise.training.schedule import Schedule, lr_lambda


def cfg(scheduler, warmup_ratio):
    return from_dict(dict(model="m", train_file="t.jsonl", scheduler=scheduler, warmup_ratio=warmup_ratio))


def rel(x):
    return pytest.approx(x, rel=1e-12)


# -- learning rate -----------------------------------------------------------------------------------

def test_the_config_allows_exactly_the_schedulers_tested_here():
    assert set(typing.get_args(typing.get_type_hints(TrainConfig)["scheduler"])) == {"linear", "cosine",
                                                                                      "constant"}


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "constant"])
def test_warmup_ramps_linearly_to_the_peak(scheduler):
    # total 10, warmup_ratio 0.2 -> 2 warmup steps; step s < 2 gets (s + 1) / (2 + 1)
    f = lr_lambda(cfg(scheduler, 0.2), 10)
    assert f(0) == rel(1 / 3)
    assert f(1) == rel(2 / 3)
    assert f(2) == rel(1.0)  # the first step after warmup is at the peak, whatever the decay


def test_linear_decays_to_zero_at_the_end():
    f = lr_lambda(cfg("linear", 0.2), 10)  # after warmup: 1 - (s - 2) / 8
    assert [f(s) for s in (3, 6, 9)] == [rel(7 / 8), rel(0.5), rel(1 / 8)]
    assert f(10) == 0.0 and f(13) == 0.0  # never negative past the end (max_steps overrun)


def test_linear_without_warmup():
    f = lr_lambda(cfg("linear", 0.0), 4)  # 1 - s/4
    assert [f(s) for s in range(4)] == [rel(1.0), rel(0.75), rel(0.5), rel(0.25)]


def test_cosine_follows_half_a_cosine_to_zero():
    f = lr_lambda(cfg("cosine", 0.2), 10)  # after warmup: (1 + cos(pi * (s - 2) / 8)) / 2
    assert f(4) == rel((2 + math.sqrt(2)) / 4)  # progress 1/4: (1 + sqrt(2)/2) / 2
    assert f(6) == rel(0.5)  # progress 1/2
    assert f(8) == rel((2 - math.sqrt(2)) / 4)  # progress 3/4: (1 - sqrt(2)/2) / 2
    assert f(9) == rel((1 + math.cos(7 * math.pi / 8)) / 2)  # the last step: small but not 0
    assert f(10) == 0.0 and f(14) == 0.0  # stays at 0 past the end instead of rising again


def test_constant_holds_the_peak_after_warmup():
    f = lr_lambda(cfg("constant", 0.2), 10)
    assert [f(s) for s in (2, 5, 9, 20)] == [1.0, 1.0, 1.0, 1.0]
    g = lr_lambda(cfg("constant", 0.0), 10)
    assert g(0) == 1.0  # no warmup: the first step is at the peak


def test_warmup_steps_are_the_ratio_of_the_total_rounded():
    # 0.1 * 24 = 2.4 -> 2 warmup steps; 0.3 * 10 = 3 warmup steps
    f = lr_lambda(cfg("linear", 0.1), 24)
    assert (f(0), f(1), f(2)) == (rel(1 / 3), rel(2 / 3), rel(1.0))
    g = lr_lambda(cfg("cosine", 0.3), 10)
    assert (g(2), g(3)) == (rel(3 / 4), rel(1.0))


def test_an_optimizer_step_uses_the_multiplier_of_its_step():
    """As build.py wires it: LambdaLR(optimizer, lr_lambda(cfg, total)); step k runs at lr * f(k)."""
    c = cfg("linear", 0.25)  # total 8: 2 warmup steps (1/3, 2/3), then 1 - (s - 2)/6
    p = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(c, 8))
    used = []
    for _ in range(8):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.5 / 3, 1 / 3, 0.5, 0.5 * 5 / 6, 0.5 * 4 / 6, 0.5 * 3 / 6, 0.5 * 2 / 6, 0.5 * 1 / 6]
    assert used == [rel(x) for x in expected]


# -- data order -------------------------------------------------------------------------------------

LENGTHS = [(7 * i) % 29 + 3 for i in range(24)]  # 24 items of lengths 3..31, all distinct


def epoch(s: Schedule, e: int) -> list[list[int]]:
    return [s.batch(e * s.per_epoch + i) for i in range(s.per_epoch)]


def test_every_item_exactly_once_per_epoch():
    s = Schedule(LENGTHS, 4, seed=0, epochs=3, max_steps=None)
    assert s.per_epoch == 6 and s.total == 18
    for e in range(3):
        batches = epoch(s, e)
        assert all(len(b) == 4 for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(24))


def test_a_remainder_smaller_than_a_batch_is_left_out():
    lengths = LENGTHS + [5, 9]  # 26 items, batches of 4: 6 per epoch, 2 items out
    s = Schedule(lengths, 4, seed=0, epochs=2, max_steps=None)
    assert s.per_epoch == 6 and s.total == 12
    for e in range(2):
        batches = epoch(s, e)
        seen = Counter(i for b in batches for i in b)
        assert all(len(b) == 4 for b in batches)
        assert len(seen) == 24 and set(seen.values()) == {1} and set(seen) <= set(range(26))


def test_the_remainder_spanning_several_mega_batches():
    """More items than one mega-batch (50 batches): still only full batches, each item at most once."""
    lengths = [(13 * i) % 41 + 1 for i in range(103)]  # batches of 2: mega-batches of 100 and 3 items
    s = Schedule(lengths, 2, seed=5, epochs=1, max_steps=None)
    assert s.per_epoch == 51
    batches = epoch(s, 0)
    seen = Counter(i for b in batches for i in b)
    assert all(len(b) == 2 for b in batches) and len(seen) == 102 and set(seen.values()) == {1}


def test_batches_are_length_grouped_and_the_longest_comes_first():
    """One mega-batch: each batch is a run of neighbours in length order; step 0 holds the longest row
    (an out-of-memory error shows at once)."""
    s = Schedule(LENGTHS, 4, seed=3, epochs=2, max_steps=None)
    rank = {i: r for r, i in enumerate(sorted(range(24), key=lambda i: -LENGTHS[i]))}
    for e in range(2):
        batches = epoch(s, e)
        for b in batches:
            ranks = sorted(rank[i] for i in b)
            assert ranks == list(range(ranks[0], ranks[0] + 4)) and ranks[0] % 4 == 0
        assert LENGTHS.index(max(LENGTHS)) in batches[0]


def test_the_order_is_deterministic_in_seed_and_epoch():
    a = Schedule(LENGTHS, 4, seed=7, epochs=3, max_steps=None)
    b = Schedule(LENGTHS, 4, seed=7, epochs=3, max_steps=None)
    assert [a.batch(t) for t in range(18)] == [b.batch(t) for t in range(18)]
    # a resumed run: a fresh Schedule asked for a late step first, then jumping back, agrees
    c = Schedule(LENGTHS, 4, seed=7, epochs=3, max_steps=None)
    assert [c.batch(t) for t in (13, 2, 17, 6, 0)] == [a.batch(t) for t in (13, 2, 17, 6, 0)]


def test_the_order_changes_across_epochs_and_seeds():
    s = Schedule(LENGTHS, 4, seed=0, epochs=3, max_steps=None)
    e0, e1, e2 = epoch(s, 0), epoch(s, 1), epoch(s, 2)
    assert e0 != e1 and e1 != e2 and e0 != e2
    other = Schedule(LENGTHS, 4, seed=1, epochs=3, max_steps=None)
    assert epoch(other, 0) != e0 and epoch(other, 2) != e2


@pytest.mark.parametrize("epochs, total", [(1, 6), (2, 12), (1.5, 9), (0.5, 3), (0.01, 1)])
def test_total_steps_from_epochs(epochs, total):
    # 6 batches per epoch; a fraction of an epoch rounds up, and a run has at least one step
    assert Schedule(LENGTHS, 4, seed=0, epochs=epochs, max_steps=None).total == total


def test_max_steps_overrides_epochs():
    short = Schedule(LENGTHS, 4, seed=0, epochs=3, max_steps=5)
    assert short.total == 5
    full = Schedule(LENGTHS, 4, seed=0, epochs=3, max_steps=None)
    assert [short.batch(t) for t in range(5)] == [full.batch(t) for t in range(5)]  # a prefix of the order
    long = Schedule(LENGTHS, 4, seed=0, epochs=1, max_steps=14)  # beyond epochs: more epochs follow
    assert long.total == 14
    assert [long.batch(t) for t in range(14)] == [full.batch(t) for t in range(14)]


def test_batch_size_above_the_data_is_refused():
    with pytest.raises(ConfigError, match="batch_size=25 is larger than the training data"):
        Schedule(LENGTHS, 25, seed=0, epochs=1, max_steps=None)
    assert Schedule(LENGTHS, 24, seed=0, epochs=1, max_steps=None).per_epoch == 1


def test_fractional_epochs_do_not_round_up_a_floating_point_excess():
    """0.07 * 100 is 7.000000000000001 in floating point: 7 steps, not 8."""
    assert Schedule([5] * 400, 4, seed=0, epochs=0.07, max_steps=None).total == 7
    assert Schedule([5] * 200, 4, seed=0, epochs=0.14, max_steps=None).total == 7


def test_batches_grouped_by_a_pairs_tokens_pad_under_5_percent_in_the_shared_layout():
    """Variable-length pairs (prompts 20-160 tokens, responses 10-80): the schedule groups by prompt +
    chosen + rejected, the shared layout's row width, so its rows waste under 5% of the positions computed;
    grouped by the two-row length instead they wasted about 9% (issue 15)."""
    import random

    from poise.data import TokenizedPair
    from poise.model.shared_prefix import collate_layout
    from poise.training.schedule import Schedule

    rng = random.Random(0)

    def ids(lo, hi):
        return tuple(rng.randint(3, 90) for _ in range(rng.randint(lo, hi)))

    pairs = [TokenizedPair(ids(20, 160), ids(10, 80), ids(10, 80), "f", i) for i in range(400)]

    def padding(lengths):
        sched = Schedule(lengths, 8, 0, 1, None)
        real = total = 0
        for s in range(sched.per_epoch):
            b = collate_layout([pairs[i] for i in sched.batch(s)], 0, "shared")
            real, total = real + int(b.attention_mask.sum()), total + b.input_ids.numel()
        return 1 - real / total

    assert padding([p.tokens for p in pairs]) < 0.05
    assert padding([p.length for p in pairs]) > 0.05  # the key matters
