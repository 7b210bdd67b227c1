"""A built-in, offline preference testbed with a known gold reward.

:mod:`poise.testbed.task` defines the synthetic instruction task (copy / reverse / sort / count over a
closed vocabulary) and its gold reward; :mod:`poise.testbed.pairs` writes SFT rows, off-policy and
on-policy preference pairs labelled by a (biased, noisy) simulated labeller, squeezing probes and
disjoint prompt splits; :mod:`poise.testbed.evaluate` generates responses and scores them (gold
reward, raw and length-controlled win rates); :mod:`poise.testbed.instruct` asks the same task in
plain English of a real instruct model (chat template, a gold reward for free-form replies, pairs
from the model's own samples).
"""

from poise.testbed.evaluate import fit_logistic, generate, score, win_rate
from poise.testbed.pairs import (
    PromptSplits,
    best_and_worst,
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
    vocabulary_corpus,
)

__all__ = [
    "NUMBERS",
    "OPS",
    "WORDS",
    "PromptSplits",
    "best_and_worst",
    "build_testbed_model",
    "build_testbed_tokenizer",
    "corrupt",
    "edit_distance",
    "fit_logistic",
    "format_prompt",
    "generate",
    "gold_answer",
    "gold_reward",
    "labeller_score",
    "make_prompts",
    "offpolicy_pairs",
    "onpolicy_pairs",
    "parse_prompt",
    "probe_rows",
    "read_jsonl",
    "save_testbed_model",
    "score",
    "sft_rows",
    "split_prompts",
    "vocabulary_corpus",
    "win_rate",
    "write_jsonl",
]
