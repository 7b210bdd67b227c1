"""FSDP2 (``distributed: fsdp``): two CPU processes (torchrun, gloo) train like one process.

One module fixture runs everything once: dpo and gate-dpo in one process (in this process), then one
two-process job (tests/training/fsdp_job.py: Python and torch start once) that trains the same two
configs under FSDP and resumes the FSDP dpo run from its sharded step-2 checkpoint, copied into a fresh
folder (tests/training/test_distributed.py launches `torchrun -m poise train` itself). Every run: 4 steps of 8 pairs in micro-batches of 2 (2 per rank:
gradient accumulation), clipping at max_grad_norm 0.5 (the gradient norm is ~0.5-0.9: it clips), probes
every 2 steps, an evaluation of 9 pairs (uneven over 2 ranks) every 2 steps, a checkpoint every 2.
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

from poise.training.checkpoint import MANIFEST, SHARDS, verify
from poise.training.config import from_dict
from poise.training.loop import train
from poise.training.runlog import read_metrics

pytestmark = pytest.mark.distributed

HERE = Path(__file__).parent
METHODS = ("dpo", "gate-dpo")
#: per-run measurements, not training results
NOT_COMPARED = {"tokens_per_s", "step_time_s", "peak_memory_mb"}
RTOL = ATOL = 1e-5


def _torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    eval9 = root / "eval9.jsonl"  # 9 pairs: 5 micro-batches of 2 (or 1), 3 on rank 0 and 2 on rank 1
    eval9.write_text((assets / "eval.jsonl").read_text() + (assets / "train.jsonl").read_text().splitlines()[0] + "\n")
    base = dict(model=str(assets / "model"), train_file=str(assets / "train.jsonl"),
                eval_file=str(eval9), cache_dir=str(root / "cache"),
                batch_size=8, micro_batch_size=2, learning_rate=1e-3, max_steps=4, warmup_ratio=0.0,
                scheduler="constant", max_grad_norm=0.5, max_length=64, max_prompt_length=32,
                diagnostics_steps=2, eval_steps=2, save_steps=2)
    paths = []
    for m in METHODS:
        train(from_dict({**base, "method": m, "output_dir": str(root / f"one-{m}")}))
        path = root / f"fsdp-{m}.yaml"
        path.write_text(yaml.safe_dump({**base, "method": m, "distributed": "fsdp",
                                        "output_dir": str(root / f"fsdp-{m}")}))
        paths.append(str(path))
    # then a resume from the FSDP dpo run's step-2 checkpoint, copied into a folder of its own
    cfg = root / "resumed.yaml"
    cfg.write_text(yaml.safe_dump({**base, "method": "dpo", "distributed": "fsdp", "resume": True,
                                   "output_dir": str(root / "resumed")}))
    step2 = root / "fsdp-dpo" / "checkpoints" / "step-00000002"
    _torchrun(str(HERE / "fsdp_job.py"), *paths, f"copy:{step2}:{root / 'resumed' / 'checkpoints' / step2.name}",
              str(cfg))
    return root


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


@pytest.mark.parametrize("method", METHODS)
def test_two_fsdp_processes_equal_one(runs, method):
    one, two = runs / f"one-{method}", runs / f"fsdp-{method}"
    worst = assert_same_weights(_weights(one), _weights(two))
    print(f"{method}: largest weight difference relative to the tensor's scale: {worst:.2e}")
    rows_one, rows_two = read_metrics(one), read_metrics(two)
    assert [(r["step"], sorted(r)) for r in rows_one] == [(r["step"], sorted(r)) for r in rows_two]
    for a, b in zip(rows_one, rows_two):
        for k in a.keys() - NOT_COMPARED:
            assert b[k] == pytest.approx(a[k], rel=RTOL, abs=ATOL), (a["step"], k)
    keys = set().union(*rows_two)
    assert {"probe/chosen_logp", "diag/param_grad_norm_chosen", "eval/loss", "eval/rewards/accuracies",
            "grad_norm"} <= keys
    assert max(r.get("grad_norm", 0) for r in rows_two) > 0.5  # the clip was active
    assert [r["step"] for r in rows_two if "eval/loss" in r] == [2, 4, 4]  # eval_steps, then the final one
    if method == "gate-dpo":  # calibrated over the ranks' slices: the same threshold as one process
        tau = [yaml.safe_load((d / "config.yaml").read_text())["gate_tau"] for d in (one, two)]
        assert isinstance(tau[0], float) and tau[1] == pytest.approx(tau[0], rel=1e-6)


def test_fsdp_checkpoints_are_sharded_by_every_rank_and_verified(runs):
    ckpt = runs / "fsdp-dpo" / "checkpoints" / "step-00000002"
    assert verify(ckpt) is None
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert {f"{SHARDS}/__0_0.distcp", f"{SHARDS}/__1_0.distcp", f"{SHARDS}/.metadata"} <= set(files)
    assert not (ckpt / "model").exists()  # the model is in the shards, not gathered on one rank
    assert "optimizer" not in torch.load(ckpt / "training_state.pt", weights_only=True)
    assert not list((runs / "fsdp-dpo" / "checkpoints").glob(".tmp-*"))


def test_fsdp_resume_is_exact(runs):
    resumed, uninterrupted = _weights(runs / "resumed"), _weights(runs / "fsdp-dpo")
    for k in uninterrupted:
        torch.testing.assert_close(resumed[k], uninterrupted[k], rtol=1e-6, atol=1e-7, msg=k)
    assert read_metrics(runs / "resumed")[0]["step"] == 3


def test_the_gathered_model_loads_in_transformers(runs):
    """The final model is one Hugging Face folder (gathered from the shards, never empty tensors)."""
    from transformers import AutoModelForCausalLM

    two = AutoModelForCausalLM.from_pretrained(runs / "fsdp-dpo" / "model")
    one = AutoModelForCausalLM.from_pretrained(runs / "one-dpo" / "model")
    a, b = one.state_dict(), two.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].numel() > 0
        torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=ATOL, msg=k)
