"""What one training stage computes on a micro-batch: the preference objective, or SFT.

A task owns its items (pairs or sequences), collates them, counts the tokens that normalise its
batch-level terms, and turns the policy's per-token log-probs into a loss. It also owns the explicit
state of what it trains (the balancers' state: Gate-DPO's calibrated threshold, beta-DPO's running
margin) with its calibration step and its per-step statistics. The trainer's loop is the same for both
kinds; it never looks at a loss name, nor at whether a task has an objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from poise.data import SequenceBatch, TokenizedPair, collate_sequences
from poise.diagnostics.imbalance import step_metrics
from poise.model.logprobs import TokenLogps, batch_logps, pair_logps
from poise.model.reference import adapters_disabled
from poise.model.shared_prefix import collate_layout


class PolicyLogps(nn.Module):
    """The policy as a module whose forward returns per-token log-probs.

    Wrapping the model this way lets DDP/FSDP see the whole log-prob pass as the module's forward
    (so gradients synchronise), while the engine still applies the output head only to completion
    positions, chunk by chunk. The forward takes the batch itself (any layout; DDP and accelerate pass a
    dataclass argument through, and the batch is already on the device) and returns the engine's
    :class:`TokenLogps` (a registered pytree, so DDP and FSDP find its tensors).
    """

    def __init__(self, model: nn.Module, *, stats: Sequence[str] = (), chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.stats = tuple(stats)
        self.chunk_size = chunk_size

    def forward(self, batch: SequenceBatch) -> TokenLogps:
        return batch_logps(self.model, batch, stats=self.stats, chunk_size=self.chunk_size)


def run_policy(module, batch: SequenceBatch) -> TokenLogps:
    """Per-token log-probs of ``batch`` under the policy; ``module`` is a :class:`PolicyLogps`, maybe
    wrapped by DDP/FSDP."""
    return module(batch)


def group_lengths(pairs: Sequence[TokenizedPair], grouping: str) -> list[int]:
    """What the schedule groups the pairs by (``batch_grouping``): their tokens, or their two-row length."""
    return [p.tokens if grouping == "tokens" else p.length for p in pairs]


@dataclass
class PreferenceTask:
    """Pairs and an objective; the reference is precomputed sums (N, 2) or a live model.

    ``layout`` is ``"shared"`` (one row per pair, the prompt once: :mod:`poise.data.shared`) or
    ``"separate"`` (prompt + chosen and prompt + rejected rows); :func:`poise.model.shared_prefix.choose_layout`
    picks it.
    """

    pairs: list[TokenizedPair]
    objective: Any
    pad_token_id: int
    kind = "preference"
    ref_sums: torch.Tensor | None = None
    ref_model: nn.Module | None = None
    ref_disable_adapters: bool = False
    chunk_size: int = 1024
    diagnostics: bool = False
    layout: str = "separate"
    grouping: str = "tokens"
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = group_lengths(self.pairs, self.grouping)  # the schedule groups by these

    def __len__(self) -> int:
        return len(self.pairs)

    def norm_tokens(self, idx: Sequence[int]) -> int:
        """Chosen tokens of these pairs: the denominator of batch-level NLL terms."""
        return sum(len(self.pairs[i].chosen_ids) for i in idx)

    def real_tokens(self, idx: Sequence[int]) -> int:
        return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                   for p in (self.pairs[i] for i in idx))

    def collate(self, idx: Sequence[int]):
        return collate_layout([self.pairs[i] for i in idx], self.pad_token_id, self.layout)

    def reference(self, idx: Sequence[int], batch, device):
        """(per-token reference TokenLogps or None, per-sequence sums or None)."""
        if not self.objective.needs_reference:
            return None, None
        if self.ref_sums is not None:
            s = self.ref_sums[list(idx)].to(device)
            return None, (s[:, 0], s[:, 1])
        model = self.ref_model
        with torch.no_grad(), adapters_disabled(model) if self.ref_disable_adapters else nullcontext():
            out = batch_logps(model, batch, chunk_size=self.chunk_size)
        return out, None

    def loss(self, module, idx: Sequence[int], device, *, state: dict[str, Any], num_items: int,
             num_tokens: int, positions: Sequence[int] | None = None):
        batch = self.collate(idx).to(device)
        pol = run_policy(module, batch)
        ref_out, ref_sums = self.reference(idx, batch, device)
        pl = pair_logps(pol, ref_out, ref_sums=ref_sums)
        out = self.objective(pl, state, num_pairs=num_items, num_chosen_tokens=num_tokens, positions=positions)
        metrics = out.metrics
        if self.diagnostics and torch.is_grad_enabled():
            metrics = step_metrics(pl, out.loss, self.objective, into=dict(metrics))  # the norms: in the backward
        return out.loss, metrics, out.per_pair

    @torch.no_grad()
    def ref_sums_for(self, idx: Sequence[int], device) -> torch.Tensor | None:
        """(len(idx), 2) reference sums of these pairs, precomputed or from the live reference."""
        if not self.objective.needs_reference:
            return None
        if self.ref_sums is not None:
            return self.ref_sums[list(idx)]
        batch = self.collate(idx).to(device)
        out, _ = self.reference(idx, batch, device)
        s = out.logps.sum(-1).float().cpu()
        return torch.stack([s[:len(idx)], s[len(idx):]], -1)

    # -- the objective's explicit state and its calibration step ---------------------------------------
    def init_state(self) -> dict[str, Any]:
        return self.objective.init_state()

    def needs_calibration(self, state: dict[str, Any]) -> bool:
        return self.objective.needs_calibration(state)

    def calibration_stats(self, module, idx: Sequence[int], device, micro_batch_size: int) -> dict[str, torch.Tensor]:
        """Per-pair calibration statistics of these pairs under the current policy (no gradient), in
        the order of ``idx``, computed micro-batch by micro-batch."""
        parts: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for i in range(0, len(idx), micro_batch_size):
                batch = self.collate(idx[i:i + micro_batch_size]).to(device)
                parts.append(self.objective.calibration_stats(pair_logps(run_policy(module, batch))))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}

    def calibrate(self, state: dict[str, Any], stats: dict[str, torch.Tensor], gather=None) -> dict[str, Any]:
        return self.objective.calibrate(state, stats, gather=gather)

    def finish_calibration(self, state: dict[str, Any]) -> dict[str, Any]:
        return self.objective.finish_calibration(state)

    def calibrated_values(self, state: dict[str, Any]) -> dict[str, Any]:
        return self.objective.calibrated_values(state)

    def check_state(self, state: dict[str, Any]) -> None:
        self.objective.check_state(state)

    # -- per-step statistics: read over the step's pairs before its forward (beta-DPO's mean margin) -----
    @property
    def needs_step_stats(self) -> bool:
        return self.objective.needs_step_stats

    def step_stats(self, module, idx: Sequence[int], device, micro_batch_size: int) -> dict[str, torch.Tensor]:
        """Per-pair step statistics of these pairs under the current policy (no gradient), in the order of
        ``idx``, micro-batch by micro-batch (the policy's log-probs and the reference's sums)."""
        parts: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for i in range(0, len(idx), micro_batch_size):
                mb = idx[i:i + micro_batch_size]
                batch = self.collate(mb).to(device)
                ref_out, ref_sums = self.reference(mb, batch, device)
                parts.append(self.objective.step_stats(pair_logps(run_policy(module, batch), ref_out,
                                                                  ref_sums=ref_sums)))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}

    def begin_step(self, state: dict[str, Any], stats: dict[str, torch.Tensor], gather=None) -> dict[str, Any]:
        return self.objective.begin_step(state, stats, gather=gather)

    def end_step(self, state: dict[str, Any]) -> dict[str, Any]:
        return self.objective.end_step(state)

    def step_selection(self, state: dict[str, Any]) -> tuple[list[int], int] | None:
        return self.objective.selection(state)


@dataclass
class SFTTask:
    """(prompt, completion) sequences; the loss is the token-mean NLL of the completions."""

    seqs: list[tuple[tuple[int, ...], tuple[int, ...]]]
    pad_token_id: int
    kind = "sft"
    objective = None  # nothing to balance, calibrate or probe
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = [len(p) + len(c) for p, c in self.seqs]

    def __len__(self) -> int:
        return len(self.seqs)

    def norm_tokens(self, idx: Sequence[int]) -> int:
        return sum(len(self.seqs[i][1]) for i in idx)

    def real_tokens(self, idx: Sequence[int]) -> int:
        return sum(self.lengths[i] for i in idx)

    def init_state(self) -> dict[str, Any]:
        return {}

    def needs_calibration(self, state: dict[str, Any]) -> bool:
        return False

    def calibrated_values(self, state: dict[str, Any]) -> dict[str, Any]:
        return {}

    def check_state(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"an SFT stage keeps no state but got {sorted(state)}")

    needs_step_stats = False

    def end_step(self, state: dict[str, Any]) -> dict[str, Any]:
        return state

    def step_selection(self, state: dict[str, Any]) -> tuple[list[int], int] | None:
        return None

    def loss(self, module, idx: Sequence[int], device, *, state: dict[str, Any], num_items: int,
             num_tokens: int, positions: Sequence[int] | None = None):
        batch = collate_sequences([self.seqs[i] for i in idx], self.pad_token_id).to(device)
        pol = run_policy(module, batch)
        nll = -pol.logps.sum()  # logps are 0 off the completion tokens
        n_local = pol.mask.sum().clamp(min=1)
        metrics = {"loss": (nll / n_local).detach(), "nll_loss": (nll / n_local).detach()}
        return nll / num_tokens, metrics, None
