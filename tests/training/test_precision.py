"""Precision (issue: GPU precision that trains): fp32 master weights by default, bf16 autocast where the
hardware computes bf16 (a GPU with bf16, a CPU with AVX512_BF16 or AMX), pure half-precision weights only
when asked for and then with a warning when the learning rate rounds away; the reference, the layout
check and the probes in the training precision."""

import logging
import math

import pytest
import torch
from safetensors.torch import load_file

from poise.model.load import pick_dtype, updates_round_away
from poise.model.tiny import build_tiny_model, build_tiny_tokenizer
from poise.training import launch
from poise.training.loop import train
from poise.training.runlog import read_metrics


def _changed(before: dict, after: dict) -> float:
    """Fraction of the weight matrices' entries that moved (not the embedding: the rows of tokens that
    the pairs never use get no gradient)."""
    moved = total = 0
    for k, a in before.items():
        if a.dim() > 1 and "embed" not in k:
            moved += (after[k] != a.to(after[k].dtype)).sum().item()  # bf16 weights: against the rounded start
            total += a.numel()
    return moved / total


def test_a_tiny_update_changes_the_weights_under_the_default(make_cfg, assets, caplog):
    """At DPO's 5e-7 the default (fp32 master weights) moves every weight; bf16 weights move few, and
    poise says so before training."""
    before = load_file(str(assets / "model" / "model.safetensors"))
    kw = dict(learning_rate=5e-7, max_steps=2, method="dpo", max_grad_norm=None)
    run = train(make_cfg(name="default", **kw))
    assert _changed(before, load_file(str(run.model_dir / "model.safetensors"))) > 0.99
    with caplog.at_level(logging.WARNING, logger="poise"):
        run = train(make_cfg(name="bf16", dtype="bfloat16", **kw))
    assert "learning_rate 5e-07 is below half the spacing of bfloat16" in caplog.text
    assert _changed(before, load_file(str(run.model_dir / "model.safetensors"))) < 0.2


def test_the_warning_names_the_threshold():
    model = build_tiny_model(build_tiny_tokenizer(), hidden_size=16, num_layers=1, seed=0)
    assert updates_round_away(model, 5e-7) is None  # fp32 weights: nothing rounds away
    model = model.to(torch.bfloat16)
    assert "dtype: auto" in updates_round_away(model, 5e-7)
    assert updates_round_away(model, 1e-2) is None
    assert pick_dtype("auto", torch.device("cuda")) == torch.float32  # fp32 master weights on a GPU too


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "no")])
def test_auto_chooses_by_what_the_cpu_computes(make_cfg, monkeypatch, native, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("POISE_CPU_BF16", "1" if native else "0")
    assert launch.resolve_mixed_precision(make_cfg()) == expected
    assert launch.resolve_mixed_precision(make_cfg(mixed_precision="no")) == "no"
    monkeypatch.delenv("POISE_CPU_BF16")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert launch.cpu_has_native_bf16() is native


def test_auto_on_a_gpu(make_cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert launch.resolve_mixed_precision(make_cfg()) == "bf16"
    assert launch.resolve_mixed_precision(make_cfg(cpu=True)) in ("bf16", "no")  # the CPU's own answer
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert launch.resolve_mixed_precision(make_cfg()) == "no"


def test_bf16_autocast_trains_with_the_reference_in_the_same_precision(make_cfg):
    """Under bf16 autocast on a CPU, the reference (cache), the layout check and the probes run in bf16
    too: at step 0 the policy equals the reference, so DPO's first loss is log 2 to float precision and
    the implicit rewards are 0 (a reference in fp32 would be off by bf16's rounding of the sums)."""
    run = train(make_cfg(name="bf16", method="dpo", mixed_precision="bf16", diagnostics_steps=1, max_steps=2))
    rows = read_metrics(run.run_dir)
    first = next(r for r in rows if r["step"] == 1)
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)
