"""Score a model on the testbed task: generate responses, then gold reward, length and win rates.

* :func:`generate` (:func:`poise.model.generate.generate`, the one generation routine) samples or
  greedily decodes responses for a list of prompts; seeded, it leaves the global RNG as it was.
* :func:`score` gives the mean gold reward, the exact-match rate and the mean length in words.
* :func:`win_rate` compares two sets of responses to the same prompts under the gold reward, raw
  and length-controlled (the definitions are in its docstring); :func:`compare` does it from the
  rewards of both sides and :func:`compare_outcomes` from per-prompt outcomes (a judge's probabilities).
* :func:`bootstrap_ci` is the percentile bootstrap interval of a statistic over prompts (the win rate's).

Everything is deterministic for a seed (on one device and torch build).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from poise.model.generate import generate as generate  # re-exported: the testbed's generation routine
from poise.testbed.task import gold_answer, gold_reward

#: L2 penalty of the length-controlled fit (on the mean log-loss), which keeps it finite when the
#: outcomes are separable by length (and when one side wins every comparison).
LC_L2 = 1e-3


#: A gold reward: (prompt, response) -> a number in [0, 1], 1 exactly for a correct answer.
Reward = Callable[[str, str], float]


def score(prompts: Sequence[str], responses: Sequence[str], *, reward: Reward = gold_reward,
          answer: Callable[[str], str] = gold_answer) -> dict[str, float]:
    """Mean gold reward, exact-match rate and mean length (words) of responses to ``prompts``.

    Returns ``{"gold_reward", "exact_match", "length", "gold_length", "n"}``; ``exact_match`` is the
    fraction of responses with reward 1 (for the testbed: exactly the gold answer's words),
    ``length`` the mean number of whitespace-separated words and ``gold_length`` the mean length of the
    gold answers, for comparison. ``reward`` and ``answer`` default to the testbed's; pass
    :mod:`poise.testbed.instruct`'s to score free-form replies of an instruct model.
    """
    _check_lengths(prompts, responses)
    if not prompts:
        raise ValueError("score needs at least one prompt")
    rewards = [reward(p, r) for p, r in zip(prompts, responses)]
    return {
        "gold_reward": float(np.mean(rewards)),
        "exact_match": float(np.mean([r >= 1.0 for r in rewards])),
        "length": float(np.mean([len(r.split()) for r in responses])),
        "gold_length": float(np.mean([len(answer(p).split()) for p in prompts])),
        "n": float(len(prompts)),
    }


def win_rate(prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str], *,
             reward: Reward = gold_reward) -> dict[str, float]:
    """Win rate of responses ``a`` over ``b`` under the gold reward, raw and length-controlled.

    Per prompt i the outcome is ``o_i = 1`` if ``gold(a_i) > gold(b_i)``, ``0.5`` on a tie and ``0``
    otherwise (``gold`` is ``reward``, the testbed's gold reward by default); the raw win rate is the
    mean of ``o_i``.

    Length-controlled win rate (after AlpacaEval 2's LC, without its per-instruction term): with the
    length difference ``d_i = len(a_i) - len(b_i)`` in words and ``s`` the standard deviation of
    ``d`` over the prompts, fit by maximum likelihood the logistic model::

        P(a wins | d) = sigmoid(theta_0 + theta_1 * tanh(d / s))

    to the outcomes (ties as targets of 0.5: minimise the mean binary cross-entropy plus
    ``LC_L2 / 2 * (theta_0^2 + theta_1^2)``, Newton's method); the LC win rate is the prediction at
    zero length difference, ``sigmoid(theta_0)``. When ``s = 0`` (every pair has the same length
    difference, e.g. equal lengths) the length effect cannot be told from the intercept and the LC
    win rate is the raw win rate.

    Returns ``{"win_rate", "lc_win_rate", "length_coef" (theta_1), "ties" (fraction),
    "length_diff" (mean d), "n"}``.
    """
    _check_lengths(prompts, responses_a)
    _check_lengths(prompts, responses_b)
    if not prompts:
        raise ValueError("win_rate needs at least one prompt")
    ga = np.array([reward(p, r) for p, r in zip(prompts, responses_a)])
    gb = np.array([reward(p, r) for p, r in zip(prompts, responses_b)])
    diff = np.array([len(a.split()) - len(b.split()) for a, b in zip(responses_a, responses_b)], float)
    return compare(ga, gb, diff)


def compare(ga: Any, gb: Any, diff: Any) -> dict[str, float]:
    """:func:`win_rate` from the rewards of both sides and the length differences (any reward)."""
    ga, gb = np.asarray(ga, float), np.asarray(gb, float)
    return compare_outcomes(np.where(ga > gb, 1.0, np.where(ga < gb, 0.0, 0.5)), diff)


def compare_outcomes(outcome: Any, diff: Any) -> dict[str, float]:
    """:func:`compare` from the per-prompt outcomes of a against b, in [0, 1] (1, 0.5, 0 from rewards;
    a judge's probability that a is better, soft), and the length differences: the same keys.
    ``ties`` is the fraction of outcomes exactly 0.5."""
    outcome, diff = np.asarray(outcome, float), np.asarray(diff, float)
    if outcome.shape != diff.shape:
        raise ValueError(f"{outcome.size} outcomes but {diff.size} length differences")
    if outcome.size and not (np.all(outcome >= 0.0) and np.all(outcome <= 1.0)):
        raise ValueError("outcomes must lie in [0, 1]")
    raw = float(outcome.mean())
    spread = float(diff.std())
    if spread == 0.0:
        lc, coef = raw, 0.0
    else:
        theta = fit_logistic(np.tanh(diff / spread), outcome, l2=LC_L2)
        lc, coef = float(_sigmoid(theta[0])), float(theta[1])
    return {"win_rate": raw, "lc_win_rate": lc, "length_coef": coef, "ties": float(np.mean(outcome == 0.5)),
            "length_diff": float(diff.mean()), "n": float(len(outcome))}


def bootstrap_ci(values: Any, stat: Callable[[np.ndarray], Any] = np.mean, n: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """The ``level`` percentile bootstrap interval of ``stat(values)``: ``n`` resamples of the values with
    replacement (``numpy.random.default_rng(seed)``, so the same inputs give the same interval), and the
    (1 - level) / 2 and (1 + level) / 2 percentiles (numpy's linear interpolation) of the statistic over
    them. For ``poise eval --prompts-file`` the values are the per-prompt outcomes and the statistic the
    win rate (their mean): the prompts are resampled."""
    v = np.asarray(values, float)
    if v.ndim != 1 or v.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty list of numbers")
    if n < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: n = {n} must be >= 1 and level = {level} in (0, 1)")
    idx = np.random.default_rng(seed).integers(0, v.size, size=(n, v.size))
    stats = v[idx].mean(axis=1) if stat is np.mean else np.array([stat(v[i]) for i in idx], float)
    low, high = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = LC_L2, steps: int = 100) -> np.ndarray:
    """``(theta_0, theta_1)`` minimising ``mean BCE(sigmoid(theta_0 + theta_1 x), y) + l2/2 |theta|^2``.

    ``y`` may hold soft targets in [0, 1]. Damped Newton steps (halved until the objective falls),
    which converge to the unique minimum since the objective is strictly convex for ``l2 > 0``.
    """
    X = np.stack([np.ones_like(x, dtype=float), np.asarray(x, dtype=float)], axis=1)
    y = np.asarray(y, dtype=float)
    theta = np.zeros(2)
    loss = _logistic_loss(theta, X, y, l2)
    for _ in range(steps):
        p = _sigmoid(X @ theta)
        grad = X.T @ (p - y) / len(y) + l2 * theta
        hess = (X * (p * (1 - p))[:, None]).T @ X / len(y) + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-8 and _logistic_loss(theta - scale * step, X, y, l2) > loss:
            scale /= 2
        theta = theta - scale * step
        new_loss = _logistic_loss(theta, X, y, l2)
        if loss - new_loss < 1e-12:
            break
        loss = new_loss
    return theta


def _logistic_loss(theta: np.ndarray, X: np.ndarray, y: np.ndarray, l2: float) -> float:
    z = X @ theta
    # mean of log(1 + e^z) - y z, computed stably
    return float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * theta @ theta)


def _sigmoid(z: Any) -> Any:
    return 1.0 / (1.0 + np.exp(-z))


def _check_lengths(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
