"""Pairwise judges as rewards (poise/eval/rewards.py): both orders averaged, the round robin of
score_groups (poise iterate), compare_sides and `poise eval --prompts-file --reward judge:...`
(poise/eval/run.py), the bootstrap interval of the win rate (poise/testbed/evaluate.py)."""

import json
import random

import numpy as np
import pytest
import torch
from helpers import save_tiny_model

from poise.errors import ConfigError, DataError
from poise.eval.rewards import (
    JUDGE_ANSWER_CUE,
    Judge,
    compare_sides,
    judge_both_orders,
    judge_text,
    letter_ids,
    load_reward,
    score_all,
    score_groups,
)
from poise.testbed.evaluate import bootstrap_ci, compare, compare_outcomes

JUDGES_PY = '''
def biased(prompt, a, b):
    """Prefers the longer response by 0.1 a character, and response A by 0.1 more (position bias)."""
    return min(1.0, max(0.0, 0.6 + 0.1 * (len(a) - len(b))))

def words(prompt, a, b):
    """Prefers the response with more words, symmetric in the order; fails on a 'boom' prompt."""
    if "boom" in prompt:
        raise ValueError("cannot judge this one")
    return min(1.0, max(0.0, 0.5 + 0.1 * (len(a.split()) - len(b.split()))))

def picky(prompt, a, b):
    if "boom" in a or "boom" in b:
        raise ValueError("cannot judge boom")
    return 0.5

def sure(prompt, a, b):
    return 1.5 if a == "x" else 0.25

def nan(prompt, a, b):
    return float("nan")
'''


@pytest.fixture
def judges_file(tmp_path):
    path = tmp_path / "myjudges.py"
    path.write_text(JUDGES_PY)
    return path


def test_a_judge_is_named_by_one_string(judges_file):
    j = load_reward(f"judge:{judges_file}:biased")
    assert isinstance(j, Judge) and j.name == f"judge:{judges_file}:biased"
    assert j.batch(["p", "p"], ["x", "yy"], ["yy", "x"]) == pytest.approx([0.5, 0.7], rel=1e-12)
    for spec, match in [("judge:", "no judge after"), ("judge:/no/such/folder", "is not a folder"),
                        (f"judge:{judges_file}:missing", r"has no function 'missing'.*biased"),
                        ("judge:/no/such/file.py:f", "does not exist"), ("nothing", "judge:FOLDER")]:
        with pytest.raises(ConfigError, match=match):
            load_reward(spec)
    with pytest.raises(ConfigError, match="pairwise judge"):  # a judge scores no response alone
        score_all(j, ["p"], ["x"])


def test_both_orders_are_averaged(judges_file):
    j = load_reward(f"judge:{judges_file}:biased")
    # P(x over yy) = 0.6 - 0.1 = 0.5 and P(yy over x) = 0.6 + 0.1 = 0.7: p = (0.5 + 1 - 0.7) / 2 = 0.4
    sides = compare_sides(j, ["p", "p"], ["x", "zzzz"], ["yy", "x"])
    assert sides.outcomes == pytest.approx([0.4, 0.8], rel=1e-12)  # (0.9 + 1 - 0.3) / 2 = 0.8: bias gone
    assert sides.scores_a is None and sides.scores_b is None and sides.skipped == 0
    rng = random.Random(0)
    names = [str(i) for i in range(30)]
    table = {(x, y): rng.random() for x in names for y in names if x != y}  # each order on its own
    table.update({("0", "1"): 0.0, ("1", "0"): 1.0, ("2", "3"): 1e-300, ("3", "2"): 1 - 1e-16, ("4", "5"): 0.5})
    j = Judge("table", one=lambda p, a, b: table[(a, b)])
    a, b = zip(*[(x, y) for x, y in table if x < y])
    forward = judge_both_orders(j, ["p"] * len(a), a, b)
    backward = judge_both_orders(j, ["p"] * len(a), b, a)
    assert all(x + y == 1.0 for x, y in zip(forward, backward))  # exactly
    assert all(y == 1.0 - x for x, y in zip(forward, backward))
    assert forward == pytest.approx([(table[(x, y)] + 1 - table[(y, x)]) / 2 for x, y in zip(a, b)], rel=1e-12)


def test_round_robin_by_hand(judges_file):
    j = load_reward(f"judge:{judges_file}:biased")
    # p(a, b) = 0.5 + 0.1 (|a| - |b|) once both orders are averaged:
    # x: (p(x, yy) + p(x, zzzz)) / 2 = (0.4 + 0.2) / 2; yy: (0.6 + 0.3) / 2; zzzz: (0.8 + 0.7) / 2
    replies = ["x", "yy", "zzzz", "bb", "bb", "a"]
    scores, skipped = score_groups(j, ["p"] * 3 + ["q"] * 3, replies, 3)
    assert scores == pytest.approx([0.3, 0.45, 0.75, 0.55, 0.55, 0.4], rel=1e-12) and skipped == 0
    assert sum(scores[:3]) == pytest.approx(1.5, rel=1e-12)  # a group's scores add up to k / 2
    two, _ = score_groups(j, ["p", "p"], ["x", "zzzz"], 2)
    assert two == pytest.approx([0.2, 0.8], rel=1e-12)
    with pytest.raises(ValueError, match="not groups of k = 4"):
        score_groups(j, ["p"] * 6, replies, 4)
    with pytest.raises(ValueError, match="prompts differ"):
        score_groups(j, ["p", "q", "p"], replies[:3], 3)
    with pytest.raises(ConfigError, match="at least 2 replies"):
        score_groups(j, ["p"], ["x"], 1)


def test_score_groups_of_a_pointwise_reward_is_score_all(tmp_path):
    path = tmp_path / "pointwise.py"
    path.write_text("def length(prompt, response):\n    return float(len(response))\n")
    r = load_reward(f"{path}:length")
    assert score_groups(r, ["p"] * 4, ["a", "bbb", "", "cc"], 2) == score_all(r, ["p"] * 4, ["a", "bbb", "", "cc"])
    sides = compare_sides(r, ["p"] * 3, ["a", "bb", "ccc"], ["bb", "bb", "c"])
    assert sides == ([0.0, 0.5, 1.0], [1.0, 2.0, 3.0], [2.0, 2.0, 1.0], 0)


def test_a_failing_comparison_is_named_or_skipped(judges_file):
    picky = load_reward(f"judge:{judges_file}:picky")
    where = ["p.jsonl row 1"] * 3
    with pytest.raises(DataError, match=r"p.jsonl row 1 \(replies 0 and 1 of its 3\): the judge .* failed "
                                        r"\(ValueError: cannot judge boom"):
        score_groups(picky, ["p"] * 3, ["ok", "boom", "fine"], 3, where=where)
    # skip: the comparisons with "boom" are left out; the others' scores are the mean of what was judged
    scores, skipped = score_groups(picky, ["p"] * 3, ["ok", "boom", "fine"], 3, where=where, on_bad_row="skip")
    assert scores == [0.5, None, 0.5] and skipped == 1
    scores, skipped = score_groups(picky, ["p"] * 4, ["ok", "boom", "fine", "x"], 2, on_bad_row="skip")
    assert scores == [None, None, 0.5, 0.5] and skipped == 2  # a pair with nothing judged: both skipped
    sure = load_reward(f"judge:{judges_file}:sure")  # 1.5 when a is "x": no probability
    with pytest.raises(DataError, match=r"row 1: .*it returned 1.5, not a probability in \[0, 1\], with the two "
                                        "responses swapped"):
        compare_sides(sure, ["p", "p"], ["y", "y"], ["z", "x"])
    sides = compare_sides(sure, ["p", "p", "p"], ["y", "x", "y"], ["z", "y", "w"], on_bad_row="skip")
    assert sides.outcomes == [0.5, None, 0.5] and sides.skipped == 1
    with pytest.raises(DataError, match="row 0: .*it returned nan"):
        compare_sides(load_reward(f"judge:{judges_file}:nan"), ["p"], ["a"], ["b"])


# -- judge:FOLDER: a local causal LM ----------------------------------------------------------------------


def _p_a(model, tok, prompt, a, b):
    """P(A) from one forward pass of one rendering, no batch: the next-token softmax over A and B."""
    from poise.model.generate import prompt_ids

    ids = torch.tensor([prompt_ids(tok, judge_text(tok, prompt, a, b))])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].double()
    a_ids, b_ids = letter_ids(tok)
    return torch.softmax(logits[a_ids + b_ids], -1)[:len(a_ids)].sum().item()


def test_a_local_judge_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from poise.model.tiny import build_tiny_model, build_tiny_tokenizer

    folder = tmp_path / "judge"
    tok = build_tiny_tokenizer()
    lm = build_tiny_model(tok, hidden_size=16, num_layers=1)
    with torch.no_grad():  # larger weights: verdicts far from 1/2 that depend on the responses
        for name, w in lm.named_parameters():
            if "norm" not in name:
                w.mul_(25)
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    # " B" splits into a space and "B" in the tiny tokenizer: only the letters without the space are read
    assert letter_ids(tok) == ([tok.encode("A", add_special_tokens=False)[0]],
                               [tok.encode("B", add_special_tokens=False)[0]])
    text = judge_text(tok, "the cat", " sat", " ran")
    assert "[Response A]\n sat" in text and text.endswith("<|assistant|>\n")  # the chat template, turn opened
    prompts = ["the cat", "a dog ran", "red box", "the cat"]
    a = [" sat", " to the mat and", " was warm", " is blue and very very small"]
    b = [" ran far", " home", " was warm and red", " sat"]
    judge = load_reward(f"judge:{folder}", batch_size=3)
    forward = judge_both_orders(judge, prompts, a, b)
    backward = judge_both_orders(judge, prompts, b, a)
    assert all(0.0 <= p <= 1.0 for p in forward) and all(x + y == 1.0 for x, y in zip(forward, backward))
    one = load_reward(f"judge:{folder}", batch_size=1)
    assert judge_both_orders(one, prompts, a, b) == pytest.approx(forward, rel=1e-5)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    raw = judge.batch(prompts, a, b)  # one order, batched and padded
    assert max(abs(p - 0.5) for p in raw) > 0.2 and max(abs(p - 0.5) for p in forward) > 0.05
    assert raw == pytest.approx([_p_a(model, tok, *row) for row in zip(prompts, a, b)], rel=1e-5)
    swapped = [_p_a(model, tok, p, y, x) for p, x, y in zip(prompts, a, b)]
    assert forward == pytest.approx([(r + 1 - s) / 2 for r, s in zip(raw, swapped)], rel=1e-5)
    scores, skipped = score_groups(judge, ["the cat"] * 3, [" sat", " ran far", " is blue"], 3)
    assert sum(scores) == pytest.approx(1.5, rel=1e-9) and skipped == 0
    with pytest.raises(ConfigError, match="no config.json"):
        load_reward(f"judge:{tmp_path}")


def test_a_judge_without_chat_template(tmp_path):
    from poise.model.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer(chat_template=False)
    build_tiny_model(tok, hidden_size=16, num_layers=1).save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    text = judge_text(tok, "the cat", " sat", " ran")
    assert text.startswith("Which of the two responses") and text.endswith(JUDGE_ANSWER_CUE)
    (p,) = judge_both_orders(load_reward(f"judge:{tmp_path / 'plain'}"), ["the cat"], [" sat"], [" ran"])
    assert 0.0 <= p <= 1.0


# -- win rates from outcomes, and their bootstrap interval ----------------------------------------------------


def test_compare_outcomes_is_compare():
    ga, gb, diff = [1, 0, 1, 0.5, 2], [0, 0, 0, 1, 1], [3, -1, 0, 2, 5]
    assert compare_outcomes([1.0, 0.5, 1.0, 0.0, 1.0], diff) == compare(ga, gb, diff)
    soft = compare_outcomes([0.9, 0.5, 0.7, 0.2], [0, 0, 0, 0])  # a judge's probabilities
    assert soft["win_rate"] == pytest.approx((0.9 + 0.5 + 0.7 + 0.2) / 4, rel=1e-12) and soft["ties"] == 0.25
    assert soft["lc_win_rate"] == soft["win_rate"]  # no length difference
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        compare_outcomes([1.5], [0])


def test_bootstrap_ci_by_hand():
    assert bootstrap_ci([1.0] * 7) == (1.0, 1.0)
    values = np.array([1.0, 0.0, 0.5, 1.0, 0.25])
    idx = np.random.default_rng(0).integers(0, 5, size=(2000, 5))
    expected = np.percentile(values[idx].mean(axis=1), [2.5, 97.5])
    low, high = bootstrap_ci(values)
    assert (low, high) == pytest.approx(tuple(expected), rel=1e-12)
    assert low <= values.mean() <= high and low < high
    assert bootstrap_ci(list(values)) == (low, high)  # reproducible: the same interval again
    # any statistic: the median, recomputed directly
    med = np.percentile([np.median(values[i]) for i in idx], [2.5, 97.5])
    assert bootstrap_ci(values, stat=np.median) == pytest.approx(tuple(med), rel=1e-12)
    small = np.random.default_rng(1).integers(0, 5, size=(10, 5))
    assert bootstrap_ci(values, n=10, seed=1, level=0.5) == pytest.approx(
        tuple(np.percentile(values[small].mean(axis=1), [25, 75])), rel=1e-12)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_poise_eval_with_a_judge(tmp_path, judges_file):
    from poise.cli import main
    from poise.training.config import from_dict
    from poise.training.loop import train

    model = save_tiny_model(tmp_path / "model")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"the cat {i}", "chosen": " sat", "rejected": " ran far"}) + "\n"
                             for i in range(8)))
    run = train(from_dict(dict(model=str(model), train_file=str(pairs), output_dir=str(tmp_path / "run"),
                               cache_dir=str(tmp_path / "cache"), batch_size=4, micro_batch_size=4, max_steps=1,
                               save_steps=0, max_length=32, max_prompt_length=16, diagnostics=False))).run_dir
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the dog", "boom box", "a red hat"]))
    common = [str(run), "--prompts-file", str(prompts), "--max-new-tokens", "4", "--reward", f"judge:{judges_file}:words"]
    assert main(["eval", *common]) == 2  # the judge fails on row 2: named, nothing written
    assert main(["eval", *common, "--on-bad-row", "skip"]) == 0
    out = json.loads((run / "eval_prompts.json").read_text())
    assert out["scored"] == 2 and out["skipped"] == 1 and out["prompt_ids"] == [0, 2]
    assert out["reward_mean"] is None and out["baseline_reward_mean"] is None  # a judge gives no reward
    rows = [json.loads(line) for line in (run / "generations_prompts.jsonl").read_text().splitlines()]
    # the judge is symmetric: its preference in both orders is 0.5 + 0.1 * (word difference), clipped
    expected = [min(1.0, max(0.0, 0.5 + 0.1 * (len(r["output"].split()) - len(r["baseline_output"].split()))))
                for r in rows]
    assert out["outcomes"] == pytest.approx([expected[0], expected[2]], rel=1e-9, abs=1e-12)
    assert [r["outcome"] for r in rows][1] is None and rows[0]["reward"] is None
    assert out["win_rate"] == pytest.approx(np.mean(out["outcomes"]), rel=1e-12)
    assert out["win_rate_ci"] == pytest.approx(list(bootstrap_ci(out["outcomes"])), rel=1e-12)
    assert out["win_rate_ci"][0] <= out["win_rate"] <= out["win_rate_ci"][1]
