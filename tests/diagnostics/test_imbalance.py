"""Diagnostics against brute force: the logit-space branch norms from the per-token statistics equal
the norms of the gradient w.r.t. the full logits; the parameter-space split equals two backward passes
with one branch detached."""

import pytest
import torch

import poise
from poise.data import TokenizedPair
from poise.diagnostics.imbalance import Probe, plan_probes, step_metrics
from poise.model.logprobs import pair_logps, token_logps
from poise.model.tiny import build_tiny_model


@pytest.fixture
def setup():
    model = build_tiny_model(50, hidden_size=32, num_layers=1, seed=0).train()
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return tuple(torch.randint(3, 50, (n,), generator=g).tolist())

    pairs = [TokenizedPair(ids(4), ids(3 + i), ids(5 - i % 2), "x", i) for i in range(3)]
    return model, pairs


@pytest.mark.parametrize("factor", [1, 3])
def test_logit_space_norms_equal_brute_force(setup, factor):
    """Read off the step's own backward (of the loss, or of 3 x the loss as a 3-process engine does): the
    norms of dL/dlogits of the loss itself."""
    model, pairs = setup
    probe = Probe(pairs, 0, chunk_size=4)
    from poise.data import collate_pairs

    b = collate_pairs(pairs, 0)
    obj = poise.objective("adadpo", beta=0.5)
    ref = (torch.tensor([-20.0, -25.0, -22.0]), torch.tensor([-30.0, -28.0, -26.0]))
    pol = token_logps(model, b.input_ids, b.attention_mask, b.completion_mask, stats=("sum_p2",))
    pl = pair_logps(pol, ref_sums=ref)
    loss = obj(pl).loss
    m = step_metrics(pl, loss, obj)
    with pytest.raises(RuntimeError, match="before the step's backward"):
        float(m["diag/logit_grad_norm_chosen"])
    (loss if factor == 1 else loss * factor).backward()
    # brute force: the same loss from full logits, gradient w.r.t. the logits themselves
    logits = model(b.input_ids, attention_mask=b.attention_mask).logits.float()
    logits.retain_grad()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
    lp = torch.nn.functional.pad(lp, (1, 0)) * b.completion_mask
    n = len(pairs)
    pl2 = poise.PairLogps(lp[:n], lp[n:], b.completion_mask[:n], b.completion_mask[n:],
                          ref_chosen=ref[0], ref_rejected=ref[1])
    obj(pl2).loss.backward()
    per_row = logits.grad.norm(dim=-1).pow(2).sum(-1).sqrt()  # (2B,)
    assert float(m["diag/logit_grad_norm_chosen"]) == pytest.approx(per_row[:n].mean().item(), rel=1e-4)
    assert float(m["diag/logit_grad_norm_rejected"]) == pytest.approx(per_row[n:].mean().item(), rel=1e-4)
    assert float(m["diag/logit_grad_ratio"]) == pytest.approx((per_row[n:].sum() / per_row[:n].sum()).item(), rel=1e-4)
    assert 0 < m["diag/sigma_neg_u_mean"].item() < 1
    del probe


@pytest.mark.parametrize("micro", [None, 1, 2])
def test_param_space_split_equals_detached_backward(setup, micro):
    """In one pass over all the probe pairs, or in chunks of 1 or 2 pairs (the branch gradients summed
    over chunks, kept per tensor)."""
    model, pairs = setup
    probe = Probe(pairs, 0, chunk_size=4, micro_batch_size=micro)
    obj = poise.objective("dpo", beta=0.5)
    ref = torch.tensor([[-20.0, -30.0], [-25.0, -28.0], [-22.0, -26.0]])
    trainable = [p for p in model.parameters() if p.requires_grad]
    m = probe.param_grads(model, obj, obj.init_state(), trainable, torch.device("cpu"), ref)
    from poise.data import collate_pairs

    b = collate_pairs(pairs, 0)

    def grad_through(side):
        pol = token_logps(model, b.input_ids, b.attention_mask, b.completion_mask)
        pl = pair_logps(pol, ref_sums=(ref[:, 0], ref[:, 1]))
        if side == "chosen":
            pl.rejected = pl.rejected.detach()
        else:
            pl.chosen = pl.chosen.detach()
        gs = torch.autograd.grad(obj(pl).loss, trainable, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, trainable)])

    gw, gl = grad_through("chosen"), grad_through("rejected")
    assert m["diag/param_grad_norm_chosen"] == pytest.approx(gw.norm().item(), rel=1e-4)
    assert m["diag/param_grad_norm_rejected"] == pytest.approx(gl.norm().item(), rel=1e-4)
    assert m["diag/param_grad_cosine"] == pytest.approx((gw @ gl / gw.norm() / gl.norm()).item(), abs=1e-4)


def test_probe_logps(setup):
    model, pairs = setup
    out = Probe(pairs, 0, chunk_size=4).logps(model, torch.device("cpu"))
    assert out["probe/chosen_logp"] < 0 and out["probe/others_logp"] < 0
    assert 0 < out["probe/max_token_prob"] <= 1 and out["probe/entropy"] > 0


@pytest.mark.parametrize("micro", [1, 2])
def test_chunked_probe_gives_the_unchunked_figures(setup, micro):
    """Every figure of measure() in chunks of micro_batch_size pairs (the no-grad pass joined, the unrelated
    responses in chunks) equals the one-pass figures, relative to their magnitude."""
    model, pairs = setup
    obj = poise.objective("adadpo", beta=0.5)
    ref = torch.tensor([[-20.0, -30.0], [-25.0, -28.0], [-22.0, -26.0]])
    trainable = [p for p in model.parameters() if p.requires_grad]
    cpu = torch.device("cpu")
    whole = Probe(pairs, 0, chunk_size=4).measure(model, obj, obj.init_state(), trainable, cpu, ref)
    parts = Probe(pairs, 0, chunk_size=4, micro_batch_size=micro).measure(model, obj, obj.init_state(), trainable,
                                                                          cpu, ref)
    assert set(parts) == set(whole) and len(whole) == 10
    for k, v in whole.items():
        assert parts[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_probe_work_counts_the_positions_of_its_passes(setup):
    """4 x both rows of each pair (a no-grad pass: 1, each branch's rows forward and backward: 3) plus the
    unrelated responses once."""
    _, pairs = setup
    rows = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    others = sum(len(pairs[i].prompt_ids) + len(pairs[(i + 1) % 3].chosen_ids) for i in range(3))
    assert Probe(pairs, 0, chunk_size=4).work() == 4 * rows + others
    assert rows == 3 * 8 + (3 + 4 + 5) + (5 + 4 + 5)


@pytest.mark.parametrize("total, every, budget, ratio, expected", [
    (24, 10, 0.0, 8.0, (0, 10, 20, 24)),  # no budget: every candidate
    (24, 0, 0.0, 8.0, (0, 24)),  # diagnostics_steps 0: the start and the end
    (24, 10, 0.05, 8.0, ()),  # 1.2 steps of budget, a probe costs 8: none
    (200, 10, 0.05, 8.0, (200,)),  # 10 / 8: one probe, the end
    (400, 10, 0.05, 8.0, (0, 400)),  # 20 / 8 = 2.5: the start and the end
    (400, 10, 0.05, 4.0, (0, 70, 200, 330, 400)),  # 5 probes: the ends and 3 of the 39 between, spread
    (30, 10, 0.5, 1.0, (0, 10, 20, 30)),  # 15 fit, 4 candidates: all of them
    (100, 10, 0.29, 14.5, (0, 100)),  # 0.29 * 100 / 14.5 is 1.9999999999999998 in floats: 2 probes
])
def test_plan_probes(total, every, budget, ratio, expected):
    assert plan_probes(total, every, budget, ratio) == expected
