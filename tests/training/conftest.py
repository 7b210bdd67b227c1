"""A tiny model folder and preference files, built locally once per test session."""

import json
import random

import pytest

from poise.model.tiny import build_tiny_model, build_tiny_tokenizer
from poise.training.config import from_dict

WORDS = "the cat sat on a mat and dog ran to big red box when it was warm".split()


def write_pairs(path, n, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({
                "prompt": " ".join(rng.choices(WORDS, k=rng.randint(3, 6))),
                "chosen": " " + " ".join(rng.choices(WORDS[:8], k=rng.randint(2, 5))),
                "rejected": " " + " ".join(rng.choices(WORDS[8:], k=rng.randint(3, 8))),
            }) + "\n")
    return path


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    write_pairs(root / "train.jsonl", 32, seed=0)
    write_pairs(root / "eval.jsonl", 8, seed=1)
    return root


@pytest.fixture
def make_cfg(assets, tmp_path):
    def make(**kw):
        raw = dict(model=str(assets / "model"), train_file=str(assets / "train.jsonl"),
                   output_dir=str(tmp_path / kw.pop("name", "run")), cache_dir=str(tmp_path / "cache"),
                   batch_size=8, micro_batch_size=8, learning_rate=1e-3, max_steps=4, warmup_ratio=0.0,
                   scheduler="constant", save_steps=0, max_length=64, max_prompt_length=32)
        raw.update(kw)
        return from_dict(raw)
    return make
