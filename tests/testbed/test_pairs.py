"""Testbed preference data: SFT rows, off-policy and on-policy pairs, probes and splits."""

import random

import pytest

from poise.data import load_rows, tokenize_rows
from poise.testbed.pairs import (
    corrupt,
    labeller_score,
    offpolicy_pairs,
    onpolicy_pairs,
    probe_rows,
    read_jsonl,
    sft_rows,
    split_prompts,
    write_jsonl,
)
from poise.testbed.task import (
    NUMBERS,
    WORDS,
    build_testbed_model,
    build_testbed_tokenizer,
    gold_answer,
    gold_reward,
    make_prompts,
)

PROMPTS = make_prompts(600, seed=11)


def _words(text):
    return len(text.split())


@pytest.fixture(scope="module")
def tok():
    return build_testbed_tokenizer()


def test_corrupt_applies_edits_and_extra_words():
    rng = random.Random(0)
    gold = ["ant", "bee", "cat"]
    assert corrupt(gold, rng, edits=0) == gold
    assert corrupt(gold, rng, edits=0, extra=3)[:3] == gold
    assert len(corrupt(gold, rng, edits=0, extra=3)) == 6
    for edits in range(1, 5):
        out = corrupt(gold, rng, edits=edits)
        assert out and abs(len(out) - 3) <= edits and set(out) <= set(WORDS)
    counts = {tuple(corrupt(["two"], rng, edits=1, op="count")) for _ in range(50)}
    assert any(len(c) == 1 and c[0] in NUMBERS.values() and c[0] != "two" for c in counts)


def test_sft_rows(tok):
    rows = sft_rows(PROMPTS[:50], seed=0)
    assert rows == sft_rows(PROMPTS[:50], seed=0)
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["chosen"] == gold_answer(row["prompt"])
        assert row["rejected"].startswith(" ") and gold_reward(row["prompt"], row["rejected"]) < 1.0


def test_offpolicy_deterministic_and_per_prompt():
    rows = offpolicy_pairs(PROMPTS[:100], seed=4, label_noise=0.2, length_bias=0.05)
    assert rows == offpolicy_pairs(PROMPTS[:100], seed=4, label_noise=0.2, length_bias=0.05)
    assert rows != offpolicy_pairs(PROMPTS[:100], seed=5, label_noise=0.2, length_bias=0.05)
    # a prompt's row does not depend on the other prompts in the list
    assert offpolicy_pairs(PROMPTS[7:8], seed=4, label_noise=0.2, length_bias=0.05)[0] in rows


def test_offpolicy_clean_labeller_prefers_the_better_response():
    rows = offpolicy_pairs(PROMPTS, seed=0)
    assert len(rows) >= 0.95 * len(PROMPTS)
    for row in rows:
        assert row["chosen_gold"] == gold_reward(row["prompt"], row["chosen"])
        assert row["rejected_gold"] == gold_reward(row["prompt"], row["rejected"])
        assert row["chosen_gold"] > row["rejected_gold"] and not row["flipped"]
        assert row["chosen"] != row["rejected"] and row["rejected"].strip()
    # the responses vary: some are the gold answer, some are padded well beyond it
    assert any(row["chosen_gold"] == 1.0 for row in rows)
    assert any(_words(row["rejected"]) >= _words(gold_answer(row["prompt"])) + 3 for row in rows)


def test_offpolicy_label_noise_flips_about_half():
    rows = offpolicy_pairs(PROMPTS, seed=1, label_noise=0.5)
    flipped = sum(row["flipped"] for row in rows) / len(rows)
    assert abs(flipped - 0.5) < 0.08  # about 4 standard deviations for ~600 pairs
    worse_chosen = [row["chosen_gold"] < row["rejected_gold"] for row in rows]
    assert worse_chosen == [row["flipped"] for row in rows]


def test_offpolicy_length_bias_prefers_longer_responses():
    rows = offpolicy_pairs(PROMPTS, seed=2, length_bias=10.0)
    unequal = [row for row in rows if _words(row["chosen"]) != _words(row["rejected"])]
    assert len(unequal) > len(rows) / 2
    assert all(_words(row["chosen"]) > _words(row["rejected"]) for row in unequal)
    # a mild bias overrides the gold reward only sometimes
    mild = offpolicy_pairs(PROMPTS, seed=2, length_bias=0.1)
    inverted = sum(row["chosen_gold"] < row["rejected_gold"] for row in mild) / len(mild)
    assert 0.02 < inverted < 0.5


def test_labeller_score():
    assert labeller_score("copy: ant bee =", " ant bee") == 1.0
    assert labeller_score("copy: ant bee =", " ant bee cat", length_bias=0.5) == pytest.approx(2 / 3 + 1.5)


def test_rows_write_and_load_into_poise_data(tmp_path, tok):
    rows = offpolicy_pairs(PROMPTS[:64], seed=0, label_noise=0.1, length_bias=0.02)
    path = write_jsonl(rows, tmp_path / "sub" / "pairs.jsonl")
    assert read_jsonl(path) == rows
    data = tokenize_rows(load_rows(str(path)), tok, max_length=32, max_prompt_length=16)
    assert len(data) == len(rows) and not data.skipped
    for pair, row in zip(data.pairs, rows):
        assert len(pair.prompt_ids) == len(tok(row["prompt"])["input_ids"])
        assert pair.chosen_ids[-1] == tok.eos_token_id


def test_onpolicy_pairs_format_and_determinism(tok):
    model = build_testbed_model(tok, seed=0)
    prompts = PROMPTS[:8]
    kw = dict(seed=3, samples_per_prompt=3, max_new_tokens=6, length_bias=0.05)
    rows = onpolicy_pairs(model, tok, prompts, **kw)
    assert rows and rows == onpolicy_pairs(model, tok, prompts, **kw)
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "chosen_gold", "rejected_gold", "flipped"}
        assert row["prompt"] in prompts and row["chosen"] != row["rejected"]
        assert row["chosen"].strip() and row["rejected"].strip()
        assert labeller_score(row["prompt"], row["chosen"], 0.05) > labeller_score(row["prompt"], row["rejected"], 0.05)
    flipped = onpolicy_pairs(model, tok, prompts, label_noise=1.0, **kw)
    assert [(r["chosen"], r["rejected"]) for r in flipped] == [(r["rejected"], r["chosen"]) for r in rows]
    with pytest.raises(ValueError):
        onpolicy_pairs(model, tok, prompts, samples_per_prompt=1)


def test_probe_rows_are_unrelated_well_formed_answers():
    prompts = PROMPTS[:100]
    rows = probe_rows(prompts, seed=0)
    assert rows == probe_rows(prompts, seed=0)
    assert [row["prompt"] for row in rows] == prompts
    for row in rows:
        assert set(row) == {"prompt", "response"}
        words = row["response"].split()
        assert row["response"].startswith(" ") and 1 <= len(words) <= 5
        assert set(words) <= set(WORDS) | set(NUMBERS.values())
        assert gold_reward(row["prompt"], row["response"]) < 1.0


def test_split_prompts_disjoint_and_deterministic():
    splits = split_prompts(200, 50, 30, seed=5)
    assert (len(splits.train), len(splits.eval), len(splits.probe)) == (200, 50, 30)
    assert not set(splits.train) & set(splits.eval)
    assert not set(splits.train) & set(splits.probe)
    assert not set(splits.eval) & set(splits.probe)
    assert splits == split_prompts(200, 50, 30, seed=5)
    assert splits != split_prompts(200, 50, 30, seed=6)
