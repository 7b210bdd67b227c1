"""Everything a run needs before its first step, built once into one typed value (:class:`RunState`):
accelerator, data, model, reference, task (with its objective), optimizer, schedule. Kept apart from
the loop so that the loop reads top to bottom."""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from poise import fsutil
from poise.data import sft_sequences
from poise.diagnostics.imbalance import Probe, plan_probes
from poise.errors import ConfigError
from poise.model.load import (
    add_lora,
    check_chat_template,
    check_tokenizer,
    check_vocabulary_fits,
    load_model,
    resolve_source,
    updates_round_away,
)
from poise.model.modes import enable_activation_checkpointing, eval_mode, set_training_mode
from poise.model.reference import cached_reference_sums
from poise.model.shared_prefix import choose_layout, pairs_reason
from poise.training.config import TrainConfig, from_dict
from poise.training.engines import AccelerateEngine, Engine, FSDPEngine
from poise.training.launch import check_launch
from poise.training.preflight import Inputs, check_inputs
from poise.training.runlog import MetricAccumulator
from poise.training.schedule import Schedule, lr_lambda
from poise.training.tasks import PolicyLogps, PreferenceTask, SFTTask, group_lengths

log = logging.getLogger("poise")


@dataclass
class RunState:
    """A run, built once by :func:`build_run`; the loop reads it and changes only ``state`` (the task's
    explicit state: set by the calibration step or a resume) and what the optimizer owns."""

    cfg: TrainConfig
    accelerator: Any
    run_dir: Path
    tokenizer: Any
    model: Any  # the Hugging Face model (a PeftModel with LoRA), unwrapped
    module: Any  # PolicyLogps, prepared by the engine (DDP-wrapped, or FSDP-sharded in place)
    optimizer: Any
    scheduler: Any
    schedule: Schedule
    task: PreferenceTask | SFTTask
    eval_task: PreferenceTask | None = None
    trainable: list = field(default_factory=list)
    probe: Probe | None = None  # preference stages with diagnostics on
    probe_ref: Any = None  # (P, 2) reference sums of the probe pairs
    state: dict[str, Any] = field(default_factory=dict)  # the task's explicit state (balancers)
    engine: Any = None  # how the processes share the model (poise/training/engines.py)
    #: the steps the probes run at (0: before step 1), from :func:`poise.diagnostics.imbalance.plan_probes`
    probe_steps: frozenset[int] = frozenset()

    def probe_metrics(self) -> dict[str, float]:
        """Squeezing probes and parameter-space gradient norms on the probe batch, measured on the main
        process on the whole model (every rank calls this: a sharded model is gathered)."""
        if self.probe is None:
            return {}
        with self.engine.full_model() as model, self.accelerator.autocast():  # the training precision
            if model is None:
                out = {}
            else:
                trainable = [p for p in model.parameters() if p.requires_grad]
                out = self.probe.measure(model, self.task.objective, self.state, trainable,
                                         self.accelerator.device, self.probe_ref)
        return out

    def unwrapped_model(self):
        """The Hugging Face model as this process holds it (its parameters are shards under FSDP)."""
        return self.engine.policy().model

    def load_checkpoint(self, ckpt: Path, state: dict[str, Any]) -> None:
        """The model's and optimizer's state from checkpoint ``ckpt`` in the engine's format (a Hugging
        Face folder, or every rank's shards); ``state`` is its training_state.pt. Every rank calls it."""
        self.engine.load_checkpoint(ckpt, state, self.load_model_weights)

    def resolved_config(self) -> TrainConfig:
        """The config with what calibration decided (``gate_tau: auto`` -> the threshold in use), so that
        ``poise eval``/``poise report`` rebuild exactly the objective that trained, never recalibrating."""
        values = self.task.calibrated_values(self.state)
        if not values:
            return self.cfg
        return from_dict({**self.cfg.to_dict(), **values}, source="resolved config")

    def load_model_weights(self, folder: Path) -> None:
        """The checkpoint's weights into the model; a checkpoint of another model (other shapes, another
        vocabulary, other or missing tensors, LoRA against full weights) is a ConfigError with the fix."""
        from safetensors.torch import load_file

        model = self.unwrapped_model()
        lora = hasattr(model, "peft_config")
        files = [folder / "adapter_model.safetensors"] if lora else sorted(folder.glob("*.safetensors"))
        if not files or not all(f.is_file() for f in files):
            other = "full weights" if lora else "LoRA adapters"
            raise self._other_model(folder, f"it holds no {'adapter' if lora else 'model'} weights (a run with "
                                            f"{other}?)")
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        own = model.state_dict() if not lora else {}
        shapes = [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
        if shapes:
            raise self._other_model(folder, f"other tensor shapes ({'; '.join(shapes[:2])})")
        try:
            if lora:
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(model, state)
                return
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # size mismatches that the shapes above did not name (adapters)
            raise self._other_model(folder, str(e).splitlines()[0]) from None
        tied = set(getattr(model, "_tied_weights_keys", None) or []) | {"lm_head.weight"}
        if unexpected or set(missing) - tied:
            raise self._other_model(folder, f"missing {missing[:3]}, unexpected {unexpected[:3]}")

    def _other_model(self, folder: Path, why: str) -> ConfigError:
        return ConfigError(f"checkpoint {folder} does not match the model {self.cfg.model} ({why}): the run was "
                           "started with another model or LoRA setting. Resume with the run's own model (see "
                           f"{self.run_dir / 'config.yaml'}), or start a new run in another output_dir.")

    def progress(self, total: int, start: int):
        return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                    disable=not self.accelerator.is_main_process)

    def check_replicas_agree(self) -> None:
        """After the first step every rank must hold the same weights, else gradients are not synced
        (an engine that shards the model holds no replicas to compare)."""
        self.engine.check_replicas_agree(self.trainable)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out preference metrics (objective metrics on eval_file), prefixed eval/."""
        task = self.eval_task
        if task is None:
            return {}
        acc = MetricAccumulator()
        world, size = self.accelerator.num_processes, self.cfg.micro_batch_size
        # one process's micro-batches, dealt out to the ranks in turn: the same metrics for any number of
        # processes. Every rank runs as many micro-batches as rank 0 (a sharded model's forward is a
        # collective): a rank with fewer scores pair 0 instead and counts it with weight 0.
        batches = [list(range(i, min(i + size, len(task)))) for i in range(0, len(task), size)]
        mine = batches[self.accelerator.process_index::world]
        rounds = -(-len(batches) // world)
        with eval_mode(self.module):
            for j in tqdm(range(rounds), desc="eval", unit="batch", leave=False, dynamic_ncols=True,
                          disable=not self.accelerator.is_main_process or rounds < 2):
                mb = mine[j] if j < len(mine) else []
                work = mb or [0]
                with self.accelerator.autocast():
                    _, m, _ = task.loss(self.module, work, self.accelerator.device, state=self.state,
                                        num_items=len(work), num_tokens=task.norm_tokens(work))
                acc.add(m, len(mb))
        return {f"eval/{k}": v for k, v in acc.reduce(self.accelerator).items()}

    def save_final_model(self) -> Path:
        """The trained model in Hugging Face format (safetensors), LoRA merged, with its tokenizer."""
        out = self.run_dir / "model"
        if self.accelerator.is_main_process:
            log.info("saving the model to %s", out)
        self.accelerator.wait_for_everyone()
        with self.engine.full_model() as model:  # gathered onto the main process when sharded
            if model is not None:
                if hasattr(model, "merge_and_unload"):
                    model = model.merge_and_unload()
                write_final_model(out, model, self.tokenizer)
        self.accelerator.wait_for_everyone()
        return out


def write_final_model(out: Path, model, tokenizer) -> None:
    """Write ``out`` (the final model folder) atomically: into a temporary sibling folder, flushed, then
    renamed over ``out`` (an old ``out`` is removed only after the rename). A failure to write (a full
    disk, a read-only folder, torch's or safetensors' writer failing) is a PoiseError that keeps the old
    folder and the checkpoints, and leaves no temporary folder."""
    from poise.training.checkpoint import _kill_point

    fsutil.remove_stale(out.parent, out.name)  # what a run killed while saving its final model left
    try:
        with fsutil.atomic_folder(out, before_rename=lambda: _kill_point("final_model", 0)) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    except Exception as e:
        if not fsutil.is_write_failure(e):
            raise
        raise fsutil.write_error("the final model", out, e,
                                 kept="The checkpoints (and any previous model there) are kept.",
                                 then="resume with resume=true: the run ends by saving the model again") from e


def make_accelerator(cfg: TrainConfig):
    """accelerate's Accelerator: the processes (device, gather, reduce) of a launch that runs what the
    config asks for (poise/training/launch.py: a launch form that would run something else is refused)."""
    from accelerate import Accelerator

    from poise.training.launch import accelerate_env, check_launch, init_distributed, resolve_mixed_precision
    from poise.training.zero import set_accelerator_env

    engine = check_launch(cfg)
    set_accelerator_env()  # DeepSpeed, when installed, is imported by transformers/accelerate: the CPU one here
    init_distributed(cfg)  # the process group, its rendezvous bounded by distributed_timeout
    mp = resolve_mixed_precision(cfg)
    # Without a GPU, accelerate sets up multi-process (gloo) training only when told cpu=True.
    from accelerate.state import AcceleratorState

    # accelerate keeps one precision per process: a second run in this process (the API, a sweep) with
    # another mixed_precision would be refused. The process state (devices, the group) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    with accelerate_env(engine):  # an engine poise runs itself is not set up by accelerate a second time
        acc = Accelerator(cpu=cfg.cpu or not torch.cuda.is_available(), mixed_precision=mp)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and acc.num_processes != world:
        raise ConfigError(f"launched with WORLD_SIZE={world} but accelerate sees {acc.num_processes} process: "
                          "gradients would not be synchronised and each rank would train its own copy. "
                          "Launch with `accelerate launch` or `torchrun` without disabling distribution.")
    per_rank = cfg.batch_size // acc.num_processes
    if cfg.batch_size % acc.num_processes or per_rank % cfg.micro_batch_size:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of micro_batch_size x processes "
                          f"({cfg.micro_batch_size} x {acc.num_processes}).")
    return acc


def _prepare_run_dir(cfg: TrainConfig) -> Path:
    """The run folder, locked for this run and checked (poise/training/runfolder.py): a fresh run into a
    folder holding a run's output, a second run into a folder in use, a resume with no checkpoint that
    verifies or with a changed config are refused here, before anything is written."""
    from poise.training.runfolder import prepare

    return prepare(cfg)


def load_checked_model(cfg: TrainConfig, tokenizer, texts, device):
    """The config's model, loaded and checked against its tokenizer and chat template (no cache)."""
    log.info("loading the model %s%s", cfg.model, f" ({cfg.gguf_file})" if cfg.gguf_file else "")
    model = load_model(cfg.model, gguf_file=cfg.gguf_file, dtype=cfg.dtype, device=device,
                       trust_remote_code=cfg.trust_remote_code)
    folder, _ = resolve_source(cfg.tokenizer or cfg.model, cfg.gguf_file, key="tokenizer" if cfg.tokenizer else "model")
    saved = folder if Path(folder).is_dir() and cfg.tokenizer_class == "auto" else None
    check_tokenizer(tokenizer, model, texts, source=cfg.model, folder=saved)
    check_chat_template(tokenizer, source=cfg.model)
    model.config.use_cache = False
    return model


def _model(cfg: TrainConfig, tokenizer, texts, device):
    model = load_checked_model(cfg, tokenizer, texts, device)
    checkpointing = cfg.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", False)
    if cfg.gradient_checkpointing and not checkpointing:
        log.warning("gradient_checkpointing: %s (%s) does not support activation checkpointing; training without "
                    "it (set gradient_checkpointing: false to silence this)", cfg.model, type(model).__name__)
    if checkpointing:
        enable_activation_checkpointing(model)
    if cfg.lora_r > 0:
        if checkpointing:
            model.enable_input_require_grads()
        model = add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                         target_modules=cfg.lora_target_modules)
    return set_training_mode(model.to(device))


def _load_reference(cfg: TrainConfig, tokenizer, device):
    """The separate reference model (``reference_model``), loaded once, or None. Its tokenizer was compared
    with the policy's before any model loaded (preflight); its embedding must hold every token id."""
    if cfg.reference_model is None:
        return None
    log.info("loading the reference model %s", cfg.reference_model)
    ref = load_model(cfg.reference_model, dtype=cfg.dtype, device=device, trust_remote_code=cfg.trust_remote_code,
                     key="reference_model")
    check_vocabulary_fits(tokenizer, ref.get_input_embeddings().weight.shape[0], key="reference_model",
                          name=cfg.reference_model, source=" (rows of its embedding)")
    return ref.to(device)


def needed_pairs(cfg: TrainConfig, pairs, objective) -> list[int] | None:
    """The training pairs a run that stops early (``max_steps``) uses: its steps' batches, the first
    epoch's when the objective calibrates, and the probe pairs drawn from the training data; None: all."""
    if cfg.max_steps is None:
        return None
    sched = Schedule(group_lengths(pairs, cfg.batch_grouping), cfg.batch_size, cfg.seed, cfg.epochs, cfg.max_steps)
    steps = sched.per_epoch if objective.needs_calibration(objective.init_state()) else 0
    used = {i for s in range(max(sched.total, steps)) for i in sched.batch(s)}
    if cfg.diagnostics and cfg.eval_file is None:
        used |= set(range(min(cfg.probe_pairs, len(pairs))))
    return None if len(used) == len(pairs) else sorted(used)


def _reference(cfg: TrainConfig, model, ref, pairs, tokenizer, device, layout: str,
               needed: list[int] | None = None) -> dict[str, Any]:
    """Keyword arguments of PreferenceTask for the reference (``ref``: the separate reference model or
    None for the initial policy), precomputed (for the ``needed`` pairs; None: all) or live."""
    disable = ref is None and cfg.lora_r > 0
    ref = model if ref is None else ref
    ref_kw = dict(pad_token_id=tokenizer.pad_token_id, batch_size=cfg.micro_batch_size * 2,
                  chunk_size=cfg.chunk_size, device=device, disable_adapters=disable, layout=layout)
    if cfg.precompute_reference:
        sums, path, hit = cached_reference_sums(ref, pairs, cache_dir=cfg.cache_dir, needed=needed, **ref_kw)
        log.info("reference log-probs %s %s%s", "reused from" if hit else "computed and cached in", path,
                 "" if needed is None else f" ({len(needed)} of {len(pairs)} pairs: those the run uses)")
        return {"ref_sums": sums, "ref_cache": (ref, ref_kw)}
    if ref is model and not disable:
        ref = copy.deepcopy(model)
    ref.eval().requires_grad_(False)
    return {"ref_model": ref, "ref_disable_adapters": disable}


def _eval_task(cfg: TrainConfig, data, tokenizer, objective, ref_info, layout: str) -> PreferenceTask | None:
    if data is None or cfg.stage == "sft":
        return None
    if pairs_reason(data.pairs):
        layout = "separate"  # the train pairs chose the layout; eval pairs without a prompt cannot share
    kw = {k: v for k, v in ref_info.items() if k in ("ref_model", "ref_disable_adapters")}
    if objective.needs_reference and "ref_cache" in ref_info:
        ref, ref_kw = ref_info["ref_cache"]
        kw["ref_sums"] = cached_reference_sums(ref, data.pairs, cache_dir=cfg.cache_dir,
                                               **{**ref_kw, "layout": layout})[0]
    return PreferenceTask(data.pairs, objective, tokenizer.pad_token_id, chunk_size=cfg.chunk_size,
                          layout=layout, **kw)


def _probe(cfg: TrainConfig, others, tokenizer, task, eval_task, device) -> tuple[Probe | None, Any]:
    """The probe batch; ``others``: the probe file's (prompt, response) ids, read and tokenized as the
    training rows are by the preflight (any training format: {prompt, completion}, messages, pairs)."""
    if not cfg.diagnostics or not isinstance(task, PreferenceTask):
        return None, None
    source = eval_task if eval_task is not None else task
    idx = list(range(min(cfg.probe_pairs, len(source))))
    probe = Probe([source.pairs[i] for i in idx], tokenizer.pad_token_id, chunk_size=cfg.chunk_size, others=others,
                  micro_batch_size=cfg.micro_batch_size)
    return probe, source.ref_sums_for(idx, device)


def _probe_plan(cfg: TrainConfig, task, probe: Probe | None, schedule: Schedule) -> frozenset[int]:
    """The steps the probes run at: :func:`plan_probes` with a probe's work over a training step's (the
    positions each computes, a forward and backward counting 3), said in the log."""
    if probe is None:
        return frozenset()
    shared = task.layout == "shared"  # one row per pair, the prompt once
    per_pair = sum((1 if shared else 2) * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                   for p in task.pairs) / max(len(task.pairs), 1)
    ratio = probe.work() / (3.0 * per_pair * min(cfg.batch_size, len(task.pairs)))
    steps = plan_probes(schedule.total, cfg.diagnostics_steps, cfg.diagnostics_budget, ratio)
    budget = f"diagnostics_budget {cfg.diagnostics_budget:g} of {schedule.total} steps"
    if steps:
        shown = ", ".join(map(str, steps[:12])) + (", ..." if len(steps) > 12 else "")
        log.info("probes at steps %s (%d; each about %.1f training steps of work; %s)", shown, len(steps), ratio,
                 budget if cfg.diagnostics_budget else "diagnostics_budget 0: every diagnostics_steps")
    else:
        log.warning("no probe fits %s (a probe is about %.1f training steps of work): the every-step diagnostics "
                    "are logged, the probes (probe/*, diag/param_grad_*) are not; set diagnostics_budget: 0 to "
                    "probe every diagnostics_steps anyway", budget, ratio)
    return frozenset(steps)


def make_engine(cfg: TrainConfig, accelerator, name: str) -> Engine:
    """The engine ``name`` (from :func:`poise.training.launch.check_launch`) over ``accelerator``'s processes."""
    if name == "fsdp":
        return FSDPEngine(cfg, accelerator)
    if name == "deepspeed":
        from poise.training.zero import DeepSpeedEngine

        return DeepSpeedEngine(cfg, accelerator)
    return AccelerateEngine(cfg, accelerator, name)


def make_optimizer(cfg: TrainConfig, params: list) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all tensors: 4x faster on SmolLM2 on a CPU) where torch has it."""
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas),
                             weight_decay=cfg.weight_decay, fused=fused or None)


def build_run(cfg: TrainConfig) -> RunState:
    """Check, load and build everything a run needs. The order: every check that needs no model weights
    (preflight: paths, packages, data files and their rows, folders, tokenizers, the tokenized data), then
    the model and the checks that need it, the reference, the tasks; the run folder is created last, so
    that no bad input leaves one behind."""
    acc = make_accelerator(cfg)
    torch.manual_seed(cfg.seed)
    inputs: Inputs = check_inputs(cfg, network=True)
    tokenizer, data = inputs.tokenizer, inputs.train
    for note in inputs.notes:
        log.info("%s", note)
    texts = [r.data.get("chosen") for r in inputs.train_rows[:64] if isinstance(r.data.get("chosen"), str)]
    model = _model(cfg, tokenizer, texts, acc.device)
    warning = updates_round_away(model, cfg.learning_rate)
    if warning:
        log.warning("%s", warning)
    ref_info: dict[str, Any] = {}
    layout = "separate"
    objective = None
    if cfg.stage == "sft":
        task: PreferenceTask | SFTTask = SFTTask(sft_sequences(data, cfg.extended_sft), tokenizer.pad_token_id)
    else:
        objective = cfg.build_objective()
        ref = _load_reference(cfg, tokenizer, acc.device) if objective.needs_reference else None
        # a separate reference must qualify for the shared layout too
        with acc.autocast():  # the layout check and the reference in the training precision
            layout = choose_layout(cfg.pair_layout, [model] + ([ref] if ref is not None else []), data.pairs,
                                   tokenizer.pad_token_id, chunk_size=cfg.chunk_size)
            if objective.needs_reference:
                ref_info = _reference(cfg, model, ref, data.pairs, tokenizer, acc.device, layout,
                                      needed_pairs(cfg, data.pairs, objective))
        task = PreferenceTask(data.pairs, objective, tokenizer.pad_token_id, chunk_size=cfg.chunk_size,
                              diagnostics=cfg.diagnostics, layout=layout, grouping=cfg.batch_grouping,
                              **{k: v for k, v in ref_info.items() if k != "ref_cache"})
    with acc.autocast():
        eval_task = _eval_task(cfg, inputs.eval, tokenizer, objective, ref_info, layout)
    probe, probe_ref = _probe(cfg, inputs.probe, tokenizer, task, eval_task, acc.device)
    stats = set(objective.needs_stats) | ({"sum_p2"} if cfg.diagnostics else set()) if objective else set()
    module = PolicyLogps(model, stats=sorted(stats), chunk_size=cfg.chunk_size)
    engine = make_engine(cfg, acc, check_launch(cfg))
    # the optimizer is built over the engine's parameters (FSDP replaces them by shards)
    module, optimizer = engine.prepare(module, lambda params: make_optimizer(cfg, params))
    schedule = Schedule(task.lengths, cfg.batch_size, cfg.seed, cfg.epochs, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, schedule.total))
    run_dir = _prepare_run_dir(cfg)  # last: every input is known good, so a bad one leaves no run folder
    if acc.is_main_process:
        (run_dir / "data_summary.json").write_text(json.dumps({"train": data.summary()}))
    return RunState(cfg, acc, run_dir, tokenizer, model, module, optimizer, scheduler, schedule, task, eval_task,
                    [p for p in module.parameters() if p.requires_grad], probe, probe_ref, task.init_state(),
                    engine, _probe_plan(cfg, task, probe, schedule))
