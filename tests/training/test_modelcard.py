"""poise.training.modelcard: the README.md of a run's model folder, and push_to_hub with a fake uploader (no
test touches the network)."""

import json
import re

import huggingface_hub
import pytest
import yaml

from poise.errors import ConfigError
from poise.training.config import from_dict
from poise.training.modelcard import hub_name, model_card, push_to_hub, write_model_card


def _cfg(**kw):
    raw = dict(model="org/base-model", train_file="org/prefs", method="adadpo", beta=0.05,
               output_dir="runs/my-adadpo", learning_rate=1e-6, max_steps=10)
    raw.update(kw)
    return from_dict(raw)


def _run(tmp_path, summary="kept 12 of 13 rows; skipped 1 (1 prompt too long)"):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "data_summary.json").write_text(json.dumps({"train": summary}))
    return run


def _front_matter(text):
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert m, text[:200]
    return yaml.safe_load(m.group(1))


def test_card_has_front_matter_method_data_metrics_and_usage(tmp_path):
    cfg = _cfg()
    run = _run(tmp_path)
    path = write_model_card(run, cfg, {"loss": 0.5, "rewards/margins": 0.25, "balance/kappa_mean": 1.5,
                                       "nonfinite_pairs": [], "flag": True})
    assert path == run / "model" / "README.md"
    text = path.read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["poise", "dpo", "adadpo", "ada"]
    assert meta["base_model"] == "org/base-model" and meta["datasets"] == ["org/prefs"]
    for name in cfg.build_objective().hyperparameters:  # every resolved hyperparameter
        assert re.search(rf"\| `{re.escape(name)}` \| ", text), name
    assert "| `beta` | 0.05 |" in text and "| `ada_clip` | 2 |" in text and "| `ada_floor` | `null` |" in text
    assert "arXiv 2605.28440" in text  # AdaDPO's paper
    assert "`org/prefs` (12 preference pairs)" in text
    assert "| `rewards/margins` | 0.25 |" in text and "| `balance/kappa_mean` | 1.5 |" in text
    assert "nonfinite_pairs" not in text and "`flag`" not in text
    assert f'from_pretrained("{(run / "model").resolve()}")' in text


def test_card_config_block_reproduces_the_config(tmp_path):
    cfg = _cfg(balance=["gate"], gate_tau=0.01)
    text = model_card(cfg, {})
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    assert from_dict(yaml.safe_load(block)).to_dict() == cfg.to_dict()
    assert _front_matter(text)["tags"] == ["poise", "dpo", "adadpo", "ada", "gate"]


def test_local_sources_are_not_hub_names(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    assert hub_name(str(folder)) is None
    assert hub_name("data/prefs.jsonl") is None and hub_name("model.gguf") is None
    assert hub_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    meta = _front_matter(model_card(_cfg(model=str(folder), train_file="prefs.jsonl"), {}))
    assert "base_model" not in meta and "datasets" not in meta


def test_sft_card(tmp_path):
    text = model_card(from_dict(dict(model="org/m", train_file="p.jsonl", stage="sft")), {"loss": 1.0})
    assert _front_matter(text)["tags"] == ["poise", "sft"]
    assert "No method hyperparameters" in text


def test_card_needs_the_model_folder(tmp_path):
    with pytest.raises(ConfigError, match="model"):
        write_model_card(tmp_path / "nowhere", _cfg(), {})


class _FakeApi:
    calls = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw, self.token))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))
        return "commit-info"


def test_push_to_hub_uploads_the_folder_with_the_card_pointing_at_the_repo(tmp_path, monkeypatch):
    _FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    run = _run(tmp_path)
    write_model_card(run, _cfg(), {"loss": 0.5})
    assert push_to_hub(run / "model", "me/my-model", token="tok", private=True) == "commit-info"
    (create, repo, kw, token), (upload, up) = _FakeApi.calls
    assert (create, repo, token) == ("create_repo", "me/my-model", "tok") and kw["exist_ok"] and kw["private"]
    assert upload == "upload_folder" and up["folder_path"] == str(run / "model") and up["repo_id"] == "me/my-model"
    assert 'from_pretrained("me/my-model")' in (run / "model" / "README.md").read_text()


def test_push_to_hub_refuses_a_folder_without_a_model(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    with pytest.raises(ConfigError, match="config.json"):
        push_to_hub(tmp_path, "me/x")


def test_auto_hyperparameters_show_their_calibrated_values():
    text = model_card(_cfg(method="gate-dpo", beta=0.1), {"gate/tau": 0.0123, "gate/sharpness": 325.2})
    assert "| `gate_tau` | auto (calibrated: 0.0123) |" in text
    assert "| `gate_sharpness` | auto (calibrated: 325.2) |" in text
