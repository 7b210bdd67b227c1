"""A corpus of malformed inputs, each through the command line as a user meets it: exit code 2, one
paragraph that names the file and row (or the key) and what to do, no traceback, no run folder."""

import json

import pytest

from poise.cli import main
from poise.model.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    tok = build_tiny_tokenizer()
    build_tiny_model(tok, hidden_size=16, num_layers=1).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def row(**kw):
    base = {"prompt": "the cat", "chosen": " sat down", "rejected": " ran off"}
    base.update(kw)
    return json.dumps({k: v for k, v in base.items() if v is not ...})


GOOD = row() + "\n"

# (name, file name, file bytes, extra config lines, words the message must contain)
DATA_CASES = [
    ("broken json line", "d.jsonl", GOOD + '{"prompt": "a",\n', "", ["d.jsonl", "line 2"]),
    ("not an object", "d.jsonl", GOOD + "[1, 2]\n", "", ["line 2"]),
    ("missing chosen", "d.jsonl", GOOD + row(chosen=...) + "\n", "", ["line 2", "chosen"]),
    ("missing rejected", "d.jsonl", GOOD + row(rejected=...) + "\n", "", ["line 2", "rejected"]),
    ("chosen not a string", "d.jsonl", GOOD + row(chosen=5) + "\n", "", ["line 2", "chosen"]),
    ("rejected null", "d.jsonl", GOOD + row(rejected=None) + "\n", "", ["line 2", "rejected"]),
    ("prompt a number", "d.jsonl", GOOD + row(prompt=3) + "\n", "", ["line 2", "prompt"]),
    ("empty chosen", "d.jsonl", GOOD + row(chosen="") + "\n", "", ["line 2", "chosen"]),
    ("whitespace rejected", "d.jsonl", GOOD + row(rejected="   ") + "\n", "", ["line 2", "rejected"]),
    ("identical", "d.jsonl", GOOD + row(chosen=" x", rejected=" x") + "\n", "", ["line 2", "identical"]),
    ("over-long prompt", "d.jsonl", GOOD + row(prompt="the cat " * 40) + "\n",
     "max_length: 24\nmax_prompt_length: 8\nprompt_truncation: error\n", ["line 2", "prompt"]),
    ("bad messages", "d.jsonl", GOOD + json.dumps({"prompt": [{"role": "user"}], "chosen": [{"x": 1}],
                                                    "rejected": [{"role": "assistant", "content": "b"}]}) + "\n",
     "", ["line 2"]),
    ("non-utf8", "d.jsonl", GOOD.encode() + b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}\n', "",
     ["d.jsonl", "UTF-8"]),
    ("empty file", "d.jsonl", "", "", ["d.jsonl", "empty"]),
    ("only blank lines", "d.jsonl", "\n\n", "", ["d.jsonl"]),
    ("missing column in csv", "d.csv", "prompt,chosen\na,b\n", "", ["d.csv", "rejected"]),
    ("json not a list", "d.json", '{"oops": 1}', "", ["d.json"]),
    ("broken csv row", "d.csv", 'prompt,chosen,rejected\n"a,b\n', "", ["d.csv"]),
    ("wrong column mapping", "d.jsonl", GOOD, "columns: {chosen: good}\n", ["good"]),
]

CONFIG_CASES = [
    ("unknown key", "betta: 0.1\n", ["betta", "beta"]),
    ("trainer typo", "learning_rat: 1.0e-6\n", ["learning_rat", "learning_rate"]),
    ("wrong type", "batch_size: eight\n", ["batch_size"]),
    ("bool for a float", "beta: true\n", ["beta"]),
    ("out of range", "beta: 0\n", ["beta"]),
    ("label smoothing 0.5", "method: cdpo\nlabel_smoothing: 0.5\n", ["label_smoothing"]),
    ("option of another method", "gate_tau: 0.1\n", ["gate_tau", "gate"]),
    ("reference space, reference-free loss", "method: ada-simpo\nada_space: reference\n", ["reference-free"]),
    ("sequence form with ORPO", "method: ada-orpo\nada_form: sequence\n", ["ada_form"]),
    ("floor above ceiling", "method: adadpo\nada_floor: 3\nada_clip: 2\n", ["ada_floor"]),
    ("unknown method", "method: adpo\n", ["adpo", "dpo"]),
    ("unknown balancer", "balance: [gat]\n", ["gat", "gate"]),
    ("batch not a multiple", "batch_size: 8\nmicro_batch_size: 3\n", ["micro_batch_size"]),
    ("unknown scheduler", "scheduler: cosin\n", ["cosine"]),
    ("not a mapping", None, ["mapping"]),
    ("not yaml", "method: [dpo\n", ["YAML"]),
]


def _run(capsys, args):
    code = main(args)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("name,fname,content,extra,words", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data(tmp_path, model_dir, capsys, name, fname, content, extra, words):
    data = tmp_path / fname
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {model_dir}\ntrain_file: {data}\noutput_dir: {tmp_path / 'run'}\nmethod: dpo\n"
                   f"batch_size: 1\nmicro_batch_size: 1\nmax_steps: 1\n{extra}")
    code, err = _run(capsys, ["train", str(cfg)])
    assert code == 2, err
    assert err.startswith("poise: error:") and "Traceback" not in err and err.count("\n") <= 2, err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,content,words", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(tmp_path, capsys, name, content, words):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("- a list\n" if content is None else f"model: m\ntrain_file: d.jsonl\n{content}")
    code, err = _run(capsys, ["validate", str(cfg)])
    assert code == 2, err
    assert "c.yaml" in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


def test_missing_files(tmp_path, model_dir, capsys):
    code, err = _run(capsys, ["validate", str(tmp_path / "nope.yaml")])
    assert code == 2 and "nope.yaml" in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {model_dir}\ntrain_file: {tmp_path / 'missing.jsonl'}\noutput_dir: {tmp_path / 'r'}\n")
    code, err = _run(capsys, ["train", str(cfg)])
    assert code == 2 and "missing.jsonl" in err and not (tmp_path / "r").exists()
    cfg.write_text(f"model: {tmp_path / 'no-model'}\ntrain_file: x.jsonl\noutput_dir: {tmp_path / 'r'}\n")
    code, err = _run(capsys, ["train", str(cfg)])
    assert code == 2 and "no-model" in err


def test_corpus_size():
    assert len(DATA_CASES) + len(CONFIG_CASES) + 3 >= 30
