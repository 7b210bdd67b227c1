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
    run = train(make_cfg(name="bf16", method="dpo", mixed_precision="bf16", diagnostics_steps=1, max_steps=2,
                         diagnostics_budget=0.0))
    rows = read_metrics(run.run_dir)
    first = next(r for r in rows if r["step"] == 1)
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", ["dpo", "adadpo", "gate-dpo", "balanced-dpo", "ipo", "simpo"])
def test_the_loss_and_balancer_maths_stay_fp32_under_bf16_autocast(method):
    """Autocast lowers matmuls only: the objective on fp32 log-probs gives the same loss and the same
    gradient w.r.t. the log-probs, bit for bit, inside a bf16 autocast region as outside it (the model's
    forward is bf16, the loss and the balancers' coefficients are not)."""
    from helpers import fresh, make_batch

    import poise

    batch = make_batch(6, 7, 5, dtype=torch.float32, seed=3)
    obj = poise.objective(method)
    state = obj.init_state()
    if obj.needs_calibration(state):
        state = obj.finish_calibration(obj.calibrate(state, obj.calibration_stats(batch)))

    def run(autocast: bool):
        b = fresh(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = obj(b, state)
        out.loss.backward()
        return out.loss.detach(), b.chosen.grad, b.rejected.grad

    plain, mixed = run(False), run(True)
    assert mixed[0].dtype == torch.float32
    for a, b in zip(plain, mixed):
        assert torch.equal(a, b)


def test_a_bf16_run_follows_the_fp32_run(make_cfg):
    """bf16 autocast over fp32 master weights, 12 AdaDPO steps at a learning rate that moves the model: the
    loss and the reward margins follow the fp32 run's within 3% of their scale at every step (bf16 keeps 8
    bits of mantissa: about 0.4% per rounding), and the every-step diagnostics within 5%."""
    kw = dict(method="adadpo", max_steps=12, learning_rate=3e-3, beta=0.5)
    rows = {p: [r for r in read_metrics(train(make_cfg(name=p, mixed_precision=p, **kw)).run_dir)
                if "loss" in r and r["step"] > 0] for p in ("no", "bf16")}
    assert len(rows["no"]) == len(rows["bf16"]) == 12
    for key, rel in (("loss", 0.03), ("rewards/margins", 0.03), ("diag/logit_grad_ratio", 0.05)):
        a = torch.tensor([r[key] for r in rows["no"]])
        b = torch.tensor([r[key] for r in rows["bf16"]])
        scale = a.abs().max()
        assert scale > 0 and (a - b).abs().max() <= rel * scale, (key, a.tolist(), b.tolist())
    assert rows["no"][-1]["loss"] < rows["no"][0]["loss"] - 0.05  # the run moved: the check is not vacuous
