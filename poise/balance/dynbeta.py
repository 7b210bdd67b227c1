"""beta-DPO's batch-adaptive beta (arXiv 2407.08639; spec section 10), as a balancer with explicit state.

With M_i = beta*(h_w - h_l) the implicit reward margin of pair i, Mbar its mean over every pair of the
optimizer step (all micro-batches and ranks) and M0 a running mean of Mbar:

    beta_batch = max(1e-3, 1 + alpha*(Mbar - M0)) * beta
    M0 <- m*M0 + (1 - m)*Mbar       after each step; M0 = Mbar at the first step (so beta_batch = beta)

Applied as forward scaling of both log-ratio terms by c = sg(beta_batch/beta): for every loss whose
beta multiplies the log-ratios (``SCALES_WITH_BETA``) that is the loss with beta replaced by
beta_batch. Both branches get the same c, so the ratio of the chosen to the rejected gradient is the
base loss's: beta-DPO changes the step size per batch, not the chosen/rejected balance. Other losses
are refused (IPO's and Cal-DPO's beta sets a target, not a scale; reference-free losses have no
log-ratio margin).

Optional data filter ``dynbeta_keep`` rho < 1: round(rho*B) pairs of the step's B are kept (rounded
half up, at least 1), drawn without replacement with weights exp(-(M_i - M0)^2 / (2 s^2)), s the
step's (population) standard deviation of M (equal weights when s <= 1e-4, the level of float rounding:
at the first step every margin is 0 in exact arithmetic), by the Gumbel-top-k draw
(exactly sequential weighted sampling without replacement, in log space so no weight underflows),
from a generator seeded by the state; the loss averages over the kept pairs.

State (explicit, saved in checkpoints): ``M0`` (None before the first step), ``steps``, ``rng`` (the
seed of the next draw) and ``step`` (the values of a step begun and not yet ended; None between
steps). Mbar is over the whole step, so the trainer reads the step's margins first (no gradient),
gathers them over ranks, then calls ``begin_step``; a plain PyTorch loop does the same::

    state = objective.begin_step(state, batch)     # the step's pairs (or their step_stats, gathered)
    out = objective(batch, state=state)             # beta_batch (and the kept pairs) of this step
    out.loss.backward(); opt.step()
    state = objective.end_step(state)               # M0 advanced

Outside a begun step (evaluation, probes), the forward uses the mean margin of the batch it is given,
with the state's M0 (beta itself before the first step), and keeps every pair.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from poise.balance.base import Balancer, Scale
from poise.params import Param

#: Floor of beta_batch/beta (spec section 10).
SCALE_MIN = 1e-3
#: The first draw's seed (the state carries the next one).
SEED = 0x5EED

#: Losses whose beta multiplies the log-ratios h (or hbar), so that scaling both terms by c is the loss
#: with beta*c (spec section 10). Decided here, not in the loss table: a loss knows nothing of balancers.
SCALES_WITH_BETA = ("dpo", "cdpo", "robust", "hinge", "rdpo", "dposhift", "dpop", "nca", "apozero", "apodown",
                    "dponorm")

DYNBETA_PARAMS = (
    Param("dynbeta_alpha", 0.5, "beta-DPO's alpha: beta_batch = max(1e-3, 1 + alpha*(Mbar - M0))*beta, Mbar the "
          "step's mean margin beta*(h_w - h_l), M0 its running mean; 0 gives the base loss.", low=0.0),
    Param("dynbeta_momentum", 0.9, "Momentum m of the running mean: M0 <- m*M0 + (1-m)*Mbar after each step "
          "(M0 = Mbar at the first step).", low=0.0, high=1.0),
    Param("dynbeta_keep", 1.0, "Fraction rho of each step's pairs the loss keeps, drawn with weights "
          "exp(-(M_i - M0)^2/(2 s^2)) (beta-DPO's data filter); 1 keeps every pair.", low=0.0, low_open=True,
          high=1.0),
)


def _scale(alpha: float, mbar: float, m0: float) -> float:
    """beta_batch/beta; NaN when Mbar is not finite (the step's loss is then not finite and skipped)."""
    if not math.isfinite(mbar):
        return math.nan
    return max(SCALE_MIN, 1.0 + alpha * (mbar - m0))


def keep_count(rho: float, n: int) -> int:
    """round(rho*n), half up, at least 1 and at most n."""
    return min(n, max(1, math.floor(rho * n + 0.5)))


#: Margin spreads up to this (nats x beta) count as 0 (equal weights): float rounding, not data.
SPREAD_FLOOR = 1e-4


def draw_kept(margins: Tensor, m0: float, k: int, seed: int) -> tuple[list[int], int]:
    """k positions drawn without replacement with weights exp(-(M_i - m0)^2/(2 s^2)) (Gumbel-top-k on
    the log-weights), sorted, and the seed of the next draw."""
    M = margins.detach().double().cpu().flatten()
    s = float(M.std(unbiased=False)) if M.numel() > 1 else 0.0
    # a spread at the level of float rounding is none: at the first step every margin is 0 in exact
    # arithmetic (policy = reference) and the draw must not depend on how the batch was cut
    logw = -(M - m0) ** 2 / (2 * s * s) if s > SPREAD_FLOOR else torch.zeros_like(M)
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(M.numel(), generator=g, dtype=torch.float64)
    keys = logw - torch.log(-torch.log(u))
    kept = sorted(torch.topk(keys, k).indices.tolist())
    return kept, int(torch.randint(0, 2 ** 62, (1,), generator=g).item())


class DynBeta(Balancer):
    name = "dynbeta"
    params = DYNBETA_PARAMS
    paper = "beta-DPO, arXiv 2407.08639"
    summary = "Batch-adaptive beta from the step's mean margin against its running mean (and a margin filter)"

    def __init__(self, loss, hp: dict[str, Any]):
        super().__init__(loss, hp)
        if loss.name not in SCALES_WITH_BETA:
            why = ("it has no reference, so no implicit reward margin beta*(h_w - h_l) to adapt beta to"
                   if not loss.needs_reference else
                   "its beta does not multiply the log-ratios (it sets a target margin), so beta_batch would "
                   "not be a rescaling of its terms")
            raise self._refuse(f"{why}. dynbeta (beta-DPO) works with {', '.join(SCALES_WITH_BETA)}.")

    @property
    def needs_reference(self) -> bool:
        return True

    # -- state -----------------------------------------------------------------------------------------
    def init_state(self) -> dict[str, Any]:
        return {"M0": None, "steps": 0, "rng": SEED, "step": None}

    @property
    def needs_step_stats(self) -> bool:
        return True

    def step_stat(self, seq, rewards):
        r_w, r_l = rewards
        return (r_w - r_l).detach()

    def begin_step(self, state: dict[str, Any], stat: Tensor) -> dict[str, Any]:
        """beta_batch (and the kept pairs) of a step from the margins of all its pairs, in order."""
        M = stat.detach().double().cpu().flatten()
        if M.numel() == 0:
            raise ValueError("dynbeta: begin_step needs the margins of the step's pairs, and got none")
        mbar = float(M.mean())
        m0 = mbar if state["M0"] is None else float(state["M0"])
        step = {"Mbar": mbar, "M0": m0, "scale": _scale(self.hp["dynbeta_alpha"], mbar, m0), "keep": None,
                "pairs": M.numel()}
        rng = state["rng"]
        if self.hp["dynbeta_keep"] < 1:
            step["keep"], rng = draw_kept(M, m0, keep_count(self.hp["dynbeta_keep"], M.numel()), rng)
        return {**state, "rng": rng, "step": step}

    def end_step(self, state: dict[str, Any]) -> dict[str, Any]:
        """M0 advanced by the step's Mbar (kept when Mbar was not finite), the step closed."""
        step = state["step"]
        if step is None:
            raise ValueError("dynbeta: end_step without begin_step; call objective.begin_step(state, batch) "
                             "before the step's forward")
        mbar, m = step["Mbar"], self.hp["dynbeta_momentum"]
        m0 = state["M0"]
        if math.isfinite(mbar):
            m0 = mbar if m0 is None else m * m0 + (1 - m) * mbar
        return {**state, "M0": m0, "steps": state["steps"] + 1, "step": None}

    def selection(self, state: dict[str, Any]) -> tuple[list[int], int] | None:
        step = state.get("step")
        return None if step is None or step["keep"] is None else (step["keep"], step["pairs"])

    def check_state(self, state: dict[str, Any]) -> None:
        super().check_state(state)
        if state["M0"] is not None and not isinstance(state["M0"], (int, float)):
            raise ValueError(f"dynbeta state has M0={state['M0']!r}, not a number")

    # -- the forward -------------------------------------------------------------------------------------
    def scales(self, state, seq, rewards):
        step = state.get("step")
        with torch.no_grad():
            if step is not None:
                mbar, m0, scale = step["Mbar"], step["M0"], step["scale"]
            else:  # outside a step (evaluation, probes): this batch's mean margin, the state's M0
                mbar = float((rewards[0] - rewards[1]).double().mean())
                m0 = mbar if state.get("M0") is None else float(state["M0"])
                scale = _scale(self.hp["dynbeta_alpha"], mbar, m0)
            ref = rewards[0]
            c = torch.full_like(ref, scale)
            metrics = {
                "dynbeta/scale": torch.tensor(scale, dtype=ref.dtype, device=ref.device),
                "dynbeta/margin_mean": torch.tensor(mbar, dtype=ref.dtype, device=ref.device),
                "dynbeta/margin_running": torch.tensor(m0, dtype=ref.dtype, device=ref.device),
            }
            if step is not None and step["keep"] is not None:
                metrics["dynbeta/kept_frac"] = torch.tensor(len(step["keep"]) / step["pairs"], dtype=ref.dtype,
                                                            device=ref.device)
        return [Scale("forward", chosen=c, rejected=c)], metrics
