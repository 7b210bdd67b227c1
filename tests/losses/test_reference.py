"""Hand-worked values and finite-difference gradients of the reference losses (spec section 3).

Every test builds pairs whose completions are n tokens of equal log-prob, so the sums S are exact
and the expected numbers follow from the formula with plain ``math`` (no torch in the expectation).
"""

import math

import pytest
import torch

from poise import Objective, PairLogps


def sp(x: float) -> float:
    """softplus(x) = -log sigma(-x), in plain math."""
    return math.log1p(math.exp(x))


def pair(S_w, S_l, R_w, R_l, n_w=1, n_l=1, dtype=torch.float64):
    """B pairs with sequence log-probs S (each spread evenly over n tokens) and reference sums R."""
    c = torch.tensor(S_w, dtype=dtype)[:, None].repeat(1, n_w) / n_w
    r = torch.tensor(S_l, dtype=dtype)[:, None].repeat(1, n_l) / n_l
    c.requires_grad_(True)
    r.requires_grad_(True)
    return PairLogps(c, r, torch.ones_like(c, dtype=torch.bool), torch.ones_like(r, dtype=torch.bool),
                     ref_chosen=torch.tensor(R_w, dtype=dtype), ref_rejected=torch.tensor(R_l, dtype=dtype))


# One batch for all: h_w = S_w - R_w, h_l = S_l - R_l.
S_W, S_L, R_W, R_L = [-1.0, -4.0], [-3.0, -2.0], [-2.0, -3.0], [-2.0, -3.5]
H_W = [s - r for s, r in zip(S_W, R_W)]  # [1, -1]
H_L = [s - r for s, r in zip(S_L, R_L)]  # [-1, 1.5]


def mean(xs):
    return sum(xs) / len(xs)


def test_dpo_values_and_gradient():
    """beta = 0.5. Pair 1: u = 0.5*(1 - (-1)) = 1, loss = softplus(-1) = 0.3132617.
    Pair 2: u = 0.5*(-1 - 1.5) = -1.25, loss = softplus(1.25) = 1.5019291.
    dL/dS_w = -beta*sigma(-u)/B = -0.5*0.2689414/2 = -0.0672353 for pair 1 (mean over B = 2)."""
    out = Objective("dpo", beta=0.5)(b := pair(S_W, S_L, R_W, R_L))
    assert out.per_pair.tolist() == pytest.approx([0.31326168751822286, 1.501929081345373], abs=1e-12)
    assert out.loss.item() == pytest.approx(mean([sp(-1.0), sp(1.25)]), abs=1e-12)
    out.loss.backward()
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert b.chosen.grad[0, 0].item() == pytest.approx(-0.5 * sig(-1.0) / 2, abs=1e-12)
    assert b.rejected.grad[1, 0].item() == pytest.approx(+0.5 * sig(1.25) / 2, abs=1e-12)


@pytest.mark.parametrize("e", [0.0, 0.1, 0.3])
def test_cdpo_and_robust(e):
    """u = beta*(h_w - h_l) = [1, -1.25] at beta 0.5.
    cDPO = (1-e)*softplus(-u) + e*softplus(u); robust = [(1-e)*softplus(-u) - e*softplus(u)]/(1-2e).
    At e = 0 both equal DPO."""
    b = pair(S_W, S_L, R_W, R_L)
    us = [1.0, -1.25]
    c = Objective("cdpo", beta=0.5, label_smoothing=e)(b).per_pair.tolist()
    r = Objective("robust", beta=0.5, label_smoothing=e)(b).per_pair.tolist()
    assert c == pytest.approx([(1 - e) * sp(-u) + e * sp(u) for u in us], abs=1e-12)
    assert r == pytest.approx([((1 - e) * sp(-u) - e * sp(u)) / (1 - 2 * e) for u in us], abs=1e-12)


def test_ipo_is_length_normalised():
    """IPO with beta 0.25: target 1/(2*0.25) = 2. Chosen: S_w = -1 over 2 tokens, R_w = -2 -> hbar_w = 0.5.
    Rejected: S_l = -3 over 4 tokens, R_l = -2 -> hbar_l = -0.25. Loss = (0.5 + 0.25 - 2)^2 = 1.5625."""
    b = pair([-1.0], [-3.0], [-2.0], [-2.0], n_w=2, n_l=4)
    assert Objective("ipo", beta=0.25)(b).loss.item() == pytest.approx(1.5625, abs=1e-12)


def test_hinge():
    """beta 0.5: margins beta*(h_w - h_l) = [1, -1.25] -> max(0, 1 - m) = [0, 2.25]."""
    b = pair(S_W, S_L, R_W, R_L)
    assert Objective("hinge", beta=0.5)(b).per_pair.tolist() == pytest.approx([0.0, 2.25], abs=1e-12)


def test_rdpo_length_term():
    """beta 0.5, alpha 0.1, |y_w| = 3, |y_l| = 1: u = 0.5*(1 + 1) + 0.1*(3 - 1) = 1.2, loss = softplus(-1.2)."""
    b = pair([-1.0], [-3.0], [-2.0], [-2.0], n_w=3, n_l=1)
    assert Objective("rdpo", beta=0.5, alpha=0.1)(b).loss.item() == pytest.approx(sp(-1.2), abs=1e-12)


def test_caldpo_has_no_beta_in_first_term():
    """beta 0.5 -> 1/(2 beta) = 1. h_w = 1, h_l = -1: softplus(-(1+1)) + (1-1)^2 + (-1+1)^2 = softplus(-2)."""
    b = pair([-1.0], [-3.0], [-2.0], [-2.0])
    assert Objective("caldpo", beta=0.5)(b).loss.item() == pytest.approx(sp(-2.0), abs=1e-12)
    b2 = pair([-1.0], [-3.0], [-3.0], [-2.0])  # h_w = 2, h_l = -1
    assert Objective("caldpo", beta=0.5)(b2).loss.item() == pytest.approx(sp(-3.0) + 1.0, abs=1e-12)


def test_dposhift():
    """beta 0.5, f 0.5: u = 0.5*1 - 0.5*0.5*(-1) = 0.75 -> softplus(-0.75)."""
    b = pair([-1.0], [-3.0], [-2.0], [-2.0])
    assert Objective("dposhift", beta=0.5, shift=0.5)(b).loss.item() == pytest.approx(sp(-0.75), abs=1e-12)
    assert Objective("dposhift", beta=0.5, shift=1.0)(b).loss.item() == pytest.approx(
        Objective("dpo", beta=0.5)(b).loss.item(), abs=1e-15)


def test_nll_weight_is_a_batch_token_mean():
    """nll_weight 0.5 on DPO: chosen tokens: pair 1 has 2 tokens summing to -1, pair 2 one token of -4:
    NLL = (1 + 4)/3 tokens = 5/3; loss = DPO + 0.5*5/3."""
    c = torch.tensor([[-0.5, -0.5], [-4.0, 0.0]], dtype=torch.float64, requires_grad=True)
    m = torch.tensor([[True, True], [True, False]])
    r = torch.tensor([[-3.0], [-2.0]], dtype=torch.float64, requires_grad=True)
    b = PairLogps(c, r, m, torch.ones_like(r, dtype=torch.bool), ref_chosen=torch.tensor([-2.0, -3.0],
                  dtype=torch.float64), ref_rejected=torch.tensor([-2.0, -3.5], dtype=torch.float64))
    base = Objective("dpo", beta=0.5)(b).loss.item()
    out = Objective("dpo", beta=0.5, nll_weight=0.5)(b)
    assert out.loss.item() == pytest.approx(base + 0.5 * 5 / 3, abs=1e-12)
    assert out.per_pair.mean().item() == pytest.approx(out.loss.item(), abs=1e-12)
    assert out.metrics["nll_loss"].item() == pytest.approx(5 / 3, abs=1e-12)


REF_LOSSES = [("dpo", {}), ("cdpo", {}), ("robust", {}), ("ipo", {}), ("hinge", {}), ("rdpo", {}),
              ("caldpo", {}), ("dposhift", {}), ("dpo", {"nll_weight": 0.3})]


@pytest.mark.parametrize("name,hp", REF_LOSSES)
def test_finite_difference_gradient(name, hp):
    """Autograd gradient of every reference loss equals central finite differences in float64."""
    g = torch.Generator().manual_seed(1)
    c = (-torch.rand(3, 4, generator=g, dtype=torch.float64) * 2).requires_grad_()
    r = (-torch.rand(3, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    mc = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    mr = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    rc, rr = -torch.rand(3, 4, generator=g, dtype=torch.float64), -torch.rand(3, 5, generator=g, dtype=torch.float64)
    obj = Objective(name, beta=0.5, **hp)

    def f(c, r):
        return obj(PairLogps(c, r, mc, mr, ref_chosen=rc, ref_rejected=rr)).loss

    assert torch.autograd.gradcheck(f, (c, r), eps=1e-6, atol=1e-7)
