"""The checks that run before any model loads (poise/training/preflight.py), the probe file in every
training format, and a checkpoint of another model refused on resume."""

import json
from types import SimpleNamespace

import pytest

from poise.errors import ConfigError
from poise.model.tiny import build_tiny_model, build_tiny_tokenizer
from poise.training.build import RunState
from poise.training.config import from_dict
from poise.training.preflight import check_inputs


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


STANDARD = {"prompt": "the cat", "chosen": " sat down", "rejected": " ran off"}
CHAT = {"prompt": [user("the cat")], "chosen": [bot("sat down")], "rejected": [bot("ran off")]}

PROBES = {
    "prompt/completion": {"prompt": "a dog", "completion": " barked"},
    "prompt/response": {"prompt": "a dog", "response": " barked"},
    "preference row": {"prompt": "a dog", "chosen": " barked", "rejected": " slept"},
    "messages": {"messages": [user("a dog"), bot("barked")]},
    "prompt/completion as messages": {"prompt": [user("a dog")], "completion": [bot("barked")]},
}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(assets, tmp_path, train_rows, **kw):
    raw = dict(model=str(assets / "model"), train_file=_write(tmp_path / "train.jsonl", train_rows),
               output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), batch_size=2,
               micro_batch_size=2, max_steps=1, max_length=64, max_prompt_length=32)
    raw.update(kw)
    return from_dict(raw)


@pytest.mark.parametrize("name", list(PROBES))
def test_probe_file_takes_every_training_format(assets, tmp_path, name):
    chat = "messages" in name
    probe = _write(tmp_path / "probe.jsonl", [PROBES[name]] * 3)
    inputs = check_inputs(_cfg(assets, tmp_path, [CHAT if chat else STANDARD] * 4, probe_file=probe))
    tok = inputs.tokenizer
    assert len(inputs.probe) == 3
    prompt, response = inputs.probe[0]
    text = tok.decode(list(prompt) + list(response))
    assert "a dog" in text and "barked" in text and "slept" not in text
    assert ("<|assistant|>" in text) == chat
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # nothing written


def test_plain_probe_rows_get_the_chat_template_when_the_training_rows_do(assets, tmp_path):
    probe = _write(tmp_path / "probe.jsonl", [PROBES["prompt/completion"]])
    inputs = check_inputs(_cfg(assets, tmp_path, [CHAT] * 4, probe_file=probe))
    (prompt, response), tok = inputs.probe[0], inputs.tokenizer
    rendered = tok.apply_chat_template([user("a dog")], tokenize=False, add_generation_prompt=True)
    assert tok.decode(prompt) == rendered
    assert tok.decode(response).startswith(" barked")


def test_a_probe_run_trains_with_a_conversational_probe_file(assets, tmp_path):
    from poise.training.loop import train
    from poise.training.runlog import read_metrics

    probe = _write(tmp_path / "probe.jsonl", [PROBES["messages"]] * 4)
    result = train(_cfg(assets, tmp_path, [CHAT] * 4, probe_file=probe, method="dpo", diagnostics_steps=1,
                          diagnostics_budget=0.0))
    start = read_metrics(result.run_dir)[0]
    assert start["step"] == 0 and "probe/others_logp" in start


def test_validate_needs_no_network_for_a_hub_name(tmp_path, assets, monkeypatch):
    cfg = _cfg(assets, tmp_path, [STANDARD] * 4, model="org/some-model", tokenizer=str(assets / "model"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    inputs = check_inputs(cfg, network=False)  # the test guard would fail any connection
    assert any("org/some-model" in n and "Hub name" in n for n in inputs.notes)
    assert len(inputs.train) == 4  # the data was still tokenized, with the local tokenizer


def _fake_run(model, tmp_path):
    run = SimpleNamespace(cfg=SimpleNamespace(model="policy-b"), run_dir=tmp_path, unwrapped_model=lambda: model)
    run._other_model = lambda folder, why: RunState._other_model(run, folder, why)
    return run


def test_a_checkpoint_of_another_model_is_refused_with_the_fix(tmp_path):
    tok = build_tiny_tokenizer()
    build_tiny_model(tok, hidden_size=16, num_layers=1).save_pretrained(tmp_path / "ckpt")
    other = build_tiny_model(tok, hidden_size=32, num_layers=1)
    with pytest.raises(ConfigError, match=r"checkpoint .*ckpt does not match the model policy-b \(other tensor "
                                          r"shapes .*started with another model.*another output_dir"):
        RunState.load_model_weights(_fake_run(other, tmp_path), tmp_path / "ckpt")
    smaller_vocab = build_tiny_model(100, hidden_size=16, num_layers=1)
    with pytest.raises(ConfigError, match=r"other tensor shapes .*embed_tokens.weight: \(\d+, 16\) in the "
                                          r"checkpoint, \(100, 16\) in the model"):
        RunState.load_model_weights(_fake_run(smaller_vocab, tmp_path), tmp_path / "ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"holds no model weights \(a run with LoRA adapters\?\)"):
        RunState.load_model_weights(_fake_run(other, tmp_path), tmp_path / "empty")
    same = build_tiny_model(tok, hidden_size=16, num_layers=1, seed=1)
    RunState.load_model_weights(_fake_run(same, tmp_path), tmp_path / "ckpt")  # the same model loads


def test_validate_notes_a_hub_dataset_instead_of_fetching_it(tmp_path, assets, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(assets, tmp_path, [STANDARD] * 4, train_file="org/some-prefs")
    inputs = check_inputs(cfg, network=False)  # the test guard would fail any connection
    assert any("org/some-prefs" in n and "Hub dataset" in n for n in inputs.notes)
    assert inputs.train is None
