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


def test_methods_and_seeds_compare_with_shared_first_samples_and_a_report(tmp_path):
    """methods x seeds: one iterate run each (output_dir/<label>/seed-<s>); round 1 of every method with the
    same seed has the same samples (made once, copied); each run's last model is evaluated on the eval
    prompts with the reward against the start model (its replies generated once); report.md has the
    rounds table and the comparison; the rounds' checkpoints are gone, their models kept."""
    from poise.recipes.iterate import iterate_main

    path = _setup(tmp_path, rounds=1)
    spec = yaml.safe_load(path.read_text())
    spec.update(methods={"dpo": {"method": "dpo"}, "ipo": {"method": "ipo", "beta": 0.5}}, seeds=[0, 1],
                eval={"prompts_file": spec["prompts_file"], "prompts": 3, "max_new_tokens": 4})
    path.write_text(yaml.safe_dump(spec))
    finals = iterate_main(str(path))
    out = tmp_path / "iter"
    assert finals == [out / lab / f"seed-{s}" / "round-1" / "run" / "model" for lab in ("dpo", "ipo") for s in (0, 1)]
    text = {(lab, s): (out / lab / f"seed-{s}" / "round-1" / "samples.jsonl").read_text()
            for lab in ("dpo", "ipo") for s in (0, 1)}
    assert text[("dpo", 0)] == text[("ipo", 0)] and text[("dpo", 1)] == text[("ipo", 1)]
    assert text[("dpo", 0)] != text[("dpo", 1)]  # another seed samples other replies
    for lab in ("dpo", "ipo"):
        for s in (0, 1):
            run = out / lab / f"seed-{s}" / "round-1" / "run"
            info = json.loads((run / "eval.json").read_text())
            assert info == {"label": lab, "cell": "rounds=1", "method": lab, "rounds": 1, "seed": s}
            ev = json.loads((run / "eval_prompts.json").read_text())
            assert ev["prompts"] == 3 and ev["baseline"] == spec["train"]["model"]
            assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == s
            assert not (run / "checkpoints").exists() and (run / "model" / "config.json").is_file()
    cached = json.loads((out / "eval-baseline.json").read_text())["replies"]  # the start's replies: generated once
    for lab in ("dpo", "ipo"):
        for s in (0, 1):
            rows = (out / lab / f"seed-{s}" / "round-1" / "run" / "generations_prompts.jsonl").read_text().splitlines()
            assert [json.loads(line)["baseline_output"] for line in rows] == cached
    report = (out / "report.md").read_text()
    assert "| run | round 1 |" in report and "| dpo |" in report and "(n=2)" in report


def test_prompts_from_a_saved_dataset_split(tmp_path):
    """prompts_file may be a dataset (a save_to_disk folder here; a Hub name the same way) and
    prompts_split its split."""
    import datasets

    from poise.recipes.iterate import iterate_main

    path = _setup(tmp_path, rounds=1)
    folder = tmp_path / "ds"
    datasets.DatasetDict({"test": datasets.Dataset.from_list([{"prompt": "a dog"}, {"prompt": "the owl"}])}
                         ).save_to_disk(str(folder))
    spec = yaml.safe_load(path.read_text())
    spec.update(prompts_file=str(folder), prompts_split="test")
    path.write_text(yaml.safe_dump(spec))
    iterate_main(str(path))
    rows = [json.loads(line) for line in (tmp_path / "iter" / "round-1" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "a dog" in rows[0]["prompt"] and "the owl" in rows[1]["prompt"]


def test_a_round_killed_mid_training_resumes_to_the_same_model(tmp_path):
    """SIGKILL while the round's training writes its step-2 checkpoint; the rerun resumes the round from
    step 1 (its samples and pairs kept) and ends with the weights of an uninterrupted run."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from poise.recipes.iterate import iterate_main

    path = _setup(tmp_path, rounds=1)
    spec = yaml.safe_load(path.read_text())
    spec["train"].update(save_steps=1, max_steps=3, batch_size=1, micro_batch_size=1)
    spec["keep_checkpoints"] = True
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "POISE_TEST_KILL_AT": "state:2"}
    p = subprocess.run([sys.executable, "-m", "poise", "iterate", str(path)], env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-2000:]
    r1 = tmp_path / "iter" / "round-1"
    assert (r1 / "pairs.jsonl").is_file() and not (r1 / "round.json").exists()
    stamp = (r1 / "samples.jsonl").stat().st_mtime_ns
    iterate_main(str(path))
    assert (r1 / "samples.jsonl").stat().st_mtime_ns == stamp
    metrics = [json.loads(line) for line in (r1 / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    spec.update(output_dir=str(tmp_path / "whole"))
    path.write_text(yaml.safe_dump(spec))
    iterate_main(str(path))
    a = load_file(str(r1 / "run" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "whole" / "round-1" / "run" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_gguf_start_is_converted_once(tmp_path, monkeypatch):
    """train.gguf_file: the start is converted into output_dir/base once, and that folder is the start (and
    the fixed reference) of every round; a second call reuses it."""
    import poise.model.load as load
    from poise.recipes.iterate import load_iterate, start_folder

    model = save_tiny_model(tmp_path / "model")
    calls = []
    real_model, real_tok = load.load_model, load.load_tokenizer

    def fake_model(source, gguf_file=None, **kw):
        calls.append((source, gguf_file))
        return real_model(str(model))

    monkeypatch.setattr(load, "load_model", fake_model)
    monkeypatch.setattr(load, "load_tokenizer", lambda source, gguf_file=None, **kw: real_tok(str(model)))
    path = _setup(tmp_path, rounds=1)
    spec = yaml.safe_load(path.read_text())
    spec["train"].update(model=str(tmp_path), gguf_file="weights.gguf")
    path.write_text(yaml.safe_dump(spec))
    cfg = load_iterate(path)
    base = start_folder(cfg)
    assert base == str(tmp_path / "iter" / "base") and (tmp_path / "iter" / "base" / "config.json").is_file()
    assert calls == [(str(tmp_path), "weights.gguf")]
    assert start_folder(cfg) == base and len(calls) == 1


JUDGE = '''
def fewer_words(prompt, a, b):
    la, lb = len(a.split()), len(b.split())
    return 1.0 if la < lb else 0.0 if la > lb else 0.5
'''


def _reward_spec(kind, tmp_path, monkeypatch, model):
    if kind == "file":
        return f"{tmp_path / 'rw.py'}:shorter"
    if kind == "module":
        (tmp_path / "mods").mkdir()
        (tmp_path / "mods" / "iter_rewards_mod.py").write_text(REWARD)
        monkeypatch.syspath_prepend(str(tmp_path / "mods"))
        return "iter_rewards_mod:shorter"
    if kind == "builtin":
        return "instruct"
    if kind == "rm":
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

        tok = AutoTokenizer.from_pretrained(model)
        torch.manual_seed(0)
        LlamaForSequenceClassification(LlamaConfig(
            vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_labels=1, pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "rm")
        tok.save_pretrained(tmp_path / "rm")
        return f"rm:{tmp_path / 'rm'}"
    if kind == "judge":
        (tmp_path / "judge.py").write_text(JUDGE)
        return f"judge:{tmp_path / 'judge.py'}:fewer_words"
    return f"judge:{model}"  # the tiny causal LM itself as a judge


@pytest.mark.parametrize("kind", ["file", "module", "builtin", "rm", "judge", "judge-model"])
def test_a_round_with_each_kind_of_reward(tmp_path, monkeypatch, kind):
    """Sampling, scoring, pairing and training with every kind of reward: a callable from a file or a
    module, a built-in gold reward (instruct: the prompts are its instructions), a local reward model, a
    pairwise judge callable (each reply scored by its mean preference over the prompt's other replies, so
    a prompt's K scores sum to K/2) and a causal LM as the judge."""
    from poise.recipes.iterate import iterate_main

    path = _setup(tmp_path, rounds=1)
    spec = yaml.safe_load(path.read_text())
    spec["reward"] = _reward_spec(kind, tmp_path, monkeypatch, spec["train"]["model"])
    if kind == "builtin":
        prompts = tmp_path / "instruct.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"Repeat these words exactly: {w}. Reply with the words only."})
                                   + "\n" for w in ("cat dog", "owl", "red sun hat", "a b")))
        spec["prompts_file"] = str(prompts)
    path.write_text(yaml.safe_dump(spec))
    r1 = tmp_path / "iter" / "round-1"
    if kind == "builtin":  # the untrained tiny model never repeats the words: every reply scores 0, all tie
        from poise.errors import DataError
        from poise.testbed.instruct import gold_reward

        with pytest.raises(DataError, match=r"round 1: no pair: every prompt's replies had equal rewards \(4 ties\)"):
            iterate_main(str(path))
        samples = [json.loads(line) for line in (r1 / "samples.jsonl").read_text().splitlines()]
        assert all(s["rewards"] == [gold_reward(s["prompt"], x) for x in s["replies"]] == [0.0] * 3 for s in samples)
        return
    iterate_main(str(path))
    samples = [json.loads(line) for line in (r1 / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(len(s["replies"]) == 3 and len(s["rewards"]) == 3 for s in samples)
    assert all(isinstance(x, float) for s in samples for x in s["rewards"])
    if kind.startswith("judge"):
        assert all(sum(s["rewards"]) == pytest.approx(1.5, rel=1e-6) for s in samples)
    if kind == "judge":  # by hand: the mean over the other two replies of 1 (fewer words), 0.5 or 0
        for s in samples:
            n = [len(x.split()) for x in s["replies"]]
            want = [sum(1.0 if n[i] < n[j] else 0.0 if n[i] > n[j] else 0.5 for j in range(3) if j != i) / 2
                    for i in range(3)]
            assert s["rewards"] == pytest.approx(want, rel=1e-9)
    info = json.loads((r1 / "round.json").read_text())
    assert info["pairs"] + info["ties_dropped"] >= 1 and info["samples"] == 12
    if info["pairs"]:
        assert (r1 / "run" / "model" / "config.json").is_file()


def test_the_shipped_smollm2_comparison_config_and_its_prompt_files(tmp_path):
    """configs/iterate/smollm2-instruct.yaml reads as 15 runs (5 methods x 3 seeds, the quickstart's five
    methods), and its prompt files are what write_prompt_files writes (disjoint train and held-out)."""
    from pathlib import Path

    from poise.recipes.iterate import load_iterate
    from poise.testbed.instruct import write_prompt_files

    root = Path(__file__).resolve().parents[2] / "configs" / "iterate"
    cfg = load_iterate(root / "smollm2-instruct.yaml")
    assert cfg.rounds >= 3 and len(cfg.seeds) >= 3 and cfg.reward == "instruct"
    assert set(cfg.methods) == {"dpo", "adadpo", "adadpo-floor1", "gate-dpo", "balanced-dpo"}
    assert len(cfg.runs()) == 15 and cfg.methods["adadpo-floor1"] == {"method": "adadpo", "ada_floor": 1.0}
    files = write_prompt_files(tmp_path)
    for name in ("train", "eval"):
        assert (root / f"instruct-{name}.jsonl").read_text() == files[name].read_text()
    tasks = [{json.loads(line)["task"] for line in files[n].read_text().splitlines()} for n in ("train", "eval")]
    assert len(tasks[0]) == 256 and len(tasks[1]) == 64 and not tasks[0] & tasks[1]


def test_new_prompts_each_round(tmp_path):
    """new_prompts_each_round: round r samples prompts (r-1)N+1 .. rN; too few prompts for the rounds is
    refused before any round starts, naming the numbers."""
    from poise.recipes.iterate import iterate_main

    path = _setup(tmp_path, rounds=2)
    spec = yaml.safe_load(path.read_text())
    spec.update(prompts_per_round=2, new_prompts_each_round=True)
    path.write_text(yaml.safe_dump(spec))
    iterate_main(str(path))
    seen = [[json.loads(line)["prompt"] for line in (tmp_path / "iter" / f"round-{r}" / "samples.jsonl").read_text()
             .splitlines()] for r in (1, 2)]
    assert [[w in p for p in seen[0]] for w in ("a mat", "the dog")] == [[True, False], [False, True]]
    assert [[w in p for p in seen[1]] for w in ("a box", "red")] == [[True, False], [False, True]]
    spec.update(rounds=3, output_dir=str(tmp_path / "other"))
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="3 rounds of 2 prompts needs 6 prompts; .* has 4"):
        iterate_main(str(path))
    assert not (tmp_path / "other").exists()
