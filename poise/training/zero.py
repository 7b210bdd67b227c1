"""DeepSpeed ZeRO (``distributed: deepspeed``), run by poise itself (not through accelerate's plugin).

* The engine: ``deepspeed.initialize`` over the policy module and poise's own optimizer (fused AdamW),
  with the ZeRO stage of ``deepspeed_stage`` (1: optimizer state sharded; 2: and gradients; 3: and
  parameters). DeepSpeed keeps fp32 master weights in its optimizer whatever the model's precision.
* Gradient accumulation: the loop sets the accumulation boundary itself (the last micro-batch of the
  step), backpropagates each micro-batch's share of the global mean (no rescaling by DeepSpeed) and
  calls the engine's step once per optimizer step; clipping at ``max_grad_norm`` is DeepSpeed's
  ``gradient_clipping`` and the norm the loop logs is the engine's global gradient norm.
* Checkpoints: DeepSpeed's own per-rank files (every rank writes its part), inside poise's atomic,
  checksummed checkpoint folder. They are read back with ``torch.load(weights_only=True)`` and an
  allow-list of the few DeepSpeed classes its files hold (:data:`ALLOWED`); nothing else is unpickled.
  DeepSpeed resumes a ZeRO checkpoint on the number of processes that wrote it (resharding needs its
  ``ds_to_universal`` conversion): another number is refused with that advice.
* The final model and the probes need the whole model on the main process: under ZeRO-1/2 every rank
  holds it; under ZeRO-3 the parameters are gathered (every rank takes part) into an empty copy of the
  model kept on the main process, as under FSDP.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from poise.errors import ConfigError, PoiseError
from poise.training.checkpoint import SHARDS, save_sharded_checkpoint
from poise.training.engines import Engine, empty_copy, empty_params, fill_replica

log = logging.getLogger("poise")

TAG = "zero"
#: The classes (module, name) besides tensors and containers that DeepSpeed's checkpoint files hold; a
#: file that references anything else is refused.
ALLOWED: tuple[tuple[str, str], ...] = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
#: Keys of a user's DeepSpeed config that poise sets from its own config.
OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
         "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")


def set_accelerator_env() -> None:
    """DeepSpeed picks its accelerator when imported: the CPU one on a machine without a GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def import_deepspeed():
    set_accelerator_env()
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("distributed: deepspeed needs the DeepSpeed package: pip install 'poise[deepspeed]' "
                          "(or distributed: fsdp, which shards like ZeRO-3 with PyTorch alone).") from None
    return deepspeed


def _read_user_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path) as f:
            user = json.load(f)
    except OSError as e:
        raise ConfigError(f"deepspeed_config: cannot read {path} ({e.strerror or e}).") from None
    except ValueError as e:
        raise ConfigError(f"deepspeed_config: {path} is not valid JSON ({e}).") from None
    if not isinstance(user, dict):
        raise ConfigError(f"deepspeed_config: {path} must hold a JSON object (a DeepSpeed config).")
    return user


def ds_config(cfg, world: int, mixed_precision: str) -> dict[str, Any]:
    """The DeepSpeed config of a run: poise's settings, over the user's ``deepspeed_config`` (whose
    settings poise owns must be absent, "auto" or equal)."""
    user = _read_user_config(cfg.deepspeed_config)
    per_rank = cfg.batch_size // world
    zero: dict[str, Any] = {"stage": cfg.deepspeed_stage}
    if cfg.deepspeed_offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.deepspeed_offload == "all":
        zero["offload_param"] = {"device": "cpu"}
    ours: dict[str, Any] = {
        "train_batch_size": cfg.batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": per_rank // cfg.micro_batch_size,
        # no clipping: a norm no gradient reaches, so that DeepSpeed still computes the norm poise logs
        "gradient_clipping": cfg.max_grad_norm if cfg.max_grad_norm is not None else 1e30,
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": mixed_precision == "fp16"},
    }
    for key in OWNED:
        if key in user and user[key] != "auto" and user[key] != ours.get(key):
            raise ConfigError(f"deepspeed_config {cfg.deepspeed_config}: {key} is {user[key]!r}, but poise sets it "
                              f"from its own config ({ours.get(key, 'poise optimizer and schedule')!r}): remove "
                              f"{key} (or write \"auto\"), and set it in the poise config.")
    user_zero = dict(user.get("zero_optimization") or {})
    for key in ("stage", "offload_optimizer", "offload_param"):
        if key in user_zero and user_zero[key] != "auto" and user_zero[key] != zero.get(key):
            raise ConfigError(f"deepspeed_config {cfg.deepspeed_config}: zero_optimization.{key} is "
                              f"{user_zero[key]!r}, but poise sets it from deepspeed_stage/deepspeed_offload "
                              f"({zero.get(key)!r}): remove it and set those keys in the poise config.")
    out = {k: v for k, v in user.items() if k not in OWNED}
    out.update(ours)
    out["zero_optimization"] = {**user_zero, **zero}
    out.setdefault("zero_allow_untested_optimizer", True)  # poise's own (fused) AdamW
    out.setdefault("zero_force_ds_cpu_optimizer", False)
    out.setdefault("steps_per_print", 2**31 - 1)  # poise logs the steps
    out.setdefault("wall_clock_breakdown", False)
    return out


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO stage 1, 2 or 3 (``distributed: deepspeed``)."""

    name = "deepspeed"

    def __init__(self, cfg, accelerator):
        super().__init__(cfg, accelerator)
        self.stage = cfg.deepspeed_stage
        self.replicated = self.stage < 3
        self._replica = None

    def prepare(self, module, make_optimizer):
        deepspeed = import_deepspeed()
        mp = self.acc.mixed_precision
        if self.stage == 3 and self.is_main:  # filled with the full weights when asked for (probes, final model)
            self._replica = empty_copy(module.model)
        optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad])
        config = ds_config(self.cfg, self.num_processes, mp)
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                               dist_init_required=False)
        engine.checkpoint_engine.load = _safe_load
        self.module, self.optimizer = engine, optimizer  # the schedule sets the base optimizer's rates
        log.info("deepspeed: ZeRO-%d over %d processes (offload %s, mixed_precision=%s, %d micro-batches per "
                 "step and process)", self.stage, self.num_processes, self.cfg.deepspeed_offload, mp,
                 config["gradient_accumulation_steps"])
        return self.module, self.optimizer

    def policy(self):
        return self.module.module

    def accumulate(self, sync: bool):
        self.module.set_gradient_accumulation_boundary(sync)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks; the loss is already this rank's share of the global mean
        self.module.backward(loss * self.num_processes, scale_wrt_gas=False)

    def step(self, params: list, max_norm: float, skip: bool) -> float:
        """DeepSpeed clips (gradient_clipping = max_grad_norm) and steps, or skips the update when the
        gradient is not finite; a step to skip for another reason has had its gradient made NaN by the
        loop (poise/training/loop.py), so DeepSpeed skips it too."""
        self.module.step()
        norm = self.module.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def check_replicas_agree(self, params: list) -> None:
        if self.replicated:
            super().check_replicas_agree(params)

    @contextmanager
    def full_model(self):
        if self.stage < 3:
            yield self.policy().model if self.is_main else None
            return
        import deepspeed

        model = self.policy().model
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()} if self.is_main else None
        if not self.is_main:
            yield None
            return
        replica = fill_replica(self._replica, state, self.device, engine="deepspeed")
        try:
            yield replica
        finally:
            empty_params(replica)

    def save_checkpoint(self, run_dir, step, *, tokenizer, scheduler, trainer_state, keep):
        def write(folder: Path) -> None:
            self.module.save_checkpoint(str(folder), tag=TAG, save_latest=False)
            if self.is_main:
                (folder / "engine.json").write_text(json.dumps({"engine": "deepspeed", "stage": self.stage,
                                                                 "processes": self.num_processes}))

        return save_sharded_checkpoint(run_dir, step, write_shards=write, comm=self, tokenizer=tokenizer,
                                       scheduler=scheduler, trainer_state=trainer_state, keep=keep)

    def load_checkpoint(self, ckpt, state, load_weights) -> None:
        meta = _engine_meta(ckpt)
        if meta.get("engine") != "deepspeed":
            raise PoiseError(f"checkpoint {ckpt} was written by distributed: {meta.get('engine', 'ddp')} (or one "
                             "process), not deepspeed: resume it with the engine that wrote it, or start a new "
                             "run in another output_dir.")
        if meta.get("stage") != self.stage or meta.get("processes") != self.num_processes:
            raise PoiseError(f"checkpoint {ckpt} was written by ZeRO-{meta.get('stage')} on {meta.get('processes')} "
                             f"processes; this run is ZeRO-{self.stage} on {self.num_processes}. DeepSpeed resumes "
                             f"its checkpoints on the stage and number of processes that wrote them: launch "
                             f"{meta.get('processes')} processes with deepspeed_stage: {meta.get('stage')}, or "
                             "convert the checkpoint with DeepSpeed's ds_to_universal and start from it.")
        path, _ = self.module.load_checkpoint(str(ckpt / SHARDS), tag=TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise PoiseError(f"DeepSpeed found no checkpoint in {ckpt / SHARDS}: damaged after its checksums were "
                             "taken? Resume from an earlier checkpoint (move this one away) or start a new run.")


def _engine_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / SHARDS / "engine.json").read_text())
    except (OSError, ValueError):
        return {}


def _allowed_classes() -> list:
    import importlib

    out = []
    for module, name in ALLOWED:
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: that class is not there
            continue
    return out


def _safe_load(path: str, map_location=None):
    """DeepSpeed's checkpoint reader, with ``weights_only=True`` and the allow-list instead of any pickle."""
    import pickle

    try:
        with torch.serialization.safe_globals(_allowed_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise PoiseError(f"{path}: refusing to load it, it holds an object outside DeepSpeed's checkpoint classes "
                         f"({_unpickling_reason(e)}): a damaged or foreign checkpoint.") from None


def _unpickling_reason(e: Exception) -> str:
    """The line of torch's weights_only message that names what was refused."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln or "global" in ln.lower()]
    return (named or lines or [type(e).__name__])[0].split(" was not an allowed")[0][:300]
