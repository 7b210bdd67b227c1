"""What a balancer is: a transform of the chosen and rejected terms, composed with any base loss.

In the spirit of optax's ``chain``: a balancer computes coefficients from the current batch (under
no-grad, in float32, from log-space quantities; spec section 4) and says how to apply them:

- ``forward``: t -> c*t; the loss value changes.
- ``gradient``: t -> sg(t) + c*(t - sg(t)); the loss value is unchanged and dL/dt is scaled by c.

Several balancers compose by multiplying their coefficients; the order does not matter because no
coefficient depends on another balancer's output.
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

    def scales(self, seq: PairSeq, rewards: tuple[Tensor, Tensor]) -> tuple[list[Scale], dict[str, Tensor]]:
        """Coefficients for this batch and this balancer's metrics (detached 0-d tensors)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Explicit state (for checkpoints); stateless balancers return {}."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"balancer {self.name!r} is stateless but got state {sorted(state)}")

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
