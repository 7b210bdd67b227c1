"""Gradient balancers of spec sections 5-7, composable with every base loss."""

from poise.balance.ada import Ada
from poise.balance.balanced import Balanced
from poise.balance.base import Balancer, Scale, apply_scales
from poise.balance.gate import Gate

#: Every balancer by name.
BALANCERS: dict[str, type[Balancer]] = {b.name: b for b in (Ada, Gate, Balanced)}

__all__ = ["BALANCERS", "Ada", "Balanced", "Balancer", "Gate", "Scale", "apply_scales"]
