"""Named methods: a base loss plus balancers (spec section 9). ``poise.objective(name)`` builds them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    loss: str
    balance: tuple[str, ...]
    paper: str
    summary: str


_ADA = "AdaDPO, arXiv 2605.28440"
_GATE = "Gate-DPO, arXiv 2605.02626"

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("adadpo", "dpo", ("ada",), _ADA, "DPO with AdaDPO's per-token balanced, clipped kappa"),
    Preset("ada-simpo", "simpo", ("ada",), _ADA + ", construction for SimPO", "SimPO with kappa on A_w"),
    Preset("ada-ipo", "ipo", ("ada",), _ADA + ", construction for IPO", "IPO with gradient-only kappa on hbar_w"),
    Preset("ada-rdpo", "rdpo", ("ada",), _ADA + ", construction for R-DPO", "R-DPO with kappa on h_w"),
    Preset("ada-cpo", "cpo", ("ada",), _ADA + ", construction for CPO", "CPO with kappa on S_w (NLL untouched)"),
    Preset("ada-orpo", "orpo", ("ada",), _ADA + ", construction for ORPO", "ORPO with kappa on the chosen log-odds"),
    Preset("gate-dpo", "dpo", ("gate",), _GATE, "DPO with the rejected gradient gated by phat(y_l)"),
    Preset("gate-ipo", "ipo", ("gate",), _GATE, "IPO with the gated rejected gradient"),
    Preset("gate-caldpo", "caldpo", ("gate",), _GATE, "Cal-DPO with the gate on both rejected terms"),
    Preset("gate-dposhift", "dposhift", ("gate",), _GATE, "DPO-Shift with the gated rejected gradient"),
    Preset("balanced-dpo", "dpo", ("balanced",), "Balanced-DPO, arXiv 2502.20847 (reconstruction)",
           "DPO with chosen and rejected gradients reweighted to equal logit-space norm"),
    Preset("beta-dpo", "dpo", ("dynbeta",), "Wu et al. 2024 (beta-DPO), arXiv 2407.08639",
           "DPO with beta adapted per step to the mean margin against its running mean"),
)}
