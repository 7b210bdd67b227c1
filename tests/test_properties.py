"""Property tests (Hypothesis) over random batches and random loss x balancer combinations.

Random per-token log-probs, masks (any placement, at least one completion token per row), lengths,
references (per token or per sequence) and hyperparameters. Checked: finiteness, the normalisation
loss == mean(per_pair), padding invariance and zero gradient on masked tokens; DPO's symmetry; and
that neutral balancer settings (ada exponents 0, an always-open gate, equal branch norms) reproduce
the base loss's value and gradient exactly (spec section 8, identity 5).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import fresh, loss_and_grads, make_batch, pad_batch, swap_sides
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from poise import ConfigError, Objective, PairLogps
from poise.balance import BALANCERS
from poise.balance.ada import TOKEN_FORM_ONLY
from poise.losses import LOSSES

LOSS_NAMES = sorted(LOSSES)
#: POISE_HYPOTHESIS_EXAMPLES=2000 for a longer hunt; the default keeps the file well under 30 s.
_N = int(os.environ.get("POISE_HYPOTHESIS_EXAMPLES", "50"))
SETTINGS = settings(max_examples=_N, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PER_LOSS = settings(max_examples=max(1, _N // 2), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one intra-op thread is faster, and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------------


LOWS = st.sampled_from([-0.01, -0.5, -2.0, -4.0, -12.0, -30.0])
REFS = st.sampled_from(["token", "sum"])


@st.composite
def batches(draw, *, low=LOWS, ref=REFS, dtype=torch.float64):
    B = draw(st.integers(1, 5))
    T_w, T_l = draw(st.integers(1, 9)), draw(st.integers(1, 9))

    def lengths(T):
        return st.lists(st.integers(1, T), min_size=B, max_size=B)

    batch = make_batch(
        B, T_w, T_l, dtype=dtype, seed=draw(st.integers(0, 2**31 - 1)), ref=draw(ref), stats=True,
        low=draw(low), mask=draw(st.sampled_from(["right", "left", "random"])),
        chosen_lengths=draw(lengths(T_w)), rejected_lengths=draw(lengths(T_l)),
    )
    # a few tokens of certainty (log-prob 0, p = 1): the edge of log1mexp and of the statistics
    for side in ("chosen", "rejected"):
        lp = getattr(batch, side)
        for b, t in draw(st.lists(st.tuples(st.integers(0, B - 1), st.integers(0, lp.shape[1] - 1)),
                                  max_size=2)):
            with torch.no_grad():
                lp[b, t] = 0.0
            st_ = getattr(batch, f"{side}_stats")["sum_p2"]
            st_[b, t] = 1.0  # sum_j p_j^2 = 1 when p_t = 1
    return batch


def _ada(draw, loss: str) -> dict:
    ref_ok = LOSSES[loss].needs_reference
    hp = {
        "ada_form": draw(st.sampled_from(["token"] if loss in TOKEN_FORM_ONLY else ["token", "sequence"])),
        "ada_space": draw(st.sampled_from(["policy", "reference"] if ref_ok else ["policy"])),
        "ada_clip": draw(st.sampled_from([None, 1.5, 2.0, 5.0])),
        "ada_alpha_w": draw(st.sampled_from([1.0, 0.5, 0.0, 1.3])),
        "ada_alpha_l": draw(st.sampled_from([0.0, 0.5, 1.0])),
        "ada_k": draw(st.sampled_from([1.0, 0.5, 2.0])),
    }
    floor = draw(st.sampled_from([None, 0.5, 1.0]))
    if floor is not None and (hp["ada_clip"] is None or floor <= hp["ada_clip"]):
        hp["ada_floor"] = floor
    return hp


def _gate(draw) -> dict:
    hp = {
        "gate_estimator": draw(st.sampled_from(["seq", "quantile"])),
        "gate_quantile": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        "gate_apply": draw(st.sampled_from(["gradient", "forward"])),
        "gate_sharpness": draw(st.sampled_from(["auto", 1.0, 50.0])),
    }
    if draw(st.booleans()):
        hp["gate_tau"] = draw(st.floats(1e-4, 0.9))
    else:
        hp["gate_calibration_pairs"] = draw(st.integers(1, 6))
    return hp


#: Spec section 10: the losses dynbeta composes with.
DYNBETA_LOSSES = {"dpo", "cdpo", "robust", "hinge", "rdpo", "dposhift", "dpop", "nca", "apozero", "apodown", "dponorm"}


@st.composite
def combos(draw):
    """(loss, balance, hyperparameters) of a valid random combination."""
    loss = draw(st.sampled_from(LOSS_NAMES))
    balance = draw(st.lists(st.sampled_from(sorted(BALANCERS)), unique=True, max_size=len(BALANCERS)))
    if loss not in DYNBETA_LOSSES:  # spec section 10: refused for losses whose beta is not a scale
        balance = [b for b in balance if b != "dynbeta"]
    hp: dict = {}
    if "ada" in balance:
        hp.update(_ada(draw, loss))
    if "gate" in balance:
        hp.update(_gate(draw))
    if "balanced" in balance:
        hp["balanced_variant"] = draw(st.sampled_from(["norm", "prob"]))
    if draw(st.booleans()):
        hp["nll_weight"] = 0.3
    return loss, balance, hp


# --------------------------------------------------------------------------------------------------
# Properties of every combination
# --------------------------------------------------------------------------------------------------


@SETTINGS
@given(combo=combos(), batch=batches(), extra=st.tuples(st.integers(0, 3), st.integers(0, 3)),
       fill=st.lists(st.sampled_from([-1e30, 50.0, 0.0, -3.0, 1e4]), min_size=1, max_size=3))
def test_random_combination(combo, batch, extra, fill):
    loss, balance, hp = combo
    try:
        obj = Objective(loss=loss, balance=balance, **hp)
    except ConfigError as e:  # the strategy draws valid combinations only
        raise AssertionError(f"valid combination refused: {e}") from e
    out, g_w, g_l = loss_and_grads(obj, fresh(batch))
    B = batch.batch_size
    assert out.loss.dim() == 0 and out.per_pair.shape == (B,)
    assert torch.isfinite(out.loss) and torch.isfinite(out.per_pair).all()
    assert torch.isfinite(g_w).all() and torch.isfinite(g_l).all()
    assert all(torch.isfinite(v) and v.dim() == 0 and not v.requires_grad for v in out.metrics.values())
    assert_close(out.loss, out.per_pair.mean(), rtol=1e-12, atol=1e-12)
    assert torch.all(g_w[~batch.chosen_mask] == 0) and torch.all(g_l[~batch.rejected_mask] == 0)

    padded = pad_batch(batch, *extra, fill=fill)
    out_p, gp_w, gp_l = loss_and_grads(Objective(loss=loss, balance=balance, **hp), padded)
    tol = dict(rtol=1e-10, atol=1e-12)
    assert_close(out_p.loss, out.loss, **tol)
    assert_close(out_p.per_pair, out.per_pair, **tol)
    assert_close(gp_w[:, : g_w.shape[1]], g_w, **tol)
    assert_close(gp_l[:, : g_l.shape[1]], g_l, **tol)
    assert torch.all(gp_w[~padded.chosen_mask] == 0) and torch.all(gp_l[~padded.rejected_mask] == 0)
    assert out_p.metrics.keys() == out.metrics.keys()


# --------------------------------------------------------------------------------------------------
# DPO's symmetry
# --------------------------------------------------------------------------------------------------


def _h(batch: PairLogps):
    out = []
    for side in ("chosen", "rejected"):
        lp, m = getattr(batch, side).detach(), getattr(batch, f"{side}_mask")
        ref = getattr(batch, f"ref_{side}")
        S = torch.where(m, lp, 0.0).sum(-1)
        R = torch.where(m, ref, 0.0).sum(-1) if ref.dim() == 2 else ref
        out.append(S - R)
    return out


@SETTINGS
@given(batch=batches(), beta=st.sampled_from([0.01, 0.1, 0.5, 2.0]))
def test_dpo_is_symmetric(batch, beta):
    """Swapping chosen and rejected turns softplus(-u) into softplus(u), u = beta*(h_w - h_l)."""
    h_w, h_l = _h(batch)
    u = beta * (h_w - h_l)
    obj = Objective(loss="dpo", beta=beta)
    out = obj(fresh(batch))
    out_swapped = obj(swap_sides(batch))
    assert_close(out.per_pair, F.softplus(-u), rtol=1e-12, atol=1e-14)
    assert_close(out_swapped.per_pair, F.softplus(u), rtol=1e-12, atol=1e-14)
    assert_close(out_swapped.per_pair - out.per_pair, u, rtol=1e-10, atol=1e-12)
    assert_close(out.metrics["rewards/margins"], -out_swapped.metrics["rewards/margins"])


# --------------------------------------------------------------------------------------------------
# Neutral balancer settings reproduce the base loss exactly
# --------------------------------------------------------------------------------------------------


def _assert_identical(loss, balance, hp, batch):
    base, b_w, b_l = loss_and_grads(Objective(loss=loss), fresh(batch))
    out, g_w, g_l = loss_and_grads(Objective(loss=loss, balance=balance, **hp), fresh(batch))
    assert torch.equal(out.loss, base.loss), (out.loss.item(), base.loss.item())
    assert torch.equal(out.per_pair, base.per_pair)
    assert torch.equal(g_w, b_w), (g_w - b_w).abs().max()
    assert torch.equal(g_l, b_l), (g_l - b_l).abs().max()


@pytest.mark.parametrize("loss", LOSS_NAMES)
@PER_LOSS
@given(batch=batches(), data=st.data())
def test_ada_with_zero_exponents_is_the_base_loss(loss, batch, data):
    hp = _ada(data.draw, loss)
    hp.update(ada_alpha_w=0.0, ada_alpha_l=0.0, ada_k=1.0)
    if hp["ada_clip"] is not None and hp["ada_clip"] < 1:
        hp["ada_clip"] = 1.0
    if hp.get("ada_floor", 0) > 1:
        del hp["ada_floor"]
    _assert_identical(loss, ["ada"], hp, batch)


@pytest.mark.parametrize("loss", LOSS_NAMES)
@PER_LOSS
@given(batch=batches(low=st.sampled_from([-0.01, -2.0, -30.0])),
       estimator=st.sampled_from(["seq", "quantile"]), apply=st.sampled_from(["gradient", "forward"]),
       q=st.sampled_from([0.0, 0.1, 1.0]))
def test_open_gate_is_the_base_loss(loss, batch, estimator, apply, q):
    """gate_tau=1e-30, gate_sharpness=1e30: g = sigma(1e30*(phat - 1e-30)) == 1 for phat >= e^-30."""
    hp = dict(gate_tau=1e-30, gate_sharpness=1e30, gate_estimator=estimator, gate_apply=apply,
              gate_quantile=q)
    _assert_identical(loss, ["gate"], hp, batch)


@pytest.mark.parametrize("loss", LOSS_NAMES)
@PER_LOSS
@given(data=st.data())
def test_balanced_with_equal_branches_is_the_base_loss(loss, data):
    """Chosen and rejected with the same tokens and statistics have G_w == G_l, so w_w = w_l = 1."""
    b = data.draw(batches())
    same = PairLogps(b.chosen, b.chosen.detach().clone().requires_grad_(True), b.chosen_mask,
                     b.chosen_mask.clone(), ref_chosen=b.ref_chosen, ref_rejected=b.ref_chosen * 0.5,
                     chosen_stats=b.chosen_stats, rejected_stats={"sum_p2": b.chosen_stats["sum_p2"].clone()})
    _assert_identical(loss, ["balanced"], {"balanced_variant": "norm"}, same)


@SETTINGS
@given(batch=batches(ref=st.just("token"), low=st.sampled_from([-0.5, -2.0, -4.0])), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_half_and_single_precision_inputs_are_finite(batch, dtype):
    low_prec = PairLogps(batch.chosen.detach().to(dtype).requires_grad_(), batch.rejected.detach().to(dtype)
                         .requires_grad_(), batch.chosen_mask, batch.rejected_mask,
                         ref_chosen=batch.ref_chosen.to(dtype), ref_rejected=batch.ref_rejected.to(dtype),
                         chosen_stats={"sum_p2": batch.chosen_stats["sum_p2"].to(dtype)},
                         rejected_stats={"sum_p2": batch.rejected_stats["sum_p2"].to(dtype)})
    obj = Objective(loss="dpo", balance=["ada", "gate", "balanced"], gate_tau=0.05)
    out, g_w, g_l = loss_and_grads(obj, low_prec)
    assert torch.isfinite(out.loss) and torch.isfinite(g_w).all() and torch.isfinite(g_l).all()
    ref = obj(fresh(batch))
    assert_close(out.loss.double(), ref.loss, rtol=0.05, atol=0.05)
