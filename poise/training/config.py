"""Typed, strict training configs.

A config is a flat YAML mapping: the trainer's own fields (below, each with its type, default and
doc) plus the hyperparameters of the chosen method (``beta``, ``ada_clip``, ``gate_tau``, ...; see
``poise ls`` and docs/methods.md). Every key is checked when the config is read: an unknown key, a
wrong type, or a hyperparameter that the chosen method does not take is a ConfigError that names the
key and suggests the fix. The field docs here are the one source for ``poise train --help`` and the
generated docs/config.md.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from poise.errors import ConfigError
from poise.params import suggest


def F(default: Any, doc: str, group: str, **kw: Any) -> Any:
    """A config field with its doc and docs group."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc, "group": group})
    return field(default=default, metadata={"doc": doc, "group": group, **kw})


@dataclass
class TrainConfig:
    # -- model ---------------------------------------------------------------------------------------
    model: str = F("", "Policy to train: a hub name, a local folder written by save_pretrained, or a "
                   "GGUF file (dequantised on load). Required.", "model")
    tokenizer: str | None = F(None, "Tokenizer to load, when it is not stored with the model.", "model")
    tokenizer_class: Literal["auto", "PreTrainedTokenizerFast"] = F(
        "auto", "auto: AutoTokenizer picks the class from the folder's config; PreTrainedTokenizerFast: "
        "load the saved tokenizer.json as it is (the fix when the two disagree).", "model")
    gguf_file: str | None = F(None, "GGUF file name inside `model` (a folder or hub repo) to load.", "model")
    trust_remote_code: bool = F(False, "Run model code shipped with a checkpoint. Off unless you trust "
                                "the source.", "model")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = F(
        "auto", "Weights' dtype. auto: float32 on every device (fp32 master weights, which the optimizer "
        "updates; the forward runs in mixed_precision). bfloat16/float16: pure half-precision weights, which "
        "round away small updates (at 5e-7, about 1% of bf16 weights change over 10 AdamW steps): poise warns "
        "when learning_rate is below half the spacing at the median weight.", "model")
    gradient_checkpointing: bool = F(
        True, "Recompute each layer's activations in the backward pass instead of keeping them (TRL's default "
        "too): in the SmolLM2-135M benchmark (batch 4, bf16 autocast, CPU) peak memory 3.5 GB instead of 4.4 "
        "GB (0.55x TRL's instead of 0.68x) for 22% more step time (docs/performance.md). false: faster where "
        "memory allows (the benchmark's 'poise fastest'). A model that cannot checkpoint trains without it, "
        "with a warning.", "model")
    lora_r: int = F(0, "LoRA rank; 0 trains every weight. With LoRA the reference is the base model "
                    "with its adapters disabled.", "model")
    lora_alpha: float = F(16.0, "LoRA scaling alpha.", "model")
    lora_dropout: float = F(0.0, "Dropout on the LoRA branch.", "model")
    lora_target_modules: list[str] | str = F("all-linear", "Modules that get adapters: a list of names "
                                             "or 'all-linear'.", "model")
    # -- reference -----------------------------------------------------------------------------------
    reference_model: str | None = F(None, "Frozen reference: a hub name or folder. Default: the initial "
                                    "policy (or, with LoRA, the base model with adapters disabled).",
                                    "reference")
    precompute_reference: bool = F(True, "Compute the reference's log-probs once before training and "
                                   "cache them on disk; the reference model is then freed.", "reference")
    cache_dir: str = F("~/.cache/poise", "Where precomputed reference log-probs are cached, keyed by "
                       "model, data and tokenization settings, and reused by later runs.", "reference")
    # -- data ----------------------------------------------------------------------------------------
    train_file: str = F("", "Preference data: JSONL, JSON, Parquet or CSV file, a save_to_disk folder, "
                        "or a hub dataset name. Required.", "data")
    eval_file: str | None = F(None, "Held-out preference data in the same formats.", "data")
    split: str = F("train", "Split to read from a dataset folder or hub dataset.", "data")
    columns: dict[str, str] = F({}, "Column mapping, e.g. {prompt: question, chosen: good, rejected: bad}.",
                                "data")
    max_length: int = F(1024, "Longest prompt + completion in tokens; completions are cut at the end.",
                        "data")
    max_prompt_length: int = F(512, "Longest prompt in tokens; longer prompts are cut at the start "
                               "(the end, nearest the response, is kept).", "data")
    prompt_truncation: Literal["keep_end", "error"] = F(
        "keep_end", "keep_end: cut long prompts at the start; error: treat them as bad rows.", "data")
    on_bad_row: Literal["error", "skip"] = F("error", "error: stop at the first bad row with its file, "
                                             "row and field; skip: drop bad rows and log a count.", "data")
    # -- method --------------------------------------------------------------------------------------
    stage: Literal["preference", "sft"] = F("preference", "preference: train the method; sft: "
                                            "supervised fine-tuning on the chosen completions.", "method")
    extended_sft: bool = F(False, "With stage: sft, train on both chosen and rejected completions "
                           "(extended SFT, arXiv 2407.10490) to build a reference.", "method")
    method: str = F("dpo", "A preset (adadpo, gate-dpo, balanced-dpo, ...) or a base loss (dpo, ipo, "
                    "simpo, ...); see `poise ls`.", "method")
    balance: list[str] = F([], "Balancers added to a base loss, e.g. [gate]; presets include theirs.",
                           "method")
    # -- optimisation --------------------------------------------------------------------------------
    output_dir: str = F("runs/poise", "Run folder: checkpoints, metrics.jsonl, the final model.", "training")
    batch_size: int = F(8, "Pairs per optimizer step, over all processes and accumulation steps.",
                        "training")
    micro_batch_size: int = F(8, "Pairs per forward pass on one process; batch_size must be a multiple "
                              "of micro_batch_size x processes (the rest is gradient accumulation).",
                              "training")
    epochs: float = F(1.0, "Passes over the training data (fractions allowed).", "training")
    max_steps: int | None = F(None, "Stop after this many optimizer steps (overrides epochs).", "training")
    learning_rate: float = F(5e-7, "Peak learning rate of AdamW.", "training")
    weight_decay: float = F(0.0, "AdamW weight decay.", "training")
    adam_betas: list[float] = F([0.9, 0.999], "AdamW betas.", "training")
    scheduler: Literal["linear", "cosine", "constant"] = F("cosine", "Learning-rate schedule after warmup.",
                                                           "training")
    warmup_ratio: float = F(0.1, "Fraction of the steps spent warming up linearly from 0.", "training")
    max_grad_norm: float | None = F(1.0, "Clip the gradient norm to this; null disables clipping.",
                                    "training")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = F(
        "auto", "Autocast precision of the forward and backward (weights and optimizer stay in dtype). auto: "
        "bf16 on a GPU that supports it and on a CPU that computes bf16 natively (AVX512_BF16 or AMX: 1.3-1.7x "
        "faster than fp32 there, docs/performance.md), else no (fp32). The reference pass, calibration, "
        "evaluation and the probes run in the same precision; the layout check runs in the weights' precision "
        "(a layout is exact or not whatever the precision, and bf16 rounds the two layouts differently). POISE_CPU_BF16=0 in the "
        "environment makes auto use fp32 on every CPU.",
        "training")
    seed: int = F(0, "Seed of the data order, initialisation of adapters and dropout.", "training")
    chunk_size: int = F(1024, "Completion tokens per chunk of the output head (memory vs speed).",
                        "training")
    batch_grouping: Literal["tokens", "length"] = F(
        "tokens", "What the length-grouped batches are grouped by. tokens: a pair's prompt + chosen + rejected "
        "(the shared layout's row: its rows pad about 0.5% of the positions computed on variable-length data); "
        "length: the longer of prompt + chosen and prompt + rejected (the two-row layout's row; the grouping "
        "of poise before version 0.1's issue 15, kept so that earlier figures reproduce exactly; the shared rows "
        "then pad about 9%). Both layouts see the same batches either way.", "training")
    pair_layout: Literal["auto", "shared", "separate"] = F(
        "auto", "shared: one row per pair, prompt + chosen + rejected, with a 4D attention mask, so the "
        "prompt runs once (same log-probs, less time and memory); separate: two rows per pair, as in TRL; "
        "auto: shared when the model qualifies (Llama, Mistral, Qwen2/3, OLMo2, Phi-3, Granite with sdpa or "
        "eager attention, no sliding window) and both layouts agree on the first pairs.", "training")
    # -- diagnostics ---------------------------------------------------------------------------------
    diagnostics: bool = F(True, "Log the imbalance every step (logit-space gradient norms of each branch, "
                          "sigma(-u), likelihood displacement) and, every diagnostics_steps, parameter-space "
                          "gradient norms and squeezing probes on a fixed probe batch.", "diagnostics")
    diagnostics_steps: int = F(10, "Probe every this many steps (0: only at the start and the end), as far as "
                               "diagnostics_budget allows.", "diagnostics")
    diagnostics_budget: float = F(
        0.03, "The largest share of the run's training work the probes may add, a probe's work counted against "
        "a training step's (positions computed; the log says how many steps a probe costs). The candidates are "
        "the start, every diagnostics_steps and the end; when n = floor(budget x steps / a probe's cost) is "
        "smaller than their number, the probes run at the end (n = 1), or at the start, the end and n - 2 "
        "steps spread between (n >= 2), or not at all (n = 0: a warning says so). The plan follows from the "
        "config and the data only, so every machine and a resumed run probe at the same steps. 0: no budget, "
        "every candidate. The every-step diagnostics are not counted (their cost was within the noise of "
        "benchmarks/results/cpu-small.md, where all the diagnostics together added -3.8% wall time and 1.2% "
        "memory with the defaults).", "diagnostics")
    probe_pairs: int = F(16, "Pairs in the probe batch (from eval_file when given, else train_file).",
                         "diagnostics")
    probe_file: str | None = F(None, "Prompt/response rows unrelated to the training pairs, to measure "
                               "squeezing, in any format train_file takes: {prompt, completion} (or response), "
                               "chat {messages} or {prompt, completion} as messages, or preference rows (the "
                               "chosen is used); rendered as the training rows are (the chat template when they "
                               "are conversational). Default: each probe prompt with another pair's chosen "
                               "response.", "diagnostics")
    # -- run -----------------------------------------------------------------------------------------
    logging_steps: int = F(1, "Write metrics every this many steps.", "run")
    save_steps: int = F(100, "Write a checkpoint every this many steps (0: only at the end).", "run")
    save_total_limit: int = F(2, "Checkpoints kept; older ones are deleted.", "run")
    resume: bool = F(False, "Continue from the last good checkpoint in output_dir.", "run")
    eval_steps: int = F(0, "Evaluate on eval_file every this many steps (0: only at the end).", "run")
    report_to: list[str] = F([], "Also log to: tensorboard (event files in the run folder's tensorboard/), wandb "
                             "(W&B; log in with `wandb login`, or set WANDB_MODE=offline). Both need the logging "
                             "extra: pip install 'poise[logging]'.", "run")
    cpu: bool = F(False, "Run on the CPU even when a GPU is present.", "run")
    on_nonfinite: Literal["stop", "skip"] = F(
        "stop", "A non-finite loss or gradient is reported with its step and pairs; stop: save a checkpoint "
        "of the last good weights and stop; skip: drop that step's update and go on.", "run")
    allow_config_change: bool = F(
        False, "On resume, accept a config that differs from the run's in settings that change the training "
        "trajectory (model, tokenizer, data and its split/columns/lengths, method and every hyperparameter, "
        "batch sizes, seed, dtype/precision, optimizer, learning rate and schedule, reference, LoRA, layout, "
        "gradient checkpointing; max_steps/epochs unless the schedule is constant without warmup). Without "
        "it such a resume is refused with every difference listed. Changes to logging, saving, evaluation "
        "and diagnostics are always accepted. Accepted changes are recorded in config_changes.jsonl and the "
        "model card.", "run")
    # -- several processes (docs/distributed.md) -----------------------------------------------------
    distributed: Literal["auto", "ddp", "fsdp", "deepspeed"] = F(
        "auto", "How several processes (launched with torchrun, or accelerate launch) share the model. auto: ddp "
        "when launched with several processes (or the engine an accelerate config asks for: fsdp, deepspeed), "
        "none with one; ddp: every process holds the whole model and optimizer, gradients are averaged "
        "(accelerate's DDP); fsdp: FSDP2 (torch fully_shard on every decoder layer and the root) shards "
        "parameters, gradients and optimizer state over the processes, checkpoints are sharded (every process "
        "writes its part) and the final model is gathered into one folder; deepspeed: DeepSpeed ZeRO (stage "
        "deepspeed_stage; the extra poise[deepspeed]), checkpoints in DeepSpeed's own per-rank format. A launch that cannot run the choice is refused with the command to run "
        "instead; fsdp and deepspeed need several processes.", "distributed")
    fsdp_reshard_after_forward: bool = F(
        True, "fsdp: free each layer's gathered parameters after its forward and gather them again for the "
        "backward (ZeRO-3 memory); false keeps them until the backward (more memory, less communication).",
        "distributed")
    fsdp_cpu_offload: bool = F(
        False, "fsdp: keep the sharded parameters, gradients and optimizer state in CPU memory and step the "
        "optimizer there (torch's CPUOffloadPolicy): less GPU memory, more transfers.", "distributed")
    deepspeed_stage: Literal[1, 2, 3] = F(
        2, "deepspeed: the ZeRO stage. 1 shards the optimizer state, 2 also the gradients, 3 also the "
        "parameters (gathered layer by layer for the forward and backward).", "distributed")
    deepspeed_offload: Literal["none", "optimizer", "all"] = F(
        "none", "deepspeed: keep the optimizer state (optimizer) or also the parameters (all, ZeRO-3 only) in "
        "CPU memory and step the optimizer there: less GPU memory, more transfers. GPU runs only.",
        "distributed")
    deepspeed_config: str | None = F(
        None, "deepspeed: a DeepSpeed JSON config whose other settings (communication, buckets, ZeRO-3 "
        "prefetch) are used as written. The settings poise owns (batch sizes, gradient accumulation, clipping, "
        "precision, optimizer, scheduler, ZeRO stage and offload) must be absent, \"auto\" or equal to poise's: "
        "a different value is an error naming the key.", "distributed")
    distributed_timeout: int = F(
        300, "Seconds a process waits at the start for the others to join (a launch without torchrun's own "
        "rendezvous) before it stops with a message that says which are missing and how to launch them.",
        "distributed")
    # -- the method's hyperparameters (beta, ada_clip, ...) ------------------------------------------
    hyperparameters: dict[str, Any] = field(default_factory=dict, metadata={"doc": "", "group": "hidden"})

    # ------------------------------------------------------------------------------------------------
    def objective_kwargs(self) -> dict[str, Any]:
        return dict(self.hyperparameters)

    def build_objective(self):
        """The objective this config trains (validates the method and its hyperparameters)."""
        from poise.compose import resolve_method

        if self.stage == "sft":
            if self.hyperparameters or self.balance:
                keys = sorted(self.hyperparameters) + (["balance"] if self.balance else [])
                raise ConfigError(f"stage: sft takes no method hyperparameters, got {', '.join(keys)}; remove "
                                  "them or set stage: preference.")
            return None
        return resolve_method(self.method, self.balance, **self.hyperparameters)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "hyperparameters"}
        d.update(self.hyperparameters)
        return d


TRAINER_FIELDS = {f.name: f for f in fields(TrainConfig) if f.name != "hyperparameters"}


def _check_choice(name: str, value: Any, tp: Any) -> Any:
    choices = typing.get_args(tp)
    if value is False and "no" in choices:  # YAML 1.1 reads `no` (and off, false) as False
        return "no"
    if isinstance(value, str) and value not in choices and value.strip().isdigit() and int(value) in choices:
        raise ConfigError(f"{name}: {value!r} is a string; write the number {int(value)} without quotes.")
    if value not in choices:
        raise ConfigError(f"{name}: {value!r} is not one of {_type_text(tp)}.{suggest(str(value), map(str, choices))}")
    return value


def _check_type(name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against a field type; ints widen to float. Returns the value or raises."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return _check_choice(name, value, tp)
    if origin in (typing.Union, types.UnionType):
        return _check_union(name, value, tp)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list ({_type_text(tp)}), got {value!r}.")
        (arg,) = typing.get_args(tp)
        return [_check_type(f"{name}[{i}]", v, arg) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}.")
        return {str(k): _check_type(f"{name}.{k}", v, typing.get_args(tp)[1]) for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{name}: expected null")
        return value
    return _check_scalar(name, value, tp)


def _check_union(name: str, value: Any, tp: Any) -> Any:
    for arg in typing.get_args(tp):
        try:
            return _check_type(name, value, arg)
        except ConfigError:
            continue
    raise ConfigError(f"{name}: {value!r} has the wrong type; expected {_type_text(tp)}.")


def _check_scalar(name: str, value: Any, tp: type) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}: {value!r} is not a finite number; give a number.")
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{name}: {value!r} has the wrong type; expected {tp.__name__}.")
    return value


def _type_text(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_text(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) in (list, dict):
        return f"{typing.get_origin(tp).__name__}[{', '.join(_type_text(a) for a in typing.get_args(tp))}]"
    return getattr(tp, "__name__", str(tp))


_HINTS = typing.get_type_hints(TrainConfig)


def from_dict(raw: dict[str, Any], *, source: str = "config", origins: dict[str, str] | None = None) -> TrainConfig:
    """Build and fully validate a config (without loading any model or data). ``origins`` names where a
    key came from when not from ``source`` (``{"beta": "beta=2 on the command line"}``): an error about
    that key names it instead of the file."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a config is a mapping of keys to values, got {type(raw).__name__}.")
    origins = origins or {}
    known: dict[str, Any] = {}
    hyper: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: the key {key!r} is not a name; config keys are names like beta or "
                              "learning_rate.")
        if key in ("report_to", "balance") and isinstance(value, str):  # one name for a list of one
            value = [] if key == "report_to" and value.lower() == "none" else [value]
        if key in TRAINER_FIELDS:
            known[key] = _check_type(origins.get(key, f"{source}: {key}"), value, _HINTS[key])
        else:
            hyper[key] = value
    cfg = TrainConfig(**known, hyperparameters=hyper)
    _validate(cfg, source, origins)
    return cfg


def _where(msg: str, source: str, origins: dict[str, str]) -> str:
    """The override a message is about (the first key of ``origins`` it names), else the file."""
    for key, label in origins.items():
        if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", msg):
            return label
    return source


def _validate(cfg: TrainConfig, source: str, origins: dict[str, str] | None = None) -> None:
    origins = origins or {}
    _validate_method(cfg, source, origins)
    for check in (_check_required, _check_sizes, _check_ranges, _check_optimizer, _check_lora):
        problem = check(cfg)
        if problem:
            raise ConfigError(f"{_where(problem, source, origins)}: {problem}")


def _validate_method(cfg: TrainConfig, source: str, origins: dict[str, str] | None = None) -> None:
    origins = origins or {}
    if cfg.stage != "sft":
        _check_method_keys(cfg, source, origins)
    try:
        cfg.build_objective()
    except ConfigError as e:
        msg = str(e)
        for key in cfg.hyperparameters:
            hint = suggest(key, TRAINER_FIELDS) if f"'{key}'" in msg and "does not take" in msg else ""
            if hint:
                msg += f" (If you meant the trainer setting:{hint})"
        raise ConfigError(f"{_where(msg, source, origins)}: {msg}") from None


def _method_params(method: str, balance: list[str]) -> set[str] | None:
    """The hyperparameters that ``method`` (+ ``balance``) takes, or None when it does not resolve."""
    from poise.compose import resolve_method

    try:
        return set(resolve_method(method, balance).hyperparameters)
    except ConfigError:
        return None


def _check_method_keys(cfg: TrainConfig, source: str, origins: dict[str, str]) -> None:
    """Every key the method does not take, in one message with the fix (switching ``method`` on a config
    written for another one leaves several: ``poise train configs/adadpo.yaml method=dpo``)."""
    from poise.balance import BALANCERS
    from poise.losses import LOSSES
    from poise.presets import PRESETS

    valid = _method_params(cfg.method, cfg.balance)
    extra = [k for k in cfg.hyperparameters if valid is not None and k not in valid]
    if not extra:
        return
    owners: dict[str, list[tuple[str, str]]] = {}
    for spec in LOSSES.values():
        for prm in spec.params:
            owners.setdefault(prm.name, []).append(("loss", spec.name))
    for cls in BALANCERS.values():
        for prm in cls.params:
            owners.setdefault(prm.name, []).append(("balancer", cls.name))
    parts = []
    for k in extra:
        who = [f"{kind} {name!r}" for kind, name in owners.get(k, [])]
        parts.append(f"{k!r} (of the {', '.join(who[:3])}{', ...' if len(who) > 3 else ''})" if who else
                     f"{k!r} (not a trainer setting, and no loss or balancer takes it."
                     f"{suggest(k, list(valid) + list(TRAINER_FIELDS))})")
    keys = set(cfg.hyperparameters)
    takers = [m for m in list(PRESETS) + list(LOSSES)
              if (ps := _method_params(m, cfg.balance)) is not None and keys <= ps]
    fix = [f"remove {'them' if len(extra) > 1 else 'it'}"]
    if takers:
        them = "every method key of the config" if len(keys) > 1 else "it"
        fix.append(f"use a method that takes {them}: {', '.join(takers[:5])}")
    needed = sorted({name for k in extra for kind, name in owners.get(k, []) if kind == "balancer"})
    if needed and (ps := _method_params(cfg.method, [*cfg.balance, *needed])) is not None and keys <= ps:
        fix.append(f"keep the method and add balance: {[*cfg.balance, *needed]}")
    where = next((origins[k] for k in extra if k in origins),
                 origins.get("method", origins.get("balance", source)))
    file_note = f" (in {source})" if any(k not in origins for k in extra) and where != source else ""
    method = f"method {cfg.method!r}" + (f" with balance: {cfg.balance}" if cfg.balance else "")
    n = f"{len(extra)} keys" if len(extra) > 1 else "the key"
    raise ConfigError(f"{where}: {method} does not take {n} of the config{file_note}: {'; '.join(parts)}. "
                      f"Fix: {', or '.join(fix)}. The keys {method} takes: {', '.join(sorted(valid))}.")


def _check_required(cfg: TrainConfig) -> str | None:
    missing = [n for n in ("model", "train_file") if not getattr(cfg, n)]
    return f"{missing[0]} is required (see docs/config.md)." if missing else None


def _check_sizes(cfg: TrainConfig) -> str | None:
    for name in ("batch_size", "micro_batch_size", "max_length", "max_prompt_length", "chunk_size",
                 "logging_steps", "save_total_limit", "probe_pairs"):
        if getattr(cfg, name) < 1:
            return f"{name} must be at least 1, got {getattr(cfg, name)}."
    for name in ("save_steps", "eval_steps", "diagnostics_steps", "lora_r"):
        if getattr(cfg, name) < 0:
            fix = " (0 trains every weight; a LoRA rank is positive, e.g. 8 or 16)" if name == "lora_r" else \
                " (0 switches it off)"
            return f"{name} must be 0 or more, got {getattr(cfg, name)}{fix}."
    if not 0 <= cfg.diagnostics_budget < 1:
        return (f"diagnostics_budget is a share of the run's time, from 0 (no budget) to below 1, got "
                f"{cfg.diagnostics_budget}.")
    if cfg.batch_size % cfg.micro_batch_size:
        return (f"batch_size={cfg.batch_size} is not a multiple of micro_batch_size={cfg.micro_batch_size}; "
                "make it one (the quotient is gradient accumulation).")
    if cfg.max_prompt_length >= cfg.max_length:
        return (f"max_prompt_length ({cfg.max_prompt_length}) must be below max_length ({cfg.max_length}) "
                "to leave room for the completion.")
    return None


def _check_optimizer(cfg: TrainConfig) -> str | None:
    if len(cfg.adam_betas) != 2 or not all(0 <= b < 1 for b in cfg.adam_betas):
        return f"adam_betas must be two numbers in [0, 1), e.g. [0.9, 0.999]; got {cfg.adam_betas}."
    if cfg.weight_decay < 0:
        return f"weight_decay must be 0 or more, got {cfg.weight_decay}."
    if cfg.max_grad_norm is not None and cfg.max_grad_norm <= 0:
        return f"max_grad_norm must be positive (or null to disable clipping), got {cfg.max_grad_norm}."
    return None


def _check_lora(cfg: TrainConfig) -> str | None:
    if cfg.lora_r == 0:
        return None
    if not 0 <= cfg.lora_dropout < 1:
        return f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}."
    if cfg.lora_alpha <= 0:
        return f"lora_alpha must be positive, got {cfg.lora_alpha}."
    if isinstance(cfg.lora_target_modules, list) and not cfg.lora_target_modules:
        return "lora_target_modules is an empty list: name the modules (e.g. [q_proj, v_proj]) or use all-linear."
    return None


def _check_ranges(cfg: TrainConfig) -> str | None:
    if not 0 <= cfg.warmup_ratio < 1:
        return f"warmup_ratio must be in [0, 1), got {cfg.warmup_ratio}."
    if cfg.learning_rate <= 0 or cfg.epochs <= 0:
        return "learning_rate and epochs must be positive."
    if cfg.max_steps is not None and cfg.max_steps < 1:
        return f"max_steps must be at least 1 (or null), got {cfg.max_steps}."
    if cfg.extended_sft and cfg.stage != "sft":
        return "extended_sft applies to stage: sft only; set stage: sft or remove it."
    bad = [r for r in cfg.report_to if r not in ("tensorboard", "wandb")]
    if bad:
        return f"report_to: unknown {bad}; use tensorboard and/or wandb."
    return None


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (at any depth; YAML would keep
    the last silently) and reads ``1e-3`` as the number 0.001, as YAML 1.2 does (YAML 1.1, PyYAML's
    dialect, needs a dot and a signed exponent: ``1.0e-3``)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise DuplicateKeyError(key, first, line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: Any, first: int, line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.line = key, first, line


_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789."))


def _yaml_error(e: yaml.YAMLError, where: str, text: str) -> ConfigError:
    """A YAML error as one sentence with the line (``where`` names the file or the override)."""
    if isinstance(e, DuplicateKeyError):
        return ConfigError(f"{where}, line {e.line}: the key {e.key!r} is given twice (first on line {e.first}); "
                           "YAML would silently keep the last one. Keep one of them.")
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    line = f", line {mark.line + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e)
    if "'\\t'" in problem:
        lines = text.splitlines()
        bad = lines[mark.line] if mark is not None and mark.line < len(lines) else ""
        what = "indents with a tab" if "\t" in bad[:len(bad) - len(bad.lstrip())] else "has a tab character"
        return ConfigError(f"{where}{line}: the line {what}; YAML indents with spaces only. Replace the tab "
                           "with spaces (e.g. two per level).")
    context = getattr(e, "context", None)
    detail = f"{context}: {problem}" if context else problem
    return ConfigError(f"{where}{line}: not valid YAML ({detail}). Fix the line (YAML: `key: value`, "
                       "one per line, nested keys indented with spaces).")


def parse_yaml(text: str, where: str) -> Any:
    """Parse config text with :class:`ConfigLoader`; errors name ``where`` and the line."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise _yaml_error(e, where, text) from None


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is parsed as YAML (so 0.1, 1e-3, true, null, [a, b])."""
    if item in ("--debug", "-h", "--help"):
        raise ConfigError(f"{item} goes before the command: poise {item} train CONFIG [key=value ...].")
    if "=" not in item:
        raise ConfigError(f"override {item!r} on the command line is not key=value (e.g. beta=0.05 or "
                          "resume=true).")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} on the command line has no key; write key=value (e.g. beta=0.05).")
    if key.startswith("-"):
        raise ConfigError(f"override {item!r} on the command line: write key=value without dashes "
                          f"({key.lstrip('-')}={value}).")
    if value == "":
        return key, ""
    try:
        return key, yaml.load(value, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{item} on the command line: not a valid YAML value ({problem}). Write a number, "
                          "true/false, null, a string, or a list as [a, b] (quote the whole override in the "
                          "shell).") from None


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config (safe loading, duplicate keys refused), apply ``key=value`` overrides, validate.
    An error in an override names the override (``learning_rate=abc on the command line: ...``)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the YAML config file (e.g. configs/dpo.yaml).")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the config as UTF-8.") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config is a mapping of keys to values (`key: value` lines), got "
                          f"{type(raw).__name__}.")
    origins: dict[str, str] = {}
    for item in overrides:
        k, v = parse_override(item)
        raw[k] = v
        origins[k] = f"{item} on the command line"
    return from_dict(raw, source=str(path), origins=origins)


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def replace(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    return dataclasses.replace(cfg, **changes)
