"""Conformance of the whole table: every base loss x every balancer configuration.

The combinations are generated from ``poise.losses.LOSSES`` and ``poise.balance.BALANCERS`` (a new
loss or balancer is covered without touching this file): no balancer; each balancer alone in each of
its option variants (every combination of its choice-valued options, plus the variants listed in
CROSS/EXTRA below); and every group of two or more balancers, cycling through their variants so
that each variant appears in each group.

What every valid combination must do (spec sections 1, 4, 8, 9):
(a) shapes and normalisation, (b) padding invariance, (c) zero gradient on masked tokens,
(d) finiteness at extreme inputs, (e) reference-free objectives never read the reference,
(f) metric names and detached 0-d values, (g) no gradient through the reference, the statistics or
the balancers' coefficients, (i) clear errors for missing inputs. Plus (h) config errors at build
time and (j) Gate-DPO's calibration state. Only the documented combinations are refused.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import math
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import call, fresh, loss_and_grads, make_batch, pad_batch, without
from torch.testing import assert_close

import poise
from poise import ConfigError, Objective, PairLogps
from poise.balance import BALANCERS
from poise.losses import LOSSES
from poise.params import NLL_WEIGHT, Param
from poise.presets import PRESETS
from poise.seq import PairSeq

# --------------------------------------------------------------------------------------------------
# What the spec documents (sections 3, 5, 9). Used to state expectations independently of the code.
# --------------------------------------------------------------------------------------------------

#: Spec sections 3 and 10, "reference" column.
SPEC_NEEDS_REFERENCE = {
    "dpo": True, "cdpo": True, "robust": True, "ipo": True, "hinge": True, "rdpo": True,
    "caldpo": True, "dposhift": True, "simpo": False, "cpo": False, "orpo": False,
    "dpop": True, "nca": True, "apozero": True, "apodown": True, "simper": False, "dponorm": True,
}
#: Spec section 5: AdaDPO's sequence form is not defined for ORPO (its odds live on the mean token
#: probability); everything else composes (section 4: "A balancer composes with any base loss").
SPEC_ADA_TOKEN_ONLY = {"orpo"}
#: Spec section 5 table: bases on which AdaDPO's kappa is applied gradient-only; plus the section 10
#: baselines whose chosen term is not one margin with the rejected (a target, a non-monotone or a
#: separable bounded term), as decided in poise/balance/ada.py (the spec leaves them to it).
SPEC_ADA_GRADIENT_ONLY = {"ipo", "caldpo", "nca", "apozero", "apodown", "simper"}
#: Spec section 10: dynbeta composes with the losses whose beta multiplies the log-ratios, and is
#: refused for the others (IPO's and Cal-DPO's beta sets a target; reference-free losses have no margin).
SPEC_DYNBETA_LOSSES = {"dpo", "cdpo", "robust", "hinge", "rdpo", "dposhift", "dpop", "nca", "apozero", "apodown",
                       "dponorm"}
#: Spec sections 9 and 10.
SPEC_PRESETS = {
    "adadpo": ("dpo", ("ada",)), "ada-simpo": ("simpo", ("ada",)), "ada-ipo": ("ipo", ("ada",)),
    "ada-rdpo": ("rdpo", ("ada",)), "ada-cpo": ("cpo", ("ada",)), "ada-orpo": ("orpo", ("ada",)),
    "gate-dpo": ("dpo", ("gate",)), "gate-ipo": ("ipo", ("gate",)), "gate-caldpo": ("caldpo", ("gate",)),
    "gate-dposhift": ("dposhift", ("gate",)), "balanced-dpo": ("dpo", ("balanced",)),
    "beta-dpo": ("dpo", ("dynbeta",)),
}

BASE_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected", "nll_loss"}
ADA_KEYS = {"balance/kappa_mean", "balance/kappa_min", "balance/kappa_max", "balance/clipped_frac",
            "balance/below_one_frac", "balance/adaptive_rewards_chosen"}
GATE_KEYS = {"gate/mean", "gate/min", "gate/max", "gate/closed_frac", "gate/phat_q10", "gate/phat_q50",
             "gate/phat_q90"}
GATE_CALIBRATED_KEYS = {"gate/tau", "gate/sharpness"}
DYNBETA_KEYS = {"dynbeta/scale", "dynbeta/margin_mean", "dynbeta/margin_running"}
BALANCED_KEYS = {"norm": {"balance/w_chosen_mean", "balance/w_rejected_mean"},
                 "prob": {"balance/beta_l_scale_mean"}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one intra-op thread is faster, and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def loss_needs_reference(loss: str) -> bool:
    return SPEC_NEEDS_REFERENCE.get(loss, LOSSES[loss].needs_reference)


# --------------------------------------------------------------------------------------------------
# The combinations
# --------------------------------------------------------------------------------------------------

#: Variants crossed with every combination of a balancer's choice options.
CROSS: dict[str, list[dict[str, Any]]] = {
    # a numeric tau, and "auto" calibrated on the first 3 pairs (so that the calibrated path runs
    # inside a test batch of 4 pairs)
    "gate": [{"gate_tau": 0.1}, {"gate_tau": "auto", "gate_calibration_pairs": 3}],
}
#: Further single variants (with default choices).
EXTRA: dict[str, list[dict[str, Any]]] = {
    "ada": [{"ada_clip": None}, {"ada_floor": 1.0}, {"ada_alpha_w": 0.5, "ada_alpha_l": 0.5}],
}


def balancer_variants(name: str) -> list[dict[str, Any]]:
    choice = [p for p in BALANCERS[name].params if p.kind == "choice"]
    grid = [dict(zip([p.name for p in choice], vals)) for vals in itertools.product(*(p.choices for p in choice))]
    return [{**g, **c} for g in grid for c in CROSS.get(name, [{}])] + EXTRA.get(name, [])


VARIANTS = {name: balancer_variants(name) for name in BALANCERS}


@dataclass(frozen=True)
class Combo:
    loss: str
    balance: tuple[str, ...]
    hp: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.hp)

    @property
    def id(self) -> str:
        defaults = {p.name: p.default for b in self.balance for p in BALANCERS[b].params}
        shown = [f"{k}={v}" for k, v in self.hp if defaults.get(k, object()) != v and k != "gate_calibration_pairs"]
        return "+".join((self.loss,) + self.balance) + (f"[{','.join(shown)}]" if shown else "")

    def build(self, **extra: Any) -> Objective:
        return Objective(loss=self.loss, balance=list(self.balance), **{**self.kwargs, **extra})

    def get(self, key: str) -> Any:
        for b in self.balance:
            for p in BALANCERS[b].params:
                if p.name == key:
                    return self.kwargs.get(key, p.default)
        raise KeyError(key)

    @property
    def invalid_keys(self) -> tuple[str, ...]:
        """The hyperparameters (or the balancer) a refusal must name; () if the spec says the combination
        is valid."""
        keys = []
        if "dynbeta" in self.balance and self.loss not in SPEC_DYNBETA_LOSSES:
            keys.append("dynbeta")
        if "ada" not in self.balance:
            return tuple(keys)
        if self.get("ada_space") == "reference" and not loss_needs_reference(self.loss):
            keys.append("ada_space")
        if self.get("ada_form") == "sequence" and self.loss in SPEC_ADA_TOKEN_ONLY:
            keys.append("ada_form")
        return tuple(keys)

    @property
    def needs_reference(self) -> bool:
        return (loss_needs_reference(self.loss) or "dynbeta" in self.balance
                or ("ada" in self.balance and self.get("ada_space") == "reference"))

    @property
    def needs_stats(self) -> bool:
        return "balanced" in self.balance and self.get("balanced_variant") == "norm"

    def _gradient_only(self, b: str) -> bool:
        if b == "gate":
            return self.get("gate_apply") == "gradient"
        if b == "balanced":
            return self.get("balanced_variant") == "norm"
        if b == "ada":
            return self.loss in SPEC_ADA_GRADIENT_ONLY
        return False

    @property
    def value_preserving(self) -> bool:
        """Every balancer applies gradient-only: the loss value must equal the base loss's."""
        return bool(self.balance) and all(self._gradient_only(b) for b in self.balance)


def _all_combos() -> list[Combo]:
    out = []
    for loss in LOSSES:
        out.append(Combo(loss, ()))
        for k in range(1, len(BALANCERS) + 1):
            for group in itertools.combinations(BALANCERS, k):
                n = max(len(VARIANTS[b]) for b in group)
                for i in range(n):
                    hp: dict[str, Any] = {}
                    for j, b in enumerate(group):
                        vs = VARIANTS[b]
                        hp.update(vs[(i + j) % len(vs)])  # offset: different partners per variant
                    out.append(Combo(loss, group, tuple(sorted(hp.items()))))
    return list(dict.fromkeys(out))


ALL = _all_combos()
VALID = [c for c in ALL if not c.invalid_keys]
REF_FREE = [c for c in VALID if not c.needs_reference]


def _params(combos):
    return [pytest.param(c, id=c.id) for c in combos]


def batch_for(combo: Combo, **kw) -> PairLogps:
    kw.setdefault("ref", "token")
    kw.setdefault("stats", True)
    return make_batch(**kw)


def _same_metrics(m0, m1, **tol):
    assert m0.keys() == m1.keys()
    keys = sorted(m0)
    v0 = torch.stack([m0[k].double() for k in keys])
    v1 = torch.stack([m1[k].double() for k in keys])
    assert_close(v1, v0, msg=lambda s: f"metrics {keys}: {s}", **tol)


# --------------------------------------------------------------------------------------------------
# Build: exactly the documented combinations are refused
# --------------------------------------------------------------------------------------------------


def test_table_is_covered():
    assert set(SPEC_NEEDS_REFERENCE) <= set(LOSSES), "a loss of spec section 3 is missing"
    for name, spec in LOSSES.items():
        if name in SPEC_NEEDS_REFERENCE:
            assert spec.needs_reference == SPEC_NEEDS_REFERENCE[name], name
    assert {"ada", "gate", "balanced"} <= set(BALANCERS)
    assert {c.loss for c in VALID} == set(LOSSES)
    for b in BALANCERS:  # every variant of every balancer appears with every loss, alone and in groups
        for v in VARIANTS[b]:
            for group_size in range(1, len(BALANCERS) + 1):
                assert any(b in c.balance and len(c.balance) == group_size
                           and all(c.kwargs.get(k) == x for k, x in v.items()) for c in ALL), (b, v)
    assert len(ALL) > 400


@pytest.mark.parametrize("combo", _params(ALL))
def test_build_refuses_exactly_the_documented_combinations(combo):
    if combo.invalid_keys:
        with pytest.raises(ConfigError) as err:
            combo.build()
        assert any(k in str(err.value) for k in combo.invalid_keys), str(err.value)
        return
    obj = combo.build()
    assert obj.balance == combo.balance
    assert obj.needs_reference == combo.needs_reference
    assert obj.needs_stats == (frozenset({"sum_p2"}) if combo.needs_stats else frozenset())


# --------------------------------------------------------------------------------------------------
# (a) shapes and normalisation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("combo", _params(VALID))
def test_shapes_and_normalisation(combo):
    for B in (4, 1):
        batch = batch_for(combo, B=B, seed=1)
        out = call(combo.build(), fresh(batch))
        assert out.loss.dim() == 0
        assert out.per_pair.shape == (B,)
        assert out.loss.dtype == out.per_pair.dtype == torch.float64
        assert_close(out.loss, out.per_pair.mean(), rtol=1e-12, atol=1e-12)

    # a share of a step-level mean: loss == sum(per_pair) / num_pairs
    batch = batch_for(combo, seed=1)
    n_tok = float(batch.chosen_mask.sum())
    kw = dict(num_pairs=10, num_chosen_tokens=17.0)
    out = call(combo.build(), fresh(batch), **kw)
    assert_close(out.loss, out.per_pair.sum() / 10, rtol=1e-12, atol=1e-12)
    out_default = call(combo.build(), fresh(batch))
    nll = combo.build().nll_weight
    if nll == 0:  # no batch-level term: per_pair does not depend on the normalisation
        assert_close(out.per_pair, out_default.per_pair, rtol=1e-12, atol=1e-12)

    # nll_weight adds the chosen token-mean NLL of the whole step (batch-level, spec section 3)
    out_nll = call(combo.build(nll_weight=0.5), fresh(batch), **kw)
    S_w = torch.where(batch.chosen_mask, batch.chosen.detach(), 0.0).sum(-1)
    assert_close(out_nll.loss - out.loss, 0.5 * -S_w.sum() / 17.0, rtol=1e-10, atol=1e-12)
    assert_close(out_nll.per_pair - out.per_pair, 0.5 * -S_w * 10 / 17.0, rtol=1e-10, atol=1e-12)
    out_nll_default = call(combo.build(nll_weight=0.5), fresh(batch))
    assert_close(out_nll_default.loss - out_default.loss, 0.5 * -S_w.sum() / n_tok, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# (b) padding invariance and (c) zero gradient on masked tokens
# --------------------------------------------------------------------------------------------------


def _assert_masked_grads_zero(batch, g_w, g_l):
    assert torch.all(g_w[~batch.chosen_mask] == 0), "a masked chosen token got a gradient"
    assert torch.all(g_l[~batch.rejected_mask] == 0), "a masked rejected token got a gradient"


@pytest.mark.parametrize("combo", _params(VALID))
def test_padding_invariance_and_masked_gradients(combo):
    tol = dict(rtol=1e-10, atol=1e-12)
    for mask in ("right", "random"):
        batch = batch_for(combo, seed=2, mask=mask)
        T_w, T_l = batch.chosen.shape[1], batch.rejected.shape[1]
        b0 = fresh(batch)
        out0, gw0, gl0 = loss_and_grads(combo.build(), b0)
        assert torch.isfinite(gw0).all() and torch.isfinite(gl0).all()
        assert gw0[b0.chosen_mask].abs().sum() + gl0[b0.rejected_mask].abs().sum() > 0, "no gradient at all"
        _assert_masked_grads_zero(b0, gw0, gl0)

        padded = pad_batch(batch, extra_w=3, extra_l=2)  # garbage -1e30, +50, 0 in log-probs, ref, stats
        out1, gw1, gl1 = loss_and_grads(combo.build(), padded)
        assert_close(out1.loss, out0.loss, **tol)
        assert_close(out1.per_pair, out0.per_pair, **tol)
        _same_metrics(out0.metrics, out1.metrics, **tol)
        assert_close(gw1[:, :T_w], gw0, **tol)
        assert_close(gl1[:, :T_l], gl0, **tol)
        _assert_masked_grads_zero(padded, gw1, gl1)

    # a per-sequence reference (sums over the completion tokens) is the same as a per-token one
    if combo.needs_reference:
        seq_ref = replace(fresh(batch),
                          ref_chosen=torch.where(batch.chosen_mask, batch.ref_chosen, 0.0).sum(-1),
                          ref_rejected=torch.where(batch.rejected_mask, batch.ref_rejected, 0.0).sum(-1))
        out2, gw2, gl2 = loss_and_grads(combo.build(), seq_ref)
        assert_close(out2.loss, out0.loss, **tol)
        assert_close(gw2, gw0, **tol)
        assert_close(gl2, gl0, **tol)


# --------------------------------------------------------------------------------------------------
# (d) finite at extreme inputs
# --------------------------------------------------------------------------------------------------

_LONG = 8192


def _extreme_batch(dtype: torch.dtype) -> PairLogps:
    """Rows: lengths 1 and 8192, per-token log-probs 0 (p = 1) and -1e4, references on the opposite
    side so that the log-ratios reach about +-8e7, and one row of uniform values in [-1e4, 0]."""
    gen = torch.Generator().manual_seed(7)
    T = _LONG
    n_w = torch.tensor([1, T, T, 1, T])
    n_l = torch.tensor([T, 1, T, 1, 1])
    pos = torch.arange(T)[None, :]
    m_w, m_l = pos < n_w[:, None], pos < n_l[:, None]
    U = -1e4 * torch.rand(2, T, generator=gen, dtype=torch.float64)
    def rows(vals):
        return torch.stack([torch.full((T,), v, dtype=torch.float64) if isinstance(v, float) else v
                            for v in vals])

    lp_w = rows([-1e4, 0.0, U[0], -1e4, -1e4])
    lp_l = rows([0.0, -1e4, U[1], 0.0, -1e-3])
    ref_w = rows([0.0, -1e4, U[1], 0.0, 0.0])
    ref_l = rows([-1e4, 0.0, U[0], -1e4, -1e4])

    def sum_p2(lp):  # in [p^2, 1], hitting both ends
        p2 = torch.exp(2 * lp)
        u = torch.rand(lp.shape, generator=gen, dtype=torch.float64)
        u[:, ::3] = 0.0
        u[:, 1::3] = 1.0
        return p2 + u * (1 - p2)

    return PairLogps(lp_w.to(dtype).requires_grad_(), lp_l.to(dtype).requires_grad_(), m_w, m_l,
                     ref_chosen=ref_w.to(dtype), ref_rejected=ref_l.to(dtype),
                     chosen_stats={"sum_p2": sum_p2(lp_w).to(dtype)},
                     rejected_stats={"sum_p2": sum_p2(lp_l).to(dtype)})


_EXTREME = {dt: _extreme_batch(dt) for dt in (torch.float32, torch.bfloat16)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("combo", _params(VALID))
def test_finite_at_extreme_inputs(combo, dtype):
    batch = fresh(_EXTREME[dtype])
    out, g_w, g_l = loss_and_grads(combo.build(), batch)
    assert out.loss.dtype in (torch.float32, torch.float64), "half-precision inputs are computed in float32+"
    assert torch.isfinite(out.loss), out.loss
    assert torch.isfinite(out.per_pair).all(), out.per_pair
    assert g_w.dtype == dtype and g_l.dtype == dtype
    assert torch.isfinite(g_w).all(), "non-finite chosen gradient"
    assert torch.isfinite(g_l).all(), "non-finite rejected gradient"
    _assert_masked_grads_zero(batch, g_w, g_l)
    bad = {k: v for k, v in out.metrics.items() if not torch.isfinite(v)}
    assert not bad, f"non-finite metrics: {bad}"


# --------------------------------------------------------------------------------------------------
# (e) reference-free objectives never read the reference fields
# --------------------------------------------------------------------------------------------------


class ReferenceRead(Exception):
    pass


class TrappedRef(PairLogps):
    """A PairLogps whose ``ref_chosen``/``ref_rejected`` raise on every read once armed."""

    def __getattribute__(self, name):
        if name in ("ref_chosen", "ref_rejected") and object.__getattribute__(self, "__dict__").get("_armed"):
            raise ReferenceRead(f"batch.{name} was read")
        return object.__getattribute__(self, name)

    @classmethod
    def of(cls, batch: PairLogps) -> TrappedRef:
        b = fresh(batch)
        t = cls(b.chosen, b.rejected, b.chosen_mask, b.rejected_mask, b.ref_chosen, b.ref_rejected,
                b.chosen_stats, b.rejected_stats)
        t.__dict__["_armed"] = True
        return t


def test_trap_works():
    t = TrappedRef.of(make_batch())
    with pytest.raises(ReferenceRead):
        _ = t.ref_chosen
    with pytest.raises(ReferenceRead):
        _ = t.has_reference
    with pytest.raises(ReferenceRead):
        Objective(loss="dpo")(t)


@pytest.mark.parametrize("combo", _params(REF_FREE))
def test_reference_free_never_reads_the_reference(combo):
    batch = batch_for(combo, seed=4)
    out0, gw0, gl0 = loss_and_grads(combo.build(), without(batch, ref=True))
    trapped = TrappedRef.of(batch)
    obj = combo.build()
    obj.calibrate(obj.init_state(), trapped)  # calibration never reads the reference either
    out1, gw1, gl1 = loss_and_grads(combo.build(), trapped)
    assert torch.equal(out1.loss, out0.loss)
    assert torch.equal(out1.per_pair, out0.per_pair)
    assert torch.equal(gw1, gw0) and torch.equal(gl1, gl0)
    _same_metrics(out0.metrics, out1.metrics, rtol=0, atol=0)

    # the weaker form: a reference full of NaN changes nothing
    nan = replace(fresh(batch), ref_chosen=torch.full_like(batch.ref_chosen, math.nan),
                  ref_rejected=torch.full_like(batch.ref_rejected, math.nan))
    out2, gw2, gl2 = loss_and_grads(combo.build(), nan)
    assert torch.isfinite(out2.loss)
    assert torch.equal(out2.loss, out0.loss) and torch.equal(gw2, gw0) and torch.equal(gl2, gl0)
    assert all(torch.isfinite(v) for v in out2.metrics.values())


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_gate_calibration_never_reads_the_reference(loss):
    obj = Objective(loss=loss, balance=["gate"], gate_calibration_pairs=3)
    state = obj.calibrate(obj.init_state(), TrappedRef.of(make_batch()))
    assert not obj.needs_calibration(state)


# --------------------------------------------------------------------------------------------------
# (f) metrics
# --------------------------------------------------------------------------------------------------


def expected_metric_keys(combo: Combo, calibrated: bool) -> set[str]:
    keys = set(BASE_KEYS)
    if "ada" in combo.balance:
        keys |= ADA_KEYS
    if "gate" in combo.balance:
        keys |= GATE_KEYS | (GATE_CALIBRATED_KEYS if calibrated else set())
    if "balanced" in combo.balance:
        keys |= BALANCED_KEYS[combo.get("balanced_variant")]
    if "dynbeta" in combo.balance:
        keys |= DYNBETA_KEYS
    return keys


@pytest.mark.parametrize("combo", _params(VALID))
def test_metrics(combo):
    batch = batch_for(combo, seed=5)
    out = call(combo.build(), fresh(batch))
    missing = expected_metric_keys(combo, calibrated=True) - set(out.metrics)
    assert not missing, f"missing metrics {sorted(missing)}"
    for k, v in out.metrics.items():
        assert isinstance(v, torch.Tensor), k
        assert v.dim() == 0, f"{k} has shape {tuple(v.shape)}"
        assert not v.requires_grad and v.grad_fn is None, f"{k} is not detached"
        assert torch.isfinite(v), f"{k} = {v}"
    assert_close(out.metrics["loss"], out.loss.detach())
    if "gate" in combo.balance:
        lo, hi = float(out.metrics["gate/min"]), float(out.metrics["gate/max"])
        assert 0.0 <= lo <= float(out.metrics["gate/mean"]) <= hi <= 1.0
    if "ada" in combo.balance:
        assert float(out.metrics["balance/kappa_min"]) <= float(out.metrics["balance/kappa_max"])
        assert 0 <= float(out.metrics["balance/clipped_frac"]) <= 1

    # rewards (spec section 1): beta*h with a reference (the standard DPO reward), beta*A or beta*S without
    obj = combo.build()
    S = [torch.where(m, x.detach(), 0.0).sum(-1) for x, m in
         ((batch.chosen, batch.chosen_mask), (batch.rejected, batch.rejected_mask))]
    n = [batch.chosen_mask.sum(-1), batch.rejected_mask.sum(-1)]
    if LOSSES[combo.loss].needs_reference:
        R = [torch.where(m, r, 0.0).sum(-1) for r, m in
             ((batch.ref_chosen, batch.chosen_mask), (batch.ref_rejected, batch.rejected_mask))]
        r = [obj.hyperparameters["beta"] * (s - rr) for s, rr in zip(S, R)]
    elif combo.loss == "cpo":
        r = [obj.hyperparameters["beta"] * s for s in S]
    elif combo.loss == "simper":  # no hyperparameter, so no scale: r = A, the log inverse perplexity
        r = [s / k for s, k in zip(S, n)]
    else:
        scale = obj.hyperparameters.get("beta", obj.hyperparameters.get("orpo_lambda"))
        r = [scale * s / k for s, k in zip(S, n)]
    assert_close(out.metrics["rewards/chosen"], r[0].mean())
    assert_close(out.metrics["rewards/rejected"], r[1].mean())
    assert_close(out.metrics["rewards/margins"], (r[0] - r[1]).mean())
    assert_close(out.metrics["rewards/accuracies"], (r[0] > r[1]).double().mean())
    assert_close(out.metrics["logps/chosen"], S[0].mean())
    assert_close(out.metrics["logps/rejected"], S[1].mean())
    assert_close(out.metrics["nll_loss"], -S[0].sum() / n[0].sum())


# --------------------------------------------------------------------------------------------------
# (g) no gradient through the reference, the statistics or the coefficients
# --------------------------------------------------------------------------------------------------


def _row_ratio(g: torch.Tensor, g0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row c with g == c * g0 on the masked tokens (NaN where g0 is zero on the row)."""
    g, g0 = torch.where(mask, g, 0.0), torch.where(mask, g0, 0.0)
    den = (g0 * g0).sum(-1)
    c = torch.where(den > 0, (g * g0).sum(-1) / den.clamp(min=1e-300), math.nan)
    expected = torch.where(den[:, None] > 0, c[:, None] * g0, 0.0)
    assert_close(g, expected, rtol=1e-9, atol=1e-15, msg="gradient is not a per-pair multiple of the base's")
    return c


@pytest.mark.parametrize("combo", _params(VALID))
def test_no_gradient_through_reference_stats_or_coefficients(combo):
    batch = batch_for(combo, seed=6)
    b = fresh(batch)
    b.ref_chosen.requires_grad_(True)
    b.ref_rejected.requires_grad_(True)
    for st in (b.chosen_stats, b.rejected_stats):
        st["sum_p2"] = st["sum_p2"].clone().requires_grad_(True)
    out, g_w, g_l = loss_and_grads(combo.build(), b)
    assert b.ref_chosen.grad is None and b.ref_rejected.grad is None, "the reference got a gradient"
    assert b.chosen_stats["sum_p2"].grad is None and b.rejected_stats["sum_p2"].grad is None

    # each balancer hands over coefficients that carry no gradient
    obj = combo.build()
    seq = PairSeq.build(fresh(batch), read_reference=obj.needs_reference)
    rewards = tuple(r.detach() for r in obj.loss_spec.rewards(seq, obj.loss_hp))
    state = obj.finish_calibration(obj.calibrate(obj.init_state(), fresh(batch)))
    for bal in obj.balancers:
        for s in bal.scales(state.get(bal.name, {}), seq, rewards)[0]:
            for c in (s.chosen, s.rejected):
                assert c is None or not c.requires_grad, f"{bal.name} coefficient carries a gradient"

    if not combo.value_preserving:
        return
    # gradient-only balancers: the loss value is bit-identical to the base loss ...
    base, g0_w, g0_l = loss_and_grads(Objective(loss=combo.loss), fresh(batch))
    assert torch.equal(out.loss, base.loss), (out.loss.item(), base.loss.item())
    assert torch.equal(out.per_pair, base.per_pair)
    # ... and the gradient of each side is a non-negative per-pair multiple of the base loss's
    c_l = _row_ratio(g_l, g0_l, batch.rejected_mask)
    assert not (c_l < 0).any()
    nll = obj.nll_weight > 0
    if combo.balance == ("gate",):  # identity 4: chosen unchanged, rejected scaled by g in [0, 1]
        assert_close(g_w, g0_w, rtol=1e-12, atol=0)
        assert not (c_l > 1 + 1e-12).any()
    elif not nll:
        c_w = _row_ratio(g_w, g0_w, batch.chosen_mask)
        assert not (c_w < 0).any()
        if combo.balance == ("balanced",):  # w_w + w_l = 2 (total scale kept)
            both = ~(c_w.isnan() | c_l.isnan())
            assert_close(c_w[both] + c_l[both], torch.full_like(c_w[both], 2.0))
        if combo.balance == ("ada",) and combo.get("ada_alpha_l") == 0:  # kappa on the chosen side only
            ok = ~c_l.isnan()
            assert_close(c_l[ok], torch.ones_like(c_l[ok]))


def _seq_stats(batch):
    lp = [batch.chosen.detach().double(), batch.rejected.detach().double()]
    m = [batch.chosen_mask, batch.rejected_mask]
    S = [torch.where(mm, x, 0.0).sum(-1) for x, mm in zip(lp, m)]
    n = [mm.sum(-1).double() for mm in m]
    R = [torch.where(mm, r.double(), 0.0).sum(-1) for r, mm in zip((batch.ref_chosen, batch.ref_rejected), m)]
    return lp, m, S, n, R


def _dpo_coefficients(batch, hp):
    """(c_w, c_l) of spec sections 5-7 for DPO, computed from the formulas, in float64."""
    lp, m, S, n, R = _seq_stats(batch)
    A = [s / k for s, k in zip(S, n)]
    h = [s - r for s, r in zip(S, R)]
    c_w, c_l = torch.ones_like(S[0]), torch.ones_like(S[0])
    if any(k.startswith("ada_") for k in hp):
        seq_form, ref_space = hp.get("ada_form") == "sequence", hp.get("ada_space") == "reference"
        if ref_space:
            D = h[0] - h[1] if seq_form else h[0] / n[0] - h[1] / n[1]
        else:
            D = S[0] - S[1] if seq_form else A[0] - A[1]
        clip = hp.get("ada_clip", 2.0)
        cap = math.inf if clip is None else math.log(clip)
        aw, al = hp.get("ada_alpha_w", 1.0), hp.get("ada_alpha_l", 0.0)
        c_w = torch.exp((aw * D).clamp(max=cap))
        if hp.get("ada_floor") is not None:
            c_w = c_w.clamp(min=hp["ada_floor"])
        c_l = torch.exp((-al * D).clamp(max=cap))
    if hp.get("balanced_variant") == "prob":
        c_l = c_l * torch.clamp(torch.exp(A[1] - A[0]), max=1.0)
    if "gate_tau" in hp:
        if hp.get("gate_estimator", "seq") == "seq":
            ph = torch.exp(A[1])
        else:
            ph = torch.stack([torch.quantile(torch.exp(lp[1][i][m[1][i]]), 0.1) for i in range(len(S[0]))])
        c_l = c_l * torch.sigmoid(4 / hp["gate_tau"] * (ph - hp["gate_tau"]))
    return c_w, c_l, h


DPO_FORWARD_CASES = [
    {"ada_form": "token"}, {"ada_clip": None}, {"ada_form": "sequence"}, {"ada_space": "reference"},
    {"ada_form": "sequence", "ada_space": "reference", "ada_clip": None}, {"ada_floor": 1.0},
    {"ada_alpha_w": 0.5, "ada_alpha_l": 0.5}, {"balanced_variant": "prob"},
    {"gate_tau": 0.1, "gate_apply": "forward"},
    {"gate_tau": 0.1, "gate_apply": "forward", "gate_estimator": "quantile"},
]


@pytest.mark.parametrize("hp", DPO_FORWARD_CASES, ids=lambda hp: ",".join(f"{k}={v}" for k, v in hp.items()))
def test_dpo_forward_coefficients_match_spec_and_carry_no_gradient(hp):
    """L = softplus(-beta*(c_w h_w - c_l h_l)) with constant c: dL/dS_w = -(c_w/c_l) dL/dS_l. A
    coefficient that carried gradient (kappa = exp(A_w - A_l) without sg) would break the ratio."""
    balance = [b for b in BALANCERS if any(k in {p.name for p in BALANCERS[b].params} for k in hp)]
    batch = make_batch(B=6, T_w=7, T_l=5, seed=11, low=-3.0)
    obj = Objective(loss="dpo", balance=balance, **hp)
    out, g_w, g_l = loss_and_grads(obj, batch)
    c_w, c_l, h = _dpo_coefficients(batch, hp)
    beta = 0.1
    assert_close(out.per_pair, F.softplus(-beta * (c_w * h[0] - c_l * h[1])), rtol=1e-10, atol=1e-12)
    rows = torch.arange(batch.batch_size)
    first_w = batch.chosen_mask.double().argmax(-1)
    first_l = batch.rejected_mask.double().argmax(-1)
    dS_w, dS_l = g_w[rows, first_w], g_l[rows, first_l]
    assert_close(dS_w, -(c_w / c_l) * dS_l, rtol=1e-10, atol=1e-15)


# --------------------------------------------------------------------------------------------------
# (h) configuration errors at build time
# --------------------------------------------------------------------------------------------------


def _bad_values(p: Param) -> list[Any]:
    bad: list[Any] = [True, False, [0.1], {"x": 1}]
    if p.kind == "choice":
        return bad + ["not-a-choice", 1, 0.5, None, p.choices[0].upper() + "_"]
    bad += ["0.1", "abc", math.nan, math.inf, -math.inf]
    if p.kind != "float|none":
        bad.append(None)
    if p.kind != "float|auto":
        bad.append("auto")
    else:
        bad += ["AUTO", "Auto "]
    if p.kind == "int":
        bad.append(1.5)
    if p.low is not None:
        bad.append(p.low if p.low_open else p.low - 1e-9 * max(1.0, abs(p.low)) - 1e-12)
        bad.append(p.low - 1)
    if p.high is not None:
        bad.append(p.high if p.high_open else p.high + 1e-9 * max(1.0, abs(p.high)) + 1e-12)
        bad.append(p.high + 1)
    return bad


def _good_values(p: Param) -> list[Any]:
    good = [p.default]
    if p.kind == "choice":
        return good + list(p.choices)
    if p.low is not None and not p.low_open:
        good.append(p.low)
    if p.high is not None and not p.high_open:
        good.append(p.high)
    if p.kind == "float|auto":
        good.append("auto")
    if p.kind == "float|none":
        good.append(None)
    if p.kind != "int" and p.low is not None and p.high is not None:
        good.append((p.low + p.high) / 2)
    if p.kind == "int":
        good.append(int(p.low or 0) + 3)
    return good


def _owners() -> list[tuple[str, str, tuple[str, ...], Param]]:
    """(id, loss, balance, param) for every hyperparameter of the library, with a valid owner."""
    out = [(f"{loss}.{NLL_WEIGHT.name}", loss, (), NLL_WEIGHT) for loss in LOSSES]
    out += [(f"{loss}.{p.name}", loss, (), p) for loss, spec in LOSSES.items() for p in spec.params]
    out += [(f"{b}.{p.name}", "dpo", (b,), p) for b, cls in BALANCERS.items() for p in cls.params]
    return out


@pytest.mark.parametrize("loss,balance,param", [pytest.param(*o[1:], id=o[0]) for o in _owners()])
def test_bad_hyperparameter_values_are_config_errors(loss, balance, param):
    for value in _bad_values(param):
        with pytest.raises(ConfigError) as err:
            Objective(loss=loss, balance=list(balance), **{param.name: value})
        assert param.name in str(err.value), f"{param.name}={value!r}: {err.value}"
    for value in _good_values(param):
        obj = Objective(loss=loss, balance=list(balance), **{param.name: value})
        assert obj.hyperparameters[param.name] == value or (value is not None and value != value)


@pytest.mark.parametrize("kw,key", [
    ({"loss": "dpo", "beta": 0}, "beta"),
    ({"loss": "dpo", "beta": 0.0}, "beta"),
    ({"loss": "dpo", "beta": -0.1}, "beta"),
    ({"loss": "dpo", "beta": "0.1"}, "beta"),
    ({"loss": "dpo", "beta": True}, "beta"),
    ({"loss": "simpo", "beta": False}, "beta"),
    ({"loss": "cdpo", "label_smoothing": 0.5}, "label_smoothing"),
    ({"loss": "robust", "label_smoothing": 0.5}, "label_smoothing"),
    ({"loss": "dposhift", "shift": 0}, "shift"),
    ({"loss": "dposhift", "shift": 1.01}, "shift"),
    ({"loss": "dpo", "balance": ["gate"], "gate_calibration_quantile": 1}, "gate_calibration_quantile"),
    ({"loss": "dpo", "balance": ["gate"], "gate_calibration_quantile": 0}, "gate_calibration_quantile"),
    ({"loss": "dpo", "balance": ["gate"], "gate_calibration_pairs": 0}, "gate_calibration_pairs"),
    ({"loss": "dpo", "balance": ["gate"], "gate_tau": 1.5}, "gate_tau"),
    ({"loss": "dpo", "balance": ["gate"], "gate_tau": 0}, "gate_tau"),
    ({"loss": "dpo", "balance": ["gate"], "gate_sharpness": 0}, "gate_sharpness"),
    ({"loss": "dpo", "balance": ["ada"], "ada_floor": 3.0}, "ada_floor"),
    ({"loss": "dpo", "balance": ["ada"], "ada_floor": 1.5, "ada_clip": 1.2}, "ada_floor"),
    ({"loss": "dpo", "balance": ["ada"], "ada_clip": 0}, "ada_clip"),
    ({"loss": "dpo", "balance": ["ada"], "ada_form": "seq"}, "ada_form"),
    ({"loss": "dpo", "balance": ["balanced"], "balanced_variant": "l2"}, "balanced_variant"),
    ({"loss": "orpo", "orpo_lambda": 0}, "orpo_lambda"),
    ({"loss": "dpop", "dpop_lambda": -1.0}, "dpop_lambda"),
    ({"loss": "dponorm", "beta": 0}, "beta"),
    ({"loss": "simper", "beta": 0.1}, "beta"),
])
def test_named_config_errors(kw, key):
    with pytest.raises(ConfigError) as err:
        Objective(**kw)
    assert key in str(err.value), str(err.value)


#: Spec section 9 defaults, and values at the edges of the spec's documented ranges that must be accepted.
SPEC_DEFAULTS = {
    "dpo": {"beta": 0.1, "nll_weight": 0.0}, "simpo": {"beta": 2.5, "gamma_beta_ratio": 0.55},
    "cdpo": {"label_smoothing": 0.1}, "robust": {"label_smoothing": 0.1}, "rdpo": {"alpha": 0.05},
    "cpo": {"beta": 0.1, "cpo_alpha": 1.0}, "orpo": {"orpo_lambda": 0.1}, "dposhift": {"shift": 0.75},
    "ipo": {"beta": 0.1}, "hinge": {"beta": 0.1}, "caldpo": {"beta": 0.1},
    "dpop": {"beta": 0.1, "dpop_lambda": 50.0}, "nca": {"beta": 0.1}, "apozero": {"beta": 0.1},
    "apodown": {"beta": 0.1}, "simper": {}, "dponorm": {"beta": 5.0},
}
SPEC_BALANCER_DEFAULTS = {
    "ada": {"ada_form": "token", "ada_space": "policy", "ada_clip": 2.0, "ada_floor": None,
            "ada_alpha_w": 1.0, "ada_alpha_l": 0.0, "ada_k": 1.0},
    "gate": {"gate_estimator": "seq", "gate_quantile": 0.1, "gate_tau": "auto", "gate_sharpness": "auto",
             "gate_apply": "gradient", "gate_calibration_pairs": 256, "gate_calibration_quantile": 0.25},
    "balanced": {"balanced_variant": "norm"},
    "dynbeta": {"dynbeta_alpha": 0.5, "dynbeta_momentum": 0.9, "dynbeta_keep": 1.0},
}
SPEC_ACCEPTED = [
    ("cdpo", (), {"label_smoothing": 0.0}), ("robust", (), {"label_smoothing": 0.49}),
    ("dposhift", (), {"shift": 1.0}), ("dposhift", (), {"shift": 1e-3}), ("dpo", ("gate",), {"gate_tau": 1.0}),
    ("dpo", ("gate",), {"gate_tau": 1e-6, "gate_sharpness": 1e6}), ("dpo", ("ada",), {"ada_clip": None}),
    ("dpo", ("ada",), {"ada_floor": 1.0}), ("dpo", (), {"beta": 1}), ("dpo", (), {"nll_weight": 1.0}),
    ("dpop", (), {"dpop_lambda": 0.0}),
]


def test_defaults_and_ranges_match_spec():
    for loss, defaults in SPEC_DEFAULTS.items():
        hp = Objective(loss=loss).hyperparameters
        assert {k: hp[k] for k in defaults} == defaults, loss
        assert hp["nll_weight"] == 0.0
    assert "beta" not in Objective(loss="orpo").hyperparameters
    assert Objective(loss="simper").hyperparameters == {"nll_weight": 0.0}  # SimPER: no hyperparameter
    for b, defaults in SPEC_BALANCER_DEFAULTS.items():
        hp = Objective(loss="dpo", balance=[b]).hyperparameters
        assert {k: hp[k] for k in defaults} == defaults, b
    for loss, balance, kw in SPEC_ACCEPTED:
        Objective(loss=loss, balance=list(balance), **kw)


def test_floor_equal_to_clip_is_allowed():
    Objective(loss="dpo", balance=["ada"], ada_floor=2.0, ada_clip=2.0)
    Objective(loss="dpo", balance=["ada"], ada_floor=5.0, ada_clip=None)


ALL_LOSS_KEYS = {p.name for s in LOSSES.values() for p in s.params} | {NLL_WEIGHT.name}
ALL_BALANCER_KEYS = {b: {p.name for p in cls.params} for b, cls in BALANCERS.items()}


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_foreign_and_unknown_hyperparameters_are_config_errors(loss):
    own = {p.name for p in LOSSES[loss].params} | {NLL_WEIGHT.name}
    for key in ["bogus_key", "Beta", "learning_rate", "gate", "ada"] + sorted(ALL_LOSS_KEYS - own):
        with pytest.raises(ConfigError) as err:
            Objective(loss=loss, **{key: 0.5})
        assert repr(key) in str(err.value) or key in str(err.value), str(err.value)
    for b, keys in ALL_BALANCER_KEYS.items():
        others = [o for o in BALANCERS if o != b]
        for key in sorted(keys):
            for balance in ([], others):  # the balancer that owns the key is not enabled
                with pytest.raises(ConfigError) as err:
                    Objective(loss=loss, balance=balance, **{key: BALANCERS[b].params[0].default})
                assert key in str(err.value), str(err.value)
    # and through a preset
    for name, preset in PRESETS.items():
        if preset.loss == loss:
            with pytest.raises(ConfigError, match="bogus_key"):
                poise.objective(name, bogus_key=1)
            for key in sorted(ALL_LOSS_KEYS - own):
                with pytest.raises(ConfigError, match=key):
                    poise.objective(name, **{key: 0.5})


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="nosuchloss"):
        Objective(loss="nosuchloss")
    with pytest.raises(ConfigError, match="adadpo"):  # a preset is not a loss
        Objective(loss="adadpo")
    with pytest.raises(ConfigError, match="nosuchbalancer"):
        Objective(loss="dpo", balance=["nosuchbalancer"])
    with pytest.raises(ConfigError, match="nosuchbalancer"):
        Objective(loss="dpo", balance="nosuchbalancer")
    with pytest.raises(ConfigError, match="nosuchpreset"):
        poise.objective("nosuchpreset")
    for b in BALANCERS:
        with pytest.raises(ConfigError, match=b):
            Objective(loss="dpo", balance=[b, b])
    with pytest.raises(ConfigError, match="ada"):
        Objective(loss="dpo", balance=["ada", "gate", "ada"])


def test_balance_accepts_a_string_and_is_order_free():
    batch = make_batch(seed=9)
    a = Objective(loss="dpo", balance="ada")(fresh(batch))
    b = Objective(loss="dpo", balance=["ada"])(fresh(batch))
    assert torch.equal(a.loss, b.loss)
    kw = dict(gate_tau=0.1, balanced_variant="prob")
    x = Objective(loss="dpo", balance=["ada", "gate", "balanced"], **kw)(fresh(batch))
    y = Objective(loss="dpo", balance=["balanced", "gate", "ada"], **kw)(fresh(batch))
    assert_close(x.loss, y.loss, rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------------------------
# Presets (spec section 9)
# --------------------------------------------------------------------------------------------------


def test_presets_are_the_documented_ones():
    assert set(SPEC_PRESETS) <= set(PRESETS)
    for name, (loss, balance) in SPEC_PRESETS.items():
        assert (PRESETS[name].loss, tuple(PRESETS[name].balance)) == (loss, balance), name


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_equal_their_composition(name):
    p = PRESETS[name]
    batch = make_batch(seed=10)
    a = poise.objective(name)
    b = Objective(loss=p.loss, balance=list(p.balance))
    assert a.hyperparameters == b.hyperparameters
    assert torch.equal(call(a, fresh(batch)).loss, call(b, fresh(batch)).loss)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_objective_accepts_a_plain_loss_name(loss):
    batch = make_batch(seed=10)
    assert torch.equal(poise.objective(loss)(fresh(batch)).loss, Objective(loss=loss)(fresh(batch)).loss)


# --------------------------------------------------------------------------------------------------
# (i) missing inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("combo", _params(VALID))
def test_missing_reference_or_statistics_is_a_clear_error(combo):
    batch = batch_for(combo, seed=8)
    obj = combo.build()
    if combo.needs_reference:
        with pytest.raises(ValueError, match="ref"):
            call(obj, without(batch, ref=True))
    else:
        assert torch.isfinite(call(obj, without(batch, ref=True)).loss)
    if combo.needs_stats:
        with pytest.raises(ValueError, match="sum_p2"):
            call(obj, without(batch, stats=True))
        other = replace(fresh(batch), chosen_stats={"entropy": batch.chosen_stats["sum_p2"]})
        with pytest.raises(ValueError, match="sum_p2"):
            call(obj, other)
        other = replace(fresh(batch), rejected_stats={})
        with pytest.raises(ValueError, match="sum_p2"):
            call(obj, other)
    else:
        assert torch.isfinite(call(obj, without(batch, stats=True)).loss)


def test_pairlogps_validates_shapes():
    b = make_batch()
    with pytest.raises(ValueError):
        PairLogps(b.chosen, b.rejected, b.chosen_mask[:, :-1], b.rejected_mask)
    with pytest.raises(ValueError):
        PairLogps(b.chosen, b.rejected, b.chosen_mask, b.rejected_mask, ref_chosen=b.ref_chosen)
    with pytest.raises(ValueError):
        PairLogps(b.chosen[0], b.rejected, b.chosen_mask[0], b.rejected_mask)
    with pytest.raises(ValueError):
        PairLogps(b.chosen, b.rejected, b.chosen_mask, b.rejected_mask,
                  ref_chosen=b.ref_chosen[:, :-1], ref_rejected=b.ref_rejected)


# --------------------------------------------------------------------------------------------------
# (j) Gate-DPO calibration and state
# --------------------------------------------------------------------------------------------------


def _phat(batch, estimator="seq", q=0.1):
    lp = batch.rejected.detach().double()
    m = batch.rejected_mask
    if estimator == "seq":
        return torch.exp(torch.where(m, lp, 0.0).sum(-1) / m.sum(-1))
    return torch.stack([torch.quantile(torch.exp(lp[i][m[i]]), q) for i in range(lp.shape[0])])


def _gate(obj):
    (g,) = [b for b in obj.balancers if b.name == "gate"]
    return g


@pytest.mark.parametrize("estimator", ["seq", "quantile"])
@pytest.mark.parametrize("quantile", [0.25, 0.6])
def test_calibrate_uses_exactly_the_first_pairs(estimator, quantile):
    N = 10
    kw = dict(gate_estimator=estimator, gate_calibration_pairs=N)
    if quantile != 0.25:
        kw["gate_calibration_quantile"] = quantile
    obj = Objective(loss="dpo", balance=["gate"], **kw)
    state = obj.init_state()
    assert obj.needs_calibration(state)
    batches = [make_batch(B=4, seed=20 + i, T_l=7) for i in range(4)]
    phats = torch.cat([_phat(b, estimator) for b in batches])
    for i, b in enumerate(batches):
        state = obj.calibrate(state, b)
        assert obj.needs_calibration(state) == (4 * (i + 1) < N)
    tau = state["gate"]["tau"]
    assert tau == pytest.approx(float(torch.quantile(phats[:N], quantile)), rel=1e-12)
    assert tau != pytest.approx(float(torch.quantile(phats[:N + 2], quantile)), rel=1e-9)
    # calibration happens once
    assert obj.calibrate(state, make_batch(B=4, seed=99))["gate"]["tau"] == tau
    out = obj(make_batch(seed=1), state)
    assert float(out.metrics["gate/tau"]) == pytest.approx(tau, rel=1e-6)
    assert float(out.metrics["gate/sharpness"]) == pytest.approx(4 / tau, rel=1e-6)
    assert obj.calibrated_values(state) == {"gate_tau": tau}


def test_the_forward_never_calibrates_and_an_uncalibrated_gate_is_an_error():
    batches = [make_batch(B=4, seed=30 + i) for i in range(3)]
    phats = torch.cat([_phat(b) for b in batches])
    obj = Objective(loss="dpo", balance=["gate"], gate_calibration_pairs=6)
    state = obj.init_state()
    with pytest.raises(ValueError, match="not calibrated"):
        obj(fresh(batches[0]), state)
    with pytest.raises(ValueError, match="not calibrated"):
        obj(fresh(batches[0]))  # no state: a new one, uncalibrated, never silently open
    s1 = obj.calibrate(state, fresh(batches[0]))
    assert state == {"gate": {"tau": None, "seen": []}}, "calibrate returns a new state, it never mutates"
    s2 = obj.calibrate(s1, fresh(batches[1]))
    assert s1["gate"]["tau"] is None and len(s1["gate"]["seen"]) == 4
    assert s2["gate"]["tau"] == pytest.approx(float(torch.quantile(phats[:6], 0.25)), rel=1e-12)
    before = copy.deepcopy(s2)
    obj(fresh(batches[2]), s2)
    assert s2 == before, "the forward never changes the state"
    # gather: every rank's phat counts
    obj2 = Objective(loss="dpo", balance=["gate"], gate_calibration_pairs=8)
    s = obj2.calibrate(obj2.init_state(), batches[0], gather=lambda t: torch.cat([t, t.flip(0)]))
    p = _phat(batches[0])
    assert s["gate"]["tau"] == pytest.approx(float(torch.quantile(torch.cat([p, p.flip(0)]), 0.25)), rel=1e-12)


def test_fewer_pairs_than_asked_calibrate_on_all_of_them_and_none_is_an_error():
    obj = Objective(loss="dpo", balance=["gate"], gate_calibration_pairs=256)
    b = make_batch(B=4, seed=50)
    state = obj.calibrate(obj.init_state(), b)
    assert obj.needs_calibration(state)
    done = obj.finish_calibration(state)
    assert done["gate"]["tau"] == pytest.approx(float(torch.quantile(_phat(b), 0.25)), rel=1e-12)
    with pytest.raises(ConfigError, match="gate_calibration_pairs"):
        obj.finish_calibration(obj.init_state())


def test_gate_state_roundtrip():
    kw = dict(gate_calibration_pairs=10)
    batches = [make_batch(B=4, seed=40 + i) for i in range(3)]
    a = Objective(loss="dpo", balance=["gate"], **kw)
    partial = a.calibrate(a.init_state(), batches[0])  # 4 of 10 pairs seen: partial state
    state = a.calibrate(a.calibrate(partial, batches[1]), batches[2])
    assert not a.needs_calibration(state)

    buf = io.BytesIO()  # survives a checkpoint (torch, weights_only) and JSON alike
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert json.loads(json.dumps(state)) == state
    b = Objective(loss="dpo", balance=["gate"], **kw)
    assert b.needs_calibration(b.init_state())
    b.check_state(loaded)
    assert not b.needs_calibration(loaded)
    x = make_batch(seed=41)
    out_a, ga_w, ga_l = loss_and_grads(a, fresh(x), state=state)
    out_b, gb_w, gb_l = loss_and_grads(b, fresh(x), state=loaded)
    assert torch.equal(out_a.loss, out_b.loss) and torch.equal(ga_l, gb_l)
    _same_metrics(out_a.metrics, out_b.metrics, rtol=0, atol=0)

    # a partial calibration resumes where it stopped
    c = Objective(loss="dpo", balance=["gate"], **kw)
    resumed = c.calibrate(c.calibrate(json.loads(json.dumps(partial)), batches[1]), batches[2])
    assert resumed["gate"]["tau"] == state["gate"]["tau"]
    with pytest.raises(ValueError, match="another method"):
        Objective(loss="dpo", balance=["ada"]).check_state(state)


def test_stateless_balancers_have_empty_state():
    obj = Objective(loss="dpo", balance=["ada", "balanced"])
    assert obj.init_state() == {}
    obj.check_state({})
    assert not obj.needs_calibration({})
    numeric = Objective(loss="dpo", balance=["gate"], gate_tau=0.2)
    state = numeric.init_state()
    assert not numeric.needs_calibration(state)
    assert numeric.calibrate(state, make_batch())["gate"]["tau"] == 0.2
    assert numeric.calibrated_values(state) == {}  # nothing was calibrated: the config already says 0.2
