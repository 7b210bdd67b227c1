"""The testbed task: prompts, gold answers, the gold reward and the tokenizer."""

import pytest

from poise.testbed.task import (
    NUMBERS,
    OPS,
    WORDS,
    build_testbed_model,
    build_testbed_tokenizer,
    edit_distance,
    format_prompt,
    gold_answer,
    gold_reward,
    make_prompts,
    parse_prompt,
    save_testbed_model,
)

PROMPT = "copy: ant bee cat dog ="  # gold answer " ant bee cat dog", 4 words


@pytest.fixture(scope="module")
def tok():
    return build_testbed_tokenizer()


def test_gold_answers_by_hand():
    assert gold_answer("copy: eel fox =") == " eel fox"
    assert gold_answer("reverse: cat owl yak =") == " yak owl cat"
    assert gold_answer("sort: pig ant hen =") == " ant hen pig"
    assert gold_answer("sort: yak ant yak =") == " ant yak yak"
    assert gold_answer("count: bee dog dog jay =") == " four"
    assert gold_answer("count: bee dog =") == " two"


def test_format_and_parse_round_trip():
    prompt = format_prompt("reverse", ["seal", "toad"])
    assert prompt == "reverse: seal toad ="
    assert parse_prompt(prompt) == ("reverse", ["seal", "toad"])
    for bad in ("copy ant bee =", "jump: ant =", "copy: ant bee"):
        with pytest.raises(ValueError):
            parse_prompt(bad)


def test_edit_distance_by_hand():
    assert edit_distance([], []) == 0
    assert edit_distance(["a", "b"], []) == 2
    assert edit_distance(["a", "b", "c"], ["a", "c"]) == 1            # one deletion
    assert edit_distance(["a", "b", "c"], ["c", "b", "a"]) == 2       # two substitutions
    assert edit_distance(["k", "i", "t", "t", "e", "n"], ["s", "i", "t", "t", "i", "n", "g"]) == 3


def test_gold_reward_is_one_exactly_for_the_gold_answer():
    assert gold_reward(PROMPT, " ant bee cat dog") == 1.0
    assert gold_reward(PROMPT, "\nant  bee cat dog ") == 1.0   # whitespace does not matter
    assert gold_reward(PROMPT, " ant bee cat dog.") < 1.0     # other characters do


def test_gold_reward_is_monotone_in_substitutions():
    """1 - k/4 for k of the 4 words substituted: 1, 0.75, 0.5, 0.25, 0."""
    responses = [" ant bee cat dog", " ant bee cat eel", " ant bee fox eel", " ant gnu fox eel",
                 " hen gnu fox eel"]
    rewards = [gold_reward(PROMPT, r) for r in responses]
    assert rewards == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_gold_reward_partial_and_empty_answers():
    assert gold_reward(PROMPT, " ant bee cat") == pytest.approx(0.75)    # 1 - 1/4
    assert gold_reward(PROMPT, " ant bee") == pytest.approx(0.5)         # 1 - 2/4
    assert gold_reward(PROMPT, " bee ant cat dog") == pytest.approx(0.5)  # a swap is 2 substitutions
    assert gold_reward(PROMPT, "") == 0.0
    assert gold_reward("count: ant bee cat =", " three") == 1.0
    assert gold_reward("count: ant bee cat =", " four") == 0.0


def test_gold_reward_penalises_padding():
    """Appending k words to the n-word gold answer gives n / (n + k)."""
    padded = [" ant bee cat dog" + " ant" * k for k in range(4)]
    rewards = [gold_reward(PROMPT, r) for r in padded]
    assert rewards == pytest.approx([1.0, 4 / 5, 4 / 6, 4 / 7])
    assert gold_reward("count: ant bee =", " two two") == pytest.approx(0.5)


def test_gold_reward_in_unit_interval():
    for prompt in make_prompts(40, seed=3):
        for response in ("", " ant", " two", " " + " ".join(WORDS), gold_answer(prompt) * 3, "zzz"):
            assert 0.0 <= gold_reward(prompt, response) <= 1.0


def test_make_prompts_deterministic_distinct_and_balanced():
    a, b = make_prompts(200, seed=1), make_prompts(200, seed=1)
    assert a == b
    assert a != make_prompts(200, seed=2)
    assert len(set(a)) == 200
    with pytest.raises(ValueError):
        make_prompts(16**2 + 16**3 + 16**4 + 16**5 + 1, seed=0, ops=("copy",))
    for op in OPS:
        assert sum(p.startswith(op + ":") for p in a) == 50
    for prompt in a:
        _, words = parse_prompt(prompt)
        assert 2 <= len(words) <= 5 and set(words) <= set(WORDS)


def test_small_closed_vocabulary():
    assert len(WORDS) + len(OPS) + len(NUMBERS) <= 40
    assert len({w[0] for w in WORDS}) == len(WORDS)


def test_every_word_is_one_token_and_prompts_are_short(tok):
    for word in (*WORDS, *NUMBERS.values()):
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    for prompt in make_prompts(100, seed=0):
        prompt_ids = tok(prompt)["input_ids"]
        answer_ids = tok(gold_answer(prompt), add_special_tokens=False)["input_ids"]
        assert prompt_ids[0] == tok.bos_token_id
        assert len(prompt_ids) <= 12 and len(answer_ids) + 1 <= 12
        # the prompt is a token prefix of prompt + answer (poise.data tokenizes them apart)
        assert tok(prompt + gold_answer(prompt))["input_ids"] == prompt_ids + answer_ids


def test_testbed_model_fits_the_tokenizer(tok):
    model = build_testbed_model(tok, seed=0)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    other = build_testbed_model(tok, seed=0)
    assert all((p == q).all() for p, q in zip(model.parameters(), other.parameters()))


def test_saved_testbed_model_loads_as_the_trainer_loads_it(tmp_path, tok):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = save_testbed_model(str(tmp_path / "init"), seed=1)
    model = AutoModelForCausalLM.from_pretrained(folder)
    loaded = AutoTokenizer.from_pretrained(folder)
    prompt = make_prompts(1, seed=0)[0]
    assert loaded(prompt + gold_answer(prompt))["input_ids"] == tok(prompt + gold_answer(prompt))["input_ids"]
    assert model.get_input_embeddings().weight.shape[0] == len(loaded)
