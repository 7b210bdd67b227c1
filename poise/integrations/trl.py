"""TRL's ``DPOTrainer`` trained with any poise objective: change the import line.

    # from trl import DPOConfig, DPOTrainer
    from poise.integrations.trl import DPOConfig, DPOTrainer      # the one changed line

    args = DPOConfig(output_dir="out", beta=0.1)                  # unchanged: trains AdaDPO (the default)
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()

``DPOTrainer`` is a subclass of ``trl.DPOTrainer`` and takes the same arguments; ``DPOConfig`` is
``trl.DPOConfig`` with two more fields (also accepted as keyword arguments of the trainer, which win):

- ``poise_method``: a preset (``adadpo``, the default; ``gate-dpo``, ``balanced-dpo``, ``ada-simpo``, ...)
  or a base loss (``dpo``, ``ipo``, ``simpo``, ...); see ``poise ls``.
- ``poise_kwargs``: the method's hyperparameters (``{"ada_clip": 2.0}``), and ``balance`` to add
  balancers to a base loss (``{"balance": ["gate"]}``). A JSON string is accepted (TRL's CLI).
  ``beta`` defaults to TRL's ``args.beta`` when the loss takes a beta.

What changes inside TRL: only ``_compute_loss``. The policy's per-token log-probs come from TRL's
fused LM head (``model(..., fused_lm_head=True).log_probs``) with TRL's completion mask, the
reference's are TRL's (precomputed sums with ``precompute_ref_log_probs=True``, else per-sequence sums
from ``compute_ref_log_probs``: the reference model, or the policy with its adapter disabled), and the
loss is ``poise_objective(PairLogps(...)).loss``. TRL's data handling, collator, reference, optimizer,
schedule, logging and checkpoints are untouched. Differences from TRL and from ``poise train``:

- **Metrics**: every metric of the objective (``rewards/*``, ``logps/*``, ``nll_loss``,
  ``balance/*``, ``gate/*``; not its ``loss``, which TRL logs itself) plus TRL's ``entropy``,
  ``num_tokens``, ``mean_token_accuracy``, ``logits/chosen``, ``logits/rejected`` (and ``aux_loss``
  for MoE models), averaged over the steps between two logs as TRL does; keys ending in ``_min`` /
  ``_max`` (or ``/min``, ``/max``) are the min / max over ranks of each step. See docs/metrics.md.
- **Balanced-DPO** (``balanced_variant: norm``) needs the per-token ``sum_j p_j^2``; it comes from the
  same fused head (its ``log_sum_sq_probs`` output, switched on for such objectives).
- **Gate-DPO calibration** (``gate_tau: auto``): as in ``poise train``, a step of its own before the
  first optimizer step: ``train()`` scores the first ``gate_calibration_pairs`` (256) pairs of the
  training dataloader under the initial policy (no gradient, gathered over all processes; all of them
  when the dataset is smaller) and fixes tau. The state is explicit (``trainer.poise_state``), saved
  in each checkpoint (``poise_objective.json``) and restored on resume, which skips the calibration.
- **Normalisation**: the loss is the mean over the pairs of each micro-batch, as in TRL (batch-level
  NLL terms use the micro-batch's chosen tokens).
- **beta-DPO** (``beta-dpo``, the ``dynbeta`` balancer) is refused: its beta follows the mean margin of
  the whole optimizer step (every micro-batch and rank), which needs a pass over the step's pairs before
  its first micro-batch, and TRL's training step has no such place. Train it with ``poise train``.
- TRL's ``loss_type``, ``loss_weights``, ``label_smoothing``, ``ld_alpha``, ``use_weighting`` and
  ``f_divergence_type`` are not read: a value other than TRL's default is an error that names the
  poise way to get it. TRL still builds its reference model for reference-free methods (SimPO, CPO,
  ORPO), which poise does not read: pass ``precompute_ref_log_probs=True`` or use PEFT to avoid it.
"""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("trl") is None:
    raise ImportError("poise.integrations.trl needs TRL, an optional extra of poise: install it with "
                      "`pip install 'poise[trl]'` (or `pip install trl`). The rest of poise works without it.")

import inspect
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import trl
from accelerate.utils import is_peft_model
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from poise.compose import Objective, resolve_method
from poise.errors import ConfigError
from poise.losses import LOSSES
from poise.model.modes import eval_mode
from poise.presets import PRESETS
from poise.training.runlog import MAX_SUFFIXES, MIN_SUFFIXES
from poise.types import PairLogps

try:
    from trl.trainer.utils import add_fused_lm_head
except ImportError as err:  # pragma: no cover - depends on the installed TRL
    raise ImportError(f"poise.integrations.trl needs a TRL whose DPOTrainer computes log-probs with the fused LM "
                      f"head (tested with trl 1.16); this is trl {trl.__version__}. Upgrade: "
                      "`pip install -U 'poise[trl]'`.") from err

__all__ = ["DEFAULT_METHOD", "DPOConfig", "DPOTrainer", "build_objective"]

log = logging.getLogger("poise")

#: The method used when neither the config nor the trainer names one.
DEFAULT_METHOD = "adadpo"
#: File in each TRL checkpoint folder holding the objective's state (the calibrated gate threshold).
STATE_FILE = "poise_objective.json"

_NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps"})
_FUSED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
_TRL_LOSS_NAMES = {"sigmoid": "dpo", "ipo": "ipo", "hinge": "hinge", "robust": "robust"}
# DPOConfig fields poise does not read: (TRL's default, how to get the same with poise).
_TRL_ONLY = {
    "loss_weights": (None, "mix the chosen NLL with nll_weight in poise_kwargs (TRL's ['sigmoid', 'sft'])"),
    "label_smoothing": (0.0, "set label_smoothing in poise_kwargs with poise_method='cdpo' or 'robust'"),
    "ld_alpha": (None, "LD-DPO's length weighting has no poise counterpart; remove it"),
    "use_weighting": (False, "WPO weighting has no poise counterpart; remove it"),
    "f_divergence_type": ("reverse_kl", "f-DPO has no poise counterpart; remove it"),
}


@dataclass
class DPOConfig(trl.DPOConfig):
    """``trl.DPOConfig`` with the poise method and its hyperparameters (see the module docstring)."""

    poise_method: str | None = field(default=None, metadata={
        "help": f"poise preset or base loss to train (`poise ls`); default {DEFAULT_METHOD!r}."})
    poise_kwargs: dict[str, Any] | str | None = field(default=None, metadata={
        "help": "Hyperparameters of the poise method (and `balance`), a dict or a JSON string."})

    def __post_init__(self):
        if isinstance(self.poise_kwargs, str):
            self.poise_kwargs = json.loads(self.poise_kwargs)
        super().__post_init__()


def build_objective(method: str, kwargs: dict[str, Any] | None = None, *, beta: float | None = None) -> Objective:
    """The objective of ``method`` (preset or base loss) with ``kwargs``, through poise's one method
    resolver; ``kwargs["balance"]`` adds balancers, and ``beta`` (TRL's) is used when the loss takes one
    and ``kwargs`` does not set it."""
    hp = dict(kwargs or {})
    extra = hp.pop("balance", None) or []
    if beta is not None and "beta" not in hp:
        loss = PRESETS[method].loss if method in PRESETS else method
        if loss in LOSSES and any(p.name == "beta" for p in LOSSES[loss].params):
            hp["beta"] = beta
    return resolve_method(method, extra, **hp)


def _check_trl_settings(config: Any, method: str) -> None:
    """Refuse TRL loss settings that poise would silently ignore."""
    if config is None:
        return
    loss_type = list(getattr(config, "loss_type", ["sigmoid"]) or ["sigmoid"])
    if loss_type != ["sigmoid"]:
        names = ", ".join(f"{k!r} -> {v!r}" for k, v in _TRL_LOSS_NAMES.items())
        raise ConfigError(f"DPOConfig.loss_type={loss_type} is not read by poise's DPOTrainer: the loss is "
                          f"poise_method (now {method!r}). Leave loss_type at its default and set poise_method "
                          f"(TRL's names: {names}; 'sft' in a list is nll_weight).")
    for name, (default, fix) in _TRL_ONLY.items():
        if getattr(config, name, default) != default:
            raise ConfigError(f"DPOConfig.{name}={getattr(config, name)!r} is not read by poise's DPOTrainer: {fix}.")


class DPOTrainer(trl.DPOTrainer):
    """``trl.DPOTrainer`` whose loss is a poise objective (see the module docstring).

    Args:
        *args, **kwargs: exactly those of ``trl.DPOTrainer``.
        poise_method: preset or base loss; default ``args.poise_method``, else ``"adadpo"``.
        poise_kwargs: its hyperparameters (and ``balance``); default ``args.poise_kwargs``.

    Attributes:
        poise_objective: the :class:`poise.Objective` that forms the loss.
    """

    _tag_names = ["trl", "dpo", "poise"]

    def __init__(self, *args: Any, poise_method: str | None = None, poise_kwargs: dict[str, Any] | None = None,
                 **kwargs: Any):
        config = inspect.signature(trl.DPOTrainer.__init__).bind(self, *args, **kwargs).arguments.get("args")
        method = poise_method or getattr(config, "poise_method", None) or DEFAULT_METHOD
        hp = poise_kwargs if poise_kwargs is not None else getattr(config, "poise_kwargs", None)
        _check_trl_settings(config, method)
        self.poise_objective = build_objective(method, hp, beta=getattr(config, "beta", None))
        if self.poise_objective.needs_step_stats:
            raise ConfigError(f"{self.poise_objective.name!r} (beta-DPO's dynbeta) adapts beta to the mean margin of "
                              "the whole optimizer step, which needs a pass over the step's pairs (every micro-batch "
                              "and process) before its forward; TRL's DPOTrainer has no such step. Train it with "
                              "the poise trainer: `poise train configs/beta-dpo.yaml` (or poise.train).")
        self.poise_state = self.poise_objective.init_state()
        unknown = set(self.poise_objective.needs_stats) - {"sum_p2", "entropy"}
        if unknown:
            raise ConfigError(f"{self.poise_objective.name!r} needs the statistics {sorted(unknown)}, which TRL's "
                              "fused LM head does not compute; train it with `poise train` instead.")
        super().__init__(*args, **kwargs)
        if "sum_p2" in self.poise_objective.needs_stats:
            base = self.model.get_base_model() if is_peft_model(self.model) else self.model
            add_fused_lm_head(base, outputs=_FUSED_OUTPUTS)  # TRL's head, with log(sum_j p_j^2) as well
        self.model.add_model_tags([method])
        log.info("poise: TRL's DPOTrainer trains %r", self.poise_objective)

    # -- the loss ------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        outputs, batch = self._pair_logps(model, inputs)
        out = self.poise_objective(batch, self.poise_state)
        loss = out.loss
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        self._log_objective_metrics(mode, out.metrics)
        self._log_trl_metrics(mode, inputs, outputs)
        if return_outputs:  # TRL's deprecated path for compute_metrics: logits need a plain forward
            with torch.no_grad():
                outputs = model(**self._model_kwargs(inputs))
            return loss, outputs
        return loss

    def _model_kwargs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            kwargs["output_router_logits"] = True
        return kwargs

    def _pair_logps(self, model, inputs: dict[str, Any], *, with_reference: bool = True) -> tuple[Any, PairLogps]:
        """TRL's forward (fused head, completion tokens only) and the batch as poise's PairLogps."""
        completion = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion == 0, -100)
        outputs = model(**self._model_kwargs(inputs), labels=labels, fused_lm_head=True)
        mask = completion[:, 1:].bool()  # mask[:, t] scores token t + 1, as TRL's log_probs[:, t]
        width = mask.size(1)  # prompt-learning PEFT prepends virtual tokens: keep the real positions
        logps = outputs.log_probs[:, -width:]
        stats = {}
        if "sum_p2" in self.poise_objective.needs_stats:
            stats["sum_p2"] = outputs.log_sum_sq_probs[:, -width:].detach().float().exp()
        if "entropy" in self.poise_objective.needs_stats:
            stats["entropy"] = outputs.entropy[:, -width:].detach().float()
        reads_ref = with_reference and self.poise_objective.needs_reference
        ref_w, ref_l = self._reference_sums(inputs) if reads_ref else (None, None)
        b = logps.size(0) // 2  # TRL's batch is [chosen, rejected]
        batch = PairLogps(logps[:b], logps[b:], mask[:b], mask[b:], ref_chosen=ref_w, ref_rejected=ref_l,
                          chosen_stats={k: v[:b] for k, v in stats.items()} or None,
                          rejected_stats={k: v[b:] for k, v in stats.items()} or None)
        return outputs, batch

    def _reference_sums(self, inputs: dict[str, Any]):
        """(B,) reference log-prob sums of the chosen and of the rejected completions, as TRL gets them."""
        if self.precompute_ref_logps:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        ref = self.ref_model if self.ref_model is not None else self.model  # PEFT: adapter disabled inside
        return self.compute_ref_log_probs(ref, inputs)

    # -- calibration: a step of its own, before the first optimizer step -------------------------------
    def train(self, resume_from_checkpoint=None, *args: Any, **kwargs: Any):
        if not resume_from_checkpoint and self.poise_objective.needs_calibration(self.poise_state):
            self._calibrate()
        return super().train(resume_from_checkpoint, *args, **kwargs)

    @torch.no_grad()
    def _calibrate(self) -> None:
        """The first training pairs under the initial policy (eval mode, no gradient), gathered over ranks."""
        obj, state = self.poise_objective, self.poise_state
        gather = self.accelerator.gather if self.accelerator.num_processes > 1 else None
        with eval_mode(self.model):
            for inputs in self.get_train_dataloader():
                _, batch = self._pair_logps(self.model, self._prepare_inputs(inputs), with_reference=False)
                state = obj.calibrate(state, batch, gather)
                if not obj.needs_calibration(state):
                    break
        self.poise_state = obj.finish_calibration(state)
        log.info("poise: calibrated %s", obj.calibrated_values(self.poise_state))

    # -- logging -------------------------------------------------------------------------------------
    def _log_objective_metrics(self, mode: str, metrics: dict[str, torch.Tensor]) -> None:
        """The objective's metrics, one value per step over all ranks (mean; min/max for _min/_max)."""
        keys = [k for k in sorted(metrics) if k != "loss"]  # TRL logs the loss itself
        if not keys:
            return
        dev = self.accelerator.device
        vals = torch.stack([metrics[k].detach().float().reshape(()).to(dev) for k in keys])
        rows = self.accelerator.gather(vals[None]).reshape(-1, len(keys))
        for j, key in enumerate(keys):
            col = rows[:, j]
            value = col.min() if key.endswith(MIN_SUFFIXES) else col.max() if key.endswith(MAX_SUFFIXES) else col.mean()
            self._metrics[mode][key].append(value.item())

    def _log_trl_metrics(self, mode: str, inputs: dict[str, Any], outputs: Any) -> None:
        """TRL's model-side metrics (entropy, num_tokens, logits/*, mean_token_accuracy), as TRL logs them."""
        mask = inputs["completion_mask"][:, 1:].bool()
        width, b = mask.size(1), mask.size(0) // 2
        m = mask.float()
        ent, mean_logits = outputs.entropy[:, -width:].detach(), outputs.mean_logits[:, -width:].detach()
        top1 = outputs.is_top1[:, -width:] & mask
        sums = torch.stack([(ent * m).sum(), m.sum(), (mean_logits[:b] * m[:b]).sum(), m[:b].sum(),
                            (mean_logits[b:] * m[b:]).sum(), m[b:].sum(), top1[:b].sum().float(),
                            inputs["attention_mask"].sum().float()]).float()
        sums = self.accelerator.gather(sums[None]).reshape(-1, sums.numel()).sum(0).tolist()
        ent_sum, n, chosen_logits, n_w, rejected_logits, n_l, correct, n_tokens = sums
        self._metrics[mode]["entropy"].append(ent_sum / n if n else 0.0)
        if mode == "train":
            self._total_train_tokens += int(n_tokens) // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        self._metrics[mode]["logits/chosen"].append(chosen_logits / n_w if n_w else 0.0)
        self._metrics[mode]["logits/rejected"].append(rejected_logits / n_l if n_l else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append(correct / n_w if n_w else 0.0)

    # -- the objective's state in checkpoints --------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        state = self.poise_state
        if state and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(state, f)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, STATE_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                state = json.load(f)
            self.poise_objective.check_state(state)
            self.poise_state = state
