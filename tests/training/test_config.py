"""Typed, strict configs: every shipped config validates; bad ones fail with the key and the fix."""

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import save_tiny_model

from poise.errors import ConfigError
from poise.training.config import from_dict, load_config

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not {"sweeps", "iterate"} & set(p.parts))
ITERATES = sorted((ROOT / "configs" / "iterate").rglob("*.yaml"))
SWEEPS = sorted((ROOT / "configs" / "sweeps").rglob("*.yaml"))
BASE = {"model": "m", "train_file": "d.jsonl"}


def test_there_is_a_config_for_every_preset():
    from poise.presets import PRESETS

    names = {p.stem for p in SHIPPED}
    assert set(PRESETS) <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_opens_with_its_command(path):
    load_config(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith(f"# poise train configs/{path.relative_to(ROOT / 'configs')}")


@pytest.mark.parametrize("path", ITERATES, ids=lambda p: p.name)
def test_every_shipped_iterate_file_validates_every_run(path):
    from poise.recipes.iterate import load_iterate

    assert load_iterate(path).runs()
    assert path.read_text().startswith(f"# poise iterate configs/iterate/{path.name}")


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_shipped_sweep_validates_every_cell(path):
    from poise.eval.sweep import load_sweep

    _, cells = load_sweep(path)
    assert len(cells) >= 16
    assert path.read_text().startswith(f"# poise sweep configs/sweeps/{path.name}")


@pytest.mark.parametrize("raw,match", [
    ({"method": "adadpo", "learning_rat": 1e-6}, r"learning_rat.*Did you mean 'learning_rate'"),
    ({"method": "dpo", "gate_tau": 0.1}, r"'gate_tau'.*balancer 'gate'"),
    ({"method": "adadpo", "beta": "high"}, r"beta='high'"),
    ({"method": "dpo", "batch_size": "8"}, r"batch_size.*wrong type; expected int"),
    ({"method": "dpo", "scheduler": "cosin"}, r"scheduler.*Did you mean 'cosine'"),
    ({"method": "adpo"}, r"unknown method 'adpo'.*Did you mean 'dpo'"),
    ({"method": "dpo", "batch_size": 8, "micro_batch_size": 3}, r"not a multiple of micro_batch_size"),
    ({"method": "simpo", "balance": ["ada"], "ada_space": "reference"}, r"reference-free"),
    ({"method": "dpo", "label_smoothing": 0.1}, r"label_smoothing.*loss 'cdpo'"),
    ({"method": "cdpo", "label_smoothing": 0.5}, r"label_smoothing=0.5"),
    ({"method": "dpo", "use_cpu": True}, r"'use_cpu'"),
    ({"stage": "sft", "beta": 0.1}, r"stage: sft takes no method hyperparameters"),
    ({"method": "dpo", "extended_sft": True}, r"extended_sft applies to stage: sft"),
    ({"method": "dpo", "max_prompt_length": 600, "max_length": 512}, r"max_prompt_length"),
    ({"method": "dpo", "report_to": ["tensorbored"]}, r"report_to"),
    ({"method": "dpo", "warmup_ratio": 1.5}, r"warmup_ratio"),
    ({"method": "dpo", "model": ""}, r"model is required"),
])
def test_bad_configs_name_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({**BASE, **raw}, source="cfg.yaml")


def test_overrides_are_typed_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: m\ntrain_file: d.jsonl\nmethod: adadpo\n")
    cfg = load_config(p, ["beta=0.05", "ada_clip=null", "lora_target_modules=[q_proj, v_proj]", "resume=true"])
    assert cfg.hyperparameters == {"beta": 0.05, "ada_clip": None}
    assert cfg.lora_target_modules == ["q_proj", "v_proj"] and cfg.resume is True
    with pytest.raises(ConfigError, match="key=value"):
        load_config(p, ["beta"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


def test_validate_and_show_on_the_command_line(tmp_path, model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "the cat", "chosen": " sat", "rejected": " ran"}\n' * 8)
    p = tmp_path / "c.yaml"
    p.write_text(f"model: {model_dir}\ntrain_file: {data}\nmethod: gate-dpo\noutput_dir: {tmp_path / 'run'}\n"
                 f"cache_dir: {tmp_path / 'cache'}\n")
    ok = subprocess.run([sys.executable, "-m", "poise", "validate", str(p)], capture_output=True, text=True)
    assert ok.returncode == 0 and "valid" in ok.stdout, ok.stderr
    assert "kept 8 of 8 rows" in ok.stdout  # the data was read and tokenized, without loading the model
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # validate writes nothing
    shown = subprocess.run([sys.executable, "-m", "poise", "show", str(p), "gate_tau=0.2"],
                           capture_output=True, text=True)
    assert "gate_tau: 0.2" in shown.stdout and "gate_calibration_pairs: 256" in shown.stdout
    p.write_text("model: m\ntrain_file: d.jsonl\nmethod: dpo\nbetta: 0.1\n")
    bad = subprocess.run([sys.executable, "-m", "poise", "validate", str(p)], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "betta" in bad.stderr and "beta" in bad.stderr


def test_every_shipped_config_is_named_for_what_it_trains():
    """configs/adadpo-lora.yaml trains adadpo with LoRA; configs/sft.yaml is the SFT stage."""
    for path in SHIPPED:
        cfg = load_config(path)
        name = path.stem.removesuffix("-lora")
        assert (cfg.lora_r > 0) == path.stem.endswith("-lora"), path.name
        assert name == ("sft" if cfg.stage == "sft" else cfg.method), (path.name, cfg.method)
    assert {"dpo", "dpo-lora", "adadpo", "adadpo-lora"} <= {p.stem for p in SHIPPED}


def test_docs_config_md_is_generated_from_the_field_docs():
    from poise.training.configdoc import as_markdown

    assert (ROOT / "docs" / "config.md").read_text() == as_markdown(), "run `poise config-docs`"


def test_train_help_lists_every_field():
    from poise.training.config import TRAINER_FIELDS

    out = subprocess.run([sys.executable, "-m", "poise", "train", "--help"], capture_output=True, text=True).stdout
    for name in TRAINER_FIELDS:
        assert f"    {name} (" in out


@pytest.mark.parametrize("text,match", [
    ("model: m\ntrain_file: d.jsonl\nbeta: 0.1\nbeta: 0.2\n", r"c.yaml, line 4: the key 'beta' is given twice \(first on line 3\)"),
    ("model: m\ntrain_file: d.jsonl\ncolumns:\n  prompt: q\n  prompt: p\n", r"line 5: the key 'prompt' is given twice"),
    ("model: m\ntrain_file: d.jsonl\ncolumns:\n\tprompt: q\n", r"c.yaml, line 4: the line indents with a tab; YAML indents with spaces"),
    ("model: m\ntrain_file: d.jsonl\nmethod: [dpo\n", r"c.yaml, line \d: not valid YAML"),
])
def test_yaml_mistakes_name_the_file_and_line(tmp_path, text, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(p)


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "1.0e-3", "+1e-3", ".1e-2", "0.001"])
def test_exponent_numbers_are_floats_in_files_and_overrides(tmp_path, text):
    """PyYAML (YAML 1.1) reads 1e-3 as a string; poise reads it as YAML 1.2 does, the number."""
    p = tmp_path / "c.yaml"
    p.write_text(f"model: m\ntrain_file: d.jsonl\nlearning_rate: {text}\n")
    assert load_config(p).learning_rate == pytest.approx(0.001)
    p.write_text("model: m\ntrain_file: d.jsonl\n")
    assert load_config(p, [f"learning_rate={text}"]).learning_rate == pytest.approx(0.001)


@pytest.mark.parametrize("override,match", [
    ("learning_rate=abc", r"^learning_rate=abc on the command line: 'abc' has the wrong type; expected float"),
    ("beta=high", r"^beta=high on the command line: beta='high'"),
    ("lora_r=-4", r"^lora_r=-4 on the command line: lora_r must be 0 or more"),
    ("columns={prompt: q", r"^columns=\{prompt: q on the command line: not a valid YAML value"),
    ("--beta=0.1", r"without dashes \(beta=0.1\)"),
    ("=3", r"has no key"),
    ("gate_tau=0.1", r"^gate_tau=0.1 on the command line: method 'dpo' does not take"),
])
def test_an_error_in_an_override_names_the_override(tmp_path, override, match):
    p = tmp_path / "c.yaml"
    p.write_text("model: m\ntrain_file: d.jsonl\nmethod: dpo\n")
    with pytest.raises(ConfigError, match=match) as e:
        load_config(p, [override])
    assert "c.yaml:" not in str(e.value)


def test_switching_method_on_a_shipped_config_lists_every_key_it_does_not_take(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text((ROOT / "configs" / "adadpo.yaml").read_text() + "ada_floor: 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["method=dpo"])
    msg = str(e.value)
    assert msg.startswith("method=dpo on the command line: method 'dpo' does not take 2 keys")
    assert "'ada_clip'" in msg and "'ada_floor'" in msg and "balancer 'ada'" in msg
    assert "remove them" in msg and "adadpo" in msg and "balance: ['ada']" in msg
    p.write_text((ROOT / "configs" / "gate-dpo.yaml").read_text())
    with pytest.raises(ConfigError, match=r"'gate_estimator'.*'gate_tau'.*gate-dpo"):
        load_config(p, ["method=ipo"])


@pytest.mark.parametrize("raw,match", [
    ({"lora_r": -4}, r"lora_r must be 0 or more, got -4"),
    ({"adam_betas": [0.9]}, r"adam_betas must be two numbers in \[0, 1\)"),
    ({"adam_betas": [0.9, 0.999, 0.5]}, r"adam_betas must be two numbers"),
    ({"adam_betas": [0.9, 1.0]}, r"adam_betas must be two numbers"),
    ({"adam_betas": [-0.1, 0.99]}, r"adam_betas must be two numbers"),
    ({"weight_decay": -0.1}, r"weight_decay"),
    ({"max_grad_norm": 0}, r"max_grad_norm must be positive"),
    ({"lora_r": 8, "lora_dropout": 1.0}, r"lora_dropout"),
    ({"save_steps": -1}, r"save_steps must be 0 or more"),
    ({"learning_rate": float("nan")}, r"learning_rate: nan is not a finite number"),
    ({3: 1}, r"the key 3 is not a name"),
])
def test_field_ranges(raw, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({**BASE, "method": "dpo", **raw}, source="cfg.yaml")


def test_yaml_no_is_the_choice_no(tmp_path):
    """YAML 1.1 reads `no` as False: `mixed_precision: no` (in a file or as an override) is the choice "no"."""
    from poise.training.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("model: m\ntrain_file: d.jsonl\nmixed_precision: no\n")
    assert load_config(path).mixed_precision == "no"
    assert load_config(path, ["mixed_precision=no"]).mixed_precision == "no"
    with pytest.raises(ConfigError, match="deepspeed_stage: '3' is a string; write the number 3"):
        from_dict({"model": "m", "train_file": "d.jsonl", "deepspeed_stage": "3"})
