"""Every engine with two CPU processes (torchrun, gloo) trains like one process: DDP, FSDP2 and DeepSpeed
ZeRO-1/2/3 (``distributed: ddp | fsdp | deepspeed``).

One module fixture trains each case once in one process (in this process); then, per engine, one
two-process job (tests/training/engine_job.py: Python, torch and the process group start once) trains the
same cases under that engine and resumes its dpo run from the step-2 checkpoint, copied into a fresh
folder. Every run: 4 steps of 8 pairs in micro-batches of 2 (2 per rank: gradient accumulation),
clipping at max_grad_norm 0.5 (0.1 with LoRA: below the gradient norm, so it clips), probes every 2 steps, an
evaluation of 9 pairs (uneven over 2 ranks) every 2 steps, a checkpoint every 2. The cases:

* ``dpo``: the reference cache; ``live``: the live reference (a frozen copy of the initial policy);
* ``gate-dpo``: the calibration, gathered over the ranks' slices;
* ``adadpo-lora``: AdaDPO with LoRA and gradient checkpointing;
* ``balanced-ref``: Balanced-DPO with a separate ``reference_model``, live;
* ``sft``: the SFT stage;
* ``beta-dpo``: a statistic of the whole step (the mean margin, gathered over ranks before the step)
  and its margin filter (the kept pairs drawn from the state's generator, the same on every rank).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import free_port
from safetensors.torch import load_file

from poise.model.tiny import build_tiny_model, build_tiny_tokenizer
from poise.training.checkpoint import MANIFEST, SHARDS, verify
from poise.training.config import from_dict
from poise.training.loop import train
from poise.training.runlog import read_metrics

pytestmark = pytest.mark.distributed

HERE = Path(__file__).parent
CASES = {
    "dpo": dict(method="dpo"),
    "live": dict(method="dpo", precompute_reference=False),
    "gate-dpo": dict(method="gate-dpo"),
    "adadpo-lora": dict(method="adadpo", lora_r=4, lora_alpha=8, gradient_checkpointing=True, max_grad_norm=0.1),
    "balanced-ref": dict(method="balanced-dpo", reference_model="REF", precompute_reference=False),
    "sft": dict(stage="sft", eval_file=None),
    "beta-dpo": dict(method="beta-dpo", dynbeta_keep=0.5),
}
ENGINES = {
    "ddp": dict(distributed="ddp"),
    "fsdp": dict(distributed="fsdp"),
    "zero2": dict(distributed="deepspeed", deepspeed_stage=2),
    "zero3": dict(distributed="deepspeed", deepspeed_stage=3),
}
EXTRA = {"zero2": {"dpo-zero1": dict(method="dpo", distributed="deepspeed", deepspeed_stage=1)}}
#: per-run measurements, not training results
NOT_COMPARED = {"tokens_per_s", "step_time_s", "peak_memory_mb"}
RTOL = ATOL = 1e-5


def _torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def base(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    eval9 = root / "eval9.jsonl"  # 9 pairs: 5 micro-batches of 2 (or 1), 3 on rank 0 and 2 on rank 1
    eval9.write_text((assets / "eval.jsonl").read_text() + (assets / "train.jsonl").read_text().splitlines()[0] + "\n")
    tok = build_tiny_tokenizer()  # another model as reference_model: the same vocabulary, other weights
    build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, seed=1).save_pretrained(root / "ref")
    tok.save_pretrained(root / "ref")
    common = dict(model=str(assets / "model"), train_file=str(assets / "train.jsonl"),
                  eval_file=str(eval9), cache_dir=str(root / "cache"),
                  batch_size=8, micro_batch_size=2, learning_rate=1e-3, max_steps=4, warmup_ratio=0.0,
                  scheduler="constant", max_grad_norm=0.5, max_length=64, max_prompt_length=32,
                  diagnostics_steps=2, diagnostics_budget=0.0, eval_steps=2, save_steps=2)

    def config(case: dict, **kw) -> dict:
        out = {**common, **case, **kw}
        if out.get("reference_model") == "REF":
            out["reference_model"] = str(root / "ref")
        return out

    return root, config


@pytest.fixture(scope="module")
def one(base):
    """Every case in one process."""
    root, config = base
    for name, case in CASES.items():
        train(from_dict(config(case, output_dir=str(root / f"one-{name}"))))
    return root


@pytest.fixture(scope="module")
def runs(base, one, request):
    """engine -> the folder of its two-process runs (trained on first use: one job per engine)."""
    root, config = base
    done: dict[str, Path] = {}

    def get(engine: str) -> Path:
        if engine in done:
            return done[engine]
        folder = root / engine
        folder.mkdir()
        cases = {**CASES, **{k: {**v} for k, v in EXTRA.get(engine, {}).items()}}
        paths = []
        for name, case in cases.items():
            path = folder / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config({**ENGINES[engine], **case}, output_dir=str(folder / name))))
            paths.append(str(path))
        resumed = folder / "resumed.yaml"
        resumed.write_text(yaml.safe_dump(config({**ENGINES[engine], **CASES["dpo"]}, resume=True,
                                                 output_dir=str(folder / "resumed"))))
        step2 = folder / "dpo" / "checkpoints" / "step-00000002"
        _torchrun(str(HERE / "engine_job.py"), *paths,
                  f"copy:{step2}:{folder / 'resumed' / 'checkpoints' / step2.name}", str(resumed))
        done[engine] = folder
        return folder

    return get


def _weights(run: Path) -> dict[str, torch.Tensor]:
    files = sorted((run / "model").glob("*.safetensors"))
    assert files, f"no weights in {run / 'model'}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def assert_same_weights(a: dict, b: dict) -> float:
    """Equal within RTOL/ATOL; returns the largest |difference| relative to the tensor's largest |value|."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        assert b[k].numel() > 0 and b[k].shape == a[k].shape, k
        torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=ATOL, msg=k)
        worst = max(worst, ((b[k] - a[k]).abs().max() / a[k].abs().max().clamp(min=1e-12)).item())
    return worst


def assert_same_metrics(one: Path, two: Path) -> None:
    rows_one, rows_two = read_metrics(one), read_metrics(two)
    assert [(r["step"], sorted(r)) for r in rows_one] == [(r["step"], sorted(r)) for r in rows_two]
    for a, b in zip(rows_one, rows_two):
        for k in a.keys() - NOT_COMPARED:
            if k.endswith("rewards/accuracies") and abs(a.get(k.replace("accuracies", "margins"), 1.0)) < 1e-6:
                continue  # every margin is 0 in exact arithmetic (step 1): the share above 0 is rounding's sign
            assert b[k] == pytest.approx(a[k], rel=RTOL, abs=ATOL), (a["step"], k)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one(one, runs, engine, case):
    a, b = one / f"one-{case}", runs(engine) / case
    worst = assert_same_weights(_weights(a), _weights(b))
    print(f"{engine} {case}: largest weight difference relative to the tensor's scale: {worst:.2e}")
    assert_same_metrics(a, b)
    rows = read_metrics(b)
    clip = yaml.safe_load((b / "config.yaml").read_text())["max_grad_norm"]
    assert max(r.get("grad_norm", 0) for r in rows) > clip  # the clip was active
    if case != "sft":
        keys = set().union(*rows)
        assert {"probe/chosen_logp", "diag/param_grad_norm_chosen", "eval/loss", "eval/rewards/accuracies"} <= keys
        assert [r["step"] for r in rows if "eval/loss" in r] == [2, 4, 4]  # eval_steps, then the final one
    if case == "gate-dpo":  # calibrated over the ranks' slices: the same threshold as one process
        tau = [yaml.safe_load((d / "config.yaml").read_text())["gate_tau"] for d in (a, b)]
        assert isinstance(tau[0], float) and tau[1] == pytest.approx(tau[0], rel=1e-6)


def test_zero1_equals_one_process(one, runs):
    assert_same_weights(_weights(one / "one-dpo"), _weights(runs("zero2") / "dpo-zero1"))
    assert_same_metrics(one / "one-dpo", runs("zero2") / "dpo-zero1")


@pytest.mark.parametrize("engine", ENGINES)
def test_resume_is_exact(runs, engine):
    resumed, uninterrupted = _weights(runs(engine) / "resumed"), _weights(runs(engine) / "dpo")
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=1e-6, atol=1e-7, msg=k)
    assert read_metrics(runs(engine) / "resumed")[0]["step"] == 3


#: what each engine's checkpoint holds besides the manifest and training_state.pt
CHECKPOINT_FILES = {
    "ddp": {"model/model.safetensors"},
    "fsdp": {f"{SHARDS}/__0_0.distcp", f"{SHARDS}/__1_0.distcp", f"{SHARDS}/.metadata"},
    "zero2": {f"{SHARDS}/zero/mp_rank_00_model_states.pt", f"{SHARDS}/zero/zero_pp_rank_0_mp_rank_00_optim_states.pt",
              f"{SHARDS}/zero/zero_pp_rank_1_mp_rank_00_optim_states.pt", f"{SHARDS}/engine.json"},
    "zero3": {f"{SHARDS}/zero/zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in (0, 1) for k in ("model", "optim")}
    | {f"{SHARDS}/engine.json"},
}


@pytest.mark.parametrize("engine", ENGINES)
def test_checkpoints_are_the_engines_own_and_verified(runs, engine):
    """Sharded engines: every rank wrote its part, inside poise's atomic, checksummed folder."""
    ckpt = runs(engine) / "dpo" / "checkpoints" / "step-00000002"
    assert verify(ckpt) is None
    files = set(json.loads((ckpt / MANIFEST).read_text())["files"])
    assert CHECKPOINT_FILES[engine] <= files
    if engine != "ddp":
        assert not (ckpt / "model").exists()  # the model is in the shards, not gathered on one rank
        assert "optimizer" not in torch.load(ckpt / "training_state.pt", weights_only=True)
    assert not list((runs(engine) / "dpo" / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_the_gathered_model_loads_in_transformers(one, runs, engine):
    """The final model is one Hugging Face folder (gathered from the shards, never empty tensors)."""
    from transformers import AutoModelForCausalLM

    two = AutoModelForCausalLM.from_pretrained(runs(engine) / "dpo" / "model")
    a, b = AutoModelForCausalLM.from_pretrained(one / "one-dpo" / "model").state_dict(), two.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].numel() > 0
        torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=ATOL, msg=k)
