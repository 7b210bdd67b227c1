"""The log-prob engine: per-token ``log pi(y_t | x, y_<t)`` on completion tokens only.

:func:`batch_logps` is THE entry: model and batch in, per-token log-probs and statistics out
(:class:`TokenLogps`), whatever the batch's layout:

* :class:`poise.data.SequenceBatch` (and :class:`poise.data.PreferenceBatch`): ``input_ids`` (N, L)
  right-padded, ``attention_mask`` (N, L) and ``completion_mask`` (N, L), True exactly at the completion
  tokens whose log-prob is scored. For preference pairs N = 2B: rows ``0..B-1`` are prompt+chosen, rows
  ``B..2B-1`` prompt+rejected, so one forward pass serves both. :func:`token_logps` is the same
  computation on the three tensors, for callers that hold tensors rather than a batch.
* :class:`poise.data.SharedPairBatch`: one row ``[prompt | chosen | rejected]`` per pair, the prompt
  through the model once, under the 4D mask of :mod:`poise.model.shared_mask` (which refuses a model the
  layout is not exact for). The result is in the usual (2B, W) pair layout, so every consumer is the
  same; :mod:`poise.model.shared_prefix` checks the two layouts against each other and picks one.

Two paths compute the same numbers (float32, exactly 0.0 off the completion tokens):

``fast`` (used whenever the model allows it)
    Run the backbone (``get_decoder()``, ``use_cache=False``) to get the last hidden states (N, L, H),
    gather the K rows at positions ``t - 1`` for which ``completion_mask[:, t]`` is True, and apply the
    output head (``get_output_embeddings()``) to at most ``chunk_size`` of those rows at a time. Each
    chunk is wrapped in a non-reentrant :func:`torch.utils.checkpoint.checkpoint`, so its logits are
    recomputed in the backward instead of stored. Logits are never computed for prompt or padding
    positions and no (N, L, V) tensor exists; the extra peak memory is about ``chunk_size x V`` float32.
    Known head quirks are reproduced: Gemma-2/3 style ``final_logit_softcapping``, Cohere's
    ``logit_scale``, Granite's ``logits_scaling`` (divide), HyperCLOVA X's (multiply), Falcon-H1's
    ``lm_head_multiplier`` and a config ``unpadded_vocab_size`` (truncation).

``fallback``
    ``model(input_ids=..., attention_mask=..., use_cache=False).logits``: the model materialises its
    own (N, L, V) logits in its dtype (so every quirk of its head is applied by the model itself), and
    the float32 log-softmax is still taken chunk by chunk, over the selected positions only. Used when
    ``path="fallback"`` is asked for, or, with ``path="auto"``, when the fast path is unsupported: a
    DDP / FSDP wrapper (calling submodules would skip its grad sync / unsharding), a peft
    prompt-learning adapter (virtual tokens are injected in ``forward``), no decoder or output head,
    an encoder-decoder, or a head this module does not reproduce. :func:`fast_path_reason` says which
    path a model gets and why; :func:`verify_fast_path` compares the two on a batch (do it once for a
    model family not listed above). A peft ``PeftModel`` with LoRA-style adapters takes the fast path
    through its base model, whose layers carry the adapters; ``disable_adapter()`` works as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils import _pytree
from torch.utils.checkpoint import checkpoint

from poise.data import SequenceBatch, SharedPairBatch
from poise.model.heads import FastPath, NoFastPath, fast_path_reason, resolve_fast_path
from poise.model.shared_mask import shared_attention_mask
from poise.types import STAT_NAMES, PairLogps

__all__ = [
    "TokenLogps",
    "batch_logps",
    "fast_path_reason",
    "pair_logps",
    "sequence_logps",
    "token_logps",
    "verify_fast_path",
]

_PATHS = ("auto", "fast", "fallback")


@dataclass
class TokenLogps:
    """Per-token log-probs of a batch of rows (N = 2B rows for preference pairs).

    Attributes:
        logps: (N, L) float32, ``log p(input_ids[i, t] | input_ids[i, :t])`` on completion tokens and
            exactly 0.0 elsewhere; carries the graph when grad is enabled.
        mask: (N, L) bool, the completion mask.
        stats: {name: (N, L) float32} per-token statistics of the predictive softmax, detached,
            0.0 off the completion tokens; names from :data:`poise.types.STAT_NAMES`.
        path: which path computed them, ``"fast"`` or ``"fallback"``.
    """

    logps: Tensor
    mask: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)
    path: str = "fast"


# A module's forward may return it: DDP (find_unused_parameters / static_graph) and FSDP2 find the
# tensors of an output by flattening it as a pytree, as transformers registers its ModelOutput.
_pytree.register_dataclass(TokenLogps)


# ----------------------------------------------------------------------------- per-chunk maths


#: rows of the (rows, V) probability buffer the statistics are computed in: small enough to stay in
#: the cache and to need no fresh pages (a (chunk_size, V) temporary cost 3x as much on a CPU).
_STATS_BLOCK = 32


def _softmax_stats(logp: Tensor, names: Sequence[str]) -> Tensor:
    """(k, len(names)) statistics of the softmax whose float32 log-probs (k, V) are ``logp``."""
    k, vocab = logp.shape
    out = logp.new_empty(k, len(names))
    buf = logp.new_empty(min(k, _STATS_BLOCK), vocab)
    for start in range(0, k, _STATS_BLOCK):
        stop = min(start + _STATS_BLOCK, k)
        lp = logp[start:stop]
        p = torch.exp(lp, out=buf[: stop - start])
        for j, name in enumerate(names):
            if name == "max_p":
                out[start:stop, j] = lp.amax(dim=-1).exp()
            elif name == "entropy":
                out[start:stop, j] = -torch.where(p > 0, p * lp, 0.0).sum(-1)
            elif name == "sum_p2":
                out[start:stop, j] = torch.linalg.vector_norm(p, 2, dim=-1).square()
    return out


def _chunk_logps(z: Tensor, targets: Tensor, names: Sequence[str]) -> tuple[Tensor, Tensor | None]:
    """log-softmax of float32 logits z (k, V) at ``targets`` (k,), and the detached stats.

    ``log_softmax`` then a gather, rather than ``z[target] - logsumexp(z)``: one fused kernel each
    way, 30-40% less time for the forward and backward on a CPU, and the statistics read the log-probs
    it already made. It saves its (k, V) output for the backward where logsumexp saved z: same memory.
    """
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)
    if not names:
        return logp, None
    with torch.no_grad():
        return logp, _softmax_stats(logp_all.detach(), names)


def _run_chunked(fn: Callable, n_rows: int, chunk_size: int, *args: Tensor):
    """Apply ``fn(start, stop, *args)`` on row ranges of at most chunk_size; cat the results.

    With grad enabled every chunk but the last is checkpointed: its logits are freed after the
    forward and recomputed in the backward. The last chunk's logits are kept, because the backward
    starts with it: recomputing them would allocate the same memory at once and cost a second
    head matmul (and the stats) for nothing.
    """
    logps, stats = [], []
    use_ckpt = torch.is_grad_enabled()
    starts = range(0, max(n_rows, 1), chunk_size)  # K = 0 still runs one empty chunk
    for start in starts:
        stop = min(start + chunk_size, n_rows)
        if use_ckpt and start != starts[-1]:
            lp, st = checkpoint(fn, start, stop, *args, use_reentrant=False)
        else:
            lp, st = fn(start, stop, *args)
        logps.append(lp)
        stats.append(st)
    return torch.cat(logps), (torch.cat(stats) if stats[0] is not None else None)


# ----------------------------------------------------------------------------- the two paths


def head_values(fast: FastPath, rows: Tensor, targets: Tensor, chunk_size: int, names: Sequence[str]):
    """Log-probs (K,) of ``targets`` under the head applied to hidden ``rows`` (K, H), chunk by chunk."""
    weight = getattr(fast.head, "weight", None)
    if isinstance(weight, Tensor) and weight.is_floating_point() and weight.dtype != rows.dtype:
        rows = rows.to(weight.dtype)

    def fn(start: int, stop: int, rows: Tensor, targets: Tensor):
        z = fast.head(rows[start:stop]).float()
        for transform in fast.transforms:
            z = transform(z)
        return _chunk_logps(z, targets[start:stop], names)

    return _run_chunked(fn, rows.shape[0], chunk_size, rows, targets)


def logits_values(logits: Tensor, index: Tensor, targets: Tensor, chunk_size: int, names: Sequence[str]):
    """Log-probs (K,) of ``targets`` from the model's own logits (N, L, V) at flat positions ``index``."""
    n, length, vocab = logits.shape
    flat = logits.reshape(n * length, vocab)

    def fn(start: int, stop: int, flat: Tensor, index: Tensor, targets: Tensor):
        z = flat.index_select(0, index[start:stop]).float()
        return _chunk_logps(z, targets[start:stop], names)

    return _run_chunked(fn, index.shape[0], chunk_size, flat, index, targets)


def last_hidden(out) -> Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _fast_values(fast, input_ids, attention_mask, sel, chunk_size, names):
    hidden = last_hidden(fast.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))
    rows = hidden[:, :-1][sel]  # (K, H): the state that predicts each completion token
    return head_values(fast, rows, input_ids[:, 1:][sel], chunk_size, names)


def _fallback_values(model, input_ids, attention_mask, sel, chunk_size, names):
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    index = (sel.nonzero() * torch.tensor([logits.shape[1], 1], device=sel.device)).sum(-1)  # row i, col t-1
    return logits_values(logits, index, input_ids[:, 1:][sel], chunk_size, names)


def resolve_path(model: nn.Module, path: str) -> FastPath | None:
    """The fast path's parts, or None for the fallback (``path="fast"`` raises if unsupported)."""
    if path == "fallback":
        return None
    try:
        return resolve_fast_path(model)
    except NoFastPath as err:
        if path == "fast":
            raise ValueError(f"the fast log-prob path is not supported: {err}") from err
    return None


def scatter_values(mask: Tensor, values: Tensor, stat_values: Tensor | None, names: Sequence[str],
                   fast: bool) -> TokenLogps:
    """Place the K scored values on the True entries of ``mask`` (row-major order), 0.0 elsewhere."""
    zeros = torch.zeros(mask.shape, dtype=torch.float32, device=values.device)
    logps = zeros.masked_scatter(mask, values)
    stat_maps = {name: zeros.masked_scatter(mask, stat_values[:, j].detach()) for j, name in enumerate(names)}
    return TokenLogps(logps, mask, stat_maps, "fast" if fast else "fallback")


def _check_options(stats, chunk_size, path) -> tuple[str, ...]:
    """The distinct stat names, in order, after checking the options shared by both layouts."""
    unknown = [s for s in stats if s not in STAT_NAMES]
    if unknown:
        raise ValueError(f"unknown stats {unknown}; choose from {STAT_NAMES}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
    return tuple(dict.fromkeys(stats))


def _check_inputs(input_ids, attention_mask, completion_mask) -> Tensor:
    if input_ids.dim() != 2 or completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids must be (N, L) and completion_mask the same shape, got "
            f"{tuple(input_ids.shape)} and {tuple(completion_mask.shape)}"
        )
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, want {tuple(input_ids.shape)}"
        )
    mask = completion_mask.bool()
    if mask[:, 0].any():
        raise ValueError("completion_mask[:, 0] must be False: the first token has no context to predict it")
    return mask


def token_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    completion_mask: Tensor,
    *,
    stats: Sequence[str] = (),
    chunk_size: int = 1024,
    path: str = "auto",
) -> TokenLogps:
    """Per-token float32 log-probs of ``input_ids`` under ``model`` on the completion tokens: the
    two-row layout of :func:`batch_logps`, on tensors.

    Args:
        model: a causal LM (transformers, optionally wrapped in a peft ``PeftModel``).
        input_ids: (N, L) right-padded token ids.
        attention_mask: (N, L), or None for all ones.
        completion_mask: (N, L) bool, True exactly on the scored completion tokens (never column 0).
        stats: names from :data:`poise.types.STAT_NAMES` to compute as well (detached, float32).
        chunk_size: rows of logits computed at once; peak extra memory ~ chunk_size x V float32.
        path: ``"auto"`` (fast path when supported, see :func:`fast_path_reason`), ``"fast"`` (raise
            if unsupported) or ``"fallback"`` (the model's own full logits).
    """
    names = _check_options(stats, chunk_size, path)
    mask = _check_inputs(input_ids, attention_mask, completion_mask)
    sel = mask[:, 1:]
    fast = resolve_path(model, path)
    if fast is not None:
        values, stat_values = _fast_values(fast, input_ids, attention_mask, sel, chunk_size, names)
    else:
        values, stat_values = _fallback_values(model, input_ids, attention_mask, sel, chunk_size, names)
    return scatter_values(mask, values, stat_values, names, fast is not None)


def _shared_token_logps(model: nn.Module, batch: SharedPairBatch, names: Sequence[str], chunk_size: int,
                        path: str) -> TokenLogps:
    """Per-token log-probs of a :class:`SharedPairBatch`, in the usual (2B, W) pair layout: the model runs
    once per pair under the shared-prefix mask, and every completion token is scored at its own
    predicting position (``batch.pred_index``) with the same head code as the two-row layout."""
    mask = shared_attention_mask(model, batch.segments)
    kwargs = dict(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, use_cache=False)
    fast = resolve_path(model, path)
    if fast is not None:
        hidden = last_hidden(fast.backbone(**kwargs))  # (B, L, H)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.pred_index)  # (K, H)
        values, stat_values = head_values(fast, rows, batch.targets, chunk_size, names)
    else:
        logits = model(**kwargs).logits
        values, stat_values = logits_values(logits, batch.pred_index, batch.targets, chunk_size, names)
    return scatter_values(batch.completion_mask, values, stat_values, names, fast is not None)


def batch_logps(
    model: nn.Module,
    batch: SequenceBatch,
    *,
    stats: Sequence[str] = (),
    chunk_size: int = 1024,
    path: str = "auto",
) -> TokenLogps:
    """Per-token float32 log-probs (and statistics) of the completion tokens of ``batch`` under ``model``.

    THE entry of the engine: it dispatches on the batch's layout. A :class:`poise.data.SharedPairBatch`
    (one row per pair, the prompt once) is scored under the shared-prefix mask and returned in the usual
    (2B, W) pair layout (ValueError if the layout is not exact for ``model``, see
    :func:`poise.model.shared_mask.shared_prefix_reason`); any other :class:`poise.data.SequenceBatch` is
    scored row by row (:func:`token_logps`). ``stats``, ``chunk_size`` and ``path`` are those of
    :func:`token_logps`. The batch must already be on the model's device.
    """
    if isinstance(batch, SharedPairBatch):
        return _shared_token_logps(model, batch, _check_options(stats, chunk_size, path), chunk_size, path)
    return token_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask, stats=stats,
                       chunk_size=chunk_size, path=path)


def sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    completion_mask: Tensor,
    *,
    chunk_size: int = 1024,
    path: str = "auto",
) -> Tensor:
    """(N,) per-row sums of the completion log-probs, under ``torch.no_grad()`` (reference log-probs)."""
    with torch.no_grad():
        out = token_logps(model, input_ids, attention_mask, completion_mask, chunk_size=chunk_size, path=path)
    return out.logps.sum(-1)


def verify_fast_path(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, completion_mask: Tensor
) -> float:
    """Largest |fast - fallback| per-token log-prob on a batch (no grad); raises if no fast path."""
    with torch.no_grad():
        fast = token_logps(model, input_ids, attention_mask, completion_mask, path="fast").logps
        slow = token_logps(model, input_ids, attention_mask, completion_mask, path="fallback").logps
    return (fast - slow).abs().max().item()


# ----------------------------------------------------------------------------- pairs


def _halves(x: Tensor, b: int) -> tuple[Tensor, Tensor]:
    return x[:b], x[b:]


def _ref_pair(ref_out, ref_sums, mask: Tensor, b: int) -> tuple[Tensor | None, Tensor | None]:
    if ref_out is not None and ref_sums is not None:
        raise ValueError("give ref_out (per token) or ref_sums (per sequence), not both")
    if ref_out is not None:
        if ref_out.mask.shape != mask.shape or not torch.equal(ref_out.mask, mask):
            raise ValueError("ref_out was computed on a different batch (its completion mask differs)")
        return _halves(ref_out.logps.detach(), b)
    if ref_sums is not None:
        ref_chosen, ref_rejected = ref_sums
        for name, ref in (("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
            if tuple(ref.shape) != (b,):
                raise ValueError(f"ref_sums {name} must have shape ({b},), got {tuple(ref.shape)}")
        return ref_chosen.detach().float(), ref_rejected.detach().float()
    return None, None


def pair_logps(
    policy_out: TokenLogps,
    ref_out: TokenLogps | None = None,
    *,
    ref_sums: tuple[Tensor, Tensor] | None = None,
) -> PairLogps:
    """Split a 2B-row :class:`TokenLogps` into chosen (first B rows) and rejected (last B rows).

    The reference is either per token (``ref_out``, the same batch through the frozen reference) or
    precomputed per-sequence sums ``ref_sums = (ref_chosen (B,), ref_rejected (B,))``; it is detached.
    """
    n = policy_out.logps.shape[0]
    if n % 2:
        raise ValueError(f"pair_logps needs 2B rows (chosen then rejected), got {n}")
    b = n // 2
    ref_chosen, ref_rejected = _ref_pair(ref_out, ref_sums, policy_out.mask, b)
    stats = policy_out.stats
    return PairLogps(
        *_halves(policy_out.logps, b),  # chosen, rejected
        *_halves(policy_out.mask, b),  # chosen_mask, rejected_mask
        ref_chosen=ref_chosen,
        ref_rejected=ref_rejected,
        chosen_stats={k: v[:b] for k, v in stats.items()} or None,
        rejected_stats={k: v[b:] for k, v in stats.items()} or None,
    )
