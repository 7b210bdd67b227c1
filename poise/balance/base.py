"""What a balancer is: a transform of the chosen and rejected terms, composed with any base loss.

In the spirit of optax's ``chain``: a balancer computes coefficients from the current batch (under
no-grad, in float32, from log-space quantities; spec section 4) and its explicit state, and says how
to apply them:

- ``forward``: t -> c*t; the loss value changes.
- ``gradient``: t -> sg(t) + c*(t - sg(t)); the loss value is unchanged and dL/dt is scaled by c.

Several balancers compose by multiplying their coefficients; the order does not matter because no
coefficient depends on another balancer's output.

State is explicit, as in optax: :meth:`Balancer.init_state` creates it (a plain dict of numbers and
lists, saved in checkpoints as it is), :meth:`Balancer.scales` reads it and never changes it, and
calibration is a step of its own that returns a new state (:meth:`Balancer.calibrate`, fed a
per-pair statistic of training pairs under the initial policy, and :meth:`Balancer.finish_calibration`
when the run has fewer pairs than the balancer asked for). A stateless balancer's state is ``{}``.

A balancer whose coefficients depend on the whole optimizer step (beta-DPO's batch-mean margin, over
every micro-batch and rank) says so with :attr:`Balancer.needs_step_stats`; the trainer then reads a
per-pair statistic of the step's pairs before the step (:meth:`Balancer.step_stat`, no gradient),
gathers it over ranks, and calls :meth:`Balancer.begin_step` (a new state that the step's forward
reads) and, after the update, :meth:`Balancer.end_step` (the state the next step starts from). Such a
balancer may also keep only some pairs of the step (:meth:`Balancer.selection`): the loss then
averages over those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from poise.errors import ConfigError
from poise.losses.base import LossSpec
from poise.ops import scale_gradient
from poise.params import Param
from poise.seq import PairSeq


@dataclass
class Scale:
    """Coefficients for one application mode; ``None`` leaves that side untouched."""

    mode: str  # "forward" | "gradient"
    chosen: Tensor | None = None  # (B,)
    rejected: Tensor | None = None  # (B,)


class Balancer:
    """Base class. Subclasses set the class attributes and implement :meth:`scales`.

    A balancer is built once per objective from its own hyperparameters (already validated) and the
    base loss it is composed with; a combination that makes no sense raises ConfigError there.
    """

    name: ClassVar[str]
    params: ClassVar[tuple[Param, ...]]
    paper: ClassVar[str]
    summary: ClassVar[str]

    def __init__(self, loss: LossSpec, hp: dict[str, Any]):
        self.loss = loss
        self.hp = hp

    @property
    def needs_reference(self) -> bool:
        return False

    @property
    def needs_stats(self) -> frozenset[str]:
        return frozenset()

    # -- state -----------------------------------------------------------------------------------------
    def init_state(self) -> dict[str, Any]:
        """A new state; stateless balancers return {}."""
        return {}

    def needs_calibration(self, state: dict[str, Any]) -> bool:
        """Whether ``state`` must be calibrated before :meth:`scales` can use it."""
        return False

    def calibration_stat(self, seq: PairSeq) -> Tensor | None:
        """(B,) the per-pair statistic that calibration reads (detached), or None if there is none."""
        return None

    def calibrate(self, state: dict[str, Any], stat: Tensor) -> dict[str, Any]:
        """A new state with ``stat`` (of further training pairs, in order) taken into account."""
        return state

    def finish_calibration(self, state: dict[str, Any]) -> dict[str, Any]:
        """A calibrated state from the pairs seen so far, when the run has no more to give."""
        return state

    def calibrated_values(self, state: dict[str, Any]) -> dict[str, Any]:
        """Hyperparameters that calibration decided (e.g. ``{"gate_tau": 0.012}``), for the resolved
        config, the checkpoint and the model card; {} when there are none."""
        return {}

    # -- per-step statistics (beta-DPO): read before the step, over all of its pairs -------------------
    @property
    def needs_step_stats(self) -> bool:
        """Whether :meth:`begin_step` must see the step's pairs before the step's forward."""
        return False

    def step_stat(self, seq: PairSeq, rewards: tuple[Tensor, Tensor]) -> Tensor | None:
        """(B,) the per-pair statistic that :meth:`begin_step` reads (detached), or None."""
        return None

    def begin_step(self, state: dict[str, Any], stat: Tensor) -> dict[str, Any]:
        """The state the step's forward reads, from ``stat`` of every pair of the step (all ranks and
        micro-batches, in the step's order). Returns a new state."""
        return state

    def end_step(self, state: dict[str, Any]) -> dict[str, Any]:
        """The state after the step's update (running statistics advanced). Returns a new state."""
        return state

    def selection(self, state: dict[str, Any]) -> tuple[list[int], int] | None:
        """(positions, in the step's order, of the pairs the step's loss averages over; the step's number
        of pairs), or None: every pair."""
        return None

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise ValueError when ``state`` was not made for this balancer."""
        expected = set(self.init_state())
        if set(state) != expected:
            raise ValueError(f"balancer {self.name!r} keeps the state {sorted(expected)} but got {sorted(state)}")

    # -- the forward -------------------------------------------------------------------------------------
    def scales(self, state: dict[str, Any], seq: PairSeq,
               rewards: tuple[Tensor, Tensor]) -> tuple[list[Scale], dict[str, Tensor]]:
        """Coefficients for this batch and this balancer's metrics (detached 0-d tensors); pure."""
        raise NotImplementedError

    def _refuse(self, why: str) -> ConfigError:
        return ConfigError(f"balancer {self.name!r} cannot be used with loss {self.loss.name!r}: {why}")


def apply_scales(t_w: Tensor, t_l: Tensor, scales: list[Scale]) -> tuple[Tensor, Tensor]:
    """Apply every balancer's coefficients: gradient-only ones first, then forward ones, so that
    t' = c_forward * (sg(t) + c_gradient * (t - sg(t)))."""
    for mode in ("gradient", "forward"):
        for s in (s for s in scales if s.mode == mode):
            if s.chosen is not None:
                t_w = _apply(t_w, s.chosen, mode)
            if s.rejected is not None:
                t_l = _apply(t_l, s.rejected, mode)
    return t_w, t_l


def _apply(t: Tensor, c: Tensor, mode: str) -> Tensor:
    if mode == "gradient":
        return scale_gradient(t, c)
    return c.detach().to(t.dtype) * t
