"""How the processes of a run share the model: one :class:`Engine` per strategy, behind one interface.

The loop and the run state never ask which engine runs; they call it:

=============================  =================================================================
``prepare(module, make_opt)``  wrap the policy module; the optimizer over the engine's parameters
``accumulate(sync)``           context of one micro-batch; gradients are reduced only when ``sync``
``backward(loss)``             ``loss`` is this rank's share of the global mean
``clip_grad_norm(params, m)``  clip to ``m``; the total norm, the same number on every rank
``full_model()``               context: the Hugging Face model with its full weights on the main
                               process (None elsewhere); every rank enters it (a gather when sharded)
``check_replicas_agree(ps)``   after step 1: replicas that differ mean gradients are not synchronised
``save_checkpoint(...)``       every rank calls it; the engine's format, written atomically
``load_checkpoint(...)``       every rank calls it
=============================  =================================================================

* :class:`AccelerateEngine` (``distributed: ddp``, and one process): accelerate's DDP, as before.
  Checkpoints hold the model as a Hugging Face folder and the optimizer in ``training_state.pt``,
  written by the main process.
* :class:`FSDPEngine` (``distributed: fsdp``): FSDP2, ``torch.distributed.fsdp.fully_shard`` applied to
  every decoder layer (the model's ``_no_split_modules``) and to the root (the policy module), over all
  processes (gloo on a CPU, nccl on GPUs). Parameters, gradients and optimizer state are sharded; the
  checkpoint is sharded too (every rank writes its part with torch.distributed.checkpoint). Probes and
  the final model need the whole model on the main process: the engine keeps an empty (meta-device)
  copy of the model there and fills it from a gather of the full state when asked, then empties it
  again; that costs one full copy of the weights in the main process's memory while it lasts.

Gradient accumulation and averaging: the loop scales each micro-batch's loss to its share of the
global mean over every rank's pairs; both engines average gradients over ranks, so ``backward``
multiplies by the number of processes.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from poise.errors import ConfigError, PoiseError
from poise.model.modes import set_training_mode
from poise.training.checkpoint import SHARDS, save_checkpoint, save_sharded_checkpoint

log = logging.getLogger("poise")


class Engine:
    """The interface; see the module docstring."""

    name = "none"
    #: Every rank holds the whole model (a replica), so replicas can be compared after a step.
    replicated = True

    def __init__(self, cfg, accelerator):
        self.cfg = cfg
        self.acc = accelerator
        self.module = None
        self.optimizer = None

    # -- the processes ------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.acc.is_main_process

    @property
    def num_processes(self) -> int:
        return self.acc.num_processes

    @property
    def device(self) -> torch.device:
        return self.acc.device

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every rank."""
        if self.num_processes == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- the model ----------------------------------------------------------------------------------
    def prepare(self, module, make_optimizer):
        raise NotImplementedError

    def policy(self):
        """The policy module (PolicyLogps) without any wrapper; under FSDP its parameters are shards."""
        return self.module

    def accumulate(self, sync: bool):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def clip_grad_norm(self, params: list, max_norm: float) -> float:
        raise NotImplementedError

    def step(self, params: list, max_norm: float, skip: bool) -> float:
        """Clip the gradients to ``max_norm`` and step the optimizer unless the norm is not finite or
        ``skip``; the gradients are cleared either way. Returns the norm before clipping (the same on
        every rank)."""
        norm = self.clip_grad_norm(params, max_norm)
        if math.isfinite(norm) and not skip:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @contextmanager
    def full_model(self):
        yield self.policy().model if self.is_main else None

    def check_replicas_agree(self, params: list) -> None:
        check_replicas(self.acc, params)

    # -- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self, run_dir: Path, step: int, *, tokenizer, scheduler, trainer_state: dict[str, Any],
                        keep: int) -> Path | None:
        raise NotImplementedError

    def load_checkpoint(self, ckpt: Path, state: dict[str, Any], load_weights) -> None:
        raise NotImplementedError


def check_replicas(acc, params: list) -> None:
    """After the first step every rank must hold the same weights, else gradients are not synced."""
    with torch.no_grad():
        s = torch.stack([p.double().sum() for p in params]).sum()[None].to(acc.device)
    allv = acc.gather(s)
    if not torch.allclose(allv, allv[0].expand_as(allv), rtol=1e-6, atol=0):
        raise ConfigError("the processes hold different weights after the first step: gradients are not "
                          "synchronised, each rank would train its own copy. Launch with accelerate "
                          "launch or torchrun so that poise sees every process.")


class AccelerateEngine(Engine):
    """One process, or DDP through accelerate (``distributed: ddp``)."""

    def __init__(self, cfg, accelerator, name: str = "ddp"):
        super().__init__(cfg, accelerator)
        self.name = name

    def prepare(self, module, make_optimizer):
        optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad])
        self.module, self.optimizer = self.acc.prepare(module, optimizer)
        return self.module, self.optimizer

    def policy(self):
        return self.acc.unwrap_model(self.module)

    def accumulate(self, sync: bool):
        return nullcontext() if sync else self.acc.no_sync(self.module)

    def backward(self, loss: torch.Tensor) -> None:
        # DDP averages gradients over ranks; the loss is already a share of the global mean.
        self.acc.backward(loss * self.acc.num_processes)

    def clip_grad_norm(self, params: list, max_norm: float) -> float:
        return float(self.acc.clip_grad_norm_(params, max_norm))

    def save_checkpoint(self, run_dir, step, *, tokenizer, scheduler, trainer_state, keep):
        if not self.is_main:
            return None
        return save_checkpoint(run_dir, step, model=self.policy().model, tokenizer=tokenizer,
                               optimizer=self.optimizer, scheduler=scheduler, trainer_state=trainer_state, keep=keep)

    def load_checkpoint(self, ckpt, state, load_weights) -> None:
        refuse_other_engine(ckpt, self.name)
        if (ckpt / SHARDS).is_dir():  # written sharded (distributed: fsdp): read whole on every rank
            from poise.training import sharded

            sharded.load(self.policy(), self.optimizer, ckpt / SHARDS)
            return
        load_weights(ckpt / "model")
        self.optimizer.load_state_dict(state["optimizer"])


class FSDPEngine(Engine):
    """FSDP2 (``distributed: fsdp``): ``fully_shard`` on each decoder layer and on the root."""

    name = "fsdp"
    replicated = False

    def __init__(self, cfg, accelerator):
        super().__init__(cfg, accelerator)
        self._replica = None  # the main process's empty copy of the model, filled by full_model()

    def prepare(self, module, make_optimizer):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        model = module.model
        units = [m for m in model.modules() if type(m).__name__ in set(getattr(model, "_no_split_modules", None) or ())]
        if not units:
            raise ConfigError(f"distributed: fsdp shards a model by its decoder layers, but "
                              f"{type(model).__name__} declares none (_no_split_modules); use distributed: ddp.")
        if self.is_main:  # an empty copy (no memory), filled with the full weights when asked for
            self._replica = empty_copy(model)
        mesh = init_device_mesh(self.device.type, (self.num_processes,))
        kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": self.cfg.fsdp_reshard_after_forward}
        mp = self.acc.mixed_precision
        if mp == "bf16":
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        elif mp == "fp16":
            raise ConfigError("distributed: fsdp trains with mixed_precision bf16 or no; fp16 needs a loss scaler "
                              "that poise's FSDP engine does not run. Set mixed_precision: bf16 (or no).")
        if self.cfg.fsdp_cpu_offload:
            kw["offload_policy"] = CPUOffloadPolicy()
        for unit in units:
            fully_shard(unit, **kw)
        fully_shard(module, **kw)
        self.module = module
        self.optimizer = make_optimizer([p for p in module.parameters() if p.requires_grad])
        log.info("fsdp: %d processes, %d decoder layers sharded and the root (reshard_after_forward=%s, "
                 "cpu_offload=%s, mixed_precision=%s)", self.num_processes, len(units),
                 self.cfg.fsdp_reshard_after_forward, self.cfg.fsdp_cpu_offload, mp)
        return self.module, self.optimizer

    def accumulate(self, sync: bool):
        self.module.set_requires_gradient_sync(sync)
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # FSDP averages the reduce-scattered gradients over ranks; the loss is a share of the global mean.
        (loss * self.num_processes).backward()

    def clip_grad_norm(self, params: list, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def check_replicas_agree(self, params: list) -> None:
        """Nothing to compare: each parameter is held once, in shards (no replicas)."""

    @contextmanager
    def full_model(self):
        from poise.training import sharded

        state = sharded.full_model_state(self.module)  # a gather: every rank takes part
        if not self.is_main:
            yield None
            return
        state = {k.removeprefix("model."): v for k, v in state.items()}
        model = fill_replica(self._replica, state, self.device, engine="fsdp")
        try:
            yield model
        finally:
            empty_params(model)  # the full copy is freed again

    def save_checkpoint(self, run_dir, step, *, tokenizer, scheduler, trainer_state, keep):
        from poise.training import sharded

        return save_sharded_checkpoint(
            run_dir, step, write_shards=lambda folder: sharded.save(self.module, self.optimizer, folder), comm=self,
            tokenizer=tokenizer, scheduler=scheduler, trainer_state=trainer_state, keep=keep)

    def load_checkpoint(self, ckpt, state, load_weights) -> None:
        from poise.training import sharded

        refuse_other_engine(ckpt, self.name)
        if not (ckpt / SHARDS).is_dir():
            raise PoiseError(f"checkpoint {ckpt} holds a whole model (written by distributed: ddp or one process), "
                             "not shards: resume it with distributed: ddp (or auto), or start a new run in "
                             "another output_dir with distributed: fsdp.")
        sharded.load(self.module, self.optimizer, ckpt / SHARDS)


def _meta(p: torch.nn.Parameter) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)


def empty_copy(model):
    """A copy of ``model`` whose parameters are on the meta device (no memory; buffers are copied)."""
    memo = {id(p): _meta(p) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def fill_replica(model, state: dict[str, torch.Tensor], device, *, engine: str):
    """``model`` (an :func:`empty_copy`) with the gathered full ``state`` assigned to it, on ``device``, in the
    policy's training mode (dropout off: the probes on it measure what the training step computes)."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    tied = set(getattr(model, "_tied_weights_keys", None) or []) | {"lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise PoiseError(f"{engine}: the gathered state does not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return set_training_mode(model.to(device))


def empty_params(model) -> None:
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.device.type != "meta":
                m._parameters[name] = _meta(p)


def refuse_other_engine(ckpt: Path, engine: str) -> None:
    """A checkpoint in DeepSpeed's format resumes only under distributed: deepspeed."""
    meta = ckpt / SHARDS / "engine.json"
    if meta.is_file():
        other = json.loads(meta.read_text()).get("engine", "?")
        raise PoiseError(f"checkpoint {ckpt} was written by distributed: {other}, and this run is "
                         f"{engine}{' (one process)' if engine == 'none' else ''}: resume it with distributed: "
                         f"{other} on the same number of processes, or start a new run in another output_dir.")
