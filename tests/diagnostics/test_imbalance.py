"""Diagnostics against brute force: the logit-space branch norms from the per-token statistics equal
the norms of the gradient w.r.t. the full logits; the parameter-space split equals two backward passes
with one branch detached."""

import pytest
import torch

import poise
from poise.data import TokenizedPair
from poise.diagnostics.imbalance import Probe, step_metrics
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


def test_logit_space_norms_equal_brute_force(setup):
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
    assert m["diag/logit_grad_norm_chosen"].item() == pytest.approx(per_row[:n].mean().item(), rel=1e-4)
    assert m["diag/logit_grad_norm_rejected"].item() == pytest.approx(per_row[n:].mean().item(), rel=1e-4)
    assert m["diag/logit_grad_ratio"].item() == pytest.approx((per_row[n:].sum() / per_row[:n].sum()).item(), rel=1e-4)
    assert 0 < m["diag/sigma_neg_u_mean"].item() < 1
    del probe


def test_param_space_split_equals_detached_backward(setup):
    model, pairs = setup
    probe = Probe(pairs, 0, chunk_size=4)
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
