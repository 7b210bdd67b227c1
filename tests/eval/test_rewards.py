"""Rewards for evaluation (poise/eval/rewards.py) and `poise eval --prompts-file --reward` (poise/eval/run.py):
a reward named by one string, row failures named or skipped, win rates against a baseline."""

import json
import math

import pytest
import torch
from helpers import save_tiny_model

from poise.errors import ConfigError, DataError
from poise.eval.rewards import load_reward, score_all
from poise.testbed.evaluate import bootstrap_ci, compare

REWARDS_PY = '''
def length(prompt, response):
    return float(len(response.split()))

def picky(prompt, response):
    if "boom" in prompt:
        raise ValueError("cannot score this one")
    return 1.0

def nan(prompt, response):
    return float("nan")
'''


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "myrewards.py"
    path.write_text(REWARDS_PY)
    return path


def test_a_reward_is_named_by_one_string(rewards_file):
    r = load_reward(f"{rewards_file}:length")
    assert r.batch(["p", "q"], ["a b c", ""]) == [3.0, 0.0]
    assert load_reward("testbed").batch
    for spec, match in [("nothing", "not a reward"), (f"{rewards_file}:missing", r"has no function 'missing'.*length"),
                        ("/no/such/file.py:f", "does not exist"), ("no_such_module_xyz:f", "importing no_such_module_xyz failed")]:
        with pytest.raises(ConfigError, match=match):
            load_reward(spec)


def test_a_failing_row_is_named_or_skipped(rewards_file):
    r = load_reward(f"{rewards_file}:picky")
    prompts, replies, where = ["ok", "boom", "fine"], ["a", "b", "c"], ["p.jsonl row 1", "p.jsonl row 2", "p.jsonl row 3"]
    with pytest.raises(DataError, match=r"p.jsonl row 2: the reward .* failed \(ValueError: cannot score this one\)"):
        score_all(r, prompts, replies, where=where)
    scores, skipped = score_all(r, prompts, replies, where=where, on_bad_row="skip")
    assert scores == [1.0, None, 1.0] and skipped == 1
    with pytest.raises(DataError, match="row 0: .*it returned nan"):
        score_all(load_reward(f"{rewards_file}:nan"), ["p"], ["r"])


def test_a_local_reward_model_scores_in_batches(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    folder = save_tiny_model(tmp_path / "lm")  # its tokenizer, and a classifier of the same shape
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                                    pad_token_id=tok.pad_token_id))
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    reward = load_reward(str(tmp_path / "rm"), batch_size=2)  # recognised by its config, or rm:FOLDER
    prompts, replies = ["the cat", "a dog ran", "red box"], [" sat", " to the mat and", " was warm"]
    got = reward.batch(prompts, replies)
    for p, r, g in zip(prompts, replies, got):  # one at a time, no padding: the same score
        text = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                       tokenize=False)  # the tokenizer has a chat template: it renders the pair
        with torch.no_grad():
            one = rm(**tok([text], return_tensors="pt")).logits[0, -1].item()
        assert g == pytest.approx(one, rel=1e-4, abs=1e-5)
    assert load_reward(f"rm:{tmp_path / 'rm'}").batch(prompts[:1], replies[:1]) == pytest.approx(got[:1], rel=1e-5)


def test_win_rates_by_hand():
    out = compare([1, 0, 1, 0.5], [0, 0, 0, 1], [0, 0, 0, 0])  # wins, tie, win, loss; no length difference
    assert out["win_rate"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert out["lc_win_rate"] == out["win_rate"] and out["ties"] == 0.25
    longer = compare([1, 1, 0, 0], [0, 0, 1, 1], [5, 4, -4, -5])  # wins only when longer: the length explains it
    assert longer["win_rate"] == 0.5 and longer["length_coef"] > 0 and math.isclose(longer["lc_win_rate"], 0.5, abs_tol=0.05)


def test_poise_eval_with_a_prompt_file_and_a_reward(tmp_path, rewards_file):
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
    prompts.write_text(json.dumps({"prompt": "the dog"}) + "\n" + json.dumps({"prompt": "boom box"}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    common = [str(run), "--prompts-file", str(prompts), "--max-new-tokens", "3", "--prompts", "2"]
    assert main(["eval", *common, "--reward", f"{rewards_file}:length"]) == 0
    out = json.loads((run / "eval_prompts.json").read_text())
    assert out["scored"] == 2 and 0 <= out["win_rate"] <= 1 and 0 <= out["lc_win_rate"] <= 1
    assert out["baseline"] == str(model)  # the run's reference model by default
    rows = [json.loads(line) for line in (run / "generations_prompts.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows] == [float(len(r["output"].split())) for r in rows]
    # per-prompt outcomes (1, 0.5, 0 as the rewards compare), paired with the file's prompts, and the
    # bootstrap interval of their mean
    assert out["prompt_ids"] == [0, 1] and out["outcomes"] == [
        1.0 if r["reward"] > r["baseline_reward"] else 0.0 if r["reward"] < r["baseline_reward"] else 0.5 for r in rows]
    assert out["win_rate"] == sum(out["outcomes"]) / 2 and out["win_rate_ci"] == list(bootstrap_ci(out["outcomes"]))
    assert main(["eval", *common, "--reward", f"{rewards_file}:picky"]) == 2  # row 2 named, nothing written
    assert main(["eval", *common, "--reward", f"{rewards_file}:picky", "--on-bad-row", "skip"]) == 0
    out = json.loads((run / "eval_prompts.json").read_text())
    assert out["skipped"] == 1 and out["prompt_ids"] == [0]  # "boom box" (the second prompt) left out
    assert main(["eval", str(run), "--reward", "testbed"]) == 2  # --reward needs --prompts-file
    # a conversational prompt (messages) is rendered with the chat template
    assert main(["eval", *common[:-1], "3", "--reward", f"{rewards_file}:length"]) == 0
    rows = [json.loads(line) for line in (run / "generations_prompts.jsonl").read_text().splitlines()]
    assert "hi" in rows[2]["instruction"] and rows[2]["instruction"] != "hi"
