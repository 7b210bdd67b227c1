"""poise iterate: rounds of on-policy pairs (sample, score with a reward, pair, train), each round kept
in its folder and resumed where it stopped."""

import json

import pytest
import yaml
from helpers import save_tiny_model

from poise.errors import ConfigError
from poise.recipes.iterate import build_pairs, load_iterate

REWARD = '''
def shorter(prompt, response):
    return -float(len(response.split()))
'''


def test_pairs_by_hand():
    import random

    rng = random.Random(0)
    replies, rewards = ["a", "b b", "c c c", "d"], [3.0, 2.0, 1.0, 3.0]
    rows, ties = build_pairs("p", replies, rewards, "best_worst", rng)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("a", "c c c")] and ties == 0
    rows, ties = build_pairs("p", replies, rewards, "all", rng)
    assert len(rows) == 5 and ties == 1  # 6 pairs, a-d tied
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    rows, _ = build_pairs("p", replies, rewards, "best_random", rng)
    assert rows[0]["chosen"] == "a" and rows[0]["rejected"] in ("b b", "c c c")
    assert build_pairs("p", ["x", "y"], [1.0, 1.0], "best_worst", rng) == ([], 1)
    assert build_pairs("p", ["x", "y"], [1.0, None], "best_worst", rng) == ([], 0)  # a skipped row


def _setup(tmp_path, rounds):
    model = save_tiny_model(tmp_path / "model")
    (tmp_path / "rw.py").write_text(REWARD)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the cat sat on {w}"}) + "\n" for w in ("a mat", "the dog", "a box", "red")))
    spec = dict(output_dir=str(tmp_path / "iter"), prompts_file=str(prompts), reward=f"{tmp_path / 'rw.py'}:shorter",
                rounds=rounds, samples_per_prompt=3, temperature=1.0, max_new_tokens=6,
                train=dict(model=str(model), method="dpo", batch_size=2, micro_batch_size=2, epochs=1,
                           learning_rate=1e-3, max_length=64, max_prompt_length=48, diagnostics=False,
                           save_steps=0, cache_dir=str(tmp_path / "cache")))
    path = tmp_path / "iterate.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_two_rounds_on_policy_and_a_resume(tmp_path):
    from poise.cli import main

    path = _setup(tmp_path, rounds=1)
    assert main(["iterate", str(path)]) == 0
    r1 = tmp_path / "iter" / "round-1"
    info = json.loads((r1 / "round.json").read_text())
    assert info["prompts"] == 4 and info["samples"] == 12 and info["pairs"] >= 1
    samples = [json.loads(line) for line in (r1 / "samples.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (r1 / "pairs.jsonl").read_text().splitlines()]
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    assert all(s["rewards"] == [-float(len(x.split())) for x in s["replies"]] for s in samples)
    assert (r1 / "run" / "model" / "config.json").is_file()
    stamp = (r1 / "samples.jsonl").stat().st_mtime_ns
    spec = yaml.safe_load(path.read_text())
    spec["rounds"] = 2
    path.write_text(yaml.safe_dump(spec))
    (tmp_path / "iter" / "round-2").mkdir()
    assert main(["iterate", str(path)]) == 0  # round 1 is kept as it was; round 2 starts from its model
    assert (r1 / "samples.jsonl").stat().st_mtime_ns == stamp
    info2 = json.loads((tmp_path / "iter" / "round-2" / "round.json").read_text())
    assert info2["start_model"] == str(r1 / "run" / "model")
    cfg2 = yaml.safe_load((tmp_path / "iter" / "round-2" / "run" / "config.yaml").read_text())
    assert cfg2["reference_model"] == spec["train"]["model"]  # reference: fixed (the default)


@pytest.mark.parametrize("change, match", [
    ({"rounds": 0}, "rounds is a whole number"), ({"pairs": "best"}, "pairs is one of"),
    ({"samples_per_prompt": 1}, "at least 2"), ({"round": 2}, r"unknown key 'round' \(did you mean 'rounds'\?\)"),
    ({"train": {"model": "m", "train_file": "x"}}, "train.train_file is set by poise iterate"),
    ({"train": {"model": "m", "methd": "dpo"}}, "methd"),
])
def test_a_bad_iterate_file_is_refused_with_the_key(tmp_path, change, match):
    path = _setup(tmp_path, rounds=1)
    spec = {**yaml.safe_load(path.read_text()), **change}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=match):
        load_iterate(path)
