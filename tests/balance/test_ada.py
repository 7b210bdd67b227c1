"""AdaDPO (spec section 5): kappa, its ceiling, floor and exponent family, and the construction for
every base loss. The expected losses are written out in plain torch with kappa as a frozen number,
so their autograd gradient is the balanced gradient the spec asks for."""

import math

import pytest
import torch
import torch.nn.functional as F

from poise import ConfigError, Objective, PairLogps

D = torch.float64


def batch(ref=True):
    """Two pairs, chosen with 2 tokens and rejected with 3 (one padded in pair 2)."""
    c = torch.tensor([[-0.2, -0.4], [-1.5, -2.5]], dtype=D, requires_grad=True)
    r = torch.tensor([[-1.0, -1.2, -1.4], [-0.3, -0.5, 9.0]], dtype=D, requires_grad=True)
    mc = torch.ones(2, 2, dtype=torch.bool)
    mr = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    refs = dict(ref_chosen=torch.tensor([-0.5, -3.0], dtype=D), ref_rejected=torch.tensor([-3.0, -1.0], dtype=D))
    return PairLogps(c, r, mc, mr, **(refs if ref else {}))


def seqs(b):
    S_w = (b.chosen * b.chosen_mask).sum(-1)
    S_l = torch.where(b.rejected_mask, b.rejected, 0).sum(-1)
    n_w, n_l = b.chosen_mask.sum(-1).to(D), b.rejected_mask.sum(-1).to(D)
    return S_w, S_l, n_w, n_l


def grads(loss, b):
    gc, gr = torch.autograd.grad(loss, (b.chosen, b.rejected), retain_graph=True)
    return gc, gr


def assert_same(out_loss, expect_loss, b):
    assert out_loss.item() == pytest.approx(expect_loss.item(), abs=1e-12)
    for g1, g2 in zip(grads(out_loss, b), grads(expect_loss, b)):
        assert torch.allclose(g1, g2, atol=1e-12), (g1, g2)


def test_kappa_is_exp_token_margin_clipped():
    """A_w = [-0.3, -2], A_l = [-1.2, -0.4]: exp(A_w - A_l) = [e^0.9 = 2.4596, e^-1.6 = 0.2019].
    With C = 2: kappa = [2, 0.2019]; one of two clipped, one below 1."""
    out = Objective("dpo", balance=["ada"], ada_clip=2.0)(batch())
    m = out.metrics
    assert m["balance/kappa_max"].item() == pytest.approx(2.0, abs=1e-12)
    assert m["balance/kappa_min"].item() == pytest.approx(math.exp(-1.6), abs=1e-12)
    assert m["balance/clipped_frac"].item() == 0.5 and m["balance/below_one_frac"].item() == 0.5
    no_clip = Objective("dpo", balance=["ada"], ada_clip=None)(batch()).metrics
    assert no_clip["balance/kappa_max"].item() == pytest.approx(math.exp(0.9), abs=1e-12)
    floored = Objective("dpo", balance=["ada"], ada_floor=1.0)(batch()).metrics
    assert floored["balance/kappa_min"].item() == 1.0


@pytest.mark.parametrize("clip,floor", [(2.0, None), (None, None), (2.0, 1.0), (1.5, 0.5)])
def test_adadpo_loss_and_gradient(clip, floor):
    """L = -log sigma(beta*kappa*h_w - beta*h_l), kappa frozen; forward scaling changes the value."""
    b = batch()
    S_w, S_l, n_w, n_l = seqs(b)
    h_w, h_l = S_w - b.ref_chosen, S_l - b.ref_rejected
    log_k = (S_w / n_w - S_l / n_l).detach()
    if clip is not None:
        log_k = log_k.clamp(max=math.log(clip))
    k = log_k.exp() if floor is None else log_k.exp().clamp(min=floor)
    expect = F.softplus(-(0.1 * k * h_w - 0.1 * h_l)).mean()
    assert_same(Objective("dpo", balance=["ada"], ada_clip=clip, ada_floor=floor)(b).loss, expect, b)


def test_sequence_and_reference_spaces():
    """form=sequence: Dbar = S_w - S_l; space=reference: Dbar = hbar_w - hbar_l (token) or h_w - h_l."""
    b = batch()
    S_w, S_l, n_w, n_l = seqs(b)
    h_w, h_l = S_w - b.ref_chosen, S_l - b.ref_rejected
    cases = {
        ("sequence", "policy"): S_w - S_l,
        ("token", "reference"): h_w / n_w - h_l / n_l,
        ("sequence", "reference"): h_w - h_l,
    }
    for (form, space), d in cases.items():
        k = d.detach().exp()
        expect = F.softplus(-(0.1 * k * h_w - 0.1 * h_l)).mean()
        out = Objective("dpo", balance=["ada"], ada_form=form, ada_space=space, ada_clip=None)(b)
        assert_same(out.loss, expect, b)


def test_exponent_family():
    """c_w = k*exp(min(alpha_w*D, log C)), c_l = exp(min(-alpha_l*D, log C)); (0.5, 0.5) is symmetric."""
    b = batch()
    S_w, S_l, n_w, n_l = seqs(b)
    h_w, h_l = S_w - b.ref_chosen, S_l - b.ref_rejected
    d = (S_w / n_w - S_l / n_l).detach()
    cw = 1.5 * (0.5 * d).clamp(max=math.log(2.0)).exp()
    cl = (-0.5 * d).clamp(max=math.log(2.0)).exp()
    expect = F.softplus(-(0.1 * cw * h_w - 0.1 * cl * h_l)).mean()
    out = Objective("dpo", balance=["ada"], ada_alpha_w=0.5, ada_alpha_l=0.5, ada_k=1.5)(b)
    assert_same(out.loss, expect, b)


def _lo(A):
    return A - torch.log(-torch.expm1(A))


def construction_cases():
    """(loss, hp, expected-loss builder) for spec section 5's table, kappa without ceiling."""

    def simpo(b, S_w, S_l, n_w, n_l):
        A_w, A_l = S_w / n_w, S_l / n_l
        k = (A_w - A_l).detach().exp()
        return F.softplus(-(2.5 * k * A_w - 2.5 * A_l - 2.5 * 0.55)).mean()

    def rdpo(b, S_w, S_l, n_w, n_l):
        h_w, h_l = S_w - b.ref_chosen, S_l - b.ref_rejected
        k = (S_w / n_w - S_l / n_l).detach().exp()
        return F.softplus(-(0.1 * k * h_w - 0.1 * h_l + 0.05 * (n_w - n_l))).mean()

    def cpo(b, S_w, S_l, n_w, n_l):
        k = (S_w / n_w - S_l / n_l).detach().exp()
        return F.softplus(-(0.1 * k * S_w - 0.1 * S_l)).mean() + 1.0 * (-S_w.sum() / n_w.sum())

    def orpo(b, S_w, S_l, n_w, n_l):
        A_w, A_l = S_w / n_w, S_l / n_l
        P_w, P_l = A_w.detach().exp(), A_l.detach().exp()
        k = P_w * (1 - P_w) / (P_l * (1 - P_l))  # spec section 5, written with probabilities
        return -S_w.sum() / n_w.sum() + 0.1 * F.softplus(-(k * _lo(A_w) - _lo(A_l))).mean()

    def ipo(b, S_w, S_l, n_w, n_l):
        hb_w, hb_l = (S_w - b.ref_chosen) / n_w, (S_l - b.ref_rejected) / n_l
        k = (S_w / n_w - S_l / n_l).detach().exp()
        hb_w = hb_w.detach() + k * (hb_w - hb_w.detach())  # gradient-only: the target does not move
        return ((hb_w - hb_l - 1 / (2 * 0.1)) ** 2).mean()

    def caldpo(b, S_w, S_l, n_w, n_l):
        h_w, h_l = S_w - b.ref_chosen, S_l - b.ref_rejected
        k = (S_w / n_w - S_l / n_l).detach().exp()
        h_w = h_w.detach() + k * (h_w - h_w.detach())
        return (F.softplus(-(h_w - h_l)) + (h_w - 5) ** 2 + (h_l + 5) ** 2).mean()

    return [("simpo", simpo), ("rdpo", rdpo), ("cpo", cpo), ("orpo", orpo), ("ipo", ipo), ("caldpo", caldpo)]


def _grad_only(t, k):
    return t.detach() + k * (t - t.detach())


def baseline_construction_cases():
    """The same for the baselines of spec section 10, as decided in poise/balance/ada.py: DPO's forward
    construction for the one-margin losses dpop and dponorm; gradient-only on the chosen term for nca,
    apozero, apodown and simper."""

    def dpop(b, S_w, S_l, n_w, n_l):
        h_w, h_l = S_w - b.ref_chosen, S_l - b.ref_rejected  # both h_w < 0 here: the penalty acts
        k = (S_w / n_w - S_l / n_l).detach().exp()
        return F.softplus(-0.1 * (k * h_w - h_l - 50.0 * F.relu(-k * h_w))).mean()

    def dponorm(b, S_w, S_l, n_w, n_l):
        hb_w, hb_l = (S_w - b.ref_chosen) / n_w, (S_l - b.ref_rejected) / n_l
        k = (S_w / n_w - S_l / n_l).detach().exp()
        return F.softplus(-5.0 * (k * hb_w - hb_l)).mean()

    def nca(b, S_w, S_l, n_w, n_l):
        k = (S_w / n_w - S_l / n_l).detach().exp()
        r_w, r_l = 0.1 * _grad_only(S_w - b.ref_chosen, k), 0.1 * (S_l - b.ref_rejected)
        return (F.softplus(-r_w) + 0.5 * F.softplus(r_w) + 0.5 * F.softplus(r_l)).mean()

    def apozero(b, S_w, S_l, n_w, n_l):
        k = (S_w / n_w - S_l / n_l).detach().exp()
        h_w, h_l = _grad_only(S_w - b.ref_chosen, k), S_l - b.ref_rejected
        return (1 - torch.sigmoid(0.1 * h_w) + torch.sigmoid(0.1 * h_l)).mean()

    def apodown(b, S_w, S_l, n_w, n_l):
        k = (S_w / n_w - S_l / n_l).detach().exp()
        h_w, h_l = _grad_only(S_w - b.ref_chosen, k), S_l - b.ref_rejected
        return (torch.sigmoid(0.1 * h_w) + 1 - torch.sigmoid(0.1 * (h_w - h_l))).mean()

    def simper(b, S_w, S_l, n_w, n_l):
        A_w, A_l = S_w / n_w, S_l / n_l
        k = (A_w - A_l).detach().exp()
        return (-torch.exp(_grad_only(A_w, k)) + torch.exp(A_l)).mean()

    return [("dpop", dpop), ("dponorm", dponorm), ("nca", nca), ("apozero", apozero), ("apodown", apodown),
            ("simper", simper)]


@pytest.mark.parametrize("loss,build", construction_cases() + baseline_construction_cases())
def test_construction_for_each_base(loss, build):
    b = batch()
    expect = build(b, *seqs(b))
    assert_same(Objective(loss, balance=["ada"], ada_clip=None)(b).loss, expect, b)


def test_gradient_only_bases_keep_the_loss_value():
    for loss in ("ipo", "caldpo", "nca", "apozero", "apodown", "simper"):
        b = batch()
        assert Objective(loss, balance=["ada"])(b).loss.item() == Objective(loss)(b).loss.item()


@pytest.mark.parametrize("loss", ["nca", "apozero", "apodown", "simper"])
def test_gradient_only_baselines_scale_the_chosen_gradient_by_exactly_kappa(loss):
    """Why gradient-only (poise/balance/ada.py): the chosen gradient is kappa times the base loss's, the
    rejected one untouched; kappa = exp(A_w - A_l) = [e^0.9, e^-1.6] without the ceiling."""
    kappa = torch.tensor([math.exp(0.9), math.exp(-1.6)], dtype=D)
    b0, b1 = batch(), batch()
    g0 = grads(Objective(loss)(b0).loss, b0)
    g1 = grads(Objective(loss, balance=["ada"], ada_clip=None)(b1).loss, b1)
    assert torch.allclose(g1[0], kappa[:, None] * g0[0], rtol=1e-12, atol=1e-15)
    assert torch.allclose(g1[1], g0[1], rtol=0, atol=0)


def test_invalid_combinations_fail_at_build_time():
    with pytest.raises(ConfigError, match="reference-free"):
        Objective("simpo", balance=["ada"], ada_space="reference")
    with pytest.raises(ConfigError, match="ada_form='token'"):
        Objective("orpo", balance=["ada"], ada_form="sequence")
    with pytest.raises(ConfigError, match="ada_floor"):
        Objective("dpo", balance=["ada"], ada_floor=3.0, ada_clip=2.0)
    assert Objective("dpo", balance=["ada"], ada_space="reference").needs_reference
