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
and kept as explicit state ``{"tau", "seen"}`` (saved in checkpoints); a="auto" is 4/tau. Calibration
is a step of its own: the poise trainer runs it on the training pairs before the first step (gathered
over ranks; on all of them when the run has fewer than ``gate_calibration_pairs``). A plain PyTorch
loop does the same::

    state = objective.calibrate(objective.init_state(), batch)   # repeat until calibrated, then
    state = objective.finish_calibration(state)                  # (if the data ran out first)
    out = objective(batch, state=state)

The forward never calibrates: an uncalibrated gate is an error, never a silently open gate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from poise.balance.base import Balancer, Scale
from poise.errors import ConfigError
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
        self.fixed_tau: float | None = None if hp["gate_tau"] == "auto" else float(hp["gate_tau"])

    def phat(self, seq: PairSeq) -> Tensor:
        """(B,) estimated probability of each rejected response, detached, float32 or wider."""
        lp = seq.logps
        if self.hp["gate_estimator"] == "seq":
            return torch.exp(seq.A_l.detach())
        p = torch.exp(upcast(lp.rejected).detach())
        return masked_quantile(p, lp.rejected_mask, self.hp["gate_quantile"])

    # -- state: tau, and the phat of the calibration pairs seen so far ---------------------------------
    def init_state(self) -> dict[str, Any]:
        return {"tau": self.fixed_tau, "seen": []}

    def needs_calibration(self, state: dict[str, Any]) -> bool:
        return state["tau"] is None

    def calibration_stat(self, seq: PairSeq) -> Tensor:
        return self.phat(seq)

    def calibrate(self, state: dict[str, Any], stat: Tensor) -> dict[str, Any]:
        """Take phat of further training pairs (already gathered over ranks, in the data order); tau is
        set once ``gate_calibration_pairs`` have been seen. Returns a new state."""
        if not self.needs_calibration(state):
            return state
        need = self.hp["gate_calibration_pairs"]
        seen = list(state["seen"]) + stat.detach().double().flatten().tolist()[: need - len(state["seen"])]
        new = {"tau": None, "seen": seen}
        return self._fit(new) if len(seen) >= need else new

    def finish_calibration(self, state: dict[str, Any]) -> dict[str, Any]:
        """Calibrate on every pair seen so far (a run with fewer pairs than gate_calibration_pairs)."""
        if not self.needs_calibration(state):
            return state
        if not state["seen"]:
            raise ConfigError("gate_tau: auto calibrates on the first gate_calibration_pairs training pairs, and none "
                              "were given. Give the run training pairs, or set gate_tau to a probability (e.g. "
                              "gate_tau: 0.01).")
        return self._fit(state)

    def _fit(self, state: dict[str, Any]) -> dict[str, Any]:
        q = torch.tensor(state["seen"], dtype=torch.float64).quantile(self.hp["gate_calibration_quantile"])
        return {"tau": max(float(q), TAU_MIN), "seen": list(state["seen"])}

    def sharpness(self, state: dict[str, Any]) -> float:
        a = self.hp["gate_sharpness"]
        return float(a) if a != "auto" else 4.0 / state["tau"]

    def calibrated_values(self, state: dict[str, Any]) -> dict[str, Any]:
        if self.fixed_tau is not None or state["tau"] is None:
            return {}
        return {"gate_tau": state["tau"]}

    def check_state(self, state: dict[str, Any]) -> None:
        super().check_state(state)
        if self.fixed_tau is not None and state["tau"] != self.fixed_tau:
            raise ValueError(f"gate state has tau={state['tau']} but this objective sets gate_tau={self.fixed_tau}")

    # -- the forward -------------------------------------------------------------------------------------
    def scales(self, state, seq, rewards):
        if self.needs_calibration(state):
            raise ValueError("the gate is not calibrated (gate_tau: auto): calibrate it on training pairs under "
                             "the initial policy first, state = objective.calibrate(objective.init_state(), "
                             "batch) (and objective.finish_calibration(state) when the pairs run out), then "
                             "pass state=state; or set gate_tau to a probability.")
        tau, a = state["tau"], self.sharpness(state)
        with torch.no_grad():
            ph = self.phat(seq)
            g = torch.sigmoid(a * (ph - tau))
            q = torch.quantile(ph.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64,
                                                         device=ph.device)).to(ph.dtype)
            metrics = {
                "gate/mean": g.mean(), "gate/min": g.min(), "gate/max": g.max(),
                "gate/closed_frac": (g < 0.5).to(g.dtype).mean(),
                "gate/phat_q10": q[0], "gate/phat_q50": q[1], "gate/phat_q90": q[2],
                "gate/tau": torch.tensor(tau), "gate/sharpness": torch.tensor(a),
            }
        return [Scale(self.hp["gate_apply"], rejected=g)], metrics
