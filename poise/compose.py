"""The objective: a base loss composed with balancers, as one drop-in PyTorch callable.

    obj = poise.Objective(loss="dpo", balance=["ada"], beta=0.1, ada_clip=2.0)
    out = obj(pair_logps)           # PairLogps of a batch
    out.loss.backward()             # exactly the balanced gradient of the spec

Balancers with state (Gate-DPO's calibrated threshold) keep it explicit, as optax does: the state is
created, passed and returned, and the forward never changes it::

    state = obj.init_state()
    state = obj.calibrate(state, first_batch)   # a step of its own, under the initial policy
    out = obj(batch, state=state)

A balancer that reads a statistic of the whole optimizer step (beta-DPO's mean margin) is fed the step's
pairs before the step and advanced after it, again returning new states::

    state = obj.begin_step(state, step_batch)   # or its step_stats, gathered over micro-batches/ranks
    out = obj(batch, state=state)               # each micro-batch of the step
    state = obj.end_step(state)                 # after the optimizer step

Hyperparameters are flat keywords (spec section 9); each belongs to exactly one loss or balancer, and
one that the chosen loss and balancers do not take is an error when the objective is built.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from poise.balance import BALANCERS, Balancer, apply_scales
from poise.errors import ConfigError
from poise.losses import LOSSES, LossSpec, Terms
from poise.params import NLL_WEIGHT, Param, suggest
from poise.presets import PRESETS
from poise.seq import PairSeq
from poise.types import ObjectiveOutput, PairLogps


def _lookup_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        hint = f" {name!r} is a preset: use poise.objective({name!r})." if name in PRESETS else suggest(name, LOSSES)
        raise ConfigError(f"unknown loss {name!r}; the losses are {', '.join(LOSSES)}.{hint}")
    return LOSSES[name]


def _balancer_names(balance: str | Sequence[str] | None) -> tuple[str, ...]:
    names = (balance,) if isinstance(balance, str) else tuple(balance or ())
    for n in names:
        if n not in BALANCERS:
            raise ConfigError(f"unknown balancer {n!r}; the balancers are {', '.join(BALANCERS)}.{suggest(n, BALANCERS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"balance={list(names)} names a balancer twice; give each at most once.")
    return names


def _all_owners() -> dict[str, list[str]]:
    """Every hyperparameter name of the library -> who owns it, for helpful errors."""
    owners: dict[str, list[str]] = {}
    for spec in LOSSES.values():
        for p in spec.params:
            owners.setdefault(p.name, []).append(f"loss {spec.name!r}")
    for cls in BALANCERS.values():
        for p in cls.params:
            owners.setdefault(p.name, []).append(f"balancer {cls.name!r}")
    return owners


def _unknown_key(key: str, valid: dict[str, Param], where: str) -> ConfigError:
    owners = _all_owners().get(key)
    if owners:
        fix = (f"It belongs to the {' and the '.join(owners)}; choose that loss, or add that balancer "
               "with balance=[...] (or use a preset), or remove the key.")
    else:
        fix = f"It is not a hyperparameter of any loss or balancer.{suggest(key, valid)}"
    return ConfigError(f"{where} does not take the hyperparameter {key!r}. {fix} "
                       f"Valid keys here: {', '.join(sorted(valid))}.")


class Objective:
    """A base loss of spec section 3 composed with balancers of sections 5-7.

    Args:
        loss: name of the base loss (see ``poise ls``).
        balance: balancer names, e.g. ``["ada"]`` or ``["gate"]``; composed by multiplying coefficients.
        **hyperparameters: flat keywords of spec section 9; unset ones take the spec's defaults.

    Attributes:
        needs_reference: whether calls need ``ref_chosen``/``ref_rejected`` in the batch.
        needs_stats: per-token statistics the batch must carry (e.g. ``{"sum_p2"}``).
        hyperparameters: every resolved hyperparameter, defaults included.
    """

    def __init__(self, loss: str = "dpo", balance: str | Sequence[str] | None = (), **hyperparameters: Any):
        self.loss_spec = _lookup_loss(loss)
        names = _balancer_names(balance)
        owner_of: dict[str, str] = {NLL_WEIGHT.name: f"loss {loss!r}"}
        params: dict[str, Param] = {NLL_WEIGHT.name: NLL_WEIGHT}
        for p in self.loss_spec.params:
            owner_of[p.name], params[p.name] = f"loss {loss!r}", p
        for n in names:
            for p in BALANCERS[n].params:
                owner_of[p.name], params[p.name] = f"balancer {n!r}", p
        where = f"loss {loss!r}" + (f" with balance={list(names)}" if names else "")
        for key in hyperparameters:
            if key not in params:
                raise _unknown_key(key, params, where)
        self.hyperparameters = {k: p.validate(hyperparameters.get(k, p.default), owner_of[k])
                                for k, p in params.items()}
        self.loss_hp = {p.name: self.hyperparameters[p.name] for p in self.loss_spec.params}
        self.nll_weight = self.hyperparameters["nll_weight"] + self.loss_spec.builtin_nll(self.loss_hp)
        self.balancers = [BALANCERS[n](self.loss_spec, {p.name: self.hyperparameters[p.name]
                                                         for p in BALANCERS[n].params}) for n in names]
        self.name = loss if not names else f"{loss}+{'+'.join(names)}"

    @property
    def needs_reference(self) -> bool:
        return self.loss_spec.needs_reference or any(b.needs_reference for b in self.balancers)

    @property
    def needs_stats(self) -> frozenset[str]:
        return frozenset().union(*(b.needs_stats for b in self.balancers))

    @property
    def needs_step_stats(self) -> bool:
        """Whether :meth:`begin_step` must see each optimizer step's pairs before its forward."""
        return any(b.needs_step_stats for b in self.balancers)

    @property
    def balance(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.balancers)

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters.items())
        return f"Objective(loss={self.loss_spec.name!r}, balance={list(self.balance)!r}, {hp})"

    def _check(self, batch: PairLogps) -> None:
        if self.needs_reference and not batch.has_reference:
            raise ValueError(f"objective {self.name!r} needs reference log-probs: pass ref_chosen and "
                             "ref_rejected in PairLogps (per token or per-sequence sums).")
        for stat in self.needs_stats:
            for side in ("chosen", "rejected"):
                stats = getattr(batch, f"{side}_stats")
                if not stats or stat not in stats:
                    raise ValueError(f"objective {self.name!r} needs the per-token statistic {stat!r}: pass "
                                     f"{side}_stats={{{stat!r}: (B, T) tensor}} (the log-prob engine computes "
                                     f"it with stats=[{stat!r}]).")

    def __call__(self, batch: PairLogps, state: dict[str, Any] | None = None, *, num_pairs: float | None = None,
                 num_chosen_tokens: float | None = None, positions: Sequence[int] | None = None) -> ObjectiveOutput:
        """Loss, per-pair losses and metrics of one batch. Pure: ``state`` is read, never changed.

        Args:
            batch: per-token log-probs of B pairs.
            state: the balancers' state (:meth:`init_state`, :meth:`calibrate`); default a new one, which
                is an error for a balancer that must be calibrated first (``gate_tau: auto``).
            num_pairs: pairs of the whole optimizer step (all micro-batches and ranks), when the loss
                is to be a share of a step-level mean; default B.
            num_chosen_tokens: chosen tokens of the whole step, the denominator of batch-level NLL
                terms (CPO, ORPO, nll_weight); default this batch's.
            positions: where this batch's pairs sit in the step (default 0..B-1), read only when the state
                keeps some pairs of the step (:meth:`selection`, ``dynbeta_keep`` < 1): the others weigh 0,
                and ``num_pairs``/``num_chosen_tokens`` then count the kept pairs only (their defaults:
                the step's kept pairs, and the chosen tokens of this batch's kept pairs).
        """
        self._check(batch)
        state = self.init_state() if state is None else state
        seq = PairSeq.build(batch, read_reference=self.needs_reference)
        with torch.no_grad():
            rewards = tuple(r.detach() for r in self.loss_spec.rewards(seq, self.loss_hp))
        t_w, t_l = self.loss_spec.terms(seq)  # (B,) each
        scales, metrics = [], {}
        for b in self.balancers:
            s, m = b.scales(state.get(b.name, {}), seq, rewards)
            scales += s
            metrics.update(m)
        t_w, t_l = apply_scales(t_w, t_l, scales)
        pair_loss = self.loss_spec.fn(Terms(t_w, t_l, seq.n_w, seq.n_l), **self.loss_hp)  # (B,)
        sel = self.selection(state)
        weight = None if sel is None else _kept(sel[0], positions, batch.batch_size, pair_loss)
        default_pairs = float(batch.batch_size) if sel is None else float(len(sel[0]))
        n_pairs = float(num_pairs) if num_pairs is not None else default_pairs
        mask = batch.chosen_mask if weight is None else batch.chosen_mask & (weight[:, None] > 0)
        n_tok = mask.sum().to(seq.dtype) if num_chosen_tokens is None else num_chosen_tokens
        per_pair = pair_loss
        if self.nll_weight:
            # batch-level token mean of the chosen NLL, shared out so that sum(per_pair)/n_pairs == loss
            per_pair = per_pair + self.nll_weight * (-seq.S_w) * (n_pairs / n_tok)
        if weight is not None:  # pairs the step does not keep weigh 0
            per_pair = per_pair * weight
        loss = per_pair.sum() / n_pairs
        metrics.update(_base_metrics(seq, rewards, per_pair, batch))
        if sel is not None:  # so that the mean over a step's micro-batches, weighted by their sizes, is the loss
            metrics["loss"] = (per_pair.detach().sum() / n_pairs) * (sel[1] / batch.batch_size)
        return ObjectiveOutput(loss=loss, per_pair=per_pair, metrics=metrics)

    # -- explicit state (optax style): created, passed, returned; the forward never changes it ------------
    def init_state(self) -> dict[str, Any]:
        """A new state: one entry per balancer that keeps one (e.g. ``{"gate": {"tau": None, ...}}``)."""
        return {b.name: st for b in self.balancers if (st := b.init_state())}

    def needs_calibration(self, state: dict[str, Any] | None = None) -> bool:
        """Whether ``state`` (default: a new one) must be calibrated before the objective can use it."""
        state = self.init_state() if state is None else state
        return any(b.needs_calibration(state[b.name]) for b in self._stateful())

    def calibration_stats(self, batch: PairLogps) -> dict[str, Tensor]:
        """Per-pair statistics (B,) that calibration reads, by balancer; they never read the reference."""
        seq = PairSeq.build(batch, read_reference=False)
        with torch.no_grad():
            return {b.name: stat for b in self.balancers if (stat := b.calibration_stat(seq)) is not None}

    def calibrate(self, state: dict[str, Any], batch: PairLogps | dict[str, Tensor],
                  gather: Callable[[Tensor], Tensor] | None = None) -> dict[str, Any]:
        """A new state with a batch of training pairs under the initial policy taken into account.

        Args:
            state: the current state (unchanged).
            batch: the pairs' log-probs, or their :meth:`calibration_stats` (already gathered).
            gather: collects a statistic from every rank first (e.g. ``accelerator.gather``).
        """
        stats = self.calibration_stats(batch) if isinstance(batch, PairLogps) else batch
        new = dict(state)
        for b in self._stateful():
            if b.name in stats and b.needs_calibration(state[b.name]):
                stat = gather(stats[b.name]) if gather else stats[b.name]
                new[b.name] = b.calibrate(state[b.name], stat)
        return new

    def finish_calibration(self, state: dict[str, Any]) -> dict[str, Any]:
        """A calibrated state from the pairs seen so far: for a run with fewer pairs than a balancer's
        calibration asks for. No pairs at all is a :class:`ConfigError` that names the key."""
        return {**state, **{b.name: b.finish_calibration(state[b.name]) for b in self._stateful()}}

    def calibrated_values(self, state: dict[str, Any]) -> dict[str, Any]:
        """Hyperparameters that calibration decided (``{"gate_tau": 0.0123}``): written into the run's
        resolved config, so that anything rebuilding the objective from it never recalibrates."""
        out: dict[str, Any] = {}
        for b in self._stateful():
            out.update(b.calibrated_values(state[b.name]))
        return out

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise ValueError when ``state`` was not made for this objective (another method's)."""
        expected = {b.name for b in self._stateful()}
        if set(state) != expected:
            raise ValueError(f"objective state has entries for {sorted(state)} but {self.name!r} keeps state "
                             f"for {sorted(expected)}; was it saved by another method?")
        for b in self._stateful():
            b.check_state(state[b.name])

    # -- per-step statistics (beta-DPO): read before each optimizer step, over all of its pairs ---------
    def step_stats(self, batch: PairLogps) -> dict[str, Tensor]:
        """Per-pair statistics (B,) that :meth:`begin_step` reads, by balancer (detached)."""
        self._check(batch)
        seq = PairSeq.build(batch, read_reference=self.needs_reference)
        with torch.no_grad():
            rewards = tuple(r.detach() for r in self.loss_spec.rewards(seq, self.loss_hp))
            return {b.name: stat for b in self.balancers if (stat := b.step_stat(seq, rewards)) is not None}

    def begin_step(self, state: dict[str, Any], batch: PairLogps | dict[str, Tensor],
                   gather: Callable[[Tensor], Tensor] | None = None) -> dict[str, Any]:
        """The state an optimizer step's forward reads, from every pair of the step (``state`` unchanged).

        Args:
            state: the state between steps.
            batch: the step's pairs, or their :meth:`step_stats` (all micro-batches, in the step's order).
            gather: collects a statistic from every rank first, in rank order (``accelerator.gather``).
        """
        stats = self.step_stats(batch) if isinstance(batch, PairLogps) else batch
        new = dict(state)
        for b in self._stateful():
            if b.needs_step_stats:
                stat = gather(stats[b.name]) if gather else stats[b.name]
                new[b.name] = b.begin_step(state[b.name], stat)
        return new

    def end_step(self, state: dict[str, Any]) -> dict[str, Any]:
        """The state after the optimizer step (running statistics advanced); unchanged without step stats."""
        return {**state, **{b.name: b.end_step(state[b.name]) for b in self._stateful() if b.needs_step_stats}}

    def selection(self, state: dict[str, Any] | None) -> tuple[list[int], int] | None:
        """(positions in the step of the pairs its loss averages over, the step's number of pairs) when the
        state keeps only some (``dynbeta_keep`` < 1), else None."""
        for b in self.balancers:
            if state and b.name in state and (sel := b.selection(state[b.name])) is not None:
                return sel
        return None

    def _stateful(self) -> list[Balancer]:
        return [b for b in self.balancers if b.init_state()]


def _kept(keep: list[int], positions: Sequence[int] | None, size: int, like: Tensor) -> Tensor:
    """(B,) 1 for the pairs of this batch that the step keeps, else 0."""
    pos = range(size) if positions is None else list(positions)
    if len(pos) != size:
        raise ValueError(f"positions has {len(pos)} entries for a batch of {size} pairs")
    kept = set(keep)
    return torch.tensor([float(p in kept) for p in pos], dtype=like.dtype, device=like.device)


def _base_metrics(seq: PairSeq, rewards: tuple[Tensor, Tensor], per_pair: Tensor,
                  batch: PairLogps) -> dict[str, Tensor]:
    with torch.no_grad():
        r_w, r_l = rewards
        n_tok = batch.chosen_mask.sum().clamp(min=1)
        return {
            "loss": per_pair.detach().mean(),
            "rewards/chosen": r_w.mean(), "rewards/rejected": r_l.mean(),
            "rewards/margins": (r_w - r_l).mean(), "rewards/accuracies": (r_w > r_l).to(r_w.dtype).mean(),
            "logps/chosen": seq.S_w.detach().mean(), "logps/rejected": seq.S_l.detach().mean(),
            "logps/chosen_token_mean": seq.A_w.detach().mean(),
            "logps/rejected_token_mean": seq.A_l.detach().mean(),
            "nll_loss": -seq.S_w.detach().sum() / n_tok,
        }


def resolve_method(method: str, balance: str | Sequence[str] | None = (), **hyperparameters: Any) -> Objective:
    """The one place a method name becomes an objective: a preset (``adadpo``: a loss plus balancers) or
    a base loss, plus any extra ``balance`` (added after the preset's own, each once), with the
    hyperparameters. The config, the command line, the Python API and the TRL integration all call it.
    """
    extra = (balance,) if isinstance(balance, str) else tuple(balance or ())
    if method in PRESETS:
        p = PRESETS[method]
        loss, names = p.loss, list(p.balance) + [b for b in extra if b not in p.balance]
    elif method in LOSSES:
        loss, names = method, list(extra)
    else:
        raise ConfigError(f"unknown method {method!r}; presets: {', '.join(PRESETS)}; losses: "
                          f"{', '.join(LOSSES)}.{suggest(method, list(PRESETS) + list(LOSSES))}")
    return Objective(loss=loss, balance=names, **hyperparameters)


def objective(name: str, **hyperparameters: Any) -> Objective:
    """A preset (``adadpo``, ``gate-dpo``, ``balanced-dpo``, ...) or a plain loss name, with overrides."""
    return resolve_method(name, **hyperparameters)
