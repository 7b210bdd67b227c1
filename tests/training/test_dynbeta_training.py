"""beta-DPO in the trainer (spec section 10): the step's mean margin over every micro-batch, so micro-batching
changes nothing; its state (M0, the step count, the generator) is checkpointed and a resumed run is the
uninterrupted one."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from poise.training.config import replace
from poise.training.loop import train
from poise.training.runlog import read_metrics

KW = dict(method="beta-dpo", dynbeta_alpha=2.0, dynbeta_keep=0.5)


def steps(run_dir):
    return [r for r in read_metrics(run_dir) if "loss" in r and r["step"] > 0]


def params(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def assert_same_params(a, b, atol=1e-5):
    """Within float noise (as tests/training/test_loop.py: Adam turns rounding into steps of up to lr)."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=atol), (k, (a[k] - b[k]).abs().max())


def _saved_state(run_dir):
    ckpt = sorted((Path(run_dir) / "checkpoints").glob("step-*"))[-1]
    return json.loads((ckpt / "trainer_state.json").read_text())["objective"]["dynbeta"]


def test_one_micro_batch_of_8_equals_4_of_2(make_cfg):
    a = train(make_cfg(name="1x8", micro_batch_size=8, **KW))
    b = train(make_cfg(name="4x2", micro_batch_size=2, **KW))
    assert_same_params(params(a.run_dir), params(b.run_dir))
    ra, rb = steps(a.run_dir), steps(b.run_dir)
    for key in ("dynbeta/scale", "dynbeta/margin_mean", "dynbeta/kept_frac", "loss"):
        # equal up to the float noise that Adam makes of near-zero gradients (see assert_same_params)
        assert [r[key] for r in rb] == pytest.approx([r[key] for r in ra], rel=2e-3, abs=1e-5), key
    assert ra[0]["dynbeta/scale"] == 1.0  # M0 = Mbar at the first step
    assert any(abs(r["dynbeta/scale"] - 1) > 1e-3 for r in ra[1:]), "beta never moved"
    assert all(r["dynbeta/kept_frac"] == 0.5 for r in ra)
    state, other = _saved_state(a.run_dir), _saved_state(b.run_dir)
    assert state["steps"] == other["steps"] == 4 and state["step"] is None and isinstance(state["M0"], float)
    assert state["rng"] == other["rng"] and state["M0"] == pytest.approx(other["M0"], rel=2e-3)


def test_resume_gives_the_uninterrupted_run(make_cfg):
    full = train(make_cfg(name="full", max_steps=6, **KW))
    part_cfg = make_cfg(name="part", max_steps=3, save_steps=1, **KW)
    train(part_cfg)
    assert _saved_state(part_cfg.output_dir)["steps"] == 3
    resumed = train(replace(part_cfg, max_steps=6, resume=True))
    assert_same_params(params(full.run_dir), params(resumed.run_dir))
    lf = [r["loss"] for r in steps(full.run_dir)]
    lr = [r["loss"] for r in steps(resumed.run_dir)]
    assert lr == pytest.approx(lf, rel=1e-5, abs=1e-6)
    sf, sr = _saved_state(full.run_dir), _saved_state(resumed.run_dir)
    assert sr["rng"] == sf["rng"] and sr["steps"] == sf["steps"] == 6
    assert sr["M0"] == pytest.approx(sf["M0"], rel=1e-5)
