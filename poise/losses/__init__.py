"""The base losses of spec sections 3 and 10, one table."""

from poise.losses.base import TERM_KINDS, LossSpec, Terms
from poise.losses.baselines import BASELINE_LOSSES
from poise.losses.reference import REFERENCE_LOSSES
from poise.losses.reference_free import REFERENCE_FREE_LOSSES

#: Every base loss by name. The trainer and the objective look losses up here; nothing branches on
#: a loss name.
LOSSES: dict[str, LossSpec] = {s.name: s for s in REFERENCE_LOSSES + REFERENCE_FREE_LOSSES + BASELINE_LOSSES}

__all__ = ["LOSSES", "LossSpec", "TERM_KINDS", "Terms"]
