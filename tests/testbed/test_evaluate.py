"""Testbed scoring: gold-reward scores and (length-controlled) win rates. Generation (the testbed's
``generate`` is poise.model.generate.generate) is tested in tests/model/test_generate.py."""

import numpy as np
import pytest

from poise.testbed.evaluate import _sigmoid, fit_logistic, score, win_rate

PROMPT = "copy: ant bee cat dog ="  # gold " ant bee cat dog"
GOLD, HALF, WRONG = " ant bee cat dog", " ant bee", " eel eel eel eel"  # gold rewards 1, 0.5, 0


def test_score_by_hand():
    out = score([PROMPT, PROMPT, "count: ant bee ="], [GOLD, HALF, " two two"])
    assert out["gold_reward"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert out["exact_match"] == pytest.approx(1 / 3)
    assert out["length"] == pytest.approx((4 + 2 + 2) / 3)
    assert out["gold_length"] == pytest.approx((4 + 4 + 1) / 3)
    with pytest.raises(ValueError):
        score([PROMPT], [])


def test_raw_win_rate_counts_ties_half_and_is_antisymmetric():
    prompts = [PROMPT] * 4
    a, b = [GOLD, HALF, WRONG, HALF], [HALF, GOLD, HALF, " ant cat"]
    out = win_rate(prompts, a, b)
    assert out["win_rate"] == pytest.approx((1 + 0 + 0 + 0.5) / 4)
    assert out["ties"] == pytest.approx(0.25)
    back = win_rate(prompts, b, a)
    assert out["win_rate"] + back["win_rate"] == pytest.approx(1.0)
    assert out["lc_win_rate"] + back["lc_win_rate"] == pytest.approx(1.0, abs=1e-6)


def test_lc_equals_raw_when_lengths_are_equal():
    prompts = [PROMPT] * 5
    a = [GOLD, " ant bee cat eel", WRONG, GOLD, " ant bee eel eel"]
    b = [WRONG, GOLD, GOLD, " ant bee cat eel", " ant bee eel eel"]
    out = win_rate(prompts, a, b)
    assert out["win_rate"] == pytest.approx(2.5 / 5)
    assert out["lc_win_rate"] == out["win_rate"] and out["length_coef"] == 0.0


def test_lc_removes_a_win_that_comes_only_from_length():
    """60 prompts where a is 2 words longer (a wins 48, 80%) and 20 where it is 2 words shorter
    (a wins 4, 20%): raw win rate 52/80 = 0.65. Given the length difference, a's odds are
    symmetric (0.8 vs 0.2), so the fitted intercept is ~0 and the LC win rate ~0.5."""
    a = [GOLD] * 48 + [WRONG] * 12 + [HALF] * 4 + [HALF] * 16
    b = [HALF] * 48 + [HALF] * 12 + [WRONG] * 4 + [GOLD] * 16
    out = win_rate([PROMPT] * 80, a, b)
    assert out["win_rate"] == pytest.approx(0.65)
    assert out["lc_win_rate"] == pytest.approx(0.5, abs=0.02)
    assert out["length_coef"] > 1.0 and out["length_diff"] == pytest.approx(1.0)


def test_lc_keeps_a_win_that_does_not_depend_on_length():
    """a wins 75% whether it is longer or shorter: the LC win rate stays at the raw 0.75."""
    a = [GOLD] * 45 + [WRONG] * 15 + [HALF] * 15 + [HALF] * 5
    b = [HALF] * 45 + [HALF] * 15 + [WRONG] * 15 + [GOLD] * 5
    out = win_rate([PROMPT] * 80, a, b)
    assert out["win_rate"] == pytest.approx(0.75)
    assert out["lc_win_rate"] == pytest.approx(0.75, abs=0.01)
    assert abs(out["length_coef"]) < 0.05


def test_fit_logistic_recovers_known_parameters():
    x = np.linspace(-1.0, 1.0, 200)  # symmetric about 0, no point at 0
    y = _sigmoid(0.5 + 2.0 * x)  # soft targets: the MLE without penalty is exactly (0.5, 2)
    assert fit_logistic(x, y, l2=0.0) == pytest.approx([0.5, 2.0], abs=1e-4)
    shrunk = fit_logistic(x, y, l2=1e-2)
    assert abs(shrunk[0]) < 0.5 and abs(shrunk[1]) < 2.0
    separable = fit_logistic(x, (x > 0).astype(float))  # finite thanks to the default penalty
    assert np.isfinite(separable).all() and abs(separable[0]) < 1e-6
