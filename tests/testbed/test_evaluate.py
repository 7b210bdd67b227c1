"""Testbed scoring: generation, gold-reward scores and (length-controlled) win rates."""

import numpy as np
import pytest
import torch

from poise.testbed.evaluate import _sigmoid, fit_logistic, generate, score, win_rate
from poise.testbed.task import build_testbed_model, build_testbed_tokenizer, make_prompts

PROMPT = "copy: ant bee cat dog ="  # gold " ant bee cat dog"
GOLD, HALF, WRONG = " ant bee cat dog", " ant bee", " eel eel eel eel"  # gold rewards 1, 0.5, 0


@pytest.fixture(scope="module")
def tok():
    return build_testbed_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_testbed_model(tok, seed=0)


def test_generate_greedy_returns_strings_deterministically(model, tok):
    prompts = make_prompts(12, seed=0)
    out = generate(model, tok, prompts, max_new_tokens=5)
    assert len(out) == 12 and all(isinstance(text, str) for text in out)
    assert out == generate(model, tok, prompts, max_new_tokens=5)
    # left padding: batched greedy decoding equals one prompt at a time
    assert out == generate(model, tok, prompts, max_new_tokens=5, batch_size=1)
    assert not model.training


def test_generate_sampling_is_seeded(model, tok):
    prompts = make_prompts(8, seed=1)
    state = torch.get_rng_state()
    a = generate(model, tok, prompts, max_new_tokens=6, temperature=1.0, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # seeded inside, the global RNG is restored
    assert a == generate(model, tok, prompts, max_new_tokens=6, temperature=1.0, seed=3)
    assert a != generate(model, tok, prompts, max_new_tokens=6, temperature=1.0, seed=4)
    with pytest.raises(ValueError):
        generate(model, tok, prompts, temperature=-1.0)


class _FixedModel(torch.nn.Module):
    """A stand-in whose generate appends fixed token ids to every prompt."""

    def __init__(self, new_ids):
        super().__init__()
        self.new_ids = torch.tensor(new_ids)
        self.device = torch.device("cpu")

    def generate(self, input_ids, attention_mask, **kw):
        return torch.cat([input_ids, self.new_ids.expand(input_ids.shape[0], -1)], dim=1)


def test_generate_cuts_at_eos_and_drops_special_tokens(tok):
    ant, bee = (tok.convert_tokens_to_ids("Ġ" + w) for w in ("ant", "bee"))
    fixed = _FixedModel([ant, tok.pad_token_id, bee, tok.eos_token_id, ant])
    assert generate(fixed, tok, [PROMPT, "sort: ant ram seal ="]) == [" ant bee"] * 2


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
