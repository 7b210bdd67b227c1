"""The baseline losses of spec section 10 (dpop, nca, apozero, apodown, simper, dponorm): hand-worked
values on tiny float64 batches, float64 gradchecks, the identities the spec implies, stable
computation far out in the tails, and their rows in ``poise ls``.

The hand-worked batches use log-ratios that make the sigmoids exact fractions: with beta*h = ln 3,
sigma(ln 3) = 3/4, sigma(-ln 3) = 1/4, -log sigma(ln 3) = ln(4/3) and -log sigma(-ln 3) = ln 4.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from poise import ConfigError, Objective, PairLogps
from poise.cli import main
from poise.losses import LOSSES
from poise.losses.baselines import BASELINE_LOSSES

D = torch.float64
LN3 = math.log(3.0)
NAMES = ["dpop", "nca", "apozero", "apodown", "simper", "dponorm"]
#: Spec section 10: the papers' arXiv ids, shown by ``poise ls``.
PAPERS = {"dpop": "2402.13228", "nca": "2402.05369", "apozero": "2408.06266", "apodown": "2408.06266",
          "simper": "2502.00883", "dponorm": "2411.15124"}
REL = dict(rel=1e-12)


def sp(x: float) -> float:
    """softplus(x) = -log sigma(-x), in plain math."""
    return math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def rows(chosen, rejected, ref_w=None, ref_l=None) -> PairLogps:
    """One pair per entry: per-token log-probs of each completion (any lengths; padded with garbage 7.0
    behind a mask) and, optionally, reference sequence sums."""
    def pad(seqs):
        T = max(len(s) for s in seqs)
        x = torch.tensor([list(s) + [7.0] * (T - len(s)) for s in seqs], dtype=D, requires_grad=True)
        m = torch.tensor([[True] * len(s) + [False] * (T - len(s)) for s in seqs])
        return x, m

    (c, mc), (r, mr) = pad(chosen), pad(rejected)
    kw = {}
    if ref_w is not None:
        kw = dict(ref_chosen=torch.tensor(ref_w, dtype=D), ref_rejected=torch.tensor(ref_l, dtype=D))
    return PairLogps(c, r, mc, mr, **kw)


def seq_pairs(S_w, S_l, R_w, R_l) -> PairLogps:
    """One-token completions with sequence log-probs S and reference sums R: h = S - R."""
    return rows([[s] for s in S_w], [[s] for s in S_l], R_w, R_l)


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------


def test_the_six_are_in_the_loss_table_with_the_spec_defaults():
    assert [s.name for s in BASELINE_LOSSES] == NAMES
    for s in BASELINE_LOSSES:
        assert LOSSES[s.name] is s
        assert PAPERS[s.name] in s.paper and s.summary and s.equation
    assert {n: LOSSES[n].needs_reference for n in NAMES} == {
        "dpop": True, "nca": True, "apozero": True, "apodown": True, "simper": False, "dponorm": True}
    hp = {n: Objective(n).hyperparameters for n in NAMES}
    assert hp["dpop"] == {"nll_weight": 0.0, "beta": 0.1, "dpop_lambda": 50.0}
    for n in ("nca", "apozero", "apodown"):
        assert hp[n] == {"nll_weight": 0.0, "beta": 0.1}
    assert hp["simper"] == {"nll_weight": 0.0}
    assert hp["dponorm"] == {"nll_weight": 0.0, "beta": 5.0}
    assert LOSSES["simper"].reward_scale is None


def test_poise_ls_lists_each_with_its_paper(capsys):
    assert main(["ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in NAMES:
        (line,) = [ln for ln in lines if ln.strip() and ln.split()[0].rstrip("*") == name]
        assert f"arXiv {PAPERS[name]}" in line, line
        assert line.split()[0].endswith("*") == (name == "simper"), line  # * marks reference-free


# --------------------------------------------------------------------------------------------------
# Hand-worked values (float64, rel 1e-12)
# --------------------------------------------------------------------------------------------------


def test_dpop_value_and_gradient():
    """beta 0.5, dpop_lambda 2, one-token completions.
    Pair 1: S_w = -1, R_w = -2 -> h_w = 1 (>= 0, no penalty); S_l = -3, R_l = -2 -> h_l = -1.
        u = 0.5*(1 + 1 - 0) = 1, loss = softplus(-1) = 0.31326168751822286 (DPO's).
    Pair 2: S_w = -2.5, R_w = -2 -> h_w = -0.5 (penalty 2*0.5 = 1); S_l = -4, R_l = -2 -> h_l = -2.
        u = 0.5*(-0.5 + 2 - 1) = 0.25, loss = softplus(-0.25) = 0.5759394198788436 (DPO: softplus(-0.75)).
    Mean 0.44460055369853324.
    Gradient (mean over B = 2): pair 1 dL/dS_w = -beta*sigma(-1)/2 = -0.0672353...;
    pair 2 dL/dS_w = -beta*(1 + lambda)*sigma(-0.25)/2 = -0.75*0.4378234991 = -0.3283676...,
    dL/dS_l = +beta*sigma(-0.25)/2."""
    b = seq_pairs([-1.0, -2.5], [-3.0, -4.0], [-2.0, -2.0], [-2.0, -2.0])
    out = Objective("dpop", beta=0.5, dpop_lambda=2.0)(b)
    assert out.per_pair.tolist() == pytest.approx([0.31326168751822286, 0.5759394198788436], **REL)
    assert out.loss.item() == pytest.approx(0.44460055369853324, **REL)
    assert out.loss.item() == pytest.approx((sp(-1.0) + sp(-0.25)) / 2, **REL)
    out.loss.backward()
    assert b.chosen.grad[:, 0].tolist() == pytest.approx([-0.5 * sig(-1.0) / 2, -0.5 * 3 * sig(-0.25) / 2], **REL)
    assert b.rejected.grad[:, 0].tolist() == pytest.approx([0.5 * sig(-1.0) / 2, 0.5 * sig(-0.25) / 2], **REL)


def test_nca_value_and_gradient():
    """beta 0.5.
    Pair 1: h_w = 2 ln 3, h_l = -2 ln 3, so beta*h_w = ln 3 and beta*h_l = -ln 3:
        -log sigma(ln 3) - 0.5 log sigma(-ln 3) - 0.5 log sigma(ln 3)
        = ln(4/3) + 0.5 ln 4 + 0.5 ln(4/3) = 1.5 ln(4/3) + ln 2 = 1.1246702892376166.
    Pair 2: policy == reference (h = 0): ln 2 + 0.5 ln 2 + 0.5 ln 2 = 2 ln 2 = 1.3862943611198906.
    Gradient of pair 2 (mean over B = 2): dL/dh_w = beta*(-sigma(0) + 0.5*sigma(0)) = -beta/4, so
    -0.0625 per pair; dL/dh_l = 0.5*beta*sigma(0) = +beta/4 -> +0.0625.
    Pair 1: dL/dh_w = beta*(-sigma(-ln 3) + 0.5*sigma(ln 3))/2 = 0.5*(-1/4 + 3/8)/2 = +0.03125 (beta*h_w is past
    NCA's chosen optimum ln 2, so h_w is pulled back); dL/dh_l = 0.5*beta*sigma(-ln 3)/2 = 0.5*0.5*(1/4)/2."""
    b = seq_pairs([-3.0 + 2 * LN3, -2.0], [-1.0 - 2 * LN3, -3.0], [-3.0, -2.0], [-1.0, -3.0])
    out = Objective("nca", beta=0.5)(b)
    assert out.per_pair.tolist() == pytest.approx([1.1246702892376166, 1.3862943611198906], **REL)
    assert out.per_pair[0].item() == pytest.approx(1.5 * math.log(4 / 3) + math.log(2), **REL)
    out.loss.backward()
    assert b.chosen.grad[:, 0].tolist() == pytest.approx([0.03125, -0.0625], **REL)
    assert b.rejected.grad[:, 0].tolist() == pytest.approx([0.03125, 0.0625], **REL)


def test_apozero_value():
    """beta 0.5. Pair 1: beta*h_w = ln 3, beta*h_l = -ln 3: (1 - 3/4) + 1/4 = 0.5.
    Pair 2: beta*h_w = -ln 3, beta*h_l = ln 3: (1 - 1/4) + 3/4 = 1.5. Mean 1.0.
    Gradient (B = 2): dL/dh_w = -beta*sigma'(beta*h_w)/2 = -0.5*(3/16)/2 = -0.046875 for both pairs
    (sigma' = sigma*(1 - sigma) = 3/16 at +-ln 3); dL/dh_l = +0.046875."""
    b = seq_pairs([-1.0 + 2 * LN3, -1.0 - 2 * LN3], [-2.0 - 2 * LN3, -2.0 + 2 * LN3], [-1.0, -1.0], [-2.0, -2.0])
    out = Objective("apozero", beta=0.5)(b)
    assert out.per_pair.tolist() == pytest.approx([0.5, 1.5], **REL)
    assert out.loss.item() == pytest.approx(1.0, **REL)
    out.loss.backward()
    assert b.chosen.grad[:, 0].tolist() == pytest.approx([-0.046875, -0.046875], **REL)
    assert b.rejected.grad[:, 0].tolist() == pytest.approx([0.046875, 0.046875], **REL)


def test_apodown_value():
    """beta 0.5. Pair 1: h_w = 2 ln 3, h_l = 4 ln 3: sigma(ln 3) + (1 - sigma(-ln 3)) = 3/4 + 3/4 = 1.5.
    Pair 2: h_w = -2 ln 3, h_l = -4 ln 3: sigma(-ln 3) + (1 - sigma(ln 3)) = 1/4 + 1/4 = 0.5. Mean 1.0.
    Gradient (B = 2): dL/dh_w = beta*(sigma'(beta*h_w) - sigma'(beta*(h_w - h_l)))/2 = 0.5*(3/16 - 3/16)/2 = 0
    (the two pushes on the chosen cancel here); dL/dh_l = +beta*sigma'(.)/2 = 0.046875."""
    b = seq_pairs([-1.0 + 2 * LN3, -1.0 - 2 * LN3], [-1.0 + 4 * LN3, -1.0 - 4 * LN3], [-1.0, -1.0], [-1.0, -1.0])
    out = Objective("apodown", beta=0.5)(b)
    assert out.per_pair.tolist() == pytest.approx([1.5, 0.5], **REL)
    out.loss.backward()
    assert b.chosen.grad[:, 0].tolist() == pytest.approx([0.0, 0.0], abs=1e-15)
    assert b.rejected.grad[:, 0].tolist() == pytest.approx([0.046875, 0.046875], **REL)


def test_simper_value_and_gradient():
    """No reference, no hyperparameter; exp(A) is the geometric mean of the token probabilities.
    Pair 1: chosen tokens (1/4, 1) -> exp(A_w) = sqrt(1/4) = 1/2; rejected (1/2, 1/4, 1/8) ->
        exp(A_l) = (2^-6)^(1/3) = 1/4. Loss = -1/2 + 1/4 = -0.25.
    Pair 2: chosen (0.1) -> 0.1; rejected (0.9, 0.4) -> sqrt(0.36) = 0.6. Loss = -0.1 + 0.6 = 0.5. Mean 0.125.
    Gradient (B = 2): d(-exp(A_w))/dl_t = -exp(A_w)/|y_w|, so -0.5/2/2 = -0.125 on each chosen token of
    pair 1 and -0.1/1/2 = -0.05 on pair 2's; rejected +0.25/3/2 = 1/24 and +0.6/2/2 = 0.15."""
    b = rows([[math.log(0.25), 0.0], [math.log(0.1)]],
             [[math.log(0.5), math.log(0.25), math.log(0.125)], [math.log(0.9), math.log(0.4)]])
    out = Objective("simper")(b)
    assert out.per_pair.tolist() == pytest.approx([-0.25, 0.5], **REL)
    assert out.loss.item() == pytest.approx(0.125, **REL)
    # the implicit reward is A itself (no scale): log(1/2) and log(0.1) for the chosen
    assert out.metrics["rewards/chosen"].item() == pytest.approx((math.log(0.5) + math.log(0.1)) / 2, **REL)
    out.loss.backward()
    g_w, g_l = b.chosen.grad, b.rejected.grad
    assert g_w[0].tolist() == pytest.approx([-0.125, -0.125], **REL)
    assert g_w[1, 0].item() == pytest.approx(-0.05, **REL) and g_w[1, 1].item() == 0.0  # padding
    assert g_l[0].tolist() == pytest.approx([1 / 24] * 3, **REL)
    assert g_l[1, :2].tolist() == pytest.approx([0.15, 0.15], **REL) and g_l[1, 2].item() == 0.0


def test_dponorm_value():
    """beta 5 (the default).
    Pair 1: h_w = 0.3 ln 3 over 3 chosen tokens -> hbar_w = 0.1 ln 3; h_l = -0.2 ln 3 over 2 tokens ->
        hbar_l = -0.1 ln 3. u = 5*(0.2 ln 3) = ln 3, loss = -log sigma(ln 3) = ln(4/3) = 0.28768207245178085.
        (Plain DPO at beta 5 would be softplus(-2.5 ln 3).)
    Pair 2: h_w = 0 over 1 token; h_l = 0.4 over 4 tokens -> hbar_l = 0.1. u = -0.5,
        loss = softplus(0.5) = 0.9740769841801067. Mean 0.6308795283159437."""
    b = rows([[-0.5] * 3, [-1.0]], [[-1.0] * 2, [-0.25] * 4],
             ref_w=[-1.5 - 0.3 * LN3, -1.0], ref_l=[-2.0 + 0.2 * LN3, -1.4])
    out = Objective("dponorm")(b)
    assert out.per_pair.tolist() == pytest.approx([0.28768207245178085, 0.9740769841801067], **REL)
    assert out.per_pair[0].item() == pytest.approx(math.log(4 / 3), **REL)
    assert out.loss.item() == pytest.approx(0.6308795283159437, **REL)


# --------------------------------------------------------------------------------------------------
# Gradients: float64 gradcheck on the per-token log-probs
# --------------------------------------------------------------------------------------------------


def _gradcheck_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    c = (-0.05 - torch.rand(3, 4, generator=g, dtype=D) * 2).requires_grad_()
    r = (-0.05 - torch.rand(3, 5, generator=g, dtype=D) * 2).requires_grad_()
    mc = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    mr = torch.tensor([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    # reference sums that put h_w at -0.7, +0.9, -1.3 (dpop's penalty on two pairs, away from its kink)
    S_w = torch.where(mc, c.detach(), 0.0).sum(-1)
    rc = S_w - torch.tensor([-0.7, 0.9, -1.3], dtype=D)
    rr = -torch.rand(3, generator=g, dtype=D) * 4
    return c, r, mc, mr, rc, rr


@pytest.mark.parametrize("name,hp", [(n, {}) for n in NAMES] + [
    ("dpop", {"beta": 0.5, "dpop_lambda": 2.0}), ("nca", {"beta": 2.0}), ("apozero", {"beta": 1.0}),
    ("apodown", {"beta": 1.0}), ("dponorm", {"beta": 1.0}), ("simper", {"nll_weight": 0.3})])
def test_gradcheck(name, hp):
    c, r, mc, mr, rc, rr = _gradcheck_batch(3)
    obj = Objective(name, **hp)
    kw = dict(ref_chosen=rc, ref_rejected=rr) if obj.needs_reference else {}

    def f(c, r):
        return obj(PairLogps(c, r, mc, mr, **kw)).loss

    assert torch.autograd.gradcheck(f, (c, r), eps=1e-6, atol=1e-8, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Identities
# --------------------------------------------------------------------------------------------------


def _grads(obj, b):
    out = obj(b)
    return (out.per_pair, *torch.autograd.grad(out.loss, (b.chosen, b.rejected)))


def _random(seed, n_w=None, n_l=None, h_w_sign=None):
    """3 pairs of random token log-probs; optional equal lengths; reference sums that give h_w the
    requested sign."""
    g = torch.Generator().manual_seed(seed)
    c = -torch.rand(3, 6, generator=g, dtype=D) * 3
    r = -torch.rand(3, 5, generator=g, dtype=D) * 3
    mc = torch.arange(6)[None, :] < torch.tensor(n_w or [2, 6, 4])[:, None]
    mr = torch.arange(5)[None, :] < torch.tensor(n_l or [5, 1, 3])[:, None]
    S_w = torch.where(mc, c, 0.0).sum(-1)
    d = 0.1 + torch.rand(3, generator=g, dtype=D) * 5
    rc = S_w - (d if h_w_sign is None or h_w_sign > 0 else -d)
    if h_w_sign is None:
        rc = -torch.rand(3, generator=g, dtype=D) * 12
    rr = -torch.rand(3, generator=g, dtype=D) * 12
    return lambda: PairLogps(c.clone().requires_grad_(), r.clone().requires_grad_(), mc, mr,
                             ref_chosen=rc, ref_rejected=rr)


@pytest.mark.parametrize("beta,lam", [(0.1, 50.0), (0.5, 2.0)])
def test_dpop_equals_dpo_when_the_chosen_is_above_the_reference(beta, lam):
    """h_w >= 0 for every pair: max(0, -h_w) = 0, so DPOP is DPO, value and gradient."""
    make = _random(1, h_w_sign=+1)
    v0, gw0, gl0 = _grads(Objective("dpo", beta=beta), make())
    v1, gw1, gl1 = _grads(Objective("dpop", beta=beta, dpop_lambda=lam), make())
    assert torch.equal(v1, v0) and torch.equal(gw1, gw0) and torch.equal(gl1, gl0)
    # below the reference: dpop_lambda = 0 is still DPO, and a positive lambda raises the loss
    make = _random(2, h_w_sign=-1)
    v0, gw0, gl0 = _grads(Objective("dpo", beta=beta), make())
    v1, gw1, gl1 = _grads(Objective("dpop", beta=beta, dpop_lambda=0.0), make())
    assert torch.equal(v1, v0) and torch.equal(gw1, gw0) and torch.equal(gl1, gl0)
    assert (Objective("dpop", beta=beta, dpop_lambda=lam)(make()).per_pair
            > Objective("dpo", beta=beta)(make()).per_pair).all()


def test_dpop_chosen_gradient_below_the_reference_is_one_plus_lambda_times():
    """h_w < 0: dL/dS_w = -beta*(1 + lambda)*sigma(-u), dL/dS_l = beta*sigma(-u): ratio -(1 + lambda)."""
    b = _random(3, h_w_sign=-1)()
    _, g_w, g_l = _grads(Objective("dpop", beta=0.1, dpop_lambda=50.0), b)
    rows_ = torch.arange(3)
    assert_close(g_w[rows_, 0], -51.0 * g_l[rows_, 0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_dponorm_equals_dpo_with_beta_over_length_when_lengths_are_equal(n):
    """|y_w| = |y_l| = n: beta*(h_w/n - h_l/n) = (beta/n)*(h_w - h_l)."""
    make = _random(4, n_w=[n] * 3, n_l=[n] * 3)
    v0, gw0, gl0 = _grads(Objective("dpo", beta=5.0 / n), make())
    v1, gw1, gl1 = _grads(Objective("dponorm", beta=5.0), make())
    assert_close(v1, v0, rtol=1e-12, atol=0)
    assert_close(gw1, gw0, rtol=1e-12, atol=1e-15)
    assert_close(gl1, gl0, rtol=1e-12, atol=1e-15)


class _NoReference(PairLogps):
    """A PairLogps whose reference fields raise on every read once armed (after validation)."""

    def __getattribute__(self, name):
        if name in ("ref_chosen", "ref_rejected") and object.__getattribute__(self, "__dict__").get("_armed"):
            raise AssertionError(f"simper read batch.{name}")
        return object.__getattribute__(self, name)


def test_simper_never_reads_the_reference():
    """SimPER needs no reference: a batch whose reference raises on read, one without, and one with a
    reference full of NaN all give the same loss and gradient."""
    make = _random(5)
    obj = Objective("simper")
    assert not obj.needs_reference and not LOSSES["simper"].needs_reference
    b = make()
    trapped = _NoReference(b.chosen, b.rejected, b.chosen_mask, b.rejected_mask, b.ref_chosen, b.ref_rejected)
    trapped.__dict__["_armed"] = True
    with pytest.raises(AssertionError, match="read batch.ref_chosen"):
        _ = trapped.has_reference  # the trap works
    v1, gw1, gl1 = _grads(obj, trapped)
    b2 = make()
    v0, gw0, gl0 = _grads(obj, PairLogps(b2.chosen, b2.rejected, b2.chosen_mask, b2.rejected_mask))
    b3 = make()
    nan = PairLogps(b3.chosen, b3.rejected, b3.chosen_mask, b3.rejected_mask,
                    ref_chosen=torch.full((3,), math.nan, dtype=D), ref_rejected=torch.full((3,), math.nan, dtype=D))
    v2, gw2, gl2 = _grads(obj, nan)
    for v, gw, gl in ((v1, gw1, gl1), (v2, gw2, gl2)):
        assert torch.equal(v, v0) and torch.equal(gw, gw0) and torch.equal(gl, gl0)


def test_simper_is_bounded_and_hyperparameter_free():
    """exp(A) is in (0, 1] for log-probs <= 0, so the loss is in [-1, 1]; SimPER takes no beta."""
    for seed in range(3):
        v = Objective("simper")(_random(seed)()).per_pair
        assert ((v > -1) & (v < 1)).all()
    with pytest.raises(ConfigError, match="beta"):
        Objective("simper", beta=0.1)


def test_at_the_reference():
    """Policy == reference (h = 0): NCA = 2 ln 2; APO-zero = 1/2 + 1/2 = 1; APO-down = 1/2 + 1/2 = 1;
    DPOP = DPO = dponorm = ln 2."""
    def at_ref():
        b = _random(6)()
        S_w = torch.where(b.chosen_mask, b.chosen.detach(), 0.0).sum(-1)
        S_l = torch.where(b.rejected_mask, b.rejected.detach(), 0.0).sum(-1)
        return PairLogps(b.chosen, b.rejected, b.chosen_mask, b.rejected_mask, ref_chosen=S_w, ref_rejected=S_l)

    expect = {"nca": 2 * math.log(2), "apozero": 1.0, "apodown": 1.0, "dpop": math.log(2), "dponorm": math.log(2)}
    for name, value in expect.items():
        assert Objective(name)(at_ref()).per_pair.tolist() == pytest.approx([value] * 3, **REL), name


def test_nca_chosen_optimum_is_beta_h_w_ln2():
    """d/dh_w [softplus(-beta h_w) + 0.5 softplus(beta h_w)] = beta*(-sigma(-x) + 0.5 sigma(x)) = 0 at
    x = beta*h_w = ln 2: NCA holds the chosen log-ratio at ln 2/beta (why AdaDPO applies its kappa to
    it gradient-only, poise/balance/ada.py)."""
    beta = 0.5
    b = seq_pairs([-1.0 + math.log(2) / beta], [-3.0], [-1.0], [-2.0])
    _, g_w, g_l = _grads(Objective("nca", beta=beta), b)
    assert abs(g_w.item()) < 1e-16 and g_l.item() > 0


# --------------------------------------------------------------------------------------------------
# Stable computation far out in the tails
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tails_are_computed_stably(dtype):
    """beta*h far from 0, where a literal -log(sigmoid(x)) is inf and 1 - sigmoid(x) is 0 by cancellation.
    beta 1, one-token pairs of log-probs <= 0, h_w = -800 and h_l = +800 (pair 1), h_w = +40 and h_l = -40
    (pair 2); SimPER: exp(-800) underflows to 0, a loss of exp(-1) - 0 on pair 1.
      dpop (lambda 0.5): u = -800 - 800 - 400 = -2000 -> 2000;  u = 80 -> softplus(-80) = e^-80.
      nca: pair 1: softplus(800) + 0.5 softplus(-800) + 0.5 softplus(800) = 1200 (+ e^-800 terms);
           pair 2: softplus(-40) + 0.5 softplus(40) + 0.5 softplus(-40) = 1.5 e^-40 + 20 (to float precision).
      apozero: pair 2: sigma(-40) + sigma(-40) = 2 sigma(-40) (not 0: no cancellation).
    """
    one = torch.ones(2, 1, dtype=torch.bool)

    def b():
        c = torch.tensor([[-800.0], [-1.0]], dtype=dtype, requires_grad=True)
        r = torch.tensor([[-1.0], [-41.0]], dtype=dtype, requires_grad=True)
        return PairLogps(c, r, one, one, ref_chosen=torch.tensor([0.0, -41.0], dtype=dtype),
                         ref_rejected=torch.tensor([-801.0, -1.0], dtype=dtype))

    rel = 1e-12 if dtype == torch.float64 else 1e-6
    dpop = Objective("dpop", beta=1.0, dpop_lambda=0.5)(b()).per_pair.tolist()
    assert dpop == pytest.approx([2000.0, math.exp(-80)], rel=rel)
    nca = Objective("nca", beta=1.0)(b()).per_pair.tolist()
    assert nca == pytest.approx([1200.0, 20.0 + 1.5 * math.exp(-40)], rel=rel)
    apo = Objective("apozero", beta=1.0)(b()).per_pair.tolist()
    assert apo[1] == pytest.approx(2 * sig(-40.0), rel=rel) and apo[0] == pytest.approx(2.0, rel=rel)
    down = Objective("apodown", beta=1.0)(b()).per_pair.tolist()
    assert down[1] == pytest.approx(1.0 + sig(-80.0), rel=rel)
    assert Objective("simper")(b()).per_pair[0].item() == pytest.approx(math.exp(-1.0), rel=rel)
    for name in NAMES:
        bb = b()
        obj = Objective(name, beta=1.0) if name != "simper" else Objective(name)
        out = obj(bb)
        out.loss.backward()
        assert torch.isfinite(out.per_pair).all() and torch.isfinite(bb.chosen.grad).all(), name
        assert torch.isfinite(bb.rejected.grad).all(), name
