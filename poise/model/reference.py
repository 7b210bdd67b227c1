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
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from poise import fsutil
from poise.data import TokenizedPair
from poise.model.logprobs import batch_logps
from poise.model.modes import eval_mode
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
                           disable_adapters: bool = False, layout: str = "separate",
                           progress: bool = True) -> torch.Tensor:
    """(N, 2) float32 sums of the reference's log-probs over each pair's chosen and rejected tokens.

    ``layout`` is the batch layout (see :func:`poise.model.shared_prefix.collate_layout`); use the training
    run's, so that at step 0 the policy's sums equal these to the last bit where the maths allows.
    """
    out = []
    ctx = adapters_disabled(model) if disable_adapters else contextlib.nullcontext()
    bar = tqdm(total=len(pairs), desc="reference", unit="pair", dynamic_ncols=True, leave=False,
               disable=not progress or not pairs)
    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)  # like lengths together: little padding
    with ctx, eval_mode(model):
        for i in range(0, len(pairs), batch_size):
            b = collate_layout([pairs[j] for j in order[i:i + batch_size]], pad_token_id, layout).to(device)
            s = batch_logps(model, b, chunk_size=chunk_size).logps.sum(-1)
            n = b.num_pairs
            out.append(torch.stack([s[:n], s[n:]], -1).float().cpu())
            bar.update(n)
    bar.close()
    if not out:
        return torch.zeros(0, 2)
    sums = torch.empty(len(pairs), 2)
    sums[torch.tensor(order)] = torch.cat(out)
    return sums


def _ranks() -> tuple[int, int]:
    """(rank, processes) of the process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_ranks_agree(flag: bool, device: torch.device) -> bool:
    import torch.distributed as dist

    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def _split_sums(model, pairs: Sequence[TokenizedPair], rank: int, world: int, device: torch.device,
                **kw) -> torch.Tensor:
    """Every rank scores its share of the pairs; the shares are gathered into the (N, 2) sums on every
    rank (a collective). The shares are contiguous runs of the length-sorted order, each a whole number of
    batches, so every batch holds the same pairs as in one process: the sums are the one-process sums
    bit for bit (not merely to rounding)."""
    import torch.distributed as dist

    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)  # compute_reference_sums' own order
    size = kw["batch_size"]
    per = math.ceil(math.ceil(len(pairs) / world) / size) * size  # a whole number of batches
    share = order[rank * per:(rank + 1) * per]
    mine = compute_reference_sums(model, [pairs[i] for i in share], device=device, **kw)
    padded = torch.zeros(per, 2, dtype=torch.float32, device=device)
    padded[:len(mine)] = mine.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    gathered = torch.cat(parts)[:len(pairs)].cpu()
    sums = torch.empty(len(pairs), 2)
    sums[torch.tensor(order[:len(gathered)])] = gathered
    return sums


def cached_reference_sums(model, pairs: Sequence[TokenizedPair], *, cache_dir: str, pad_token_id: int,
                          batch_size: int, chunk_size: int, device: torch.device,
                          disable_adapters: bool = False, write: bool = True,
                          layout: str = "separate",
                          needed: Sequence[int] | None = None) -> tuple[torch.Tensor, Path, bool]:
    """(sums (N, 2), cache file, whether it was a cache hit).

    In a process group (several processes; every rank calls this with the same pairs) the work is
    split: each rank scores its share, the sums are gathered on every rank and the main process alone
    writes the cache file; a cache file counts as a hit only when every rank can read it.

    ``needed``: the indices of the pairs the run will use (a run that stops early at ``max_steps``); only
    those are scored, the others are NaN in the sums and in the file, and a later run that needs more
    scores the missing ones and extends the file."""
    with adapters_disabled(model) if disable_adapters else contextlib.nullcontext():
        fp = weights_fingerprint(model)
    key = cache_key(fp, pairs, extra=f"logps-v1|{model.config.model_type}|{layout}")
    path = Path(os.path.expanduser(cache_dir)) / "reference" / f"{key}.safetensors"
    rank, world = _ranks()
    want = sorted(set(range(len(pairs)) if needed is None else needed))
    cached = _read_cache(path, len(pairs))
    missing = want if cached is None else [i for i in want if not torch.isfinite(cached[i]).all()]
    hit = not missing if world == 1 else _all_ranks_agree(not missing, device)
    if hit:
        return cached, path, True
    if world > 1:  # every rank scores the same missing pairs: those of the main process's reading
        import torch.distributed as dist

        box = [missing, cached]  # and the main process's cached sums, should another rank have read none
        dist.broadcast_object_list(box, src=0)
        missing, cached = box
    kw = dict(pad_token_id=pad_token_id, batch_size=batch_size, chunk_size=chunk_size,
              disable_adapters=disable_adapters, layout=layout)
    todo = [pairs[i] for i in missing]
    if world == 1:
        new = compute_reference_sums(model, todo, device=device, **kw)
    else:
        new = _split_sums(model, todo, rank, world, device, progress=rank == 0, **kw)
    sums = cached.clone() if cached is not None else torch.full((len(pairs), 2), float("nan"))
    sums[torch.tensor(missing, dtype=torch.long)] = new
    failure = None
    if write and rank == 0:
        try:
            _write_cache(path, sums)
        except Exception as e:
            failure = e
    if world > 1:  # every rank hears of a failed write, else the others would wait at the next collective
        import torch.distributed as dist

        told = [None if failure is None else str(failure)]
        dist.broadcast_object_list(told, src=0)
        if failure is None and told[0] is not None:
            from poise.errors import PoiseError

            raise PoiseError(f"the main process could not write the reference cache ({told[0]})")
    if failure is not None:
        raise failure
    return sums, path, False


def _read_cache(path: Path, n: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        sums = load_file(str(path))["sums"]
        if sums.shape == (n, 2):
            return sums
    except Exception as e:  # a damaged cache file is recomputed, never trusted
        log.warning("reference cache %s unreadable (%s); recomputing", path, e)
    return None


def _write_cache(path: Path, sums: torch.Tensor) -> None:
    try:  # a temporary file renamed over the cache file: a reader never sees half of one
        path.parent.mkdir(parents=True, exist_ok=True)
        with fsutil.atomic_path(path) as tmp:
            save_file({"sums": sums.contiguous()}, str(tmp))
    except Exception as e:
        if not fsutil.is_write_failure(e):
            raise
        raise fsutil.write_error("the reference cache file", path, e,
                                 then="run again (or set cache_dir to another folder)") from e
