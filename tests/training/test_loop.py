"""The trainer on a tiny model: the maths of a step and the trajectory invariants."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from poise.training.loop import train
from poise.training.runlog import read_metrics


def steps(run_dir):
    """The training-step rows of metrics.jsonl (not the probe row at step 0 or eval rows)."""
    return [r for r in read_metrics(run_dir) if "loss" in r and r["step"] > 0]


def params(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def assert_same_params(a, b, atol=1e-5):
    """Within float noise: Adam turns rounding differences of near-zero gradients into steps of up to
    lr, so 4 steps at lr 1e-3 leave a few 1e-6; a wrong normalisation moves weights by far more."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=atol), (k, (a[k] - b[k]).abs().max())


def test_first_dpo_step_is_ln2_and_loss_falls(make_cfg):
    """Policy == reference at step 1, so DPO's loss is ln 2 exactly; on a toy set it then falls."""
    res = train(make_cfg(method="dpo", max_steps=12, beta=0.5, learning_rate=3e-3))
    rows = steps(res.run_dir)
    assert rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert sum(r["loss"] for r in rows[-3:]) / 3 < math.log(2) - 0.05
    assert (res.run_dir / "model" / "model.safetensors").is_file()


def test_gradient_accumulation_gives_the_same_parameters(make_cfg):
    """1 micro-batch of 8 and 8 micro-batches of 1 per step: the same gradient, the same weights.
    cpo has a batch-level NLL term, which must be normalised by the step's token count, not each
    micro-batch's."""
    for method in ("adadpo", "cpo"):
        a = train(make_cfg(name=f"{method}-1x8", method=method, micro_batch_size=8))
        b = train(make_cfg(name=f"{method}-8x1", method=method, micro_batch_size=1))
        assert_same_params(params(a.run_dir), params(b.run_dir))


def test_precomputed_and_live_reference_give_the_same_losses(make_cfg):
    a = train(make_cfg(name="pre", method="gate-dpo", precompute_reference=True))
    b = train(make_cfg(name="live", method="gate-dpo", precompute_reference=False))
    la = [r["loss"] for r in steps(a.run_dir)]
    lb = [r["loss"] for r in steps(b.run_dir)]
    assert la == pytest.approx(lb, rel=1e-6, abs=1e-6)


def test_shared_and_separate_pair_layouts_give_the_same_trajectory(make_cfg, caplog):
    """The prompt run once per pair (one row, 4D mask) or twice (two rows): the same losses, metrics and
    weights up to float noise, with a live reference and with diagnostics (per-token stats) on."""
    caplog.set_level("INFO", logger="poise")
    a = train(make_cfg(name="shared", method="adadpo", pair_layout="shared", precompute_reference=False))
    assert "pair layout: shared prompt prefix" in caplog.text
    b = train(make_cfg(name="separate", method="adadpo", pair_layout="separate", precompute_reference=False))
    ra, rb = steps(a.run_dir), steps(b.run_dir)
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert [r[key] for r in ra] == pytest.approx([r[key] for r in rb], rel=1e-5, abs=1e-5), key
    assert_same_params(params(a.run_dir), params(b.run_dir))


def test_separate_reference_model_starts_at_ln2_in_the_shared_layout(make_cfg, assets, caplog):
    """A reference_model folder (here the same weights): loaded once, checked for the shared layout
    together with the policy, and equal to the policy at step 1."""
    caplog.set_level("INFO", logger="poise")
    res = train(make_cfg(method="dpo", reference_model=str(assets / "model"), precompute_reference=False,
                         max_steps=1))
    assert "pair layout: shared prompt prefix" in caplog.text
    assert steps(res.run_dir)[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)


def test_reference_cache_is_reused(make_cfg, caplog):
    train(make_cfg(name="first", method="dpo", max_steps=1))
    with caplog.at_level("INFO", logger="poise"):
        train(make_cfg(name="second", method="dpo", max_steps=1))
    assert any("reused from" in r.getMessage() for r in caplog.records)


def test_lora_with_adapter_disabled_reference_trains(make_cfg):
    res = train(make_cfg(method="dpo", lora_r=4, lora_target_modules=["q_proj", "v_proj"], beta=0.5,
                         learning_rate=1e-2, max_steps=6))
    rows = steps(res.run_dir)
    assert rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # adapters start at zero: pi == ref
    assert rows[-1]["rewards/margins"] > 0
    cfg = json.loads((res.run_dir / "model" / "config.json").read_text())
    assert cfg["model_type"] == "llama"  # merged: a plain transformers folder


def test_sft_and_extended_sft(make_cfg):
    a = train(make_cfg(name="sft", stage="sft", method="dpo"))
    b = train(make_cfg(name="xsft", stage="sft", extended_sft=True, method="dpo"))
    ra, rb = steps(a.run_dir), steps(b.run_dir)
    assert ra[0]["loss"] > 0 and rb[0]["loss"] > 0
    assert ra[-1]["loss"] < ra[0]["loss"]


def test_resume_gives_the_same_trajectory(make_cfg):
    full = train(make_cfg(name="full", method="gate-dpo", max_steps=6, gate_calibration_pairs=8))
    part_cfg = make_cfg(name="part", method="gate-dpo", max_steps=3, save_steps=1, gate_calibration_pairs=8)
    train(part_cfg)
    from poise.training.config import replace

    resumed = train(replace(part_cfg, max_steps=6, resume=True))
    assert_same_params(params(full.run_dir), params(resumed.run_dir))
    lf = [r["loss"] for r in steps(full.run_dir)]
    lr = [r["loss"] for r in steps(resumed.run_dir)]
    assert lr == pytest.approx(lf, rel=1e-6, abs=1e-6)


def test_eval_file_gives_held_out_metrics(make_cfg, assets):
    res = train(make_cfg(method="dpo", eval_file=str(assets / "eval.jsonl"), max_steps=2))
    assert "eval/rewards/accuracies" in res.metrics


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_loss_is_reported_with_its_pairs(make_cfg, monkeypatch, mode):
    """A NaN in one pair's loss: stop names the pair and keeps a checkpoint; skip drops the update."""
    from poise.compose import Objective
    from poise.errors import NonFiniteError

    real = Objective.__call__
    calls = {"n": 0}

    def poisoned(self, batch, state=None, **kw):
        out = real(self, batch, state, **kw)
        calls["n"] += 1
        if calls["n"] == 2:  # the second step's batch
            out.per_pair = out.per_pair + torch.tensor([float("nan")] + [0.0] * (len(out.per_pair) - 1))
            out.loss = out.per_pair.sum() / kw.get("num_pairs", len(out.per_pair))
        return out

    monkeypatch.setattr(Objective, "__call__", poisoned)
    cfg = make_cfg(method="dpo", on_nonfinite=mode, max_steps=3, diagnostics=False)
    if mode == "stop":
        with pytest.raises(NonFiniteError, match=r"step 2.*train.jsonl row \d+"):
            train(cfg)
        ckpts = [p.name for p in (Path(cfg.output_dir) / "checkpoints").iterdir()]
        assert ckpts == ["step-00000001"]
    else:
        res = train(cfg)
        rows = read_metrics(res.run_dir)
        assert any(r.get("nonfinite") for r in rows) and res.steps == 3
        assert all(math.isfinite(r.get("grad_norm", 0.0)) for r in rows)


def test_gradient_checkpointing_recomputes_and_gives_the_same_weights(make_cfg, monkeypatch):
    """The layers are really checkpointed in training (transformers does so only for a layer whose own
    training flag is set; poise trains with dropout off), also after an evaluation, and the weights are
    those of a run without it."""
    import transformers.modeling_utils as mu

    calls = []
    real = mu.checkpoint

    def counting(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(mu, "checkpoint", counting)
    a = train(make_cfg(name="plain", method="adadpo", max_steps=2, diagnostics=False,
                       gradient_checkpointing=False))
    assert calls == []
    b = train(make_cfg(name="ckpt", method="adadpo", max_steps=2, diagnostics=False, gradient_checkpointing=True))
    assert calls and all(calls)
    assert_same_params(params(a.run_dir), params(b.run_dir))


def test_gate_calibrates_before_step_1_on_all_pairs_of_a_small_run(make_cfg, assets, tmp_path, caplog,
                                                                   monkeypatch):
    """32 training pairs, fewer than gate_calibration_pairs (256): the calibration step runs before step 1 on
    all of them (logged), never during training; the threshold is in the checkpoint, the resolved config and
    the model card; `poise eval` reads it and never recalibrates."""
    import json

    import yaml

    from poise.compose import Objective
    from poise.eval.run import evaluate_run

    caplog.set_level("INFO", logger="poise")
    res = train(make_cfg(method="gate-dpo", max_steps=3, eval_file=str(assets / "eval.jsonl")))
    assert "calibrated on all of them" in caplog.text and "32 training pairs" in caplog.text
    state = json.loads(sorted((res.run_dir / "checkpoints").glob("step-*"))[-1]
                       .joinpath("trainer_state.json").read_text())["objective"]
    tau = state["gate"]["tau"]
    assert len(state["gate"]["seen"]) == 32 and 0 < tau < 1
    rows = steps(res.run_dir)
    assert rows and all("gate/calibrating" not in r for r in rows)
    assert [r["gate/tau"] for r in rows] == pytest.approx([tau] * len(rows), rel=1e-5)  # logged to 6 digits
    assert yaml.safe_load((res.run_dir / "config.yaml").read_text())["gate_tau"] == tau
    assert f"auto (calibrated: {tau:.6g})" in (res.run_dir / "model" / "README.md").read_text()

    def no_calibration(*a, **k):
        raise AssertionError("poise eval recalibrated the gate")

    monkeypatch.setattr(Objective, "calibrate", no_calibration)
    monkeypatch.setattr(Objective, "finish_calibration", no_calibration)
    out = evaluate_run(res.run_dir, num_prompts=2, max_new_tokens=2)
    assert 0.0 <= out["reward_accuracy"] <= 1.0


def test_the_probes_run_at_the_planned_steps(make_cfg, caplog):
    """diagnostics_budget 0: the start, every diagnostics_steps and the end. The default budget on a 4-step
    run affords no probe (each costs about 4 steps): none run, a warning says so and how to get them, and
    the every-step diagnostics are still logged. A budget that affords two (of 7 candidates): the start and the end."""
    def probe_steps(res):
        return [r["step"] for r in read_metrics(res.run_dir) if "diag/param_grad_ratio" in r]

    every = train(make_cfg(name="all", method="dpo", diagnostics_steps=2, diagnostics_budget=0.0))
    assert probe_steps(every) == [0, 2, 4]
    with caplog.at_level("WARNING", logger="poise"):
        none = train(make_cfg(name="none", method="dpo", diagnostics_steps=2))
    assert probe_steps(none) == [] and "no probe fits diagnostics_budget" in caplog.text
    assert all("diag/logit_grad_ratio" in r for r in steps(none.run_dir))
    two = train(make_cfg(name="two", method="dpo", diagnostics_steps=2, diagnostics_budget=0.9, max_steps=12))
    assert probe_steps(two) == [0, 12]  # 0.9 x 12 / 4.1: 2 probes


def test_a_model_that_cannot_checkpoint_trains_without_it_and_says_so(make_cfg, monkeypatch, caplog):
    """gradient_checkpointing is on by default; a model class without support trains anyway, with a warning."""
    import poise.training.build as build

    real = build.load_checked_model

    def unsupported(*args, **kwargs):
        model = real(*args, **kwargs)
        model.supports_gradient_checkpointing = False
        return model

    monkeypatch.setattr(build, "load_checked_model", unsupported)
    caplog.set_level("WARNING", logger="poise")
    res = train(make_cfg(name="nockpt", max_steps=1, diagnostics=False))
    assert res.steps == 1
    assert any("does not support activation checkpointing" in r.message for r in caplog.records)


def test_every_long_phase_says_what_it_is_doing(make_cfg, caplog, capfd):
    """Loading, the reference pass, calibration, the probes, training and saving each announce themselves
    (a log line) or show a progress bar, so that no phase runs silently."""
    caplog.set_level("INFO", logger="poise")
    train(make_cfg(name="phases", method="gate-dpo", diagnostics=True, diagnostics_steps=2,
                   diagnostics_budget=0, max_steps=2))
    said = caplog.text
    for line in ("loading the model", "reference log-probs computed and cached in", "calibrated before step 1",
                 "probes at steps", "saving the model"):
        assert line in said, line
    bars = capfd.readouterr().err
    for bar in ("reference:", "calibrate:", "probes:", "train:"):
        assert bar in bars, bar
