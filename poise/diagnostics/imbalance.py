"""Diagnostics of the imbalance, logged during any training run.

Every step (cheap, from the per-token statistics of the log-prob pass; spec section 2):
    diag/logit_grad_norm_chosen, _rejected   ||dL/dlogits|| of each branch: at token t the logit
        gradient is dL/dl_t * (e_y - p_t), whose squared norm is (dL/dl_t)^2 (1 - 2 p_t + sum_j p_j^2)
    diag/logit_grad_ratio                    rejected over chosen (DPO's imbalance: > 1)
    diag/sigma_neg_u_mean, diag/sigma_saturated_frac
        the per-pair weight sigma(-u), u = r_w - r_l the implicit reward margin, and the fraction of
        pairs with sigma(-u) < 0.05 (no longer learning)
    diag/chosen_below_ref_frac, diag/rejected_below_ref_frac
        likelihood displacement: pairs whose log-prob is below the reference's

Every ``diagnostics_steps`` steps, on a fixed probe batch (no effect on training):
    diag/param_grad_norm_chosen, _rejected, diag/param_grad_ratio, diag/param_grad_cosine
        the gradient of the loss w.r.t. the trainable parameters through the chosen and through the
        rejected log-probs only, their norm ratio and cosine
    probe/chosen_logp, probe/rejected_logp   mean sequence log-prob of the probe pairs
    probe/others_logp                        responses unrelated to their prompts (squeezing): each
        probe prompt with another probe pair's chosen response, or the rows of ``probe_file``
    probe/greedy_logp                        mean log max_j p_j along the probe chosen responses (the
        teacher-forced greedy token's log-prob)
    probe/max_token_prob, probe/entropy      mean over the probe chosen tokens
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from poise.data import TokenizedPair, collate_pairs, collate_sequences
from poise.model.logprobs import batch_logps, pair_logps
from poise.ops import logit_grad_sq, masked_sum, upcast
from poise.seq import PairSeq
from poise.types import PairLogps

SATURATED = 0.05


def _branch_norm(dl: Tensor, lp: Tensor, mask: Tensor, sum_p2: Tensor) -> Tensor:
    """(B,) logit-space gradient norm of one branch from dL/dl_t and the token statistics."""
    dl = upcast(dl)
    sq = logit_grad_sq(lp, sum_p2).to(dl.dtype) * dl ** 2
    return masked_sum(sq, mask).sqrt()


def step_metrics(pl: PairLogps, loss: Tensor, objective) -> dict[str, Tensor]:
    """Logit-space gradient norms, sigma(-u) and displacement for one micro-batch (no parameter work:
    the gradient is taken w.r.t. the per-token log-probs only)."""
    out: dict[str, Tensor] = {}
    if pl.chosen_stats and "sum_p2" in pl.chosen_stats and pl.chosen.requires_grad:
        dw, dl = torch.autograd.grad(loss, (pl.chosen, pl.rejected), retain_graph=True, allow_unused=True)
        dw = torch.zeros_like(pl.chosen) if dw is None else dw
        dl = torch.zeros_like(pl.rejected) if dl is None else dl
        nw = _branch_norm(dw, pl.chosen, pl.chosen_mask, pl.chosen_stats["sum_p2"])
        nl = _branch_norm(dl, pl.rejected, pl.rejected_mask, pl.rejected_stats["sum_p2"])
        out["diag/logit_grad_norm_chosen"] = nw.mean()
        out["diag/logit_grad_norm_rejected"] = nl.mean()
        out["diag/logit_grad_ratio"] = (nl.sum() / nw.sum().clamp(min=1e-30))
    with torch.no_grad():
        seq = PairSeq.build(pl, read_reference=objective.needs_reference)
        r_w, r_l = objective.loss_spec.rewards(seq, objective.loss_hp)
        w = torch.sigmoid(-(r_w - r_l))
        out["diag/sigma_neg_u_mean"] = w.mean()
        out["diag/sigma_saturated_frac"] = (w < SATURATED).to(w.dtype).mean()
        if seq.h_w is not None:
            out["diag/chosen_below_ref_frac"] = (seq.h_w < 0).to(w.dtype).mean()
            out["diag/rejected_below_ref_frac"] = (seq.h_l < 0).to(w.dtype).mean()
    return {k: v.detach() for k, v in out.items()}


class Probe:
    """A fixed probe batch and the squeezing probes, measured every few steps.

    :meth:`measure` takes every figure in one schedule of passes whose memory is bounded by
    ``micro_batch_size`` pairs: one no-grad pass over the probe pairs (the log-prob probes, the softmax
    statistics and the loss's gradient w.r.t. each branch's per-token log-probs), then, per chunk of
    ``micro_batch_size`` pairs, a forward and backward of the chosen rows alone and of the rejected rows
    alone, with those per-token gradients as grad_outputs (each row's graph is its own in the separate
    layout, so the branch gradients take one backward over the probe's rows in all, not one per branch
    over all rows), and a no-grad pass over the unrelated responses.
    """

    def __init__(self, pairs: Sequence[TokenizedPair], pad_token_id: int, *, chunk_size: int,
                 others: Sequence[tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
                 micro_batch_size: int | None = None):
        self.pairs = list(pairs)
        self.pad = pad_token_id
        self.chunk_size = chunk_size
        self.micro_batch_size = micro_batch_size or max(len(self.pairs), 1)
        if others is None:  # each prompt with another pair's chosen response: unrelated to the prompt
            n = len(self.pairs)
            others = [(p.prompt_ids, self.pairs[(i + 1) % n].chosen_ids) for i, p in enumerate(self.pairs)]
        self.others = list(others)

    @torch.no_grad()
    def _forward(self, model, device, stats: Sequence[str]):
        b = collate_pairs(self.pairs, self.pad).to(device)
        return batch_logps(model, b, stats=tuple(stats), chunk_size=self.chunk_size)

    @torch.no_grad()
    def _logp_metrics(self, model, device, out) -> dict[str, float]:
        n = len(self.pairs)
        sums = out.logps.sum(-1)
        cm = out.mask[:n]
        res = {"probe/chosen_logp": sums[:n].mean().item(), "probe/rejected_logp": sums[n:].mean().item(),
               "probe/max_token_prob": out.stats["max_p"][:n][cm].mean().item(),
               "probe/entropy": out.stats["entropy"][:n][cm].mean().item(),
               "probe/greedy_logp": out.stats["max_p"][:n][cm].clamp(min=1e-30).log().mean().item()}
        if self.others:
            o = collate_sequences(self.others, self.pad).to(device)
            ol = batch_logps(model, o, chunk_size=self.chunk_size)
            res["probe/others_logp"] = ol.logps.sum(-1).mean().item()
        return res

    def logps(self, model, device) -> dict[str, float]:
        return self._logp_metrics(model, device, self._forward(model, device, ("entropy", "max_p")))

    def measure(self, model, objective, state: dict, trainable: list, device, ref_sums: Tensor | None,
                *, grads: bool = True) -> dict[str, float]:
        """Every probe figure (the parameter-space ones only with ``grads``)."""
        names = {"entropy", "max_p"} | (set(objective.needs_stats) if grads else set())
        chunks = -(-len(self.pairs) // self.micro_batch_size)
        with tqdm(total=2 + (2 * chunks if grads else 0), desc="probes", unit="pass", leave=False,
                  dynamic_ncols=True) as self._bar:
            out = self._forward(model, device, sorted(names))
            self._bar.update(1)
            res = self._logp_metrics(model, device, out)
            self._bar.update(1)
            if grads:
                res.update(self._param_grads(model, objective, state, trainable, device, ref_sums, out))
        self._bar = None
        return res

    def param_grads(self, model, objective, state: dict, trainable: list, device,
                    ref_sums: Tensor | None) -> dict[str, float]:
        """Norms and cosine of the chosen-branch and rejected-branch parameter gradients (``state``: the
        objective's explicit state, read only)."""
        out = self._forward(model, device, tuple(objective.needs_stats))
        return self._param_grads(model, objective, state, trainable, device, ref_sums, out)

    def _param_grads(self, model, objective, state, trainable, device, ref_sums, out) -> dict[str, float]:
        ref = None if ref_sums is None else (ref_sums[:, 0].to(device), ref_sums[:, 1].to(device))
        pl = pair_logps(out, ref_sums=ref)
        pl.chosen = pl.chosen.detach().requires_grad_(True)
        pl.rejected = pl.rejected.detach().requires_grad_(True)
        loss = objective(pl, state).loss
        dw, dl = torch.autograd.grad(loss, (pl.chosen, pl.rejected))
        vw = self._branch_grad(model, trainable, device, dw, pl.chosen_mask, "chosen_ids")
        vl = self._branch_grad(model, trainable, device, dl, pl.rejected_mask, "rejected_ids")
        nw, nl = vw.norm(), vl.norm()
        return {"diag/param_grad_norm_chosen": nw.item(), "diag/param_grad_norm_rejected": nl.item(),
                "diag/param_grad_ratio": (nl / nw.clamp(min=1e-30)).item(),
                "diag/param_grad_cosine": (vw @ vl / (nw * nl).clamp(min=1e-30)).item()}

    def _branch_grad(self, model, trainable, device, d: Tensor, mask: Tensor, side: str) -> Tensor:
        """The parameter gradient through one branch: sum over chunks of micro_batch_size pairs of the
        vector-Jacobian product of that branch's per-token log-probs with ``d`` (dL/dlog-prob)."""
        total = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in trainable]
        size = self.micro_batch_size
        for i in range(0, len(self.pairs), size):
            part = self.pairs[i:i + size]
            b = collate_sequences([(p.prompt_ids, getattr(p, side)) for p in part], self.pad).to(device)
            lp = batch_logps(model, b, chunk_size=self.chunk_size)
            g = torch.zeros_like(lp.logps)
            g[lp.mask] = d[i:i + size][mask[i:i + size]].to(g.dtype)  # the same tokens, in the same order
            gs = torch.autograd.grad(lp.logps, trainable, grad_outputs=g, allow_unused=True)
            for t, gp in zip(total, gs):
                if gp is not None:
                    t.add_(gp.float())
            if getattr(self, "_bar", None) is not None:
                self._bar.update(1)
        return torch.cat([t.flatten() for t in total])
