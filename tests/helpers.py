"""Random :class:`poise.PairLogps` batches and small utilities shared by the tests.

Everything is deterministic given ``seed`` (a private ``torch.Generator``; the global RNG is never
touched), so the helpers work the same under pytest-xdist and Hypothesis.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace

import torch
import yaml
from torch import Tensor

from poise import PairLogps


def _lengths(B: int, T: int, given: Sequence[int] | None, gen: torch.Generator) -> Tensor:
    if given is not None:
        n = torch.as_tensor(list(given), dtype=torch.long)
        if n.shape != (B,) or bool((n < 1).any()) or bool((n > T).any()):
            raise ValueError(f"lengths {list(given)} must be {B} numbers in [1, {T}]")
        return n
    return torch.randint(1, T + 1, (B,), generator=gen)


def _mask(B: int, T: int, lengths: Tensor, kind: str, gen: torch.Generator) -> Tensor:
    """(B, T) bool with exactly lengths[b] True entries in row b.

    ``right``: completion tokens first, then padding. ``left``: padding (or prompt) first.
    ``random``: the True entries anywhere in the row (a prompt, holes, padding on both sides).
    """
    pos = torch.arange(T)[None, :]
    if kind == "right":
        return pos < lengths[:, None]
    if kind == "left":
        return pos >= (T - lengths)[:, None]
    if kind == "random":
        ranks = torch.rand(B, T, generator=gen).argsort(-1).argsort(-1)  # a random permutation per row
        return ranks < lengths[:, None]
    raise ValueError(f"mask kind {kind!r}: use 'right', 'left' or 'random'")


def _uniform(shape: tuple[int, ...], low: float, high: float, gen: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)


def _sum_p2(logp: Tensor, gen: torch.Generator) -> Tensor:
    """A valid sum_j p_j^2 for a target token of log-prob ``logp``: a value in [p^2, 1]."""
    p2 = torch.exp(2 * logp.clamp(max=0))
    return p2 + torch.rand(logp.shape, generator=gen, dtype=torch.float64) * (1 - p2)


def make_batch(
    B: int = 4,
    T_w: int = 6,
    T_l: int = 5,
    *,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    ref: str | None = "token",
    stats: bool = True,
    requires_grad: bool = True,
    low: float = -4.0,
    mask: str = "right",
    chosen_lengths: Sequence[int] | None = None,
    rejected_lengths: Sequence[int] | None = None,
) -> PairLogps:
    """A random batch of B pairs.

    Args:
        B, T_w, T_l: pairs, and padded lengths of the chosen and rejected rows.
        dtype: dtype of every float tensor (log-probs, reference, statistics).
        seed: seeds a private generator; equal arguments give equal batches.
        ref: ``"token"`` per-token reference log-probs (B, T), ``"sum"`` per-sequence sums (B,) over
            the completion tokens, ``None`` no reference.
        stats: attach ``{"sum_p2": (B, T)}`` for both sides, each value in [p_t^2, 1] with
            p_t = exp(log-prob), i.e. consistent with a real softmax.
        requires_grad: make ``chosen`` and ``rejected`` leaf tensors that require grad.
        low: log-probs (policy and reference) are uniform in [low, 0).
        mask: ``"right"`` (right padding), ``"left"`` or ``"random"`` placement of the completion
            tokens; every row has at least one.
        chosen_lengths, rejected_lengths: completion lengths per row (default random in [1, T]).

    Masked positions hold values drawn like the real ones (not zeros), so a test that a masked
    value is never read is meaningful.
    """
    gen = torch.Generator().manual_seed(int(seed))
    n_w = _lengths(B, T_w, chosen_lengths, gen)
    n_l = _lengths(B, T_l, rejected_lengths, gen)
    m_w = _mask(B, T_w, n_w, mask, gen)
    m_l = _mask(B, T_l, n_l, mask, gen)
    lp_w = _uniform((B, T_w), low, 0.0, gen)
    lp_l = _uniform((B, T_l), low, 0.0, gen)
    kw = {}
    if ref is not None:
        r_w = _uniform((B, T_w), low, 0.0, gen)
        r_l = _uniform((B, T_l), low, 0.0, gen)
        if ref == "sum":
            r_w = torch.where(m_w, r_w, torch.zeros(())).sum(-1)
            r_l = torch.where(m_l, r_l, torch.zeros(())).sum(-1)
        elif ref != "token":
            raise ValueError(f"ref={ref!r}: use 'token', 'sum' or None")
        kw["ref_chosen"], kw["ref_rejected"] = r_w.to(dtype), r_l.to(dtype)
    if stats:
        kw["chosen_stats"] = {"sum_p2": _sum_p2(lp_w, gen).to(dtype)}
        kw["rejected_stats"] = {"sum_p2": _sum_p2(lp_l, gen).to(dtype)}
    chosen = lp_w.to(dtype).requires_grad_(requires_grad)
    rejected = lp_l.to(dtype).requires_grad_(requires_grad)
    return PairLogps(chosen, rejected, m_w, m_l, **kw)


def fresh(batch: PairLogps, requires_grad: bool = True) -> PairLogps:
    """A copy whose ``chosen``/``rejected`` are new leaf tensors (same values), so that the same data
    can go through several independent backward passes."""
    return replace(batch, chosen=batch.chosen.detach().clone().requires_grad_(requires_grad),
                   rejected=batch.rejected.detach().clone().requires_grad_(requires_grad))


def _pad(x: Tensor, extra: int, fill: Sequence[float]) -> Tensor:
    if extra == 0:
        return x.detach().clone()
    vals = torch.tensor([fill[i % len(fill)] for i in range(extra)], dtype=torch.float64)
    cols = vals.to(x.dtype)[None, :].expand(x.shape[0], extra)
    return torch.cat([x.detach(), cols], dim=-1)


def pad_batch(batch: PairLogps, extra_w: int = 3, extra_l: int = 2,
              fill: Sequence[float] = (-1e30, 50.0, 0.0)) -> PairLogps:
    """Append ``extra_w``/``extra_l`` masked columns filled with ``fill`` (garbage) to the chosen and
    rejected log-probs, and to the per-token reference and statistics. Per-sequence reference sums
    are kept. ``chosen``/``rejected`` of the result are new leaf tensors that require grad; the
    original columns come first, so ``grad[:, :T]`` is the gradient on the original positions."""
    kw = {}
    for side, extra in (("chosen", extra_w), ("rejected", extra_l)):
        lp, mask = getattr(batch, side), getattr(batch, f"{side}_mask")
        kw[side] = _pad(lp, extra, fill).requires_grad_(True)
        kw[f"{side}_mask"] = torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=torch.bool)], -1)
        ref = getattr(batch, f"ref_{side}")
        if ref is not None:
            kw[f"ref_{side}"] = _pad(ref, extra, fill) if ref.dim() == 2 else ref.detach().clone()
        st = getattr(batch, f"{side}_stats")
        if st is not None:
            kw[f"{side}_stats"] = {k: _pad(v, extra, fill[::-1]) for k, v in st.items()}
    return PairLogps(**kw)


def swap_sides(batch: PairLogps) -> PairLogps:
    """The same pairs with chosen and rejected exchanged (new leaf tensors)."""
    b = fresh(batch)
    return PairLogps(b.rejected, b.chosen, b.rejected_mask, b.chosen_mask,
                     ref_chosen=b.ref_rejected, ref_rejected=b.ref_chosen,
                     chosen_stats=b.rejected_stats, rejected_stats=b.chosen_stats)


def without(batch: PairLogps, *, ref: bool = False, stats: bool = False) -> PairLogps:
    """A copy without the reference and/or the statistics (new leaf tensors)."""
    b = fresh(batch)
    if ref:
        b = replace(b, ref_chosen=None, ref_rejected=None)
    if stats:
        b = replace(b, chosen_stats=None, rejected_stats=None)
    return b


def call(objective, batch: PairLogps, state=None, **kw):
    """``objective(batch, state)`` with the explicit state an objective needs: the one given, else a new
    one, calibrated on this batch first when a balancer asks for calibration (gate_tau: auto; the
    batch's first gate_calibration_pairs pairs, or all of them)."""
    if state is not None:
        return objective(batch, state, **kw)
    state = objective.init_state()
    if objective.needs_calibration(state):
        state = objective.finish_calibration(objective.calibrate(state, batch))
    return objective(batch, state, **kw)


def loss_and_grads(objective, batch: PairLogps, **kw):
    """:func:`call` the objective, backpropagate ``loss`` and return (output, grad_chosen,
    grad_rejected). ``batch.chosen``/``rejected`` must be leaves that require grad; their ``.grad``
    is reset first. A side that does not reach the loss gets a zero gradient."""
    for t in (batch.chosen, batch.rejected):
        t.grad = None
    out = call(objective, batch, **kw)
    out.loss.backward()
    g_w = batch.chosen.grad if batch.chosen.grad is not None else torch.zeros_like(batch.chosen)
    g_l = batch.rejected.grad if batch.rejected.grad is not None else torch.zeros_like(batch.rejected)
    return out, g_w, g_l


def word_model(tok):
    """A tiny random model that mostly says testbed words (their output rows scaled up), so that its
    samples hold words the testbed's gold reward can tell apart."""
    from poise.model.tiny import build_tiny_model
    from poise.testbed.task import NUMBERS, WORDS

    model = build_tiny_model(tok, seed=0)
    vocab = tok.get_vocab()
    keep = [vocab["Ġ" + w] for w in (*WORDS, *NUMBERS.values()) if "Ġ" + w in vocab] + [tok.eos_token_id]
    with torch.no_grad():
        scale = torch.zeros(len(tok))
        scale[keep] = 50.0
        model.lm_head.weight.mul_(scale[:, None])
    return model


def make_run(root, name, config=None, metrics=None, eval=None, raw_lines=()):
    """A run folder under ``root`` with the given config.yaml, metrics.jsonl rows and eval.json."""
    d = root / name
    d.mkdir(parents=True)
    if config is not None:
        (d / "config.yaml").write_text(yaml.safe_dump(config))
    if metrics is not None or raw_lines:
        lines = [json.dumps(r) for r in metrics or []] + list(raw_lines)
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if eval is not None:
        (d / "eval.json").write_text(json.dumps(eval))
    return d


def curve(key, values, start=1):
    return [{"step": start + i, "epoch": 0.1 * i, "loss": 0.69, key: v} for i, v in enumerate(values)]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it: bind to port 0), for a launcher's
    --master_port; a fixed number collides with another test run on the same machine."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_tiny_model(folder):
    """A tiny Llama (1 layer, width 16) and its tokenizer saved into ``folder``; returns the folder."""
    from poise.model.tiny import build_tiny_model, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    build_tiny_model(tok, hidden_size=16, num_layers=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
