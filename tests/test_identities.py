"""The identities of spec section 8, one test each (6 and 7 run over the whole table in
tests/test_objective.py and tests/test_properties.py)."""

import math

import pytest
import torch

from poise import Objective, PairLogps, objective

D = torch.float64
REF_FREE = ("simpo", "cpo", "orpo", "simper")


def one_token_pair(p_w, p_l, ref=(0.0, 0.0), leaf="logp"):
    """Single-token responses. With leaf="p" the probabilities are the leaves (for dL/dp)."""
    pw = torch.tensor([[p_w]], dtype=D, requires_grad=True)
    pl = torch.tensor([[p_l]], dtype=D, requires_grad=True)
    lw, ll = (pw.log(), pl.log()) if leaf == "p" else (pw, pl)
    one = torch.ones(1, 1, dtype=torch.bool)
    b = PairLogps(lw, ll, one, one, ref_chosen=torch.tensor([ref[0]], dtype=D),
                  ref_rejected=torch.tensor([ref[1]], dtype=D))
    return b, pw, pl


def test_1_dpo_at_the_reference_is_ln2_with_gradient_half_beta():
    g = torch.Generator().manual_seed(0)
    c = (-torch.rand(4, 7, generator=g, dtype=D) * 3).requires_grad_()
    r = (-torch.rand(4, 5, generator=g, dtype=D) * 3).requires_grad_()
    mc, mr = torch.ones(4, 7, dtype=torch.bool), torch.ones(4, 5, dtype=torch.bool)
    b = PairLogps(c, r, mc, mr, ref_chosen=c.detach().clone(), ref_rejected=r.detach().clone())
    out = Objective("dpo", beta=0.3)(b)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-15)
    out.loss.backward()
    # dL/dS_w = -beta/2 per pair; the batch mean divides by B = 4; every token of S gets that gradient
    assert torch.allclose(c.grad, torch.full_like(c, -0.3 / 2 / 4), atol=1e-15)
    assert torch.allclose(r.grad, torch.full_like(r, +0.3 / 2 / 4), atol=1e-15)


@pytest.mark.parametrize("p_w,p_l", [(0.6, 0.1), (0.05, 0.4), (0.3, 0.3)])
def test_2_dpo_probability_space_ratio_is_pw_over_pl(p_w, p_l):
    """Finite differences of L(p_w, p_l) in probability space: |dL/dp_l| / |dL/dp_w| = p_w / p_l."""
    obj = Objective("dpo", beta=0.5)

    def L(a, b):
        return obj(one_token_pair(a, b, ref=(-1.0, -1.5), leaf="p")[0]).loss.item()

    e = 1e-6
    d_w = (L(p_w + e, p_l) - L(p_w - e, p_l)) / (2 * e)
    d_l = (L(p_w, p_l + e) - L(p_w, p_l - e)) / (2 * e)
    assert abs(d_l) / abs(d_w) == pytest.approx(p_w / p_l, rel=1e-6)


@pytest.mark.parametrize("p_w,p_l", [(0.6, 0.1), (0.05, 0.4), (0.9, 0.001)])
def test_3_adadpo_sequence_form_without_ceiling_balances_probability_gradients(p_w, p_l):
    obj = Objective("dpo", balance=["ada"], ada_form="sequence", ada_clip=None)
    b, pw, pl = one_token_pair(p_w, p_l, ref=(-1.0, -1.5), leaf="p")
    obj(b).loss.backward()
    assert abs(pl.grad.item()) / abs(pw.grad.item()) == pytest.approx(1.0, rel=1e-12)


def test_3_token_form_kappa_and_ceiling():
    c = torch.tensor([[-0.1, -0.3, -0.2]], dtype=D)  # A_w = -0.2
    r = torch.tensor([[-2.0, -1.0]], dtype=D)  # A_l = -1.5
    b = PairLogps(c, r, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool),
                  ref_chosen=torch.zeros(1, dtype=D), ref_rejected=torch.zeros(1, dtype=D))
    free = Objective("dpo", balance=["ada"], ada_clip=None)(b).metrics["balance/kappa_mean"].item()
    assert free == pytest.approx(math.exp(1.3), abs=1e-12)
    capped = Objective("dpo", balance=["ada"], ada_clip=2.0)(b).metrics["balance/kappa_mean"].item()
    assert capped == pytest.approx(min(math.exp(1.3), 2.0), abs=1e-12)


@pytest.mark.parametrize("base", ["dpo", "ipo", "caldpo", "dposhift", "simpo", "cpo", "orpo", "hinge", "rdpo",
                                  "dpop", "nca", "apozero", "apodown", "simper", "dponorm"])
def test_4_gradient_only_gate(base):
    """Loss value equals the base loss; rejected token gradients are g times the base's; chosen unchanged."""
    g0 = torch.Generator().manual_seed(3)
    c = (-0.05 - torch.rand(3, 4, generator=g0, dtype=D) * 2).requires_grad_()
    r = (-0.05 - torch.rand(3, 5, generator=g0, dtype=D) * 2).requires_grad_()
    mc = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    mr = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    kw = {} if base in REF_FREE else dict(ref_chosen=-torch.rand(3, generator=g0, dtype=D) * 4,
                                                          ref_rejected=-torch.rand(3, generator=g0, dtype=D) * 4)
    b = PairLogps(c, r, mc, mr, **kw)
    base_out = Objective(base)(b)
    gated = Objective(base, balance=["gate"], gate_tau=0.3, gate_sharpness=8.0)(b)
    assert gated.loss.item() == base_out.loss.item()
    gc_b, gr_b = torch.autograd.grad(base_out.loss, (c, r))
    gc_g, gr_g = torch.autograd.grad(gated.loss, (c, r))
    A_l = (r * mr).sum(-1) / mr.sum(-1)
    g = torch.sigmoid(8.0 * (A_l.exp() - 0.3))
    assert torch.allclose(gr_g, g[:, None] * gr_b, atol=1e-13)
    assert torch.allclose(gc_g, gc_b, atol=1e-15)


NEUTRAL = {
    "ada": dict(ada_alpha_w=0.0, ada_alpha_l=0.0),
    "gate": dict(gate_tau=1e-30, gate_sharpness=1e30),
    "gate-forward": dict(gate_tau=1e-30, gate_sharpness=1e30, gate_apply="forward"),
}


@pytest.mark.parametrize("base", ["dpo", "cdpo", "robust", "ipo", "hinge", "rdpo", "caldpo", "dposhift",
                                  "simpo", "cpo", "orpo", "dpop", "nca", "apozero", "apodown", "simper", "dponorm"])
@pytest.mark.parametrize("which", list(NEUTRAL) + ["balanced"])
def test_5_neutral_balancer_reproduces_the_base(base, which):
    """kappa = 1, g = 1 or w = 1 give exactly the base loss's value and gradient."""
    c = torch.tensor([[-0.5, -1.0], [-2.0, -0.25]], dtype=D, requires_grad=True)
    r = torch.tensor([[-0.7, -1.3], [-1.0, -3.0]], dtype=D, requires_grad=True)
    m = torch.ones(2, 2, dtype=torch.bool)
    stats = {"sum_p2": torch.full((2, 2), 0.6, dtype=D)}
    kw = {} if base in REF_FREE else dict(ref_chosen=torch.tensor([-1.0, -2.0], dtype=D),
                                                          ref_rejected=torch.tensor([-2.5, -3.0], dtype=D))
    if which == "balanced":  # w = 1 exactly when both branches have the same statistics
        r = c.detach().clone().requires_grad_()
        hp = {}
    else:
        hp = NEUTRAL[which]
    b = PairLogps(c, r, m, m, chosen_stats=stats, rejected_stats=stats, **kw)
    name = which.split("-")[0]
    base_out, bal_out = Objective(base)(b), Objective(base, balance=[name], **hp)(b)
    assert bal_out.loss.item() == base_out.loss.item()
    for g1, g2 in zip(torch.autograd.grad(base_out.loss, (c, r)), torch.autograd.grad(bal_out.loss, (c, r))):
        assert torch.equal(g1, g2)


def test_presets_are_their_compositions():
    assert objective("adadpo").name == "dpo+ada"
    assert objective("gate-caldpo").name == "caldpo+gate"
    assert objective("balanced-dpo", balanced_variant="prob").hyperparameters["balanced_variant"] == "prob"
