"""Row formats, chat templates, tokenization, truncation and bad rows."""

import copy

import pytest
from tokenizers import normalizers

from poise.data import (
    BadRow,
    Row,
    TokenizedData,
    load_rows,
    sft_sequences,
    split_shared_messages,
    split_shared_prefix,
    tokenize_rows,
    tokenize_sft_rows,
)
from poise.data.formats import row_format
from poise.errors import ConfigError, DataError

SRC = "prefs.jsonl"


def rows_of(*records, source=SRC):
    return [Row(source, i, record) for i, record in enumerate(records, start=1)]


def ids(tok, text):
    return list(tok(text, add_special_tokens=False)["input_ids"])


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


GOOD = {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " London."}
IMPLICIT = {"chosen": "Q: a", "rejected": "Q: b"}
CHAT = {"prompt": [user("What is the capital of France?")], "chosen": [bot("Paris.")], "rejected": [bot("London.")]}


def good_neighbour(row):
    """A good row of the bad row's own format (a file holds one format: mixing is its own error)."""
    if row_format(row) == "conversational":
        return CHAT
    return GOOD if "prompt" in row else IMPLICIT


# --- token ids -------------------------------------------------------------------------------


def test_standard_row_exact_ids_with_bos_and_eos(tok):
    (pair,) = tokenize_rows(rows_of(GOOD), tok).pairs
    assert pair.prompt_ids == (tok.bos_token_id, *ids(tok, GOOD["prompt"]))
    assert pair.prompt_ids == tuple(tok(GOOD["prompt"])["input_ids"])
    assert pair.chosen_ids == (*ids(tok, " Paris."), tok.eos_token_id)
    assert pair.rejected_ids == (*ids(tok, " London."), tok.eos_token_id)
    assert (pair.source, pair.index) == (SRC, 1)


def test_no_bos_tokenizer_adds_no_bos(tok_nobos):
    (pair,) = tokenize_rows(rows_of(GOOD), tok_nobos).pairs
    assert tok_nobos.bos_token_id is None
    assert pair.prompt_ids == tuple(ids(tok_nobos, GOOD["prompt"]))
    assert 1 not in pair.prompt_ids  # the <bos> token's id


def test_eos_is_not_doubled(tok):
    row = {"prompt": "Hi", "chosen": " Hello<eos>", "rejected": " Bye"}
    (pair,) = tokenize_rows(rows_of(row), tok).pairs
    assert pair.chosen_ids == (*ids(tok, " Hello"), tok.eos_token_id)
    assert pair.chosen_ids.count(tok.eos_token_id) == 1
    assert pair.rejected_ids[-1] == tok.eos_token_id


# --- implicit prompts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        ("Q: 2+2? A: 4", "Q: 2+2? A: 5", ("Q: 2+2? A:", " 4", " 5")),
        ("The cat sat", "The car sat", ("The", " cat sat", " car sat")),
        ("Question?\n\nYes, sure.", "Question?\n\nNo.", ("Question?", "\n\nYes, sure.", "\n\nNo.")),
        ("Yes", "Yes!", ("", "Yes", "Yes!")),
        ("Hello world", "Goodbye", ("", "Hello world", "Goodbye")),
        ("I agree. Fully", "I agree. Partly", ("I agree.", " Fully", " Partly")),
        ("Hi there", "Hi\tyou", ("Hi", " there", "\tyou")),
        ("A: yes  sir", "A: yes \tno", ("A: yes", "  sir", " \tno")),
        ("Yes", "Yes sir", ("", "Yes", "Yes sir")),
        ("same", "same", ("", "same", "same")),
    ],
)
def test_split_shared_prefix_never_splits_a_word(chosen, rejected, expected):
    prompt, rest_c, rest_r = split_shared_prefix(chosen, rejected)
    assert (prompt, rest_c, rest_r) == expected
    assert prompt + rest_c == chosen and prompt + rest_r == rejected


def test_implicit_string_prompt_is_tokenized_like_an_explicit_one(tok):
    implicit = tokenize_rows(rows_of({"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}), tok).pairs[0]
    explicit = tokenize_rows(rows_of({"prompt": "Q: 2+2? A:", "chosen": " 4", "rejected": " 5"}), tok).pairs[
        0
    ]
    assert implicit == explicit


def test_split_shared_messages():
    chosen = [user("Hi"), bot("Hello"), user("2+2?"), bot("4")]
    rejected = [user("Hi"), bot("Hello"), user("2+2?"), bot("5")]
    assert split_shared_messages(chosen, rejected) == (chosen[:3], [bot("4")], [bot("5")])


def test_implicit_conversation_equals_explicit(tok):
    prompt = [user("Hi"), bot("Hello"), user("2+2?")]
    implicit = {"chosen": [*prompt, bot("4")], "rejected": [*prompt, bot("5")]}
    explicit = {"prompt": prompt, "chosen": [bot("4")], "rejected": [bot("5")]}
    a = tokenize_rows(rows_of(implicit), tok).pairs[0]
    b = tokenize_rows(rows_of(explicit), tok).pairs[0]
    assert a == b


def test_explicit_prompt_is_decided_per_source(tok):
    rows = [Row("a.jsonl", 1, GOOD), Row("a.jsonl", 2, {"chosen": "x y", "rejected": "x z"})]
    rows.append(Row("b.jsonl", 1, {"chosen": "x y", "rejected": "x z"}))
    data = tokenize_rows(rows, tok, on_bad_row="skip")
    assert data.skipped == [BadRow("a.jsonl", 2, "prompt", "missing field")]
    assert [(p.source, p.index) for p in data.pairs] == [("a.jsonl", 1), ("b.jsonl", 1)]


# --- chat templates --------------------------------------------------------------------------


def test_chat_template_rendering(tok):
    prompt = [{"role": "system", "content": "Be brief."}, user("Hi")]
    row = {"prompt": prompt, "chosen": [bot("Hello!")], "rejected": [bot("Go away.")]}
    (pair,) = tokenize_rows(rows_of(row), tok).pairs
    rendered = "<bos><|system|>\nBe brief.<eos><|user|>\nHi<eos><|assistant|>\n"
    assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == rendered
    assert pair.prompt_ids == tuple(ids(tok, rendered))
    assert pair.prompt_ids.count(tok.bos_token_id) == 1  # the template's BOS is not doubled
    assert tok.decode(list(pair.chosen_ids)) == "Hello!<eos>"
    assert pair.chosen_ids == (*ids(tok, "Hello!"), tok.eos_token_id)
    assert tok.decode(list(pair.rejected_ids)) == "Go away.<eos>"


def test_conversational_data_needs_a_chat_template():
    from poise.model.tiny import build_tiny_tokenizer

    plain = build_tiny_tokenizer(chat_template=False)
    row = {"prompt": [user("Hi")], "chosen": [bot("a")], "rejected": [bot("b")]}
    with pytest.raises(
        DataError, match=r"prefs\.jsonl, row 1: the data is conversational .* no chat template"
    ):
        tokenize_rows(rows_of(row), plain)


def test_template_that_does_not_render_the_prompt_as_prefix(tok):
    odd = copy.deepcopy(tok)
    odd.chat_template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    row = {"prompt": [user("Hi")], "chosen": [bot("a")], "rejected": [bot("b")]}
    with pytest.raises(
        DataError, match=r"row 1, field 'chosen': the chat template does not render the prompt as a prefix"
    ):
        tokenize_rows(rows_of(row), odd, on_bad_row="skip")


# --- truncation ------------------------------------------------------------------------------

LONG = {
    "prompt": "Please explain why the sky is blue during the day.",
    "chosen": " Sunlight is scattered by the air.",
    "rejected": " I cannot help with that.",
}


def test_prompt_keeps_its_end_and_its_bos(tok):
    body = ids(tok, LONG["prompt"])
    (pair,) = tokenize_rows(rows_of(LONG), tok, max_prompt_length=4, max_length=None).pairs
    assert pair.prompt_ids == (tok.bos_token_id, *body[-3:])
    assert pair.chosen_ids == (*ids(tok, LONG["chosen"]), tok.eos_token_id)


def test_prompt_keeps_its_end_without_bos(tok_nobos):
    body = ids(tok_nobos, LONG["prompt"])
    (pair,) = tokenize_rows(rows_of(LONG), tok_nobos, max_prompt_length=4, max_length=None).pairs
    assert pair.prompt_ids == tuple(body[-4:])


def test_completions_keep_their_start(tok):
    prompt = [tok.bos_token_id, *ids(tok, LONG["prompt"])]
    chosen = ids(tok, LONG["chosen"])
    rejected = ids(tok, LONG["rejected"])
    (pair,) = tokenize_rows(rows_of(LONG), tok, max_length=len(prompt) + 3, max_prompt_length=None).pairs
    assert pair.prompt_ids == tuple(prompt)
    assert pair.chosen_ids == tuple(chosen[:3]) and pair.rejected_ids == tuple(rejected[:3])
    assert tok.eos_token_id not in pair.chosen_ids


def test_prompt_then_completion_truncation(tok):
    body = ids(tok, LONG["prompt"])
    (pair,) = tokenize_rows(rows_of(LONG), tok, max_prompt_length=5, max_length=7).pairs
    assert pair.prompt_ids == (tok.bos_token_id, *body[-4:])
    assert pair.chosen_ids == tuple(ids(tok, LONG["chosen"])[:2])


def test_no_limits_keep_everything(tok):
    (pair,) = tokenize_rows(rows_of(LONG), tok, max_length=None, max_prompt_length=None).pairs
    assert len(pair.prompt_ids) == 1 + len(ids(tok, LONG["prompt"]))
    assert pair.length == len(pair.prompt_ids) + len(pair.chosen_ids)


def test_prompt_truncation_error(tok):
    with pytest.raises(
        DataError,
        match=r"prefs\.jsonl, row 1, field 'prompt': prompt too long \(\d+ tokens, max_prompt_length is 4\)",
    ):
        tokenize_rows(rows_of(LONG), tok, max_prompt_length=4, prompt_truncation="error")


def test_prompt_alone_reaching_max_length_is_a_bad_row(tok):
    n = 1 + len(ids(tok, LONG["prompt"]))
    data = tokenize_rows(rows_of(LONG, GOOD), tok, max_length=n, max_prompt_length=None, on_bad_row="skip")
    assert [(b.index, b.field, b.reason) for b in data.skipped] == [(1, "prompt", "prompt too long")]
    assert len(data.pairs) == 1 and data.pairs[0].index == 2


def test_truncation_that_makes_the_completions_identical(tok):
    row = {"prompt": "Hi", "chosen": " The cat sat on the mat.", "rejected": " The cat sat on the rug."}
    with pytest.raises(
        DataError, match=r"field 'rejected': identical chosen and rejected \(the same after truncation"
    ):
        tokenize_rows(rows_of(row), tok, max_length=4, max_prompt_length=None)


def test_completion_with_no_tokens_is_empty_after_truncation(tok):
    odd = copy.deepcopy(tok)
    odd.backend_tokenizer.normalizer = normalizers.Replace(
        "\u200b", ""
    )  # a character that encodes to nothing
    odd.eos_token = None
    rows = rows_of({"prompt": "Hi", "chosen": "\u200b", "rejected": " no"}, GOOD)
    data = tokenize_rows(rows, odd, on_bad_row="skip")
    assert data.skipped == [
        BadRow(SRC, 1, "chosen", "empty completion after truncation", "the completion has no tokens")
    ]
    assert data.pairs[0].chosen_ids == tuple(ids(odd, " Paris."))  # no EOS token to append


# --- bad rows --------------------------------------------------------------------------------

BAD_ROWS = [
    ({"prompt": "Hi", "rejected": " no"}, "chosen", "missing field"),
    ({"prompt": None, "chosen": " a", "rejected": " b"}, "prompt", "missing field"),
    ({"prompt": "Hi", "chosen": 42, "rejected": " b"}, "chosen", "not a string"),
    ({"prompt": 7, "chosen": " a", "rejected": " b"}, "prompt", "not a string"),
    (
        {"prompt": [user("Hi")], "chosen": [{"role": "assistant"}], "rejected": [bot("b")]},
        "chosen",
        "malformed messages",
    ),
    ({"prompt": [user("Hi")], "chosen": [bot("a")], "rejected": "b"}, "rejected", "malformed messages"),
    ({"prompt": [user("Hi")], "chosen": [user("a")], "rejected": [bot("b")]}, "chosen", "malformed messages"),
    ({"prompt": "Hi", "chosen": "", "rejected": " b"}, "chosen", "empty completion"),
    ({"prompt": "Hi", "chosen": " a", "rejected": " \n\t"}, "rejected", "empty completion"),
    ({"prompt": [user("Hi")], "chosen": [bot("  ")], "rejected": [bot("b")]}, "chosen", "empty completion"),
    ({"prompt": "Hi", "chosen": " same", "rejected": " same"}, "rejected", "identical chosen and rejected"),
    ({"chosen": "Q? same", "rejected": "Q? same"}, "rejected", "identical chosen and rejected"),
    (
        {"prompt": [user("Hi")], "chosen": [bot("x")], "rejected": [bot("x")]},
        "rejected",
        "identical chosen and rejected",
    ),
]


@pytest.mark.parametrize(("row", "field", "reason"), BAD_ROWS)
def test_bad_row_in_error_mode_names_file_row_and_field(tok, row, field, reason):
    good = good_neighbour(row)
    rows = rows_of(good, good, row, good)
    with pytest.raises(DataError) as info:
        tokenize_rows(rows, tok)
    assert str(info.value).startswith(f"prefs.jsonl, row 3, field '{field}': {reason}")
    assert "Fix the row or set on_bad_row: skip to drop such rows." in str(info.value)


@pytest.mark.parametrize(("row", "field", "reason"), BAD_ROWS)
def test_bad_row_in_skip_mode_is_counted(tok, row, field, reason):
    good = good_neighbour(row)
    data = tokenize_rows(rows_of(good, row, good), tok, on_bad_row="skip")
    assert [(b.source, b.index, b.field, b.reason) for b in data.skipped] == [(SRC, 2, field, reason)]
    assert [p.index for p in data.pairs] == [1, 3]
    assert data.summary() == f"kept 2 of 3 rows; skipped 1 (1 {reason})"


def test_error_mode_reports_the_first_bad_row_in_file_order(tok):
    short = {"prompt": "Hi", "chosen": " a", "rejected": " b"}
    rows = rows_of(short, LONG, {"prompt": "Hi", "chosen": "", "rejected": " b"})
    with pytest.raises(DataError) as info:  # row 2 fails when truncated, row 3 before tokenizing
        tokenize_rows(rows, tok, max_prompt_length=5, prompt_truncation="error")
    message = str(info.value)
    assert message.startswith("prefs.jsonl, row 2, field 'prompt': prompt too long")
    assert message.endswith("1 other row also has problems.")


def test_jsonl_bad_rows_name_the_line(tok, write_jsonl):
    path = write_jsonl([GOOD, "", {"prompt": "Hi", "chosen": " ", "rejected": " b"}])
    with pytest.raises(DataError, match=rf"^{path}, line 3, field 'chosen': empty completion\."):
        tokenize_rows(load_rows(path), tok)


def test_summary_counts_each_kind(tok):
    rows = rows_of(
        GOOD,
        {"prompt": "Hi", "chosen": " same", "rejected": " same"},
        {"prompt": "Hi", "chosen": "", "rejected": " b"},
        {"prompt": "Hi", "chosen": " a", "rejected": ""},
        GOOD,
    )
    data = tokenize_rows(rows, tok, on_bad_row="skip")
    assert (
        data.summary() == "kept 2 of 5 rows; skipped 3 (2 empty completion, 1 identical chosen and rejected)"
    )
    assert TokenizedData(data.pairs).summary() == "kept 2 of 2 rows"
    assert data.skipped[0].message() == "prefs.jsonl, row 2, field 'rejected': identical chosen and rejected."


def test_all_rows_bad_is_an_error_even_when_skipping(tok):
    rows = rows_of(
        {"prompt": "Hi", "chosen": "", "rejected": " b"}, {"prompt": "Hi", "chosen": " a", "rejected": " a"}
    )
    with pytest.raises(DataError, match=r"none of the rows can be used \(kept 0 of 2 rows; skipped 2"):
        tokenize_rows(rows, tok, on_bad_row="skip")
    with pytest.raises(DataError, match="no rows"):
        tokenize_rows([], tok)


@pytest.mark.parametrize(
    "options",
    [
        {"max_length": 0},
        {"max_prompt_length": -1},
        {"prompt_truncation": "keep_start"},
        {"on_bad_row": "ignore"},
    ],
)
def test_bad_options_are_config_errors(tok, options):
    with pytest.raises(ConfigError):
        tokenize_rows(rows_of(GOOD), tok, **options)


# --- SFT -------------------------------------------------------------------------------------


def test_sft_sequences_plain_and_extended(tok):
    other = {"prompt": "Hi", "chosen": " Hello.", "rejected": " Bye."}
    data = tokenize_rows(rows_of(GOOD, other), tok)
    a, b = data.pairs
    assert sft_sequences(data) == [(a.prompt_ids, a.chosen_ids), (b.prompt_ids, b.chosen_ids)]
    assert sft_sequences(data, extended=True) == [
        (a.prompt_ids, a.chosen_ids),
        (a.prompt_ids, a.rejected_ids),
        (b.prompt_ids, b.chosen_ids),
        (b.prompt_ids, b.rejected_ids),
    ]
    assert tokenize_sft_rows(rows_of(GOOD, other), tok, extended=True, max_length=64) == sft_sequences(
        data, True
    )


# --- one format per file, truncation counts, prompt/response rows (probe files) ---------------


def test_a_file_mixing_standard_and_conversational_rows_is_refused_naming_the_first_of_each(tok):
    rows = rows_of(GOOD, GOOD, CHAT, GOOD, CHAT)
    for mode in ("error", "skip"):
        with pytest.raises(DataError) as info:
            tokenize_rows(rows, tok, on_bad_row=mode)
        msg = str(info.value)
        assert msg.startswith("prefs.jsonl: mixes standard rows (plain strings; first at row 1) and "
                              "conversational rows (lists of messages; first at row 3)")
        assert "Convert the file to one format" in msg
    # two files, one format each, are fine together
    assert len(tokenize_rows(rows_of(GOOD) + rows_of(CHAT, source="other.jsonl"), tok)) == 2


def test_truncation_is_counted_and_reported(tok):
    long = {"prompt": "Hi", "chosen": " the cat sat on the mat" * 4, "rejected": " a dog ran" * 8}
    data = tokenize_rows(rows_of(GOOD, long), tok, max_length=16, max_prompt_length=8)
    assert (data.truncated, data.prompt_truncated) == (1, 1)  # GOOD's prompt: 10 tokens with BOS
    assert data.longest > 16
    assert "1 with completions cut to max_length" in data.summary()
    assert tokenize_rows(rows_of(GOOD), tok).truncated == 0


@pytest.mark.parametrize("row", [
    {"prompt": "What is the capital of France?", "completion": " Paris."},
    {"prompt": "What is the capital of France?", "response": " Paris."},
    {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " London."},
])
def test_prompt_response_rows_tokenize_like_training_rows(tok, row):
    from poise.data.tokenize import tokenize_completions

    (pair,) = tokenize_rows(rows_of(GOOD), tok).pairs
    assert tokenize_completions(rows_of(row), tok) == [(pair.prompt_ids, pair.chosen_ids)]


@pytest.mark.parametrize("row", [
    {"prompt": [user("What is the capital of France?")], "completion": [bot("Paris.")]},
    {"messages": [user("What is the capital of France?"), bot("Paris.")]},
    CHAT,
    {"prompt": "What is the capital of France?", "completion": "Paris."},  # strings, chat=True
])
def test_conversational_prompt_response_rows_use_the_chat_template(tok, row):
    from poise.data.tokenize import tokenize_completions

    (pair,) = tokenize_rows(rows_of(CHAT), tok).pairs
    assert tokenize_completions(rows_of(row), tok, chat=True) == [(pair.prompt_ids, pair.chosen_ids)]


@pytest.mark.parametrize("row,field", [
    ({"prompt": "Hi"}, "completion"),
    ({"prompt": "Hi", "completion": "  "}, "completion"),
    ({"messages": [bot("only an answer")]}, "messages"),
    ({"messages": [user("Hi"), user("again")]}, "messages"),
])
def test_bad_prompt_response_rows_name_the_row(tok, row, field):
    from poise.data.tokenize import tokenize_completions

    with pytest.raises(DataError, match=rf"prefs.jsonl, row 2, field '{field}'"):
        first = {"prompt": "a", "completion": " b"} if row_format(row) != "conversational" else CHAT
        tokenize_completions(rows_of(first, row), tok)
