"""The testbed asked in plain English (poise.testbed.instruct): rendering, reply parsing, the gold reward
on free-form replies (values worked by hand), scores, pair selection and self-sampled pairs."""

import pytest
from helpers import word_model

from poise.model.generate import prompt_ids
from poise.model.tiny import build_tiny_tokenizer
from poise.testbed import instruct as I
from poise.testbed.pairs import best_and_worst
from poise.testbed.task import make_prompts

REVERSE = "Reverse the order of these words: cat owl yak. Reply with the words only."  # gold "yak owl cat"
COUNT = "How many words are in this list: bee dog dog? Reply with a number only."  # gold "three"


@pytest.fixture(scope="module")
def tok():
    corpus = [I.instruction(p) + " " + I.gold_answer(I.instruction(p)) for p in make_prompts(200, seed=5)]
    return build_tiny_tokenizer(corpus, vocab_size=384)


def test_instructions_by_hand():
    assert I.instruction("reverse: cat owl yak =") == REVERSE
    assert I.instruction("count: bee dog dog =") == COUNT
    assert I.instruction("copy: eel fox =") == "Repeat these words exactly: eel fox. Reply with the words only."
    assert I.instruction("sort: pig ant =") == ("Sort these words in alphabetical order: pig ant. "
                                                "Reply with the words only.")


def test_parse_instruction_round_trips_and_finds_it_inside_a_chat_rendering(tok):
    for prompt in make_prompts(40, seed=1):
        op, words = prompt.split(":")[0], prompt.split(":")[1].split()[:-1]
        assert I.parse_instruction(I.instruction(prompt)) == (op, words)
        assert I.parse_instruction(I.render_prompt(tok, prompt)) == (op, words)
    for bad in ("", "reverse: cat owl yak =", "Reverse the order of these words: . Reply with the words only."):
        with pytest.raises(ValueError, match="no testbed instruction"):
            I.parse_instruction(bad)


def test_render_prompt_uses_the_chat_template(tok):
    assert I.chat_messages("copy: eel fox =") == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Repeat these words exactly: eel fox. Reply with the words only."}]
    assert [m["role"] for m in I.chat_messages("copy: eel fox =", system=None)] == ["user"]
    assert I.render_prompt(tok, "copy: eel fox =", system="Be short.") == (
        "<bos><|system|>\nBe short.<eos><|user|>\nRepeat these words exactly: eel fox. Reply with the words "
        "only.<eos><|assistant|>\n")
    with pytest.raises(ValueError, match="chat template"):
        I.render_prompt(build_tiny_tokenizer(chat_template=False), "copy: eel fox =")


def test_reply_words_by_hand():
    assert I.reply_words("Yak, owl, cat.") == ["yak", "owl", "cat"]
    assert I.reply_words('The list is: "hen wolf"') == ["the", "list", "is", "hen", "wolf"]
    assert I.reply_words("1. seal\n2. toad") == ["one", "seal", "two", "toad"]
    assert I.reply_words("**Four**") == ["four"] and I.reply_words("4") == ["four"]
    assert I.reply_words("21 cat-owl") == ["21", "cat", "owl"]  # beyond twenty digits stay digits
    assert I.reply_words("") == [] and I.reply_words(" ...\n") == []


def test_gold_reward_by_hand():
    assert I.gold_answer(REVERSE) == "yak owl cat" and I.gold_answer(COUNT) == "three"
    assert I.gold_reward(REVERSE, "Yak, owl, cat.") == 1.0
    assert I.gold_reward(REVERSE, "yak owl") == pytest.approx(2 / 3)        # one word missing
    # a preamble costs a word each: 4 insertions over 7 words
    assert I.gold_reward(REVERSE, "The reversed list is: yak, owl, cat.") == pytest.approx(3 / 7)
    assert I.gold_reward(REVERSE, "cat owl yak") == pytest.approx(1 / 3)    # not reversed: 2 substitutions
    assert I.gold_reward(REVERSE, "") == 0.0 and I.gold_reward(REVERSE, "dog") == 0.0
    for right in ("3", "Three.", "three", " 3 "):
        assert I.gold_reward(COUNT, right) == 1.0
    assert I.gold_reward(COUNT, "The answer is 3.") == pytest.approx(1 / 4)
    assert I.gold_reward(COUNT, "4") == 0.0
    # a chat rendering of the instruction is scored the same as the instruction
    assert I.gold_reward(f"<|user|>\n{REVERSE}<eos><|assistant|>\n", "yak owl") == pytest.approx(2 / 3)


def test_score_and_win_rate_by_hand():
    prompts = [REVERSE, COUNT]
    a = ["yak owl cat", "The answer is 3."]  # rewards 1 and 1/4
    b = ["yak owl", "3"]                      # rewards 2/3 and 1
    s = I.score(prompts, a)
    assert s["gold_reward"] == pytest.approx(0.625) and s["exact_match"] == 0.5
    assert s["length"] == 3.5 and s["gold_length"] == 2.0 and s["n"] == 2.0
    w = I.win_rate(prompts, a, b)
    assert w["win_rate"] == 0.5 and w["ties"] == 0.0 and w["length_diff"] == 2.0  # (3-2 + 4-1) / 2
    assert I.win_rate(prompts, a, a)["win_rate"] == 0.5  # all ties


def test_best_and_worst_picks_and_breaks_ties_by_order():
    key = {"a": 1.0, "b": 0.5, "c": 0.5, "d": 1.0, "e": 0.0}.get
    assert best_and_worst(["b", "a", "e", "d", "c"], key) == ("d", "e")   # last of the best, first of the worst
    assert best_and_worst(["b", "c", "b"], key) is None                    # every sample ties
    assert best_and_worst(["a", "a", " ", ""], key) is None                # one distinct non-empty sample
    assert best_and_worst(["c", "b", "a"], key) == ("a", "c")


def test_pair_row_is_best_versus_worst_under_the_gold_reward():
    replies = ["yak owl", "Yak, owl, cat.", "", "yak owl", "dog"]
    row = I.pair_row(REVERSE, replies)
    assert row == {"prompt": REVERSE, "chosen": "Yak, owl, cat.", "rejected": "dog", "chosen_gold": 1.0,
                   "rejected_gold": 0.0}
    assert I.pair_row(REVERSE, ["dog", "ant", ""]) is None   # both 0: a tie
    assert I.pair_row(COUNT, ["3", "3"]) is None             # one distinct reply


def test_prompt_ids_match_the_data_pipeline(tok):
    text = I.render_prompt(tok, "copy: eel fox =")
    ids = prompt_ids(tok, text)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # the template's BOS, not a second
    assert prompt_ids(tok, "Hi") == (tok.bos_token_id, *tok("Hi", add_special_tokens=False)["input_ids"])


def test_self_pairs_rows_and_determinism(tok):
    model = word_model(tok)
    prompts = make_prompts(16, seed=0)
    kw = dict(samples_per_prompt=4, temperature=1.0, max_new_tokens=6, seed=1)
    rows = I.self_pairs(model, tok, prompts, **kw)
    assert rows and rows == I.self_pairs(model, tok, prompts, **kw)
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "chosen_gold", "rejected_gold", "task"}
        assert row["task"] in prompts and row["prompt"] == I.render_prompt(tok, row["task"])
        assert row["chosen_gold"] == I.gold_reward(row["prompt"], row["chosen"]) > row["rejected_gold"]
        assert row["chosen"] == row["chosen"].strip() and row["rejected"].strip()
    with pytest.raises(ValueError, match="at least 2"):
        I.self_pairs(model, tok, prompts, samples_per_prompt=1)


def test_probe_rows_answer_another_instruction(tok):
    prompts = make_prompts(20, seed=3)
    rows = I.probe_rows(tok, prompts, seed=0)
    assert [r["prompt"] for r in rows] == [I.render_prompt(tok, p) for p in prompts]
    for row in rows:
        assert row["response"] == row["response"].strip() and row["response"]
        assert I.gold_reward(row["prompt"], row["response"]) < 1.0
