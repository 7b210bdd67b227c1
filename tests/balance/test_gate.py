"""Gate-DPO (spec section 6): the gate value, both estimators, both applications, calibration."""

import math

import pytest
import torch
import torch.nn.functional as F

from poise import Objective, PairLogps

D = torch.float64


def batch():
    c = torch.tensor([[-0.2, -0.4], [-1.5, -2.5]], dtype=D, requires_grad=True)
    r = torch.tensor([[-1.0, -3.0, -2.0], [-0.1, -0.3, 9.0]], dtype=D, requires_grad=True)
    mr = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return PairLogps(c, r, torch.ones(2, 2, dtype=torch.bool), mr,
                     ref_chosen=torch.tensor([-0.5, -3.0], dtype=D), ref_rejected=torch.tensor([-3.0, -1.0], dtype=D))


def sig(z):
    return 1 / (1 + math.exp(-z))


def test_gate_values_seq_estimator():
    """phat = exp(A_l): pair 1 A_l = -2 -> 0.1353353; pair 2 A_l = -0.2 -> 0.8187308.
    tau 0.3, a 10: g = sigma(10*(0.1353 - 0.3)) = sigma(-1.6466) = 0.1615; sigma(5.187) = 0.99444."""
    out = Objective("dpo", balance=["gate"], gate_tau=0.3, gate_sharpness=10.0)(batch())
    g = [sig(10 * (math.exp(-2.0) - 0.3)), sig(10 * (math.exp(-0.2) - 0.3))]
    assert out.metrics["gate/mean"].item() == pytest.approx(sum(g) / 2, abs=1e-12)
    assert out.metrics["gate/min"].item() == pytest.approx(g[0], abs=1e-12)
    assert out.metrics["gate/closed_frac"].item() == 0.5
    assert out.metrics["gate/tau"].item() == pytest.approx(0.3)


def test_gate_quantile_estimator():
    """q = 0.5 over the rejected token probabilities: pair 1 median of {e^-1, e^-3, e^-2} = e^-2;
    pair 2 (two tokens) midpoint of e^-0.1 and e^-0.3."""
    out = Objective("dpo", balance=["gate"], gate_estimator="quantile", gate_quantile=0.5,
                    gate_tau=0.3, gate_sharpness=10.0)(batch())
    ph = [math.exp(-2.0), (math.exp(-0.1) + math.exp(-0.3)) / 2]
    g = [sig(10 * (p - 0.3)) for p in ph]
    assert out.metrics["gate/mean"].item() == pytest.approx(sum(g) / 2, abs=1e-12)
    assert out.metrics["gate/phat_q50"].item() == pytest.approx(sum(ph) / 2, abs=1e-12)


def test_auto_sharpness_is_four_over_tau():
    out = Objective("dpo", balance=["gate"], gate_tau=0.2)(batch())
    assert out.metrics["gate/sharpness"].item() == pytest.approx(20.0)


def test_forward_application_scales_the_rejected_term():
    """gate_apply=forward: L = -log sigma(beta*h_w - beta*g*h_l) with g frozen."""
    b = batch()
    out = Objective("dpo", balance=["gate"], gate_apply="forward", gate_tau=0.3, gate_sharpness=10.0)(b)
    S_w = b.chosen.sum(-1)
    S_l = torch.where(b.rejected_mask, b.rejected, 0).sum(-1)
    g = torch.tensor([sig(10 * (math.exp(-2.0) - 0.3)), sig(10 * (math.exp(-0.2) - 0.3))], dtype=D)
    expect = F.softplus(-(0.1 * (S_w - b.ref_chosen) - 0.1 * g * (S_l - b.ref_rejected))).mean()
    assert out.loss.item() == pytest.approx(expect.item(), abs=1e-12)
    g1 = torch.autograd.grad(out.loss, b.rejected, retain_graph=True)[0]
    g2 = torch.autograd.grad(expect, b.rejected)[0]
    assert torch.allclose(g1, g2, atol=1e-12)


def test_caldpo_gate_covers_the_rejected_calibration_term():
    """Gradient-only on h_l everywhere h_l appears: dL/dh_l = g * (base dL/dh_l) including (h_l + c)^2."""
    b = batch()
    base = Objective("caldpo")(b)
    gated = Objective("caldpo", balance=["gate"], gate_tau=0.3, gate_sharpness=10.0)(b)
    gb = torch.autograd.grad(base.loss, b.rejected)[0]
    gg = torch.autograd.grad(gated.loss, b.rejected)[0]
    g = torch.tensor([sig(10 * (math.exp(-2.0) - 0.3)), sig(10 * (math.exp(-0.2) - 0.3))], dtype=D)
    assert torch.allclose(gg, gb * g[:, None], atol=1e-12)


def _phat_batch(values):
    """One-token rejected responses with probability values[i]."""
    n = len(values)
    r = torch.tensor(values, dtype=D).log()[:, None]
    c = torch.full((n, 1), -0.5, dtype=D)
    ones = torch.ones(n, 1, dtype=torch.bool)
    return PairLogps(c, r, ones, ones, ref_chosen=torch.zeros(n, dtype=D), ref_rejected=torch.zeros(n, dtype=D))


def test_auto_calibration_on_the_first_pairs_then_frozen():
    """tau = 0.25-quantile of phat over exactly the first 8 pairs, in a calibration step of its own; the
    forward never calibrates, and refuses an uncalibrated gate."""
    obj = Objective("dpo", balance=["gate"], gate_calibration_pairs=8)
    first = _phat_batch([0.1, 0.2, 0.3, 0.4, 0.5])
    with pytest.raises(ValueError, match="not calibrated"):
        obj(first)
    state = obj.calibrate(obj.init_state(), first)
    assert obj.needs_calibration(state)
    state = obj.calibrate(state, _phat_batch([0.6, 0.7, 0.8, 0.01, 0.02]))  # only 0.6, 0.7, 0.8 are taken
    expect = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], dtype=D).quantile(0.25).item()
    assert state["gate"]["tau"] == pytest.approx(expect)
    fresh = Objective("dpo", balance=["gate"], gate_calibration_pairs=8)
    fresh.check_state(state)
    assert not fresh.needs_calibration(state)
    assert fresh(first, state).metrics["gate/tau"].item() == pytest.approx(expect)
    # the calibrated threshold as a plain number builds the same gate (what config.yaml records)
    numeric = Objective("dpo", balance=["gate"], **obj.calibrated_values(state))
    assert numeric(first).metrics["gate/mean"].item() == fresh(first, state).metrics["gate/mean"].item()


def test_explicit_calibration_with_gather():
    obj = Objective("dpo", balance=["gate"], gate_calibration_pairs=4)
    seen = []
    state = obj.calibrate(obj.init_state(), _phat_batch([0.1, 0.2]),
                          gather=lambda t: (seen.append(t), torch.cat([t, t + 0.5]))[1])
    assert len(seen) == 1 and not obj.needs_calibration(state)
    assert state["gate"]["tau"] == pytest.approx(torch.tensor([0.1, 0.2, 0.6, 0.7], dtype=D).quantile(0.25).item())


def test_state_of_another_method_is_refused():
    with pytest.raises(ValueError, match="another method"):
        Objective("dpo", balance=["gate"]).check_state({})
    with pytest.raises(ValueError, match="another method"):
        Objective("dpo", balance=["ada"]).check_state({"gate": {"tau": 0.1, "seen": []}})
    Objective("dpo", balance=["ada"]).check_state({})
