"""Balanced-DPO (spec section 7, a reconstruction): the norm and prob variants, by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from poise import Objective, PairLogps

D = torch.float64


def batch():
    """One-token responses: p_w = 0.5 with sum_j p_j^2 = 0.5; p_l = 0.1 with sum_j p_j^2 = 0.02."""
    c = torch.tensor([[math.log(0.5)]], dtype=D, requires_grad=True)
    r = torch.tensor([[math.log(0.1)]], dtype=D, requires_grad=True)
    one = torch.ones(1, 1, dtype=torch.bool)
    return PairLogps(c, r, one, one, ref_chosen=torch.tensor([-1.0], dtype=D),
                     ref_rejected=torch.tensor([-2.0], dtype=D),
                     chosen_stats={"sum_p2": torch.tensor([[0.5]], dtype=D)},
                     rejected_stats={"sum_p2": torch.tensor([[0.02]], dtype=D)})


def test_norm_variant_by_hand():
    """G_w^2 = 1 - 2*0.5 + 0.5 = 0.5; G_l^2 = 1 - 0.2 + 0.02 = 0.82.
    w_w = 2*sqrt(0.82)/(sqrt(0.5)+sqrt(0.82)) = 1.123047; w_l = 2*sqrt(0.5)/(...) = 0.876953.
    Gradient-only: loss value is DPO's; dL/dS_w and dL/dS_l are DPO's times w_w and w_l."""
    gw, gl = math.sqrt(0.5), math.sqrt(0.82)
    ww, wl = 2 * gl / (gw + gl), 2 * gw / (gw + gl)
    assert ww == pytest.approx(1.123047, abs=1e-6)
    b = batch()
    base = Objective("dpo")(b)
    out = Objective("dpo", balance=["balanced"])(b)
    assert out.loss.item() == base.loss.item()
    assert out.metrics["balance/w_chosen_mean"].item() == pytest.approx(ww, abs=1e-12)
    gb = torch.autograd.grad(base.loss, (b.chosen, b.rejected))
    go = torch.autograd.grad(out.loss, (b.chosen, b.rejected))
    assert go[0].item() == pytest.approx(ww * gb[0].item(), abs=1e-12)
    assert go[1].item() == pytest.approx(wl * gb[1].item(), abs=1e-12)
    # the balanced branches have equal logit-space gradient norm: |dL/dS_w|*G_w == |dL/dS_l|*G_l
    assert abs(go[0].item()) * gw == pytest.approx(abs(go[1].item()) * gl, abs=1e-12)


def test_prob_variant_by_hand():
    """beta_l = beta*min(1, exp(A_l - A_w)) = 0.1*0.2 (p_l/p_w = 0.2), forward on the rejected term."""
    b = batch()
    out = Objective("dpo", balance=["balanced"], balanced_variant="prob")(b)
    h_w, h_l = math.log(0.5) + 1.0, math.log(0.1) + 2.0
    expect = math.log1p(math.exp(-(0.1 * h_w - 0.1 * 0.2 * h_l)))
    assert out.loss.item() == pytest.approx(expect, abs=1e-12)
    expect_t = F.softplus(-(0.1 * (b.chosen.sum() + 1.0) - 0.1 * 0.2 * (b.rejected.sum() + 2.0)))
    assert torch.autograd.grad(out.loss, b.rejected)[0].item() == pytest.approx(
        torch.autograd.grad(expect_t, b.rejected)[0].item(), abs=1e-12)


def test_norm_variant_needs_stats():
    b = batch()
    b.chosen_stats = None
    with pytest.raises(ValueError, match="sum_p2"):
        Objective("dpo", balance=["balanced"])(b)
    assert Objective("dpo", balance=["balanced"]).needs_stats == {"sum_p2"}
    assert Objective("dpo", balance=["balanced"], balanced_variant="prob").needs_stats == frozenset()


def test_length_normalised_terms_use_the_chain_rule():
    """For SimPO (term A = S/|y|) the norm of dA/dlogits is G/|y|: with 2 chosen tokens of the same
    statistics as one, G_w doubles in sqrt and halves by |y|."""
    c = torch.full((1, 2), math.log(0.5), dtype=D, requires_grad=True)
    r = torch.tensor([[math.log(0.1)]], dtype=D, requires_grad=True)
    b = PairLogps(c, r, torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool),
                  chosen_stats={"sum_p2": torch.full((1, 2), 0.5, dtype=D)},
                  rejected_stats={"sum_p2": torch.tensor([[0.02]], dtype=D)})
    out = Objective("simpo", balance=["balanced"])(b)
    gw, gl = math.sqrt(2 * 0.5) / 2, math.sqrt(0.82)
    assert out.metrics["balance/w_chosen_mean"].item() == pytest.approx(2 * gl / (gw + gl), abs=1e-12)


def test_norm_variant_has_no_cancellation_in_float32():
    """Every token of a side with p close to 1: 1 - 2p + sum p^2 cancels in float32 if computed literally
    (w_rejected 0.333 against 0.018 in float64, found by an independent implementation). Computed as
    (1-p)^2 + (sum p^2 - p^2) in float64: exact from float64 inputs; from float32 inputs the residual error
    is that of the float32 statistic sum p^2 itself (~6e-8 absolute next to 1), a few percent here, where
    the literal float32 formula is off by orders of magnitude."""
    lp_w = torch.tensor([[-1e-4, -2e-4, -5e-5]], dtype=torch.float64)
    lp_l = torch.tensor([[-0.7, -1.2, -0.4]], dtype=torch.float64)
    p_w, p_l = lp_w.exp(), lp_l.exp()
    sp_w = p_w ** 2 + (1 - p_w) ** 2 / 2  # the other tokens share 1 - p evenly between two of them
    sp_l = p_l ** 2 + (1 - p_l) ** 2 / 3
    mask = torch.ones(1, 3, dtype=torch.bool)
    ref = torch.zeros(1, dtype=torch.float64)

    def weights(dtype):
        b = PairLogps(lp_w.to(dtype), lp_l.to(dtype), mask, mask, ref_chosen=ref.to(dtype), ref_rejected=ref.to(dtype),
                      chosen_stats={"sum_p2": sp_w.to(dtype)}, rejected_stats={"sum_p2": sp_l.to(dtype)})
        m = Objective("dpo", balance=["balanced"])(b).metrics
        return m["balance/w_chosen_mean"].item(), m["balance/w_rejected_mean"].item()

    g_w = ((1 - p_w) ** 2 * 1.5).sum().sqrt().item()  # by hand: ||e_y - p||^2 = (1-p)^2 + (1-p)^2/2
    g_l = ((1 - p_l) ** 2 * (1 + 1 / 3)).sum().sqrt().item()
    expect = (2 * g_l / (g_w + g_l), 2 * g_w / (g_w + g_l))
    assert weights(torch.float64) == pytest.approx(expect, rel=1e-9)
    assert weights(torch.float32) == pytest.approx(expect, rel=0.1)
    lp32, sp32 = lp_w.float(), sp_w.float()  # the literal formula on the same float32 inputs is far off
    literal = (1 - 2 * lp32.exp() + sp32).clamp(min=0).sum().sqrt().item()
    assert not literal == pytest.approx(g_w, rel=0.1)
