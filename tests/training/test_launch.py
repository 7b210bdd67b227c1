"""Launch forms (poise/training/launch.py): each runs what was asked or is refused with a message that
says why and what to run instead; none silently runs something else, none waits without a bound."""

import os
import subprocess
import sys
import time

import pytest
import yaml
from helpers import free_port

from poise.errors import LaunchError
from poise.training.launch import accelerate_env, check_launch
from poise.training.loop import train

LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE",
               "ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "PMI_SIZE",
               "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_CONFIG_FILE",
               "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@pytest.fixture
def env(monkeypatch):
    """A clean launch environment; ``env(WORLD_SIZE=2, ...)`` sets variables for one test."""
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)

    def set_(**kw):
        for k, v in kw.items():
            monkeypatch.setenv(k, str(v))
    return set_


def _refused(cfg, match: str) -> LaunchError:
    with pytest.raises(LaunchError, match=match) as e:
        train(cfg)
    assert not os.path.exists(cfg.output_dir)  # refused before anything was written
    return e.value


def test_world_size_without_a_process_group_is_refused(make_cfg, env):
    env(WORLD_SIZE=2)
    err = _refused(make_cfg(), "RANK, MASTER_ADDR, MASTER_PORT are not set")
    assert "torchrun --nproc_per_node 2 -m poise train" in str(err)


def test_accelerate_launch_cpu_with_two_processes_is_refused(make_cfg, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process (accelerate wants mpirun for that):
    the real command, refused with the torchrun command instead of training one copy alone."""
    cfg = make_cfg()
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(free_port()), "-m", "poise", "train", str(path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("poise: error:")]
    # every process poise ran in was refused with the torchrun command (accelerate starts one; the
    # contract is about each started process, not about how many accelerate starts), and none trained
    assert errors and all("started this one alone" in e and "torchrun --nproc_per_node" in e for e in errors), \
        proc.stderr
    assert "done:" not in proc.stdout, proc.stdout
    assert not os.path.exists(cfg.output_dir)


@pytest.mark.parametrize("rank, what", [(0, "did not join"), (1, "process 0 never opened the rendezvous")])
def test_a_lone_rank_stops_after_distributed_timeout(make_cfg, env, rank, what):
    """The rendezvous variables are set but the other process never comes: a message after
    distributed_timeout seconds, not a silent wait of accelerate's 30 minutes."""
    env(WORLD_SIZE=2, RANK=rank, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    t0 = time.monotonic()
    err = _refused(make_cfg(distributed_timeout=2), what)
    assert time.monotonic() - t0 < 30
    assert f"process {rank} of 2 waited 2 s" in str(err) and "torchrun --nproc_per_node 2" in str(err)
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_a_sharding_engine_with_one_process_is_refused(make_cfg, env):
    _refused(make_cfg(distributed="fsdp"), "distributed: fsdp shards the model over several processes, but this "
                                           "launch started one")


def test_fsdp_options_without_fsdp_are_refused(make_cfg, env):
    _refused(make_cfg(fsdp_reshard_after_forward=False), "apply to distributed: fsdp, but this run is none")
    env(WORLD_SIZE=2, RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=1)
    with pytest.raises(LaunchError, match="this run trains on the CPU"):
        check_launch(make_cfg(distributed="fsdp", fsdp_cpu_offload=True, cpu=True))


def test_an_accelerate_config_chooses_the_engine_and_a_contradiction_is_refused(make_cfg, env):
    env(WORLD_SIZE=2, RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=1)
    assert check_launch(make_cfg()) == "ddp"
    env(ACCELERATE_USE_FSDP="true")  # `accelerate launch` with an FSDP config
    assert check_launch(make_cfg()) == "fsdp"  # poise runs FSDP itself: accelerate would drop it on a CPU
    assert check_launch(make_cfg(distributed="fsdp")) == "fsdp"
    with pytest.raises(LaunchError, match="asks for fsdp .* but the poise config says distributed: ddp"):
        check_launch(make_cfg(distributed="ddp"))
    with accelerate_env("fsdp"):  # the Accelerator is built without accelerate's own FSDP switch
        assert "ACCELERATE_USE_FSDP" not in os.environ
    assert os.environ["ACCELERATE_USE_FSDP"] == "true"


def test_deepspeed_launch_forms(make_cfg, env, monkeypatch):
    """distributed: deepspeed runs with several processes; an accelerate DeepSpeed config selects it, and
    one that asks for another ZeRO stage or DeepSpeed file than the poise config is refused."""
    _refused(make_cfg(distributed="deepspeed"), "distributed: deepspeed shards the model over several processes")
    env(WORLD_SIZE=2, RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=1)
    assert check_launch(make_cfg(distributed="deepspeed", deepspeed_stage=3)) == "deepspeed"
    env(ACCELERATE_USE_DEEPSPEED="true")
    assert check_launch(make_cfg()) == "deepspeed"
    env(ACCELERATE_DEEPSPEED_ZERO_STAGE="3")
    with pytest.raises(LaunchError, match="asks for ZeRO-3 .* deepspeed_stage: 2. .* set deepspeed_stage: 3"):
        check_launch(make_cfg())
    assert check_launch(make_cfg(deepspeed_stage=3)) == "deepspeed"
    env(ACCELERATE_DEEPSPEED_CONFIG_FILE="/somewhere/ds.json")
    with pytest.raises(LaunchError, match="set deepspeed_config: /somewhere/ds.json"):
        check_launch(make_cfg(deepspeed_stage=3))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(LaunchError, match=r"pip install 'poise\[deepspeed\]'"):
        check_launch(make_cfg(distributed="deepspeed"))


def test_deepspeed_options_are_checked_at_launch(make_cfg, env, tmp_path):
    _refused(make_cfg(deepspeed_stage=3), "deepspeed_stage applies to distributed: deepspeed, but this run is none")
    env(WORLD_SIZE=2, RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=1)
    ds = dict(distributed="deepspeed")
    with pytest.raises(LaunchError, match="trains on the CPU, where it is already: set deepspeed_offload: none"):
        check_launch(make_cfg(**ds, deepspeed_offload="optimizer", cpu=True))
    with pytest.raises(LaunchError, match="LoRA and a live reference"):
        check_launch(make_cfg(**ds, deepspeed_stage=3, lora_r=4, precompute_reference=False))
    from poise.errors import ConfigError

    bad = tmp_path / "ds.json"
    bad.write_text('{"gradient_clipping": 5.0, "zero_optimization": {"reduce_bucket_size": 1000}}')
    with pytest.raises(ConfigError, match="gradient_clipping is 5.0, but poise sets it .* remove gradient_clipping"):
        check_launch(make_cfg(**ds, deepspeed_config=str(bad)))
    bad.write_text('{"zero_optimization": {"stage": 3}}')
    with pytest.raises(ConfigError, match="zero_optimization.stage is 3.*deepspeed_stage"):
        check_launch(make_cfg(**ds, deepspeed_config=str(bad)))
    bad.write_text('{"zero_optimization": {')
    with pytest.raises(ConfigError, match="is not valid JSON"):
        check_launch(make_cfg(**ds, deepspeed_config=str(bad)))
    with pytest.raises(ConfigError, match="cannot read"):
        check_launch(make_cfg(**ds, deepspeed_config=str(tmp_path / "missing.json")))


def test_a_deepspeed_config_file_keeps_its_other_settings(make_cfg, tmp_path):
    from poise.training.zero import ds_config

    path = tmp_path / "ds.json"
    path.write_text('{"train_batch_size": "auto", "gradient_clipping": 0.5, "communication_data_type": "fp32", '
                    '"zero_optimization": {"stage": "auto", "reduce_bucket_size": 1000}}')
    cfg = make_cfg(distributed="deepspeed", deepspeed_stage=3, deepspeed_config=str(path), batch_size=8,
                   micro_batch_size=2, max_grad_norm=0.5)
    out = ds_config(cfg, world=2, mixed_precision="no")
    assert out["train_batch_size"] == 8 and out["gradient_accumulation_steps"] == 2
    assert out["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000}
    assert out["communication_data_type"] == "fp32" and out["gradient_clipping"] == 0.5
    assert out["bf16"] == {"enabled": False}


def test_the_commands_of_docs_distributed_md_name_configs_that_validate():
    """Every `torchrun ... -m poise train CONFIG key=value` in docs/distributed.md: the config exists and
    validates with its overrides, and the engine it asks for is documented there."""
    import re
    import shlex
    from pathlib import Path

    from poise.training.config import load_config

    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "distributed.md").read_text()
    commands = [line.split("#")[0] for line in text.splitlines() if line.startswith("torchrun ")]
    assert len(commands) >= 3
    for cmd in commands:
        args = shlex.split(cmd)
        rest = args[args.index("train") + 1:]
        config, overrides = rest[0], rest[1:]
        if config.startswith("configs/"):  # a shipped config (else YOUR_CONFIG.yaml)
            cfg = load_config(root / config, overrides)
            assert cfg.distributed in ("fsdp", "ddp", "deepspeed") and f"`{cfg.distributed}`" in text
        assert re.fullmatch(r"torchrun --nproc_per_node \d+ -m poise train", " ".join(args[:args.index("train") + 1]))
