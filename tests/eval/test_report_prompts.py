"""poise.eval.report's intervals over prompts: the bootstrap itself on hand-made cases, and the report
end to end on run folders whose eval_prompts.json holds per-prompt outcomes (as ``poise eval
--prompts-file`` writes them) next to a sweep's eval.json (label, cell, seed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import make_run

from poise.eval.report import (
    beats_counts,
    bootstrap_mean,
    bootstrap_prompts,
    build_report,
    comparison_table,
    load_run,
    load_runs,
    paired_bootstrap,
    prompt_difference,
    seeds_table,
    win_rate_interval,
)

# -- the bootstrap ------------------------------------------------------------------------------------


def test_identical_sides_give_zero_with_a_zero_interval():
    a = {i: [0.0, 0.5, 1.0][i % 3] for i in range(30)}
    assert paired_bootstrap(a, dict(a)) == (0.0, 0.0, 0.0)
    assert paired_bootstrap([a, a], [a]) == (0.0, 0.0, 0.0)


def test_a_side_that_wins_every_prompt_is_above_zero():
    rng = np.random.default_rng(1)
    b = {i: float(rng.choice([0.0, 0.5, 1.0])) for i in range(50)}
    d, low, high = paired_bootstrap({i: 1.0 for i in range(50)}, b)
    assert d == pytest.approx(1 - np.mean(list(b.values())), rel=1e-12)
    assert 0 < low <= d <= high <= 1
    assert paired_bootstrap(b, {i: 1.0 for i in range(50)})[2] < 0  # and the other way round below


def test_a_small_case_recomputed_with_numpy():
    """Only the ids both sides have (1, 2, 3, 7), in sorted order; the resamples as the docstring says."""
    a = {3: 1.0, 1: 0.0, 2: 0.5, 7: 1.0, 8: 0.0}
    b = {1: 0.5, 2: 0.5, 3: 0.0, 7: 1.0, 9: 1.0}
    x = np.array([0.0 - 0.5, 0.5 - 0.5, 1.0 - 0.0, 1.0 - 1.0])
    rng = np.random.default_rng(5)
    stats = x[rng.integers(0, 4, size=(2000, 4))].mean(axis=1)
    low, high = np.quantile(stats, [0.025, 0.975])
    d, lo, hi = paired_bootstrap(a, b, n=2000, seed=5)
    assert d == pytest.approx(x.mean(), rel=1e-12)
    assert lo == pytest.approx(low, rel=1e-12, abs=1e-15) and hi == pytest.approx(high, rel=1e-12)
    assert bootstrap_prompts([a], [b], n=2000, seed=5)[3] == 4


def test_the_order_of_the_ids_does_not_matter():
    rng = np.random.default_rng(2)
    a = {i: float(rng.choice([0.0, 0.5, 1.0])) for i in range(25)}
    b = {i: float(rng.choice([0.0, 1.0])) for i in range(25)}
    flipped = (dict(reversed(list(a.items()))), dict(sorted(b.items(), key=lambda kv: (kv[1], -kv[0]))))
    assert paired_bootstrap(a, b) == paired_bootstrap(*flipped)
    assert bootstrap_mean(a) == bootstrap_mean(flipped[0])


def test_seeds_are_averaged_over_the_prompts_they_all_share():
    """Each resample's statistic is the mean over seeds of each seed's mean over the resampled prompts
    (recomputed that way here), on the ids every seed of both sides has."""
    rng = np.random.default_rng(3)
    a = [{i: float(rng.choice([0.0, 0.5, 1.0])) for i in range(20)} for _ in range(3)]
    b = [{i: float(rng.choice([0.0, 1.0])) for i in range(1, 21)} for _ in range(2)]
    a[1][25] = 1.0  # a prompt only one seed has: left out
    ids = list(range(1, 20))
    A = np.array([[s[i] for i in ids] for s in a])
    B = np.array([[s[i] for i in ids] for s in b])
    idx = np.random.default_rng(0).integers(0, len(ids), size=(2000, len(ids)))
    stats = A[:, idx].mean(axis=2).mean(axis=0) - B[:, idx].mean(axis=2).mean(axis=0)
    low, high = np.quantile(stats, [0.025, 0.975])
    d, lo, hi, n = bootstrap_prompts(a, b)
    assert n == 19 and d == pytest.approx(A.mean(axis=1).mean() - B.mean(axis=1).mean(), rel=1e-12)
    assert lo == pytest.approx(low, rel=1e-9, abs=1e-12) and hi == pytest.approx(high, rel=1e-9, abs=1e-12)
    m, lo1, hi1 = bootstrap_mean(a)
    assert m == pytest.approx(np.mean([[s[i] for i in range(20)] for s in a]), rel=1e-12) and lo1 <= m <= hi1


def test_many_prompts_and_no_common_prompt():
    rng = np.random.default_rng(4)
    a = {i: float(rng.random() < 0.6) for i in range(3000)}  # resampled in blocks
    m, lo, hi = bootstrap_mean(a)
    assert lo < m < hi and hi - lo == pytest.approx(2 * 1.96 * (0.6 * 0.4 / 3000) ** 0.5, rel=0.1)
    with pytest.raises(ValueError, match="common"):
        paired_bootstrap({1: 1.0}, {2: 1.0})
    with pytest.raises(ValueError):
        bootstrap_prompts([])


# -- the report, end to end ---------------------------------------------------------------------------

P = 40


def _outcomes(kind: str, seed: int) -> list[float]:
    """Per-prompt outcomes: "good" wins ~90% of prompts, "even" ~half (the baseline's level)."""
    rng = np.random.default_rng(100 + seed + (0 if kind == "good" else 50))
    p = 0.9 if kind == "good" else 0.5
    return [float(v) for v in np.where(rng.random(P) < p, 1.0, np.where(rng.random(P) < 0.2, 0.5, 0.0))]


def _folder(tmp_path, name, *, method, cell, seed, outcomes, lc, order=None, ci=None, extra_ids=()):
    """A sweep run folder: config.yaml, eval.json (label, cell, seed, gold reward, LC win rate) and
    eval_prompts.json (win rate, outcomes, prompt ids; the ids listed in ``order``)."""
    ids = list(range(P)) if order is None else order
    d = make_run(tmp_path, name, config={"method": method, "seed": seed},
                 eval={"method": method, "label": method, "cell": cell, "seed": seed, "gold_reward": lc,
                       "lc_win_rate": lc})
    values = [outcomes[i] for i in ids] + [1.0] * len(extra_ids)
    prompts = {"run": str(d), "method": method, "win_rate": float(np.mean(values)), "lc_win_rate": lc,
               "outcomes": values, "prompt_ids": ids + list(extra_ids)}
    if ci is not None:
        prompts["win_rate_ci"] = ci
    (d / "eval_prompts.json").write_text(json.dumps(prompts))
    return d


@pytest.fixture
def seeded(tmp_path):
    """Cell a: adadpo wins most prompts, dpo about half: significant. Cell b: both about half. Three
    seeds each; one adadpo seed lists its prompts in another order and has two prompts no other seed has."""
    dirs, sides = [], {}
    for cell, kind in (("a", "good"), ("b", "even")):
        for method in ("dpo", "adadpo"):
            for seed in range(3):
                o = _outcomes(kind if method == "adadpo" else "even", seed + (10 if method == "dpo" else 0))
                order = list(reversed(range(P))) if (method, seed) == ("adadpo", 1) else None
                extra = (P, P + 1) if (method, seed) == ("adadpo", 2) else ()
                dirs.append(_folder(tmp_path, f"{cell}-{method}-{seed}", method=method, cell=cell, seed=seed,
                                    outcomes=o, lc=0.5 + 0.01 * seed, order=order, extra_ids=extra))
                sides.setdefault((cell, method), []).append(dict(enumerate(o)))
    return dirs, sides


def test_outcomes_are_read_and_paired_by_prompt_id(seeded):
    dirs, sides = seeded
    run = load_run(dirs[4])  # cell a, adadpo, seed 1: ids in reverse order
    assert run.prompt_outcomes() == sides[("a", "adadpo")][1]
    assert len(load_run(dirs[5]).prompt_outcomes()) == P + 2


def test_the_seeds_table_and_counts_use_the_bootstrap_over_prompts(seeded):
    dirs, sides = seeded
    runs = load_runs(dirs)
    from poise.eval.report import _entrants

    cells = _entrants(runs)
    for cell in ("a", "b"):
        got = win_rate_interval(cells[cell]["adadpo"])
        assert got == pytest.approx(bootstrap_mean(sides[(cell, "adadpo")]), rel=1e-12)
        d = prompt_difference(cells[cell]["adadpo"], cells[cell]["dpo"])
        assert d[3] == P  # the extra prompts of one seed are left out
        assert d[:3] == pytest.approx(paired_bootstrap(sides[(cell, "adadpo")], sides[(cell, "dpo")]), rel=1e-12)
    da = prompt_difference(cells["a"]["adadpo"], cells["a"]["dpo"])
    db = prompt_difference(cells["b"]["adadpo"], cells["b"]["dpo"])
    assert da[1] > 0 and db[1] < 0 < db[2]
    assert beats_counts(runs, significant=True)[("adadpo", "win_rate")] == (1, 2)
    # LC win rate: the same for both methods in every seed: no difference, never significant (t over seeds)
    assert beats_counts(runs, significant=True)[("adadpo", "lc_win_rate")] == (0, 2)

    table = seeds_table(runs)
    wa = win_rate_interval(cells["a"]["adadpo"])
    assert "| a | adadpo | 3 | 0.510 ± 0.025 | +0.00 ± 0.000 | 0.510 ± 0.025 | +0.00 ± 0.000 | " in table
    assert f"{wa[0]:.3f} [{wa[1]:.3f}, {wa[2]:.3f}] | {da[0]:+.2f} [{da[1]:+.2f}, {da[2]:+.2f}] * |" in table
    assert f"{db[0]:+.2f} [{db[1]:+.2f}, {db[2]:+.2f}] |" in table
    assert "win rate (mean [95%])" in table and "LC win rate (mean ± 95%)" in table
    assert "bootstrap over prompts (2000 resamples of the prompt ids all seeds share" in table

    report = build_report(runs)
    assert "adadpo beats dpo on win rate in" in report
    assert "(significantly, 95% paired bootstrap over prompts: in 1)" in report
    assert "on LC win rate in 0 of 2 cells (significantly, 95% over seeds: in 0)" in report
    assert "| best win rate |" in report


def test_single_runs_get_the_run_interval_and_the_paired_bootstrap(tmp_path):
    """No seeds: a run's interval is its win_rate_ci when it has one, else the bootstrap of its
    outcomes; the "beats" count on the win rate is significant by the paired bootstrap alone."""
    good, even = _outcomes("good", 0), _outcomes("even", 1)
    dpo = _folder(tmp_path, "dpo", method="dpo", cell="c", seed=None, outcomes=even, lc=0.5)
    ada = _folder(tmp_path, "ada", method="adadpo", cell="c", seed=None, outcomes=good, lc=0.6,
                  ci=[0.81, 0.93])
    runs = load_runs([dpo, ada])
    assert win_rate_interval(runs[1]) == (pytest.approx(np.mean(good), rel=1e-12), 0.81, 0.93)
    m, lo, hi = bootstrap_mean(dict(enumerate(even)))
    assert win_rate_interval(runs[0]) == pytest.approx((np.mean(even), lo, hi), rel=1e-12)
    table = comparison_table(runs)
    assert f"| {np.mean(good):.3f} [0.810, 0.930] |" in table
    assert f"| {np.mean(even):.3f} [{lo:.3f}, {hi:.3f}] |" in table
    assert beats_counts(runs, significant=True) == {("adadpo", "gold_reward"): (0, 1),
                                                    ("adadpo", "lc_win_rate"): (0, 1),
                                                    ("adadpo", "win_rate"): (1, 1)}
    report = build_report(runs)
    assert "adadpo beats dpo on win rate in 1 of 1 cell (significantly, 95% paired bootstrap over prompts: in 1)" \
        in report
    assert "adadpo beats dpo on LC win rate in 1 of 1 cell\n" in report  # no seeds: no interval for it
    assert "Win rate [low, high]: its 95% interval over prompts" in report
    assert "## Seeds" not in report


def test_eval_json_win_rate_keeps_its_own_numbers(tmp_path):
    """eval.json's own win rate (poise eval --gold) is not given the outcomes of eval_prompts.json,
    which belong to another comparison; without outcomes nothing changes."""
    d = _folder(tmp_path, "r", method="dpo", cell="c", seed=0, outcomes=_outcomes("good", 0), lc=0.5,
                ci=[0.1, 0.2])
    ev = json.loads((d / "eval.json").read_text())
    (d / "eval.json").write_text(json.dumps({**ev, "win_rate": 0.3}))
    run = load_run(d)
    assert run.score("win_rate") == 0.3 and run.outcomes() is None and "win_rate_ci" not in run.eval
    assert win_rate_interval(run) is None
    bad = _folder(tmp_path, "bad", method="dpo", cell="c", seed=0, outcomes=_outcomes("even", 0), lc=0.5)
    prompts = json.loads((bad / "eval_prompts.json").read_text())
    (bad / "eval_prompts.json").write_text(json.dumps({**prompts, "prompt_ids": [0] * P}))
    assert load_run(bad).prompt_outcomes() is None and load_run(bad).outcomes() is not None
