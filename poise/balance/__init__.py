"""Gradient balancers of spec sections 5-7 and beta-DPO's adaptive beta (section 10), composed with the base
losses."""

from poise.balance.ada import Ada
from poise.balance.balanced import Balanced
from poise.balance.base import Balancer, Scale, apply_scales
from poise.balance.dynbeta import DynBeta
from poise.balance.gate import Gate

#: Every balancer by name.
BALANCERS: dict[str, type[Balancer]] = {b.name: b for b in (Ada, Gate, Balanced, DynBeta)}

__all__ = ["BALANCERS", "Ada", "Balanced", "Balancer", "DynBeta", "Gate", "Scale", "apply_scales"]
