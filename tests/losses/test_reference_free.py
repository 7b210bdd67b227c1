"""Hand-worked values and finite-difference gradients of SimPO, CPO and ORPO (spec section 3)."""

import math

import pytest
import torch

from poise import Objective, PairLogps


def sp(x: float) -> float:
    return math.log1p(math.exp(x))


def log1mexp(a: float) -> float:
    return math.log(-math.expm1(a))


def pair(tok_w, tok_l, dtype=torch.float64):
    """One pair per row of per-token log-probs (no padding, no reference)."""
    c = torch.tensor(tok_w, dtype=dtype, requires_grad=True)
    r = torch.tensor(tok_l, dtype=dtype, requires_grad=True)
    return PairLogps(c, r, torch.ones_like(c, dtype=torch.bool), torch.ones_like(r, dtype=torch.bool))


def test_simpo():
    """beta 2, gamma/beta 0.5 (gamma = 1). A_w = (-1 - 2)/2 = -1.5, A_l = -3 over 3 tokens = -3 per token
    ... A_l = (-2 - 3 - 4)/3 = -3. u = 2*(-1.5 + 3) - 1 = 2 -> softplus(-2) = 0.1269280."""
    b = pair([[-1.0, -2.0]], [[-2.0, -3.0, -4.0]])
    out = Objective("simpo", beta=2.0, gamma_beta_ratio=0.5)(b)
    assert out.loss.item() == pytest.approx(sp(-2.0), abs=1e-12)
    assert out.loss.item() == pytest.approx(0.12692801104297263, abs=1e-12)
    # rewards are beta*A for SimPO (spec section 1)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(-3.0, abs=1e-12)
    assert out.metrics["rewards/margins"].item() == pytest.approx(3.0, abs=1e-12)


def test_cpo():
    """beta 0.5, cpo_alpha 1: S_w = -3, S_l = -9, preference = softplus(-0.5*6) = softplus(-3);
    NLL = token mean of chosen = 3/2 = 1.5; loss = 0.0485874 + 1.5."""
    b = pair([[-1.0, -2.0]], [[-2.0, -3.0, -4.0]])
    out = Objective("cpo", beta=0.5, cpo_alpha=1.0)(b)
    assert out.loss.item() == pytest.approx(sp(-3.0) + 1.5, abs=1e-12)
    out2 = Objective("cpo", beta=0.5, cpo_alpha=0.0)(b)
    assert out2.loss.item() == pytest.approx(sp(-3.0), abs=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.5 * -3.0, abs=1e-12)


def test_orpo():
    """lambda 0.1. A_w = -0.5 (tokens -0.4, -0.6), A_l = -2.
    logodds(A) = A - log(1 - e^A): logodds_w = -0.5 - log(1 - e^-0.5) = -0.5 - log(0.3934693) = 0.4327521;
    logodds_l = -2 - log(1 - e^-2) = -2 - log(0.8646647) = -1.8545865. Lambda = 2.2873386.
    loss = NLL (0.5) + 0.1*softplus(-2.2873386) = 0.5 + 0.1*0.0967059 = 0.5096706."""
    b = pair([[-0.4, -0.6]], [[-2.0]])
    out = Objective("orpo", orpo_lambda=0.1)(b)
    lam = (-0.5 - log1mexp(-0.5)) - (-2.0 - log1mexp(-2.0))
    assert lam == pytest.approx(2.2873386, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.5 + 0.1 * sp(-lam), abs=1e-12)
    assert out.loss.item() == pytest.approx(0.5096706, abs=1e-6)


@pytest.mark.parametrize("name,hp", [("simpo", {}), ("cpo", {}), ("orpo", {}), ("simpo", {"nll_weight": 0.2})])
def test_finite_difference_gradient(name, hp):
    g = torch.Generator().manual_seed(2)
    c = (-0.05 - torch.rand(3, 4, generator=g, dtype=torch.float64) * 2).requires_grad_()
    r = (-0.05 - torch.rand(3, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    mc = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    mr = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    obj = Objective(name, **hp)

    def f(c, r):
        return obj(PairLogps(c, r, mc, mr)).loss

    assert torch.autograd.gradcheck(f, (c, r), eps=1e-6, atol=1e-7)


def test_orpo_finite_at_certainty():
    """A = 0 (probability 1) would make the odds infinite; log1mexp is clamped, so values stay finite."""
    b = pair([[0.0, 0.0]], [[0.0]])
    out = Objective("orpo")(b)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(b.chosen.grad).all()


def _orpo_formula(a_w: float, a_l: float, lam: float) -> float:
    """ORPO by hand in float64 (spec section 3): NLL(y_w) - lambda*log sigma(logodds_w - logodds_l)."""
    def logodds(a):
        return a - math.log(-math.expm1(a))
    z = logodds(a_w) - logodds(a_l)
    return -a_w + lam * math.log1p(math.exp(-z))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("a_w,a_l", [(-2e-6, -1e-7), (-1e-7, -2e-6), (-3e-7, -0.5), (-0.9, -4e-7)])
def test_orpo_near_certainty_has_no_clamp_that_moves_the_value(dtype, a_w, a_l):
    """Mean token log-probs in (-1e-6, 0): the value and the gradient are ORPO's formula (an earlier clamp at
    -1e-6 gave 0.1099 for (-2e-6, -1e-7) where the formula gives 0.3045, and a gradient off by ~1e6)."""
    lam = 0.1
    one = torch.ones(1, 1, dtype=torch.bool)
    cw = torch.tensor([[a_w]], dtype=dtype, requires_grad=True)
    cl = torch.tensor([[a_l]], dtype=dtype, requires_grad=True)
    out = Objective("orpo", orpo_lambda=lam)(PairLogps(cw, cl, one, one))
    expect = _orpo_formula(a_w, a_l, lam)
    assert out.loss.item() == pytest.approx(expect, rel=1e-12 if dtype == torch.float64 else 1e-5)
    out.loss.backward()
    h = 1e-3 * min(abs(a_w), abs(a_l))  # central differences in float64, well inside a < 0
    d_w = (_orpo_formula(a_w + h, a_l, lam) - _orpo_formula(a_w - h, a_l, lam)) / (2 * h)
    d_l = (_orpo_formula(a_w, a_l + h, lam) - _orpo_formula(a_w, a_l - h, lam)) / (2 * h)
    tol = 1e-5 if dtype == torch.float64 else 1e-3
    assert cw.grad.item() == pytest.approx(d_w, rel=tol)
    assert cl.grad.item() == pytest.approx(d_l, rel=tol)


def test_orpo_at_certainty_stays_finite():
    """A = 0 exactly (every token certain) has log-odds +inf; the result is held finite, with a finite gradient."""
    one = torch.ones(1, 1, dtype=torch.bool)
    cw = torch.zeros(1, 1, requires_grad=True)
    cl = torch.full((1, 1), -0.3, requires_grad=True)
    out = Objective("orpo")(PairLogps(cw, cl, one, one))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(cw.grad).all() and torch.isfinite(cl.grad).all()
