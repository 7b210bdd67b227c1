"""``poise score-pairs CONFIG``: a per-pair displacement score for every training pair, and a data filter.

For each pair of the config's ``train_file`` (read, checked and tokenized by the same preflight as
``poise train``, scored by the same model loader, pair layout and log-prob engine), under the config's
``model`` (or ``--model``):

``ches``, ``ches_norm``
    CHES, the centered hidden-embedding similarity of Razin et al. (arXiv 2410.08847; spec section 10).
    With H(y) = the sum over the response's tokens of the last hidden layer's embedding at the position
    that *predicts* each token (the prefix embedding h_{x, y_<k}: the hidden state at position t - 1 for
    the response token at position t, i.e. the vector the output head reads),

        ches      = <H(y_w), H(y_l)> - ||H(y_w)||^2
        ches_norm = <H(y_w)/|y_w|, H(y_l)/|y_l|> - ||H(y_w)/|y_w|||^2

    in float64 from the hidden states. A larger score predicts a larger fall of the chosen log-prob
    under DPO; the paper filters out the highest-scoring pairs. The maths is
    :func:`prefix_embedding_sums` and :func:`ches_scores` (pure functions).
``logp_chosen``, ``logp_rejected``, ``len_chosen``, ``len_rejected``
    S(y) = sum of the response's token log-probs under the model, and |y| (completion tokens, EOS
    included, after truncation), as training sees them.
``grad_ratio``
    The pair's gradient imbalance, rejected over chosen: G_l / G_w with G(y) = sqrt(sum_t (1 - 2 p_t +
    sum_j p_tj^2)) = ||dS(y)/dlogits|| over the response's tokens (spec section 2). It is the per-pair
    value of the diagnostics' ``diag/logit_grad_ratio`` for a DPO step on that pair (and Balanced-DPO's
    G_l / G_w): for DPO, and any loss of one margin of S_w - S_l, |dL/dl_t| is the same on every token
    of both branches, so the ratio of the logit-space gradient norms does not depend on beta, the
    reference or sigma(-u). > 1: DPO pushes on the rejected response harder than it pulls the chosen one.

Outputs, each written atomically into the out folder (default ``<output_dir>/pair_scores``):
``scores.jsonl`` (one row per scored pair: ``source`` and ``index`` of its row, as in error messages,
and the scores above), ``summary.json`` (counts, mean, standard deviation and quantiles of each score,
and the filter), ``ches_hist.png``, and with ``drop_top=f`` ``train_filtered.jsonl``: the training rows
as they are in the file (every column, under its own name) without the floor(f * n) pairs of highest
score (``by``: ``ches`` or ``ches_norm``; ties broken by file order, the earlier row dropped first),
ready to be given as ``train_file`` to ``poise train`` with the same config. Rows the tokenizer
skipped as bad (``on_bad_row: skip``) are not scored and are left out of the filtered file too.
An out folder that already holds files is refused unless ``force=True``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from poise import fsutil
from poise.data import SharedPairBatch, TokenizedPair, load_rows
from poise.errors import ConfigError, PoiseError
from poise.model.logprobs import batch_logps, last_hidden, pair_logps, resolve_path
from poise.model.shared_mask import shared_attention_mask
from poise.model.shared_prefix import choose_layout, collate_layout
from poise.ops import logit_grad_sq, masked_sum
from poise.training.config import TrainConfig, from_dict
from poise.training.preflight import check_inputs, check_writable

log = logging.getLogger("poise")

#: The scores a filter can rank by.
SCORES_BY = ("ches", "ches_norm")
#: Columns of scores.jsonl after ``source`` and ``index``.
SCORE_KEYS = ("ches", "ches_norm", "logp_chosen", "logp_rejected", "len_chosen", "len_rejected", "grad_ratio")
#: The files this command writes into its out folder.
SCORES_FILE, SUMMARY_FILE, HIST_FILE, FILTERED_FILE = ("scores.jsonl", "summary.json", "ches_hist.png",
                                                       "train_filtered.jsonl")
OUT_FILES = (SCORES_FILE, SUMMARY_FILE, HIST_FILE, FILTERED_FILE)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# ----------------------------------------------------------------------------- the maths (pure)


def prefix_embedding_sums(hidden: Tensor, completion_mask: Tensor) -> Tensor:
    """H(y) per row: (N, L, D) last-layer hidden states and (N, L) bool completion mask (True on the
    response's tokens, in the input-id layout) -> (N, D) float64, the sum over the response tokens t of
    ``hidden[:, t - 1]``, the prefix embedding that predicts token t."""
    mask = completion_mask.bool()
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be (N, L, D) and completion_mask (N, L), got {tuple(hidden.shape)} and "
                         f"{tuple(mask.shape)}")
    if mask[:, 0].any():
        raise ValueError("completion_mask[:, 0] must be False: the first token has no position before it")
    weights = mask[:, 1:].to(torch.float64)  # weight of position t - 1 = 1 when token t is a response token
    return torch.einsum("nl,nld->nd", weights, hidden[:, :-1].to(torch.float64))


def ches_scores(h_w: Tensor, h_l: Tensor, n_w: Tensor, n_l: Tensor) -> tuple[Tensor, Tensor]:
    """(ches, ches_norm), each (B,) float64, from the summed prefix embeddings H(y_w), H(y_l) (B, D) and
    the response lengths |y_w|, |y_l| (B,), as spec section 10 states them:
    ``<H_w, H_l> - ||H_w||^2`` and ``<H_w/|y_w|, H_l/|y_l|> - ||H_w/|y_w|||^2``."""
    h_w, h_l = h_w.to(torch.float64), h_l.to(torch.float64)
    raw = (h_w * h_l).sum(-1) - (h_w * h_w).sum(-1)
    m_w = h_w / n_w.to(torch.float64).clamp(min=1)[:, None]
    m_l = h_l / n_l.to(torch.float64).clamp(min=1)[:, None]
    norm = (m_w * m_l).sum(-1) - (m_w * m_w).sum(-1)
    return raw, norm


def branch_grad_norm(logps: Tensor, mask: Tensor, sum_p2: Tensor) -> Tensor:
    """(B,) float64 sqrt(sum_t (1 - 2 p_t + sum_j p_tj^2)) = ||dS(y)/dlogits|| over the masked tokens."""
    return masked_sum(logit_grad_sq(logps, sum_p2), mask).sqrt()


def top_indices(scores: list[float], fraction: float) -> list[int]:
    """Positions of the floor(fraction * n) highest scores (ties: the earlier position first)."""
    k = math.floor(fraction * len(scores) + 1e-9)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def check_drop_top(fraction: float | None) -> None:
    if fraction is not None and not (0.0 <= fraction < 1.0):  # NaN fails both comparisons
        raise ConfigError(f"--drop-top {fraction}: the fraction of pairs to drop must be in [0, 1), e.g. "
                          "--drop-top 0.1 to drop the 10% of pairs with the highest score.")


# ----------------------------------------------------------------------------- scoring with a model


def _final_hidden(model, batch, chunk_size: int):
    """The engine's per-token log-probs with ``sum_p2`` (the call training makes), and the last hidden
    layer of the same forward pass: taken from the backbone the fast path runs, or, on the fallback path,
    from a second forward with ``output_hidden_states=True``."""
    fast = resolve_path(model, "auto")
    if fast is None:
        out = batch_logps(model, batch, stats=("sum_p2",), chunk_size=chunk_size)
        if isinstance(batch, SharedPairBatch):
            kw = dict(attention_mask=shared_attention_mask(model, batch.segments), position_ids=batch.position_ids)
        else:
            kw = dict(attention_mask=batch.attention_mask)
        hidden = model(input_ids=batch.input_ids, use_cache=False, output_hidden_states=True, **kw).hidden_states[-1]
        return out, hidden
    seen: list[Tensor] = []
    handle = fast.backbone.register_forward_hook(lambda module, args, output: seen.append(last_hidden(output)))
    try:
        out = batch_logps(model, batch, stats=("sum_p2",), chunk_size=chunk_size)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f"expected one pass through the backbone, saw {len(seen)}")
    return out, seen[0]


@torch.no_grad()
def score_batch(model, pairs: list[TokenizedPair], pad_token_id: int, *, layout: str = "separate",
                chunk_size: int = 1024) -> dict[str, list]:
    """Every score of :data:`SCORE_KEYS` for ``pairs`` (one forward pass in ``layout``), as lists of floats
    and ints, one entry per pair."""
    device = next(model.parameters()).device
    batch = collate_layout(pairs, pad_token_id, layout).to(device)
    out, hidden = _final_hidden(model, batch, chunk_size)
    n = len(pairs)
    if isinstance(batch, SharedPairBatch):  # predicting positions listed by the layout, in out.mask's order
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.pred_index).to(torch.float64)
        row_of = out.mask.nonzero()[:, 0]
        sums = torch.zeros(2 * n, hidden.shape[-1], dtype=torch.float64, device=device).index_add_(0, row_of, rows)
    else:
        sums = prefix_embedding_sums(hidden, batch.completion_mask)
    pl = pair_logps(out)
    n_w, n_l = pl.chosen_mask.sum(-1), pl.rejected_mask.sum(-1)
    ches, ches_norm = ches_scores(sums[:n], sums[n:], n_w, n_l)
    g_w = branch_grad_norm(pl.chosen, pl.chosen_mask, pl.chosen_stats["sum_p2"])
    g_l = branch_grad_norm(pl.rejected, pl.rejected_mask, pl.rejected_stats["sum_p2"])
    ratio = torch.where(g_w > 0, g_l / g_w.clamp(min=1e-300), torch.full_like(g_w, float("nan")))
    values = {"ches": ches, "ches_norm": ches_norm,
              "logp_chosen": masked_sum(pl.chosen.double(), pl.chosen_mask),
              "logp_rejected": masked_sum(pl.rejected.double(), pl.rejected_mask),
              "len_chosen": n_w, "len_rejected": n_l, "grad_ratio": ratio}
    return {k: v.cpu().tolist() for k, v in values.items()}


# ----------------------------------------------------------------------------- the command


@dataclass
class ScoreResult:
    """What :func:`score_pairs` wrote: the out folder, the per-pair rows, the summary, and the filtered
    file (None without ``drop_top``) with the number of pairs it dropped."""

    out: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    filtered: Path | None = None
    dropped: int = 0
    files: list[Path] = field(default_factory=list)


def _check_out(out: Path, force: bool) -> None:
    """The out folder is absent, empty, or (with ``force``) holds files we may replace."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder. Choose a folder for the scores.")
    check_writable(str(out), "--out")
    if out.is_dir() and not force:
        present = sorted(p.name for p in out.iterdir())
        if present:
            shown = ", ".join(present[:4]) + (" ..." if len(present) > 4 else "")
            raise ConfigError(f"--out {out}: the folder already holds files ({shown}). Pass --force to replace "
                              f"this command's files there ({', '.join(OUT_FILES)}), or choose another --out.")


def _stats(values: list[float]) -> dict[str, Any]:
    finite = torch.tensor([v for v in values if v is not None and math.isfinite(v)], dtype=torch.float64)
    out: dict[str, Any] = {"count": int(finite.numel())}
    if len(values) != finite.numel():
        out["non_finite"] = len(values) - int(finite.numel())
    if finite.numel() == 0:
        return out
    out.update(mean=finite.mean().item(), std=finite.std(unbiased=False).item(), min=finite.min().item())
    for q in QUANTILES:
        out[f"q{round(q * 100):02d}"] = torch.quantile(finite, q).item()
    out["max"] = finite.max().item()
    return out


def _json_value(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _write(path: Path, text: str, what: str) -> Path:
    try:
        return fsutil.atomic_write_text(path, text)
    except OSError as e:
        raise fsutil.write_error(what, path, e, kept="The previous file (if any) is kept.",
                                 then="run `poise score-pairs` again (or pass another --out)") from e


def _histogram(path: Path, rows: list[dict[str, Any]], threshold: float | None, by: str | None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "ches", "CHES"), (axes[1], "ches_norm", "CHES, length-normalised")):
        values = [r[key] for r in rows]
        ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="tab:blue", alpha=0.8)
        if threshold is not None and by == key:
            ax.axvline(threshold, color="tab:red", linestyle="--", label=f"dropped from {threshold:.4g}")
            ax.legend(fontsize=9)
        ax.set(title=title, xlabel=key, ylabel="pairs")
    fig.tight_layout()
    try:
        with fsutil.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    except OSError as e:
        raise fsutil.write_error("the histogram", path, e, kept="The previous plot (if any) is kept.",
                                 then="run `poise score-pairs` again (or pass another --out)") from e
    finally:
        plt.close(fig)
    return path


def _original_rows(cfg: TrainConfig) -> dict[tuple[str, int], dict[str, Any]]:
    """The training rows as they are in the file (no column renamed), keyed by (source, index): the same
    reader as the preflight, so the keys are those of the tokenized pairs."""
    rows = load_rows(cfg.train_file, split=cfg.split, columns=None, required=())
    return {(r.source, r.index): r.data for r in rows}


def _load_model(cfg: TrainConfig, tokenizer, texts: list[str], device: torch.device):
    """The policy as training loads it (poise/training/build.py): same loader, dtype and tokenizer checks;
    no LoRA (an adapter starts as the identity) and no gradient checkpointing (nothing is trained)."""
    from poise.training.build import load_checked_model

    return load_checked_model(cfg, tokenizer, texts, device).to(device).eval().requires_grad_(False)


def score_pairs(cfg: TrainConfig, *, out: str | Path | None = None, drop_top: float | None = None,
                by: str = "ches", model: str | None = None, force: bool = False,
                progress: bool = True) -> ScoreResult:
    """Score every training pair of ``cfg`` and write the outputs (module docstring).

    Args:
        cfg: the training config (its model, data, tokenization, ``micro_batch_size``, ``chunk_size``,
            ``pair_layout``, ``dtype`` and ``cpu`` are used).
        out: the out folder; default ``<output_dir>/pair_scores``.
        drop_top: with a fraction f in [0, 1), also write ``train_filtered.jsonl`` without the top
            floor(f * n) pairs by ``by``.
        by: ``"ches"`` (raw, the default) or ``"ches_norm"``.
        model: scores under this model instead of the config's ``model``.
        force: replace this command's files in an out folder that already holds files.

    Raises:
        ConfigError: ``drop_top`` out of range, an unknown ``by``, an SFT config, an out folder in the
            way; and every error of the config, data and model that ``poise train`` raises.
    """
    from tqdm.auto import tqdm

    check_drop_top(drop_top)
    if by not in SCORES_BY:
        raise ConfigError(f"--by {by}: rank by one of {', '.join(SCORES_BY)}.")
    # nothing is logged: a logging back end of the config (report_to) is neither needed nor checked
    changes: dict[str, Any] = {"report_to": [], **({"model": model} if model is not None else {})}
    cfg = from_dict({**cfg.to_dict(), **changes}, source="config", origins={"model": f"--model {model}"})
    if cfg.stage == "sft":
        raise ConfigError("stage: sft: poise score-pairs scores preference pairs (chosen and rejected); use a "
                          "config with stage: preference.")
    out_dir = Path(out if out is not None else Path(cfg.output_dir) / "pair_scores").expanduser()
    _check_out(out_dir, force)
    inputs = check_inputs(cfg, network=True)
    tokenizer, data = inputs.tokenizer, inputs.train
    if tokenizer is None or data is None:  # pragma: no cover - check_inputs with network=True tokenizes
        raise PoiseError(f"{cfg.train_file}: the training data could not be tokenized.")
    originals = _original_rows(cfg) if drop_top is not None else {}
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    texts = [r.data.get("chosen") for r in inputs.train_rows[:64] if isinstance(r.data.get("chosen"), str)]
    policy = _load_model(cfg, tokenizer, texts, device)
    pairs = data.pairs
    layout = choose_layout(cfg.pair_layout, [policy], pairs, tokenizer.pad_token_id, chunk_size=cfg.chunk_size)
    rows: list[dict[str, Any]] = []
    size = cfg.micro_batch_size
    with tqdm(total=len(pairs), desc="score-pairs", unit="pair", dynamic_ncols=True, disable=not progress) as bar:
        for start in range(0, len(pairs), size):
            chunk = pairs[start:start + size]
            scores = score_batch(policy, chunk, tokenizer.pad_token_id, layout=layout, chunk_size=cfg.chunk_size)
            for i, pair in enumerate(chunk):
                rows.append({"source": pair.source, "index": pair.index,
                             **{k: _json_value(scores[k][i]) for k in SCORE_KEYS}})
            bar.update(len(chunk))
    broken = next((r for r in rows if r["ches"] is None or r["ches_norm"] is None), None)
    if broken is not None:
        raise PoiseError(f"{broken['source']}, row {broken['index']}: the model's hidden states are not finite "
                         f"(CHES is NaN or infinite); check the model {cfg.model} (and dtype: {cfg.dtype}).")

    dropped_at: list[int] = []
    threshold = None
    if drop_top is not None:
        dropped_at = top_indices([r[by] for r in rows], drop_top)
        threshold = min((rows[i][by] for i in dropped_at), default=None)
    summary: dict[str, Any] = {
        "command": "poise score-pairs", "model": cfg.model, "train_file": cfg.train_file, "layout": layout,
        "pairs": len(rows), "skipped_rows": len(data.skipped), "data": data.summary(),
        "notes": {"ches": "<H_w, H_l> - ||H_w||^2, H(y) the sum of the last hidden states at the positions "
                          "predicting the response's tokens; ches_norm: the same with H(y)/|y|",
                  "grad_ratio": "G_l / G_w, the logit-space gradient norms of the rejected and chosen branches "
                                "under DPO (diag/logit_grad_ratio of that pair alone)"},
        "scores": {k: _stats([r[k] for r in rows]) for k in SCORE_KEYS},
        "drop_top": None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [_write(out_dir / SCORES_FILE, "".join(json.dumps(r) + "\n" for r in rows), "the scores")]
    filtered = None
    if drop_top is not None:
        drop = set(dropped_at)
        kept = [originals[(r["source"], r["index"])] for i, r in enumerate(rows) if i not in drop]
        text = "".join(json.dumps(d, ensure_ascii=False, default=str) + "\n" for d in kept)
        filtered = _write(out_dir / FILTERED_FILE, text, "the filtered data")
        files.append(filtered)
        summary["drop_top"] = {"fraction": drop_top, "by": by, "dropped": len(drop), "kept": len(kept),
                               "threshold": threshold,
                               "file": FILTERED_FILE}
    elif (out_dir / FILTERED_FILE).exists():  # --force: an old filter would not match these scores
        (out_dir / FILTERED_FILE).unlink()
    files.append(_histogram(out_dir / HIST_FILE, rows, threshold, by if drop_top is not None else None))
    files.append(_write(out_dir / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n", "the summary"))
    return ScoreResult(out_dir, rows, summary, filtered, len(dropped_at), files)
