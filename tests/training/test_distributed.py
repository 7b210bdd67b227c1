"""Data parallelism: two CPU processes (gloo) train exactly like one process with the same global
batch; a launch whose ranks would not synchronise gradients is refused."""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import free_port
from safetensors.torch import load_file

from poise.errors import ConfigError
from poise.training.loop import train


@pytest.mark.distributed
def test_two_processes_equal_one(make_cfg, tmp_path):
    single = make_cfg(name="one", method="adadpo", micro_batch_size=4, max_steps=3)
    train(single)
    cfg = single.to_dict()
    cfg["output_dir"] = str(tmp_path / "two")
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # a port free now, not a fixed number that another run on this machine may hold
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                           "-m", "poise", "train", str(path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-5), k
    assert proc.stdout.count("done:") == 1  # only the main process reports


def test_a_launch_without_synchronisation_is_refused(make_cfg, monkeypatch):
    """WORLD_SIZE says 2 processes but the accelerator sees one: each rank would train its own copy."""
    import accelerate

    class OneProcess:
        num_processes = 1

        def __init__(self, **kw):
            pass

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(accelerate, "Accelerator", OneProcess)
    with pytest.raises(ConfigError, match="each rank would train its own copy"):
        train(make_cfg(method="dpo"))


def test_diverged_replicas_are_detected():
    from poise.training.build import RunState
    from poise.training.engines import AccelerateEngine

    class Acc:
        device = torch.device("cpu")

        def gather(self, t):
            return torch.cat([t, t + 1.0])

    s = RunState.__new__(RunState)
    s.accelerator, s.trainable = Acc(), [torch.nn.Parameter(torch.ones(3))]
    s.engine = AccelerateEngine(None, s.accelerator)
    with pytest.raises(ConfigError, match="not synchronised"):
        s.check_replicas_agree()
