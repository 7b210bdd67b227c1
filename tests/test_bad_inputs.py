"""A corpus of malformed inputs, each through the command line as a user meets it: exit code 2, one
paragraph that names the file and row (or the key) and what to do, no traceback, no run folder."""

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
from helpers import save_tiny_model

from poise.cli import main
from poise.model.tiny import build_tiny_model, build_tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


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
    ("unknown engine", "distributed: zero3\n", ["distributed", "fsdp", "deepspeed"]),
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


# -- inputs checked before the model loads: each through `poise validate` and `poise train` ------------

CHAT_ROW = json.dumps({"prompt": [{"role": "user", "content": "the cat"}],
                       "chosen": [{"role": "assistant", "content": "sat down"}],
                       "rejected": [{"role": "assistant", "content": "ran off"}]})
LONG = row(chosen=" the cat sat on the mat and looked at the rain" * 3, rejected=" the dog ran" * 12)


def _weights_only(tmp_path, model_dir):
    import shutil

    d = tmp_path / "weights-only"
    d.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, d / name)
    return d


def _other_tokenizer_model(tmp_path, model_dir):
    d = tmp_path / "other"
    tok = build_tiny_tokenizer(["zebra quantum " * 50, "xylophone " * 50], vocab_size=300)
    build_tiny_model(tok, hidden_size=16, num_layers=1).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _small_vocab_model(tmp_path, model_dir):
    d = tmp_path / "small"
    build_tiny_model(10, hidden_size=16, num_layers=1).save_pretrained(d)
    return d


def _truncated_weights(tmp_path, model_dir):
    import shutil

    d = tmp_path / "truncated"
    shutil.copytree(model_dir, d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    return d


def _a_file(tmp_path, model_dir):
    f = tmp_path / "a-file"
    f.write_text("x")
    return f


# (name, data, {key: value or a function (tmp_path, model_dir) -> path}, words, also through validate)
INPUT_CASES = [
    ("missing eval_file", GOOD * 2, {"eval_file": "{tmp}/missing-eval.jsonl"}, ["eval_file", "missing-eval.jsonl"], True),
    ("missing probe_file", GOOD * 2, {"probe_file": "{tmp}/nope.jsonl"}, ["probe_file", "nope.jsonl"], True),
    ("probe_file without a response", GOOD * 2, {"probe_file": "{tmp}/probe.jsonl"},
     ["probe.jsonl", "line 1", "a probe row needs a prompt and a response"], True),
    ("missing reference_model", GOOD * 2, {"reference_model": "{tmp}/no-ref"}, ["reference_model", "no such folder"], True),
    ("reference with another tokenizer", GOOD * 2, {"reference_model": _other_tokenizer_model},
     ["reference_model", "another tokenizer", "vocabulary of", "remove reference_model"], True),
    ("reference with a smaller vocabulary", GOOD * 2, {"reference_model": _small_vocab_model},
     ["reference_model", "vocabulary of 10 tokens", "smaller"], True),
    ("batch larger than the data", GOOD * 2, {"batch_size": 4, "micro_batch_size": 4},
     ["batch_size=4", "larger than the training data", "2 rows"], True),
    ("batch larger than the usable pairs", GOOD * 2 + row(chosen=" x", rejected=" x") + "\n",
     {"batch_size": 3, "micro_batch_size": 3, "on_bad_row": "skip"}, ["batch_size=3", "2 usable pairs"], True),
    ("cache_dir is a file", GOOD * 2, {"cache_dir": _a_file}, ["cache_dir", "is a file"], True),
    ("cache_dir below a file", GOOD * 2, {"cache_dir": lambda t, m: _a_file(t, m) / "cache"},
     ["cache_dir", "cannot be created"], True),
    ("output_dir is a file", GOOD * 2, {"output_dir": _a_file}, ["output_dir", "is a file"], True),
    ("mixed standard and conversational rows", GOOD + CHAT_ROW + "\n", {},
     ["d.jsonl", "mixes standard rows", "line 1", "line 2"], True),
    ("every row truncated", LONG + "\n" + LONG + "\n", {"max_length": 16, "max_prompt_length": 8},
     ["d.jsonl", "every one of the 2 rows", "max_length"], True),
    ("gate-dpo calibrating on zero pairs", row(chosen=" x", rejected=" x") + "\n",
     {"method": "gate-dpo", "on_bad_row": "skip"}, ["none of the rows can be used"], True),
    ("model folder without tokenizer files", GOOD * 2, {"model": _weights_only},
     ["no tokenizer files", "tokenizer:", "!identical"], True),
    ("model is a weights file", GOOD * 2, {"model": "{model}/model.safetensors"},
     ["is a file: pass its folder", "gguf_file"], True),
    ("model path that does not exist", GOOD * 2, {"model": "./no/such/model"}, ["no such folder"], True),
    ("bare model name, offline", GOOD * 2, {"model": "foo-no-such-model"},
     ["'foo-no-such-model'", "offline", "local folder"], True),
    ("truncated safetensors", GOOD * 2, {"model": _truncated_weights},
     ["model.safetensors", "damaged or incomplete"], True),
    ("gguf file missing", GOOD * 2, {"model": "{tmp}/m.gguf"}, ["no such GGUF file"], True),
]


@pytest.mark.parametrize("name,data,settings,words,validate", INPUT_CASES, ids=[c[0] for c in INPUT_CASES])
def test_bad_run_inputs(tmp_path, model_dir, capsys, monkeypatch, name, data, settings, words, validate):
    import yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text(data)
    (tmp_path / "probe.jsonl").write_text(json.dumps({"prompt": "a", "text": "b"}) + "\n")
    raw = {"model": str(model_dir), "train_file": str(tmp_path / "d.jsonl"), "output_dir": str(tmp_path / "run"),
           "cache_dir": str(tmp_path / "cache"), "method": "dpo", "batch_size": 1, "micro_batch_size": 1,
           "max_steps": 1}
    for key, value in settings.items():
        if callable(value):
            value = str(value(tmp_path, model_dir))
        elif isinstance(value, str):
            value = value.format(tmp=tmp_path, model=model_dir)
        raw[key] = value
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    output_dir = raw["output_dir"]
    for command in (["validate"] if validate else []) + ["train"]:
        code, err = _run(capsys, [command, str(cfg)])
        assert code == 2, (command, err)
        assert err.startswith("poise: error:") and "Traceback" not in err and err.count("\n") <= 2, err
        for w in words:
            assert (w[1:] not in err) if w.startswith("!") else (w in err), (command, w, err)
        assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists(), command
    if output_dir != str(tmp_path / "run"):
        assert Path(output_dir).is_file()


def test_unwritable_cache_dir(tmp_path, model_dir, capsys):
    """A read-only place (/sys refuses writes even to root; a chmod-ed folder does not stop root)."""
    import os

    target = Path("/sys/poise-cache") if os.geteuid() == 0 else tmp_path / "ro" / "cache"
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
    elif not Path("/sys").is_dir() or os.access("/sys", os.W_OK) and _can_write("/sys"):
        pytest.skip("no read-only folder to test with")
    (tmp_path / "d.jsonl").write_text(GOOD * 2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {model_dir}\ntrain_file: {tmp_path / 'd.jsonl'}\noutput_dir: {tmp_path / 'run'}\n"
                   f"method: dpo\nbatch_size: 1\nmicro_batch_size: 1\nmax_steps: 1\ncache_dir: {target}\n")
    for command in ("validate", "train"):
        code, err = _run(capsys, [command, str(cfg)])
        assert code == 2 and "cache_dir" in err and str(target) in err and "Traceback" not in err, err
        assert "not writable" in err or "cannot be created" in err, err
    assert not (tmp_path / "run").exists()


def _can_write(folder):
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


# (name, config lines, command-line overrides, words); every one through `poise validate`
OVERRIDE_CASES = [
    ("override not a number", "", ["learning_rate=abc"], ["learning_rate=abc on the command line", "float"]),
    ("override unknown key", "", ["betta=0.1"], ["betta=0.1 on the command line", "beta"]),
    ("override negative lora_r", "", ["lora_r=-4"], ["lora_r=-4 on the command line", "0 or more"]),
    ("override broken list", "", ["adam_betas=[0.9, 0.99"], ["adam_betas=[0.9, 0.99 on the command line", "YAML"]),
    ("override with dashes", "", ["--beta=0.1"], ["without dashes"]),
    ("duplicate key", "beta: 0.1\nbeta: 0.2\n", [], ["c.yaml", "line 4", "given twice", "line 3"]),
    ("duplicate nested key", "columns:\n  prompt: q\n  prompt: p\n", [], ["c.yaml", "line 5", "'prompt'"]),
    ("tab indentation", "columns:\n\tprompt: q\n", [], ["c.yaml", "line 4", "tab", "spaces"]),
    ("adam_betas wrong length", "adam_betas: [0.9]\n", [], ["c.yaml", "adam_betas", "two numbers"]),
    ("adam_betas out of range", "adam_betas: [0.9, 1.5]\n", [], ["adam_betas", "[0, 1)"]),
    ("negative lora_r in the file", "lora_r: -4\n", [], ["c.yaml", "lora_r", "trains every weight"]),
    ("gate calibration on zero pairs", "method: gate-dpo\ngate_calibration_pairs: 0\n", [],
     ["gate_calibration_pairs"]),
]


@pytest.mark.parametrize("name,content,overrides,words", OVERRIDE_CASES, ids=[c[0] for c in OVERRIDE_CASES])
def test_bad_config_and_overrides(tmp_path, capsys, name, content, overrides, words):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: m\ntrain_file: d.jsonl\n{content}")
    code, err = _run(capsys, ["validate", str(cfg), *overrides])
    assert code == 2, err
    assert "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    if overrides and not overrides[0].startswith("-"):
        assert "c.yaml" not in err.split(":", 2)[1], err  # the override is named, not the file


def test_switching_method_on_a_shipped_config_reports_every_key_at_once(capsys):
    config = Path(__file__).resolve().parents[1] / "configs" / "adadpo.yaml"
    code, err = _run(capsys, ["validate", str(config), "method=dpo", "ada_floor=1.0"])
    assert code == 2 and "Traceback" not in err
    for w in ("'ada_clip'", "'ada_floor'", "does not take 2 keys", "remove them", "adadpo", "balance: ['ada']"):
        assert w in err, (w, err)


def test_report_to_without_its_package_names_the_extra(tmp_path, model_dir, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("tensorboard", "wandb") else real(n, *a))
    (tmp_path / "d.jsonl").write_text(GOOD * 2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {model_dir}\ntrain_file: {tmp_path / 'd.jsonl'}\noutput_dir: {tmp_path / 'run'}\n"
                   "method: dpo\nbatch_size: 1\nmicro_batch_size: 1\nmax_steps: 1\n")
    for backend in ("tensorboard", "wandb"):
        for command in ("validate", "train"):
            code, err = _run(capsys, [command, str(cfg), f"report_to=[{backend}]"])
            assert code == 2 and "pip install 'poise[logging]'" in err and backend in err, err
            assert not (tmp_path / "run").exists()


def test_wandb_without_a_login_says_how(tmp_path, model_dir, capsys, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    (tmp_path / "d.jsonl").write_text(GOOD * 2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {model_dir}\ntrain_file: {tmp_path / 'd.jsonl'}\noutput_dir: {tmp_path / 'run'}\n"
                   "method: dpo\nbatch_size: 1\nmicro_batch_size: 1\nmax_steps: 1\nreport_to: wandb\n")
    code, err = _run(capsys, ["train", str(cfg)])
    assert code == 2 and "wandb login" in err and "WANDB_MODE=offline" in err, err
    assert not (tmp_path / "run").exists()


def test_gguf_without_the_package_through_the_command_line(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(64))
    (tmp_path / "d.jsonl").write_text(GOOD * 2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tmp_path / 'm.gguf'}\ntrain_file: {tmp_path / 'd.jsonl'}\noutput_dir: {tmp_path / 'run'}\n"
                   "batch_size: 1\nmicro_batch_size: 1\n")
    for command in ("validate", "train"):
        code, err = _run(capsys, [command, str(cfg)])
        assert code == 2 and "pip install 'poise[gguf]'" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_bad_input_corpus_size():
    """38 cases before the checks of inputs and configuration before the model loads; 77 since (the six
    single tests: method switch, report_to, wandb login, gguf, resume with another model, output_dir)."""
    single = 6
    assert len(DATA_CASES) + len(CONFIG_CASES) + 3 + len(INPUT_CASES) + 1 + len(OVERRIDE_CASES) + single >= 77


def test_resume_with_another_models_weights(tmp_path, model_dir, capsys):
    """A resume whose model does not fit the checkpoint (accepted as a config change): the message names
    the checkpoint and the fix, and the run's checkpoints are left as they were."""
    other = tmp_path / "other"
    tok = build_tiny_tokenizer()
    build_tiny_model(tok, hidden_size=32, num_layers=1).save_pretrained(other)
    tok.save_pretrained(other)
    (tmp_path / "d.jsonl").write_text(GOOD * 4)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {model_dir}\ntrain_file: {tmp_path / 'd.jsonl'}\noutput_dir: {tmp_path / 'run'}\n"
                   f"cache_dir: {tmp_path / 'cache'}\nmethod: dpo\nbatch_size: 2\nmicro_batch_size: 2\n"
                   "max_steps: 2\nsave_steps: 1\n")
    assert main(["train", str(cfg)]) == 0
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    code, err = _run(capsys, ["train", str(cfg), "resume=true", f"model={other}", "allow_config_change=true"])
    assert code == 2 and "Traceback" not in err, err
    for w in ("checkpoint", "does not match the model", "other tensor shapes", "another output_dir"):
        assert w in err, (w, err)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_validate_refuses_an_output_dir_that_train_would_refuse(tmp_path, model_dir, capsys):
    """poise validate runs the read-only checks of the run folder too: a fresh run into a finished run's
    output, a resume with a changed config."""
    (tmp_path / "d.jsonl").write_text(GOOD * 2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {model_dir}\ntrain_file: {tmp_path / 'd.jsonl'}\noutput_dir: {tmp_path / 'run'}\n"
                   f"cache_dir: {tmp_path / 'cache'}\nmethod: dpo\nbatch_size: 1\nmicro_batch_size: 1\nmax_steps: 1\n")
    assert main(["validate", str(cfg)]) == 0 and not (tmp_path / "run").exists()
    assert main(["train", str(cfg)]) == 0
    capsys.readouterr()
    code, err = _run(capsys, ["validate", str(cfg)])
    assert code == 2 and "output_dir" in err and "resume=true" in err and "Traceback" not in err, err


# -- the run folder: in use, holding a run's output, or a resume that cannot be verified ------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, model_dir):
    """A finished two-step run (checkpoints of steps 1 and 2, model/, metrics.jsonl, config.yaml) and its
    config file; each case works on a copy."""
    root = tmp_path_factory.mktemp("finished")
    (root / "d.jsonl").write_text(GOOD * 4)
    cfg = root / "c.yaml"
    cfg.write_text(f"model: {model_dir}\ntrain_file: {root / 'd.jsonl'}\noutput_dir: {root / 'run'}\n"
                   f"cache_dir: {root / 'cache'}\nmethod: dpo\nbatch_size: 2\nmicro_batch_size: 2\nmax_steps: 2\n"
                   "save_steps: 1\nlearning_rate: 1.0e-3\nscheduler: constant\nwarmup_ratio: 0.0\n")
    assert main(["train", str(cfg)]) == 0
    return root


def _lock(run, pid, host):
    (run / ".poise.lock").write_text(json.dumps({"pid": pid, "host": host, "since": "2024-05-01T09:30:00"}))


def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def _ckpt(run, step):
    return run / "checkpoints" / f"step-{step:08d}"


# (name, what to do to a copy of the finished run (None: start from an empty folder), overrides, words the
# message must contain); every case: exit code 2, nothing in the run folder written, deleted or changed
RUN_FOLDER_CASES = [
    ("folder in use", lambda run: _lock(run, os.getpid(), socket.gethostname()), [],
     ["is in use by another poise run", f"pid {os.getpid()} on host {socket.gethostname()}",
      "since 2024-05-01T09:30:00", "choose another output_dir"]),
    ("folder in use, resume", lambda run: _lock(run, os.getpid(), socket.gethostname()), ["resume=true"],
     ["is in use by another poise run", f"pid {os.getpid()}"]),
    ("lock of another host", lambda run: _lock(run, 4242, "node-17"), ["resume=true"],
     ["pid 4242 on host node-17", "If you are sure it has stopped, delete", ".poise.lock"]),
    ("unreadable lock", lambda run: (run / ".poise.lock").write_text(""), ["resume=true"],
     ["unreadable lock file", ".poise.lock", "delete"]),
    ("fresh run into a finished run", lambda run: None, [],
     ["already holds the output of a run", "config.yaml", "metrics.jsonl", "model/", "checkpoints/",
      "resume with resume=true, or choose another output_dir"]),
    ("fresh run into metrics only", lambda run: [shutil.rmtree(run / p) if (run / p).is_dir() else (run / p).unlink()
                                                 for p in ("model", "checkpoints", "config.yaml")],
     [], ["already holds the output of a run (metrics.jsonl)", "resume with resume=true"]),
    ("resume, manifests missing", lambda run: [(_ckpt(run, s) / "manifest.json").unlink() for s in (1, 2)],
     ["resume=true"], ["no checkpoint verifies", "step-00000002: manifest.json is missing",
                       "step-00000001: manifest.json is missing", "Nothing was changed or deleted",
                       "Restore the missing or damaged files", "new output_dir"]),
    ("resume, checksums fail", lambda run: [_corrupt(_ckpt(run, s) / "model" / "model.safetensors") for s in (1, 2)],
     ["resume=true"], ["no checkpoint verifies", "step-00000002: model/model.safetensors fails its checksum",
                       "step-00000001: model/model.safetensors fails its checksum"]),
    ("resume over a model without checkpoints", lambda run: shutil.rmtree(run / "checkpoints"), ["resume=true"],
     ["holds a final model (model/) but no checkpoint to resume from", "another output_dir"]),
    ("resume with another learning rate and seed", lambda run: None, ["resume=true", "learning_rate=0.01", "seed=3"],
     ["settings that change the training trajectory", "learning_rate: 0.001 -> 0.01", "seed: 0 -> 3",
      "allow_config_change: true", "config_changes.jsonl"]),
    ("resume with another method", lambda run: None, ["resume=true", "method=ipo"],
     ["method: \"dpo\" -> \"ipo\"", "allow_config_change"]),
    ("resume with max_steps below the checkpoint", lambda run: None, ["resume=true", "max_steps=1"],
     ["max_steps=1 is below the step of the checkpoint", "step 2", "max_steps to 2 or more"]),
]


def _files(folder):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name,setup,overrides,words", RUN_FOLDER_CASES, ids=[c[0] for c in RUN_FOLDER_CASES])
def test_bad_run_folder(tmp_path, finished_run, capsys, name, setup, overrides, words):
    run = tmp_path / "run"
    shutil.copytree(finished_run / "run", run)
    setup(run)
    before = _files(run)
    text = (finished_run / "c.yaml").read_text().replace(str(finished_run / "run"), str(run))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    code, err = _run(capsys, ["train", str(cfg), *overrides])
    assert code == 2, err
    assert err.startswith("poise: error:") and "Traceback" not in err and err.count("\n") <= 2, err
    assert str(run) in err, err
    for w in words:
        assert w in err, (w, err)
    assert _files(run) == before
