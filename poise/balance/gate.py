"""Gate-DPO (seed 002; arXiv 2605.02626; spec section 6).

A gate on the rejected gradient from the model's probability of the rejected response:

    g    = sg(sigma(a*(phat(y_l) - tau)))
    phat = exp(A_l)                                   (gate_estimator="seq", default)
    phat = q-quantile of {p_t(y_l)} over the tokens   (gate_estimator="quantile", q = gate_quantile)

Applied gradient-only to the rejected term by default (the loss value is the base loss's). When phat
is far below tau the push on the rejected response fades (g -> 0), which stops DPO from squeezing
probability mass onto the mode.

tau and a are not published. tau="auto" is the ``gate_calibration_quantile`` (0.25) quantile of phat
over the first ``gate_calibration_pairs`` (256) training pairs under the initial policy, computed once
and kept as state (saved in checkpoints); a="auto" is 4/tau. Until calibration is complete the gate is
open (g = 1: the base loss). The poise trainer calibrates on the initial policy before the first
step; a plain PyTorch loop may call ``objective.calibrate(batch)`` itself, or let the first batches
calibrate it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from poise.balance.base import Balancer, Scale
from poise.ops import masked_quantile, upcast
from poise.params import Param
from poise.seq import PairSeq

#: tau is held above this so that a = 4/tau stays finite in float32 (numerical guard).
TAU_MIN = 1e-30

GATE_PARAMS = (
    Param("gate_estimator", "seq", "'seq': phat = exp(mean token log-prob of y_l); 'quantile': the "
          "gate_quantile quantile of the rejected token probabilities (the paper's q10).",
          kind="choice", choices=("seq", "quantile")),
    Param("gate_quantile", 0.1, "q of the 'quantile' estimator.", low=0.0, high=1.0),
    Param("gate_tau", "auto", "Probability threshold tau: below it the rejected push fades. 'auto' "
          "calibrates it on the first training pairs.", kind="float|auto", low=0.0, low_open=True,
          high=1.0),
    Param("gate_sharpness", "auto", "Slope a of the gate sigma(a*(phat - tau)); 'auto' = 4/tau.",
          kind="float|auto", low=0.0, low_open=True),
    Param("gate_apply", "gradient", "'gradient': scale only the rejected gradient (loss value unchanged, "
          "the paper); 'forward': scale the rejected term in the loss.", kind="choice",
          choices=("gradient", "forward")),
    Param("gate_calibration_pairs", 256, "Pairs used to calibrate gate_tau='auto'.", kind="int", low=1),
    Param("gate_calibration_quantile", 0.25, "Quantile of phat over the calibration pairs that becomes "
          "tau.", low=0.0, low_open=True, high=1.0, high_open=True),
)


class Gate(Balancer):
    name = "gate"
    params = GATE_PARAMS
    paper = "Gate-DPO, arXiv 2605.02626 (seed 002)"
    summary = "Gate sigma(a*(phat(y_l) - tau)) on the rejected gradient, against squeezing"

    def __init__(self, loss, hp: dict[str, Any]):
        super().__init__(loss, hp)
        self.tau: float | None = None if hp["gate_tau"] == "auto" else float(hp["gate_tau"])
        self._seen: list[float] = []  # phat of the calibration pairs seen so far

    def phat(self, seq: PairSeq) -> Tensor:
        """(B,) estimated probability of each rejected response, detached, float32 or wider."""
        lp = seq.logps
        if self.hp["gate_estimator"] == "seq":
            return torch.exp(seq.A_l.detach())
        p = torch.exp(upcast(lp.rejected).detach())
        return masked_quantile(p, lp.rejected_mask, self.hp["gate_quantile"])

    @property
    def calibrated(self) -> bool:
        return self.tau is not None

    @property
    def sharpness(self) -> float | None:
        a = self.hp["gate_sharpness"]
        if a != "auto":
            return float(a)
        return None if self.tau is None else 4.0 / self.tau

    def calibrate(self, phat: Tensor) -> None:
        """Feed phat of training pairs under the initial policy (already gathered over ranks)."""
        if self.calibrated:
            return
        need = self.hp["gate_calibration_pairs"]
        self._seen.extend(phat.detach().double().flatten().tolist()[: need - len(self._seen)])
        if len(self._seen) >= need:
            q = torch.tensor(self._seen, dtype=torch.float64).quantile(self.hp["gate_calibration_quantile"])
            self.tau = max(float(q), TAU_MIN)

    def scales(self, seq, rewards):
        with torch.no_grad():
            ph = self.phat(seq)
            if not self.calibrated:
                self.calibrate(ph)
            if self.calibrated:
                g = torch.sigmoid(self.sharpness * (ph - self.tau))
            else:
                g = torch.ones_like(ph)
            q = torch.quantile(ph.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64,
                                                         device=ph.device)).to(ph.dtype)
            metrics = {
                "gate/mean": g.mean(), "gate/min": g.min(), "gate/max": g.max(),
                "gate/closed_frac": (g < 0.5).to(g.dtype).mean(),
                "gate/phat_q10": q[0], "gate/phat_q50": q[1], "gate/phat_q90": q[2],
                "gate/calibrating": torch.tensor(0.0 if self.calibrated else 1.0),
            }
            if self.calibrated:
                metrics["gate/tau"] = torch.tensor(self.tau)
                metrics["gate/sharpness"] = torch.tensor(self.sharpness)
        return [Scale(self.hp["gate_apply"], rejected=g)], metrics

    def state_dict(self) -> dict[str, Any]:
        return {"tau": self.tau, "seen": list(self._seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tau = state["tau"]
        self._seen = list(state.get("seen", []))
