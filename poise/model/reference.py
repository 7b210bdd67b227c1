"""Reference log-probs: a separate frozen model, the base model with LoRA adapters disabled, or
sums precomputed once and cached on disk.

The cache key covers the reference weights (a fingerprint of every parameter), the token ids of
every pair, and the log-prob settings, so a later run with the same model, data and tokenization
reuses the file (``{cache_dir}/reference/{key}.safetensors``) and never loads the reference again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from poise import fsutil
from poise.data import TokenizedPair
from poise.model.logprobs import batch_logps
from poise.model.shared_prefix import collate_layout

log = logging.getLogger("poise")


def weights_fingerprint(model) -> str:
    """A cheap fingerprint of a model's weights: names, shapes and up to 4096 values of each tensor."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)[:4096].float().cpu()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat.numpy().tobytes())
    return h.hexdigest()


def cache_key(fingerprint: str, pairs: Sequence[TokenizedPair], extra: str = "") -> str:
    h = hashlib.sha256(fingerprint.encode())
    h.update(extra.encode())
    for p in pairs:
        h.update(repr((p.prompt_ids, p.chosen_ids, p.rejected_ids)).encode())
    return h.hexdigest()[:32]


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """The base model of a peft model (its adapters off); any other model as it is."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


@torch.no_grad()
def compute_reference_sums(model, pairs: Sequence[TokenizedPair], *, pad_token_id: int,
                           batch_size: int, chunk_size: int, device: torch.device,
                           disable_adapters: bool = False, layout: str = "separate") -> torch.Tensor:
    """(N, 2) float32 sums of the reference's log-probs over each pair's chosen and rejected tokens.

    ``layout`` is the batch layout (see :func:`poise.model.shared_prefix.collate_layout`); use the training
    run's, so that at step 0 the policy's sums equal these to the last bit where the maths allows.
    """
    out = []
    was_training = model.training
    model.eval()
    ctx = adapters_disabled(model) if disable_adapters else contextlib.nullcontext()
    with ctx:
        for i in range(0, len(pairs), batch_size):
            b = collate_layout(pairs[i:i + batch_size], pad_token_id, layout).to(device)
            s = batch_logps(model, b, chunk_size=chunk_size).logps.sum(-1)
            n = b.num_pairs
            out.append(torch.stack([s[:n], s[n:]], -1).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


def cached_reference_sums(model, pairs: Sequence[TokenizedPair], *, cache_dir: str, pad_token_id: int,
                          batch_size: int, chunk_size: int, device: torch.device,
                          disable_adapters: bool = False, write: bool = True,
                          layout: str = "separate") -> tuple[torch.Tensor, Path, bool]:
    """(sums (N, 2), cache file, whether it was a cache hit)."""
    with adapters_disabled(model) if disable_adapters else contextlib.nullcontext():
        fp = weights_fingerprint(model)
    key = cache_key(fp, pairs, extra=f"logps-v1|{model.config.model_type}|{layout}")
    path = Path(os.path.expanduser(cache_dir)) / "reference" / f"{key}.safetensors"
    if path.is_file():
        try:
            sums = load_file(str(path))["sums"]
            if sums.shape == (len(pairs), 2):
                return sums, path, True
        except Exception as e:  # a damaged cache file is recomputed, never trusted
            log.warning("reference cache %s unreadable (%s); recomputing", path, e)
    sums = compute_reference_sums(model, pairs, pad_token_id=pad_token_id, batch_size=batch_size,
                                  chunk_size=chunk_size, device=device, disable_adapters=disable_adapters,
                                  layout=layout)
    if write:
        try:  # a temporary file renamed over the cache file: a reader never sees half of one
            path.parent.mkdir(parents=True, exist_ok=True)
            with fsutil.atomic_path(path) as tmp:
                save_file({"sums": sums.contiguous()}, str(tmp))
        except Exception as e:
            if not fsutil.is_write_failure(e):
                raise
            raise fsutil.write_error("the reference cache file", path, e,
                                     then="run again (or set cache_dir to another folder)") from e
    return sums, path, False
