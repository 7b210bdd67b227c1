"""poise.api: ``poise.train`` and ``poise.evaluate`` on a tiny model (a couple of steps), and the model
card a finished run gets."""

import json
import math
import random
import subprocess
import sys

import pytest
import yaml

from poise.api import evaluate, resolve_config, train
from poise.errors import ConfigError
from poise.model.tiny import build_tiny_model, build_tiny_tokenizer
from poise.training.config import TrainConfig, from_dict
from poise.training.loop import TrainResult
from poise.training.modelcard import write_model_card

WORDS = "the cat sat on a mat and dog ran to big red box when it was warm".split()


def _write_pairs(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": " ".join(rng.choices(WORDS, k=rng.randint(3, 6))),
                                "chosen": " " + " ".join(rng.choices(WORDS[:8], k=rng.randint(2, 5))),
                                "rejected": " " + " ".join(rng.choices(WORDS[8:], k=rng.randint(3, 8)))}) + "\n")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    tok = build_tiny_tokenizer()
    build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=0).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    _write_pairs(root / "train.jsonl", 8, seed=0)
    _write_pairs(root / "eval.jsonl", 4, seed=1)
    return root


def _raw(assets, tmp_path, **kw):
    raw = dict(model=str(assets / "model"), train_file=str(assets / "train.jsonl"), method="adadpo",
               output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), batch_size=4,
               micro_batch_size=4, max_steps=2, learning_rate=1e-3, save_steps=0, max_length=64,
               max_prompt_length=32, diagnostics=False)
    raw.update(kw)
    return raw


@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api-run")
    res = train(_raw(assets, tmp, eval_file=str(assets / "eval.jsonl")), method="gate-dpo",
                gate_calibration_pairs=4)
    return res, tmp


def test_train_from_a_dict_with_overrides(finished_run):
    res, _ = finished_run
    assert isinstance(res, TrainResult) and res.steps == 2 and not res.stopped_early
    assert res.model_dir == res.run_dir / "model" and (res.model_dir / "config.json").is_file()
    assert all(isinstance(v, float) for v in res.metrics.values())
    assert math.isfinite(res.metrics["loss"]) and "gate/tau" in res.metrics and "eval/rewards/margins" in res.metrics
    assert yaml.safe_load((res.run_dir / "config.yaml").read_text())["method"] == "gate-dpo"


def test_train_from_a_yaml_file_and_from_a_config(assets, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_raw(assets, tmp_path, max_steps=5)))
    a = train(path, max_steps=1, output_dir=str(tmp_path / "a"))  # overrides win over the file
    b = train(from_dict(_raw(assets, tmp_path, output_dir=str(tmp_path / "b"))), max_steps=1)
    assert a.steps == b.steps == 1
    assert a.metrics["loss"] == pytest.approx(b.metrics["loss"], rel=1e-6, abs=1e-6)


def test_config_errors_come_before_anything_is_written(assets, tmp_path):
    with pytest.raises(ConfigError, match="gate_tau"):
        train(_raw(assets, tmp_path), gate_tau=0.1)  # adadpo takes no gate_tau
    with pytest.raises(ConfigError, match="no such config file"):
        train(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="a config is a dict"):
        train(42)
    assert not (tmp_path / "run").exists()


def test_resolve_config(assets, tmp_path):
    cfg = resolve_config(_raw(assets, tmp_path), beta=0.05, balance=["gate"])
    assert isinstance(cfg, TrainConfig) and cfg.hyperparameters["beta"] == 0.05 and cfg.balance == ["gate"]
    assert resolve_config(cfg) == cfg and resolve_config(cfg, max_steps=3).max_steps == 3


def test_evaluate_a_run(finished_run):
    res, _ = finished_run
    out = evaluate(res.run_dir, num_prompts=2, max_new_tokens=4)
    assert out["method"] == "gate-dpo" and 0.0 <= out["reward_accuracy"] <= 1.0
    assert math.isfinite(out["kl_to_reference"]) and "eval/logps/chosen" in out
    assert json.loads((res.run_dir / "eval.json").read_text())["margin"] == pytest.approx(out["margin"])


def test_model_card_of_a_finished_run_loads_and_its_snippet_runs(finished_run):
    res, _ = finished_run
    written = (res.run_dir / "model" / "README.md").read_text()  # the card the run wrote
    state = json.loads(sorted((res.run_dir / "checkpoints").glob("step-*"))[-1].joinpath("trainer_state.json")
                       .read_text())["objective"]
    tau = state["gate"]["tau"]
    assert f"gate_tau` | auto (calibrated: {tau:.6g})" in written
    cfg = resolve_config(res.run_dir / "config.yaml")  # the resolved config holds the calibrated tau itself
    assert cfg.hyperparameters["gate_tau"] == tau
    card = write_model_card(res.run_dir, cfg, res.metrics).read_text()
    assert "(8 preference pairs)" in card and f"gate_tau` | {tau:.4g}" in card
    snippet = card.split("## Use")[1].split("```python\n")[1].split("```")[0]
    exec(compile(snippet.replace("max_new_tokens=64", "max_new_tokens=3"), "card", "exec"), {})


def test_package_level_functions_survive_importing_every_module():
    """``poise.train``/``poise.evaluate`` stay the functions after the layer packages are imported (no
    submodule shares their names), and ``import poise`` alone loads none of the heavy libraries."""
    code = ("import sys, poise; bad = [m for m in ('transformers', 'accelerate', 'datasets') if m in sys.modules]; "
            "assert not bad, bad; import poise.eval.run, poise.training.loop, poise.api; "
            "assert poise.evaluate is poise.api.evaluate and poise.train is poise.api.train")
    subprocess.run([sys.executable, "-c", code], check=True)
