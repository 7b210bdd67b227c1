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
from poise.model.logprobs import TokenLogps, batch_logps, pair_logps
from poise.ops import logit_grad_sq, masked_sum, upcast
from poise.seq import PairSeq
from poise.types import PairLogps

SATURATED = 0.05


def _branch_norm(dl: Tensor, lp: Tensor, mask: Tensor, sum_p2: Tensor) -> Tensor:
    """(B,) logit-space gradient norm of one branch from dL/dl_t and the token statistics."""
    dl = upcast(dl)
    sq = logit_grad_sq(lp, sum_p2).to(dl.dtype) * dl ** 2
    return masked_sum(sq, mask).sqrt()


class _AfterBackward:
    """Figures computed from what the backward caught, on first read (``float``), i.e. after the backward:
    computing them inside the backward, between its large buffers, raised the peak memory by 10%."""

    def __init__(self, fn):
        self.fn, self.values = fn, None

    def part(self, i: int) -> _Part:
        return _Part(self, i)


class _Part:
    def __init__(self, owner: _AfterBackward, i: int):
        self.owner, self.i = owner, i

    def __float__(self) -> float:
        if self.owner.values is None:
            self.owner.values = [float(v) for v in self.owner.fn()]
        return self.owner.values[self.i]


def _norms(pl: PairLogps, seen: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(mean chosen norm, mean rejected norm, ratio of their sums) from the gradients the step's backward
    passed through each branch, divided by the factor it reached the loss with; a branch the loss does
    not depend on has norm 0."""
    if "scale" not in seen:
        raise RuntimeError("the logit-space norms are read before the step's backward")
    nw, nl = (_branch_norm(seen[k] / seen["scale"], t.detach(), m, st["sum_p2"]) if k in seen else
              torch.zeros(t.shape[0], device=t.device)
              for k, t, m, st in (("chosen", pl.chosen, pl.chosen_mask, pl.chosen_stats),
                                  ("rejected", pl.rejected, pl.rejected_mask, pl.rejected_stats)))
    return nw.mean(), nl.mean(), nl.sum() / nw.sum().clamp(min=1e-30)


def step_metrics(pl: PairLogps, loss: Tensor, objective, into: dict | None = None) -> dict[str, Tensor]:
    """Logit-space gradient norms, sigma(-u) and displacement for one micro-batch, with no pass of their
    own: sigma(-u) and displacement from the log-probs at hand, and the branch norms read off the step's own
    backward, whose gradient w.r.t. each branch's per-token log-probs is caught on its way through (hooks),
    with the closed form of :func:`_branch_norm`, once the step has backpropagated ``loss`` (or any multiple
    of it: the factor, e.g. the engine's number of processes, is read off the gradient reaching ``loss`` and
    divided out): those three entries become numbers on ``float``, read after the backward. The metrics are written into ``into`` (a new dict by default), which is returned."""
    out: dict[str, Tensor] = {} if into is None else into
    if pl.chosen_stats and "sum_p2" in pl.chosen_stats and pl.chosen.requires_grad and loss.requires_grad:
        seen: dict[str, Tensor] = {}  # what the backward passes through: the factor, each branch's gradient
        loss.register_hook(lambda g: seen.__setitem__("scale", g.detach().float()))
        pl.chosen.register_hook(lambda g: seen.__setitem__("chosen", g.detach()))  # one hook per branch: a hook
        pl.rejected.register_hook(lambda g: seen.__setitem__("rejected", g.detach()))  # on both holds more memory
        norms = _AfterBackward(lambda: _norms(pl, seen))
        out["diag/logit_grad_norm_chosen"] = norms.part(0)
        out["diag/logit_grad_norm_rejected"] = norms.part(1)
        out["diag/logit_grad_ratio"] = norms.part(2)
    with torch.no_grad():
        seq = PairSeq.build(pl, read_reference=objective.needs_reference)
        r_w, r_l = objective.loss_spec.rewards(seq, objective.loss_hp)
        w = torch.sigmoid(-(r_w - r_l))
        out["diag/sigma_neg_u_mean"] = w.mean()
        out["diag/sigma_saturated_frac"] = (w < SATURATED).to(w.dtype).mean()
        if seq.h_w is not None:
            out["diag/chosen_below_ref_frac"] = (seq.h_w < 0).to(w.dtype).mean()
            out["diag/rejected_below_ref_frac"] = (seq.h_l < 0).to(w.dtype).mean()
    return out


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

    def _chunks(self):
        size = self.micro_batch_size
        return [self.pairs[i:i + size] for i in range(0, len(self.pairs), size)]

    @torch.no_grad()
    def _forward(self, model, device, stats: Sequence[str]):
        """The probe pairs' per-token log-probs and statistics, ``micro_batch_size`` pairs per pass (the
        memory of a training micro-batch's forward at most), joined as one batch: chosen rows, then
        rejected, padded to the longest row."""
        parts = [batch_logps(model, collate_pairs(part, self.pad).to(device), stats=tuple(stats),
                             chunk_size=self.chunk_size) for part in self._chunks()]
        return _join_pairs(parts)

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
            rows = 2 * self.micro_batch_size  # as many rows as a micro-batch of pairs
            total = 0.0
            for i in range(0, len(self.others), rows):
                o = collate_sequences(self.others[i:i + rows], self.pad).to(device)
                total += batch_logps(model, o, chunk_size=self.chunk_size).logps.sum(-1).double().sum().item()
            res["probe/others_logp"] = total / len(self.others)
        return res

    def work(self) -> float:
        """The positions one :meth:`measure` computes, a forward counting 1 and a forward with its backward 3
        (the unit of :func:`plan_probes`): the no-grad pass over both rows of each pair and over the
        unrelated responses, and each branch's rows forward and backward."""
        rows = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in self.pairs)
        return 4.0 * rows + sum(len(a) + len(b) for a, b in self.others)

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
        # per tensor, no flattened copy: the branch gradients are the probe's only parameter-sized memory
        nw = torch.stack([t.square().sum() for t in vw]).sum().sqrt()
        nl = torch.stack([t.square().sum() for t in vl]).sum().sqrt()
        dot = torch.stack([torch.dot(a.flatten(), b.flatten()) for a, b in zip(vw, vl)]).sum()
        return {"diag/param_grad_norm_chosen": nw.item(), "diag/param_grad_norm_rejected": nl.item(),
                "diag/param_grad_ratio": (nl / nw.clamp(min=1e-30)).item(),
                "diag/param_grad_cosine": (dot / (nw * nl).clamp(min=1e-30)).item()}

    def _branch_grad(self, model, trainable, device, d: Tensor, mask: Tensor, side: str) -> list[Tensor]:
        """The parameter gradient through one branch, one fp32 tensor per trainable parameter: the sum over
        chunks of micro_batch_size pairs of the vector-Jacobian product of that branch's per-token log-probs
        with ``d`` (dL/dlog-prob). The first chunk's gradient is kept as the sum (no zeroed copy)."""
        total: list[Tensor] | None = None
        size = self.micro_batch_size
        for i in range(0, len(self.pairs), size):
            part = self.pairs[i:i + size]
            b = collate_sequences([(p.prompt_ids, getattr(p, side)) for p in part], self.pad).to(device)
            lp = batch_logps(model, b, chunk_size=self.chunk_size)
            g = torch.zeros_like(lp.logps)
            g[lp.mask] = d[i:i + size][mask[i:i + size]].to(g.dtype)  # the same tokens, in the same order
            gs = torch.autograd.grad(lp.logps, trainable, grad_outputs=g, allow_unused=True)
            del lp, g
            gs = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) if gp is None else gp.float()
                  for p, gp in zip(trainable, gs)]
            if total is None:
                total = gs
            else:
                for t, gp in zip(total, gs):
                    t.add_(gp)
            del gs
            if getattr(self, "_bar", None) is not None:
                self._bar.update(1)
        return total or []


def _join_pairs(parts: list[TokenLogps]) -> TokenLogps:
    """Chunks of pairs (each: its chosen rows, then its rejected rows) as one batch of all the chosen rows,
    then all the rejected rows, padded on the right to the longest row (log-probs, mask and statistics 0
    there, as the collation pads)."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.logps.shape[1] for p in parts)

    def pad(t: Tensor) -> Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    def join(get) -> Tensor:
        halves = [(get(p)[:get(p).shape[0] // 2], get(p)[get(p).shape[0] // 2:]) for p in parts]
        return torch.cat([pad(c) for c, _ in halves] + [pad(r) for _, r in halves])

    return TokenLogps(join(lambda p: p.logps), join(lambda p: p.mask),
                      {k: join(lambda p, k=k: p.stats[k]) for k in parts[0].stats}, parts[0].path)


def plan_probes(total: int, every: int, budget: float, ratio: float) -> tuple[int, ...]:
    """The steps a run probes at (0: before step 1). The candidates are 0, every ``every``-th step and the
    last step (``total``); with ``budget`` 0, all of them. Otherwise a probe costs ``ratio`` training steps
    of work (:meth:`Probe.work` over a step's), and the probes may do ``budget`` of the run's training work:
    ``n = floor(budget * total / ratio)`` probes. Which: none when n = 0; the last step when n = 1; the first
    and the last, and n - 2 of the candidates between them evenly spread, when n >= 2. The plan follows from
    the config and the data alone: every machine, and a resumed run, probes at the same steps."""
    cands = sorted({0, total} | (set(range(every, total, every)) if every > 0 else set()))
    if not budget:
        return tuple(cands)
    n = int(budget * total / max(ratio, 1e-12) + 1e-9)
    if n <= 0:
        return ()
    if n == 1:
        return (total,)
    inner = [s for s in cands if 0 < s < total]
    k = min(n - 2, len(inner))
    picked = {inner[min(int((i + 0.5) * len(inner) / k), len(inner) - 1)] for i in range(k)} if k else set()
    return tuple(sorted({0, total} | picked))
