"""beta-DPO's batch-adaptive beta (balancer ``dynbeta``; spec section 10): beta_batch and M0 by hand,
the loss equal to the base loss at beta_batch (values and gradients, float64), the stop-gradient,
refusals, the data filter, and the trainer's step (accumulation invariance, resume)."""

import json
import math
from collections import Counter

import pytest
import torch
from torch.testing import assert_close

from poise import ConfigError, Objective, PairLogps, objective
from poise.balance.dynbeta import SCALE_MIN, draw_kept, keep_count

D = torch.float64

#: Spec section 10: the losses whose beta multiplies the log-ratios.
SCALES_WITH_BETA = ["dpo", "cdpo", "robust", "hinge", "rdpo", "dposhift", "dpop", "nca", "apozero", "apodown",
                    "dponorm"]
REFUSED = ["ipo", "caldpo", "simpo", "cpo", "orpo", "simper"]


def batch(x=None):
    """4 pairs, float64, per-sequence reference sums. x: optional (8,) override of the policy's first
    chosen/rejected tokens, for finite differences."""
    c = torch.tensor([[-0.2, -0.4, -1.0], [-1.5, -2.5, -0.3], [-0.7, -0.1, -0.2], [-3.0, -0.5, -0.9]], dtype=D)
    r = torch.tensor([[-1.0, -3.0], [-0.1, -0.3], [-2.0, -0.6], [-0.4, -0.2]], dtype=D)
    if x is not None:
        c = c.clone()
        r = r.clone()
        c[:, 0], r[:, 0] = x[:4], x[4:]
    mc = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    mr = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    return PairLogps(c.requires_grad_(), r.requires_grad_(), mc, mr,
                     ref_chosen=torch.tensor([-2.0, -3.5, -1.5, -2.0], dtype=D),
                     ref_rejected=torch.tensor([-2.5, -0.6, -3.0, -1.0], dtype=D))


def h(b):
    S_w = torch.where(b.chosen_mask, b.chosen, 0.0).sum(-1)
    S_l = torch.where(b.rejected_mask, b.rejected, 0.0).sum(-1)
    return (S_w - b.ref_chosen).detach(), (S_l - b.ref_rejected).detach()


def st(**kw):
    return {"dynbeta": {"M0": None, "steps": 0, "rng": 7, "step": None, **kw}}


# --------------------------------------------------------------------------------------------------
# beta_batch and M0, by hand
# --------------------------------------------------------------------------------------------------


def test_beta_batch_and_running_mean_over_three_steps():
    """alpha 0.5, m 0.9. Step 1: M = [1, 3], Mbar 2, M0 := 2, scale 1; after: M0 = 2.
    Step 2: M = [4, 6], Mbar 5, scale 1 + 0.5*(5 - 2) = 2.5; after: M0 = 0.9*2 + 0.1*5 = 2.3.
    Step 3: M = [-10, -8], Mbar -9, 1 + 0.5*(-9 - 2.3) = -4.65 -> floor 1e-3; after: M0 = 2.07 - 0.9 = 1.17."""
    obj = objective("beta-dpo")
    state = obj.init_state()
    assert state == {"dynbeta": {"M0": None, "steps": 0, "rng": state["dynbeta"]["rng"], "step": None}}
    expect = [(2.0, 2.0, 1.0, 2.0), (5.0, 2.0, 2.5, 2.3), (-9.0, 2.3, SCALE_MIN, 1.17)]
    for k, (margins, (mbar, m0, scale, m0_after)) in enumerate(zip(([1.0, 3.0], [4.0, 6.0], [-10.0, -8.0]), expect)):
        begun = obj.begin_step(state, {"dynbeta": torch.tensor(margins, dtype=D)})
        assert state["dynbeta"]["step"] is None, "begin_step changed its input"
        s = begun["dynbeta"]["step"]
        assert (s["Mbar"], s["M0"]) == pytest.approx((mbar, m0), abs=1e-15)
        assert s["scale"] == pytest.approx(scale, abs=1e-15)
        assert s["keep"] is None
        state = obj.end_step(begun)
        assert state["dynbeta"]["M0"] == pytest.approx(m0_after, abs=1e-14)
        assert state["dynbeta"]["steps"] == k + 1 and state["dynbeta"]["step"] is None
    obj.check_state(json.loads(json.dumps(state)))  # plain JSON: it goes into trainer_state.json as it is


def test_margin_is_beta_times_the_log_ratio_margin_and_gather_sees_every_rank():
    b = batch()
    h_w, h_l = h(b)
    obj = objective("beta-dpo", beta=0.3)
    assert_close(obj.step_stats(b)["dynbeta"], 0.3 * (h_w - h_l), rtol=1e-15, atol=1e-15)
    other = torch.tensor([10.0, 12.0], dtype=D)  # another rank's margins
    begun = obj.begin_step(obj.init_state(), b, gather=lambda t: torch.cat([t, other]))
    assert begun["dynbeta"]["step"]["Mbar"] == pytest.approx(float(torch.cat([0.3 * (h_w - h_l), other]).mean()))
    assert begun["dynbeta"]["step"]["pairs"] == 6


def test_end_step_without_begin_and_missing_margins_are_errors():
    obj = objective("beta-dpo")
    with pytest.raises(ValueError, match="begin_step"):
        obj.end_step(obj.init_state())
    with pytest.raises(ValueError, match="another method"):
        obj.check_state({"gate": {"tau": 0.1, "seen": []}})
    with pytest.raises(ValueError, match="M0"):
        obj.check_state(st(M0="x"))


# --------------------------------------------------------------------------------------------------
# The loss is the base loss with beta replaced by beta_batch (values and gradients, float64)
# --------------------------------------------------------------------------------------------------


def _loss_grads(obj, b, state=None, **kw):
    out = obj(b, state, **kw)
    g_w, g_l = torch.autograd.grad(out.loss, (b.chosen, b.rejected))
    return out, g_w, g_l


@pytest.mark.parametrize("loss", SCALES_WITH_BETA)
def test_loss_and_gradient_equal_the_base_loss_at_beta_batch(loss):
    base = Objective(loss)
    beta = base.hyperparameters["beta"]
    obj = Objective(loss, balance=["dynbeta"], dynbeta_alpha=0.7)
    h_w, h_l = h(batch())
    mbar = float((beta * (h_w - h_l)).mean())
    m0 = mbar - 0.4  # a running mean below this step's: beta_batch = (1 + 0.7*0.4) beta = 1.28 beta
    state = obj.begin_step(st(M0=m0), batch())
    scale = state["dynbeta"]["step"]["scale"]
    assert scale == pytest.approx(1 + 0.7 * 0.4, abs=1e-12)
    out, g_w, g_l = _loss_grads(obj, batch(), state)
    ref, r_w, r_l = _loss_grads(Objective(loss, beta=beta * scale), batch())
    assert_close(out.loss, ref.loss, rtol=1e-13, atol=1e-15)
    assert_close(out.per_pair, ref.per_pair, rtol=1e-13, atol=1e-15)
    assert_close(g_w, r_w, rtol=1e-12, atol=1e-15)
    assert_close(g_l, r_l, rtol=1e-12, atol=1e-15)
    # the logged rewards stay the standard beta*h (comparable across methods), the scale is logged
    assert_close(out.metrics["rewards/margins"], (beta * (h_w - h_l)).mean())
    assert out.metrics["dynbeta/scale"].item() == pytest.approx(scale)
    assert out.metrics["dynbeta/margin_running"].item() == pytest.approx(m0)


def test_dpo_by_hand():
    """DPO at beta_batch: L = mean softplus(-beta_batch*(h_w - h_l)), dL/dS_w = -beta_batch*sigma(-u)/B."""
    b = batch()
    h_w, h_l = h(b)
    M = 0.1 * (h_w - h_l)
    state = objective("beta-dpo").begin_step(st(M0=0.0), {"dynbeta": M})
    bb = 0.1 * (1 + 0.5 * float(M.mean()))
    out, g_w, _ = _loss_grads(objective("beta-dpo"), b, state)
    u = bb * (h_w - h_l)
    assert out.loss.item() == pytest.approx(float(torch.nn.functional.softplus(-u).mean()), abs=1e-14)
    expect_w = -bb * torch.sigmoid(-u) / 4
    assert_close(g_w, torch.where(b.chosen_mask, expect_w[:, None], 0.0), rtol=1e-12, atol=1e-15)


def test_the_factor_carries_no_gradient():
    """Finite differences (float64): the autograd gradient is that of the base loss at a FROZEN beta_batch;
    it differs from the derivative of x -> loss(x, beta_batch(x)) that a differentiated factor would give."""
    obj = objective("beta-dpo", dynbeta_alpha=2.0)
    x0 = torch.tensor([-0.2, -1.5, -0.7, -3.0, -1.0, -0.1, -2.0, -0.4], dtype=D)
    state = obj.begin_step(st(M0=-0.5), batch(x0))
    _, g_w, g_l = _loss_grads(obj, batch(x0), state)
    auto = torch.cat([g_w[:, 0], g_l[:, 0]])

    def frozen(x):  # the step's beta_batch kept
        return obj(batch(x), state).loss.item()

    def moving(x):  # beta_batch recomputed from x
        return obj(batch(x), obj.begin_step(st(M0=-0.5), batch(x))).loss.item()

    eps = 1e-6
    for f, same in ((frozen, True), (moving, False)):
        fd = torch.tensor([(f(x0 + eps * e) - f(x0 - eps * e)) / (2 * eps) for e in torch.eye(8, dtype=D)],
                          dtype=D)
        if same:
            assert_close(fd, auto, rtol=1e-6, atol=1e-9)
        else:  # the missing term dL/dc * dc/dx, dc/dx_i = alpha * d Mbar/dx_i = +-alpha*beta/B
            b = batch(x0)
            h_w, h_l = h(b)
            c = state["dynbeta"]["step"]["scale"]
            u = c * 0.1 * (h_w - h_l)
            dL_dc = float((-torch.sigmoid(-u) * 0.1 * (h_w - h_l)).mean())
            side = torch.tensor([1.0] * 4 + [-1.0] * 4, dtype=D)
            assert_close(fd - auto, dL_dc * 2.0 * 0.1 / 4 * side, rtol=1e-5, atol=1e-9)
            assert (fd - auto).abs().min() > 1e-4


def test_outside_a_step_the_batch_mean_and_the_state_m0_are_used():
    b = batch()
    h_w, h_l = h(b)
    mbar = float((0.1 * (h_w - h_l)).mean())
    obj = objective("beta-dpo")
    # before the first step (M0 None): beta itself
    assert_close(obj(batch()).loss, Objective("dpo")(batch()).loss, rtol=1e-15, atol=0)
    out = obj(batch(), st(M0=mbar + 1.0))  # evaluation with a running mean above: beta*(1 - 0.5)
    assert_close(out.loss, Objective("dpo", beta=0.05)(batch()).loss, rtol=1e-13, atol=0)


def test_composes_with_another_balancer_by_multiplying():
    """dynbeta's c on both sides times ada's kappa on the chosen: the same as ada at beta_batch."""
    state = objective("beta-dpo").begin_step(st(M0=0.0), batch())
    obj = Objective("dpo", balance=["ada", "dynbeta"])
    bb = 0.1 * state["dynbeta"]["step"]["scale"]
    out, g_w, g_l = _loss_grads(obj, batch(), state)
    ref, r_w, r_l = _loss_grads(Objective("dpo", balance=["ada"], beta=bb), batch())
    assert_close(out.loss, ref.loss, rtol=1e-13, atol=0)
    assert_close(g_w, r_w, rtol=1e-12, atol=1e-15)
    assert_close(g_l, r_l, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss", REFUSED)
def test_losses_whose_beta_is_not_a_scale_are_refused(loss):
    with pytest.raises(ConfigError, match=r"dynbeta.*" + loss + r".*works with dpo, cdpo, robust") as err:
        Objective(loss, balance=["dynbeta"])
    assert ("no reference" in str(err.value)) == (loss in ("simpo", "cpo", "orpo", "simper"))


def test_preset_and_defaults():
    obj = objective("beta-dpo")
    assert (obj.loss_spec.name, obj.balance) == ("dpo", ("dynbeta",))
    assert {k: obj.hyperparameters[k] for k in ("dynbeta_alpha", "dynbeta_momentum", "dynbeta_keep")} == {
        "dynbeta_alpha": 0.5, "dynbeta_momentum": 0.9, "dynbeta_keep": 1.0}
    assert obj.needs_step_stats and obj.needs_reference
    assert not Objective("dpo", balance=["gate"]).needs_step_stats
    for bad in ({"dynbeta_keep": 0.0}, {"dynbeta_keep": 1.5}, {"dynbeta_momentum": 1.2}, {"dynbeta_alpha": -1}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            objective("beta-dpo", **bad)


# --------------------------------------------------------------------------------------------------
# The data filter (dynbeta_keep < 1)
# --------------------------------------------------------------------------------------------------


def test_keep_count_is_round_half_up_at_least_one():
    assert [keep_count(r, 8) for r in (0.5, 0.3125, 0.25, 0.01, 1.0)] == [4, 3, 2, 1, 8]


def test_filter_keeps_round_rho_b_pairs_reproducibly_from_the_state():
    obj = objective("beta-dpo", dynbeta_keep=0.5)
    state = st(M0=0.0)
    a = obj.begin_step(state, batch())
    b = obj.begin_step(json.loads(json.dumps(state)), batch())
    keep = a["dynbeta"]["step"]["keep"]
    assert len(keep) == 2 and keep == sorted(set(keep)) and all(0 <= i < 4 for i in keep)
    assert b["dynbeta"]["step"]["keep"] == keep  # the same state draws the same pairs
    assert a["dynbeta"]["rng"] != state["dynbeta"]["rng"]  # the generator advanced
    # the next step draws from the advanced generator; over a few steps the kept sets differ
    s, sets = a, set()
    for _ in range(6):
        s = obj.begin_step(obj.end_step(s), batch())
        sets.add(tuple(s["dynbeta"]["step"]["keep"]))
    assert len(sets) > 1


def test_filtered_loss_averages_over_the_kept_pairs_and_splits_over_micro_batches():
    obj = objective("beta-dpo", dynbeta_keep=0.5, nll_weight=0.3)
    state = obj.begin_step(st(M0=0.0), batch())
    keep = state["dynbeta"]["step"]["keep"]
    scale = state["dynbeta"]["step"]["scale"]
    out = obj(batch(), state)
    assert out.metrics["dynbeta/kept_frac"].item() == 0.5
    ref = Objective("dpo", beta=0.1 * scale)(batch())
    b = batch()
    S_w = torch.where(b.chosen_mask, b.chosen, 0.0).sum(-1).detach()
    n_tok = b.chosen_mask.sum(-1)
    nll = -S_w[keep].sum() / n_tok[keep].sum()
    assert_close(out.loss, ref.per_pair[keep].mean() + 0.3 * nll, rtol=1e-13, atol=0)
    assert all(out.per_pair[i].item() == 0.0 for i in range(4) if i not in keep)
    # two micro-batches of the same step, with their positions and the step's kept counts
    whole = _loss_grads(obj, batch(), state)
    b1 = batch()
    n = dict(num_pairs=len(keep), num_chosen_tokens=float(n_tok[keep].sum()))
    parts = []
    for lo, hi in ((0, 2), (2, 4)):
        sub = PairLogps(b1.chosen[lo:hi], b1.rejected[lo:hi], b1.chosen_mask[lo:hi], b1.rejected_mask[lo:hi],
                        ref_chosen=b1.ref_chosen[lo:hi], ref_rejected=b1.ref_rejected[lo:hi])
        parts.append(obj(sub, state, positions=range(lo, hi), **n).loss)
    total = parts[0] + parts[1]
    g_w, g_l = torch.autograd.grad(total, (b1.chosen, b1.rejected))
    assert_close(total, whole[0].loss, rtol=1e-13, atol=0)
    assert_close(g_w, whole[1], rtol=1e-12, atol=1e-15)
    assert_close(g_l, whole[2], rtol=1e-12, atol=1e-15)


def test_a_pair_far_from_m0_is_never_kept():
    """31 margins near M0 = 0 and one at 100: s ~ 17.4, its weight exp(-100^2/(2 s^2)) ~ 7e-8; with
    round(0.0625*32) = 2 kept per draw it never appears in 500 draws."""
    M = torch.cat([torch.linspace(-0.5, 0.5, 31, dtype=D), torch.tensor([100.0], dtype=D)])
    seen = Counter()
    for seed in range(500):
        kept, _ = draw_kept(M, 0.0, 2, seed)
        assert len(kept) == 2
        seen.update(kept)
    assert seen[31] == 0
    assert len(seen) > 20  # the near ones are all drawn


def test_single_draw_follows_the_gaussian_weights():
    """k = 1 is a categorical draw with p_i proportional to exp(-(M_i - M0)^2/(2 s^2)). M = [-1, 0, 1],
    M0 = 0, s^2 = 2/3: weights e^-0.75, 1, e^-0.75 -> p = [0.2429, 0.5142, 0.2429]."""
    M = torch.tensor([-1.0, 0.0, 1.0], dtype=D)
    w = torch.tensor([math.exp(-0.75), 1.0, math.exp(-0.75)], dtype=D)
    p = w / w.sum()
    n = 3000
    counts = Counter(draw_kept(M, 0.0, 1, seed)[0][0] for seed in range(n))
    freq = torch.tensor([counts[i] / n for i in range(3)], dtype=D)
    assert (freq - p).abs().max() < 0.03, (freq, p)  # ~ 3.3 standard errors
    # equal margins (s = 0): equal weights
    counts = Counter(draw_kept(torch.zeros(4, dtype=D), 0.0, 1, seed)[0][0] for seed in range(2000))
    assert min(counts.values()) > 400


def test_float_noise_in_the_margins_does_not_decide_the_draw():
    """At the first step every margin is 0 in exact arithmetic; rounding noise (which depends on how the
    batch was cut into micro-batches) must draw the same pairs as exact zeros."""
    from poise.balance.dynbeta import draw_kept

    exact = draw_kept(torch.zeros(8, dtype=torch.float64), 0.0, 4, seed=7)
    for noise_seed in range(5):
        noise = torch.randn(8, generator=torch.Generator().manual_seed(noise_seed), dtype=torch.float64) * 1e-7
        assert draw_kept(noise, 0.0, 4, seed=7) == exact
