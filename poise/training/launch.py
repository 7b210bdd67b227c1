"""How a run was launched, checked before anything is loaded: the engine it runs (``distributed:``) and
the process group it joins.

Every launch form runs what was asked or is refused with a message that says why and what to run
instead; none silently runs something else:

* ``WORLD_SIZE=N`` (N > 1) without ``RANK``/``MASTER_ADDR``/``MASTER_PORT``: no process group can be
  formed; refused (torchrun sets all four).
* ``accelerate launch --cpu --num_processes N`` starts ONE process (accelerate runs several CPU
  processes only under mpirun) and passes the rendezvous address without a world size; refused with
  the torchrun command.
* A rank whose peers never come (rendezvous variables set by hand, a launcher that died): the
  rendezvous gives up after ``distributed_timeout`` seconds with a message, instead of waiting for
  accelerate's 30 minutes in silence. Under torchrun (its agent's store) torchrun's own rendezvous,
  which has its own timeout, has already gathered every process.
* An accelerate config that asks for FSDP or DeepSpeed (``ACCELERATE_USE_FSDP``/``_DEEPSPEED``): with
  ``distributed: auto`` poise runs that engine itself (accelerate would drop the plugin on a CPU and
  run DDP); a different explicit ``distributed:`` is a contradiction and refused.
* ``distributed: fsdp`` or ``deepspeed`` with one process: refused (nothing to shard over).
* An accelerate DeepSpeed config whose ZeRO stage or DeepSpeed config file differs from the poise
  config's ``deepspeed_stage``/``deepspeed_config``: refused with the keys to set (poise runs DeepSpeed
  itself, from its own config).
"""

from __future__ import annotations

import atexit
import logging
import os
from datetime import timedelta

import torch

from poise.errors import LaunchError

log = logging.getLogger("poise")

#: Timeout of every collective once the group is formed (torch's and accelerate's default): a rank
#: that waits this long for the others at a barrier (a slow checkpoint, a long reference pass) stops.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
ENGINES = ("ddp", "fsdp", "deepspeed")


def _env_int(name: str, default: int = 0) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def world_size() -> int:
    """Processes this launch started (WORLD_SIZE, 1 when unset)."""
    return max(_env_int("WORLD_SIZE", 1), 1)


def _torchrun(n: int | str = "N") -> str:
    return f"`torchrun --nproc_per_node {n} -m poise train CONFIG [key=value ...]`"


def _launcher_engine() -> str | None:
    """The engine an accelerate config asks for through `accelerate launch` (None: none)."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return None


def check_launch(cfg) -> str:
    """The engine this launch runs (``none`` for one process with ``distributed: auto``), or a
    :class:`LaunchError` saying why the launch cannot run what the config asks and what to run instead.
    Reads only the environment: nothing is started."""
    world = world_size()
    _check_processes(world)
    asked = cfg.distributed
    launcher = _launcher_engine()
    if launcher is not None and asked not in ("auto", launcher):
        raise LaunchError(
            f"the accelerate config of this launch asks for {launcher} (ACCELERATE_USE_{launcher.upper()}=true), "
            f"but the poise config says distributed: {asked}. Choose one: set distributed: {launcher} (or auto), or "
            "launch without that accelerate config (poise runs the engine itself; `torchrun` needs none).")
    engine = asked if asked != "auto" else (launcher or ("ddp" if world > 1 else "none"))
    if engine in ("fsdp", "deepspeed") and world == 1:
        raise LaunchError(
            f"distributed: {engine} shards the model over several processes, but this launch started one. "
            f"Launch several with {_torchrun()}, or set distributed: auto to train in one process.")
    _check_engine_options(cfg, engine)
    if engine == "deepspeed":
        _check_deepspeed(cfg, world)
    if cfg.distributed_timeout < 1:
        raise LaunchError(f"distributed_timeout must be at least 1 second, got {cfg.distributed_timeout}.")
    return engine


def _check_processes(world: int) -> None:
    """Refuse the launch forms that start fewer processes than asked for, or processes without a group."""
    if world > 1:
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise LaunchError(
                f"WORLD_SIZE={world} says this is one of {world} processes, but {', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set, so there is no process group to join: gradients "
                f"would not be synchronised and each rank would train its own copy. Launch every process with "
                f"{_torchrun(world)} (it sets RANK, MASTER_ADDR and MASTER_PORT), or unset WORLD_SIZE to train in "
                "one process.")
    elif os.environ.get("ACCELERATE_USE_CPU") is not None and os.environ.get("MASTER_ADDR") and \
            not any(os.environ.get(v) for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")):
        # accelerate's simple launcher sets MASTER_ADDR only when several processes (or machines) were
        # asked for, and starts one process anyway: `accelerate launch --cpu --num_processes N`
        raise LaunchError(
            "`accelerate launch` asked for several processes but started this one alone (with --cpu, accelerate "
            "starts several CPU processes only under mpirun): each would train its own copy. Launch them with "
            f"{_torchrun()} (gloo on a CPU), or `accelerate launch --multi_gpu --num_processes N -m poise train "
            "CONFIG` on GPUs; for one process, drop --num_processes (and unset MASTER_ADDR).")


def _check_engine_options(cfg, engine: str) -> None:
    if engine == "fsdp" and cfg.lora_r > 0 and not cfg.precompute_reference and cfg.reference_model is None:
        raise LaunchError(
            "distributed: fsdp with LoRA and a live reference: the reference is the policy with its adapters "
            "off, and FSDP shards the policy, so it cannot run outside the policy's own forward. Set "
            "precompute_reference: true (the default) or give a reference_model.")
    ds_options = [k for k, default in (("deepspeed_stage", 2), ("deepspeed_offload", "none"),
                                       ("deepspeed_config", None)) if getattr(cfg, k) != default]
    if engine != "deepspeed" and ds_options:
        raise LaunchError(f"{', '.join(ds_options)} appl{'ies' if len(ds_options) == 1 else 'y'} to distributed: "
                          f"deepspeed, but this run is {engine}{' (one process)' if engine == 'none' else ''}: set "
                          "distributed: deepspeed (and launch several processes), or remove "
                          f"{'it' if len(ds_options) == 1 else 'them'}.")
    if engine != "fsdp" and (cfg.fsdp_cpu_offload or not cfg.fsdp_reshard_after_forward):
        raise LaunchError(f"fsdp_cpu_offload and fsdp_reshard_after_forward apply to distributed: fsdp, but this "
                          f"run is {engine}{' (one process)' if engine == 'none' else ''}: set distributed: fsdp "
                          "(and launch several processes), or remove them.")
    if engine == "fsdp" and cfg.fsdp_cpu_offload and (cfg.cpu or not torch.cuda.is_available()):
        raise LaunchError("fsdp_cpu_offload: true moves the shards from GPU memory to CPU memory, but this run "
                          "trains on the CPU, where they are already: set fsdp_cpu_offload: false.")


def _check_deepspeed(cfg, world: int) -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise LaunchError("distributed: deepspeed needs the DeepSpeed package, which is not installed: "
                          "pip install 'poise[deepspeed]' (or use distributed: fsdp, which shards parameters, "
                          "gradients and optimizer state as ZeRO-3 does with PyTorch alone).")
    if cfg.deepspeed_offload != "none" and (cfg.cpu or not torch.cuda.is_available()):
        raise LaunchError(f"deepspeed_offload: {cfg.deepspeed_offload} moves state from GPU memory to CPU memory, "
                          "but this run trains on the CPU, where it is already: set deepspeed_offload: none.")
    if cfg.deepspeed_offload == "all" and cfg.deepspeed_stage != 3:
        raise LaunchError(f"deepspeed_offload: all also offloads the parameters, which only ZeRO-3 shards: set "
                          f"deepspeed_stage: 3, or deepspeed_offload: optimizer with ZeRO-{cfg.deepspeed_stage}.")
    if cfg.deepspeed_stage == 3 and cfg.lora_r > 0 and not cfg.precompute_reference and cfg.reference_model is None:
        raise LaunchError(
            "distributed: deepspeed with ZeRO-3, LoRA and a live reference: the reference is the policy with its "
            "adapters off, and ZeRO-3 partitions the policy, so it cannot run outside the policy's own forward. "
            "Set precompute_reference: true (the default) or give a reference_model.")
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage and stage.strip() != str(cfg.deepspeed_stage):
        raise LaunchError(f"the accelerate config of this launch asks for ZeRO-{stage} (ACCELERATE_DEEPSPEED_ZERO_STAGE), "
                          f"but the poise config has deepspeed_stage: {cfg.deepspeed_stage}. poise runs DeepSpeed "
                          f"from its own config: set deepspeed_stage: {stage}, or launch with torchrun.")
    file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if file and file not in ("none", "None") and (cfg.deepspeed_config is None or
                                                   os.path.abspath(file) != os.path.abspath(cfg.deepspeed_config)):
        raise LaunchError(f"the accelerate config of this launch names the DeepSpeed config {file}, but the poise "
                          f"config has deepspeed_config: {cfg.deepspeed_config}. poise runs DeepSpeed from its own "
                          f"config: set deepspeed_config: {file}, or launch with torchrun.")
    from poise.training.zero import ds_config

    ds_config(cfg, world, resolve_mixed_precision(cfg))  # a deepspeed_config that conflicts is refused now


def cpu_has_native_bf16() -> bool:
    """The CPU computes bf16 natively (AVX512_BF16 or AMX), where bf16 autocast is faster than fp32
    (docs/performance.md); the environment variable POISE_CPU_BF16=0 (or 1) overrides the detection."""
    forced = os.environ.get("POISE_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch: no native bf16 assumed
        return False


def resolve_mixed_precision(cfg) -> str:
    """``mixed_precision`` with ``auto`` decided: bf16 autocast on a GPU that has bf16 and on a CPU that
    computes bf16 natively, else no (fp32)."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if torch.cuda.is_available() and not cfg.cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_native_bf16() else "no"


def backend(cfg) -> str:
    return "nccl" if torch.cuda.is_available() and not cfg.cpu else "gloo"


def init_distributed(cfg) -> None:
    """Form the process group of a multi-process launch (once), with a rendezvous that gives up after
    ``cfg.distributed_timeout`` seconds and says which process waited for what."""
    import torch.distributed as dist

    world = world_size()
    if world == 1 or dist.is_initialized():
        return
    rank, addr, port = _env_int("RANK"), os.environ["MASTER_ADDR"], _env_int("MASTER_PORT")
    be = backend(cfg)
    if be == "nccl":
        torch.cuda.set_device(_env_int("LOCAL_RANK"))
    atexit.register(_destroy)  # registered first: runs after the hooks of what the run starts later
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        # torchrun's agent holds the store and has gathered every process already
        dist.init_process_group(be, timeout=COLLECTIVE_TIMEOUT)
        return
    wait = timedelta(seconds=cfg.distributed_timeout)
    try:
        store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=wait, wait_for_workers=True)
    except (RuntimeError, OSError) as e:
        what = (f"the other {world - 1} process(es) did not join it" if rank == 0 else
                f"process 0 never opened the rendezvous at {addr}:{port}")
        raise LaunchError(
            f"process {rank} of {world} waited {cfg.distributed_timeout} s (distributed_timeout) at {addr}:{port}: "
            f"{what} ({str(e).splitlines()[0][:200]}). Every process of the run must be started: {_torchrun(world)} "
            "starts them all with one command; raise distributed_timeout if they start slowly.") from None
    store.set_timeout(COLLECTIVE_TIMEOUT)
    dist.init_process_group(be, store=store, rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT)


def _destroy() -> None:
    """The process group poise formed, closed at exit (some backends and DeepSpeed hang without it)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            # every rank reaches the end before any closes its connections: a rank whose peer has already
            # gone can abort in gloo's teardown ("terminate called without an active exception")
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=60))
            else:
                dist.barrier()
        except Exception as e:  # noqa: BLE001 - a peer that is gone: close anyway
            log.debug("barrier at exit: %s", e)
        try:
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - at exit, a failure to close is only reported
            log.debug("destroy_process_group at exit: %s", e)


class accelerate_env:
    """While poise builds accelerate's Accelerator for an engine it runs itself (fsdp, deepspeed), the
    launcher's FSDP/DeepSpeed switches are hidden, so that accelerate does not set up a second copy of
    the engine; the Accelerator is then only the process bookkeeping (device, gather, reduce)."""

    KEYS = ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")

    def __init__(self, engine: str):
        self.hide = engine in ("fsdp", "deepspeed")
        self.saved: dict[str, str] = {}

    def __enter__(self):
        if self.hide:
            self.saved = {k: os.environ.pop(k) for k in self.KEYS if k in os.environ}
        return self

    def __exit__(self, *exc):
        os.environ.update(self.saved)
        return False
