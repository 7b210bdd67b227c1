"""Generation: the one routine that samples or greedily decodes completions, for every caller.

:func:`generate_ids` takes prompts as token ids or as strings and returns the new token ids of each
completion, cut before the first EOS; :func:`generate` decodes them (special tokens dropped, nothing
else touched). The evaluation of a run (:mod:`poise.eval.run`), the testbed's scoring and on-policy pairs
(:mod:`poise.testbed`) and the instruct testbed's self-sampled pairs (:mod:`poise.testbed.instruct`) all
call it.

* Prompts are left-padded (with the tokenizer's pad token, or EOS when it has none) into batches of
  ``batch_size``, so batched greedy decoding equals decoding one prompt at a time.
* A string prompt is tokenized as poise's data pipeline tokenizes a prompt (:func:`prompt_ids`): no
  special tokens added, except BOS in front when the tokenizer adds one and the text lacks it. A prompt
  rendered with a chat template (which writes its own BOS and turn markers) therefore gets no second
  BOS, and its ids are those the trainer saw.
* ``temperature=0`` decodes greedily; a positive temperature samples from the full distribution (top-k
  and top-p off, whatever the model's generation config says).
* Sampling is seeded: torch's generator is seeded with ``seed`` once, the batches run in order, and the
  global RNG state (the CPU's and the model's device's) is restored afterwards, so the same seed,
  prompts and ``batch_size`` give the same completions and the caller's random stream is untouched.
  (This is the seeding of the testbed's former ``generate``, whose committed results it reproduces.)

Backends (``backend=``): ``"hf"`` is the Hugging Face ``model.generate`` path above. ``"vllm"`` runs the
same request through vLLM (:func:`_vllm_generate_ids`): the same prompt token ids (``prompt_token_ids``,
so a chat-template rendering is used as rendered), the same settings (greedy at ``temperature=0``/None,
else sampling from the full distribution: top-p 1, top-k off; ``max_new_tokens``; one completion per
prompt; stop at the tokenizer's EOS, the ids cut before it; decoded by :func:`generate` with the same
tokenizer, special tokens skipped). vLLM loads the weights itself, so it needs the model's **folder**
(``model_path``: a full model, not an adapter); the in-memory ``model`` is then used only for its dtype
and may be None. ``"auto"`` (the default) picks vLLM when it is installed, a CUDA GPU is present and
``model_path`` is given, and Hugging Face otherwise, so callers that pass no folder keep the HF path;
``"vllm"`` without vLLM, a GPU or a folder is a :class:`~poise.errors.ConfigError`. What differs: vLLM
draws its own random numbers (per-prompt seeds derived from ``seed``, so the same seed gives the same
completions under vLLM, but not the HF path's completions; ``batch_size`` plays no part), duplicates of
a prompt are sent as one request with ``n`` completions, vLLM also stops at any extra EOS ids the
model's ``generation_config.json`` lists, and each call loads the model into vLLM and frees it after
(``vllm_options`` are passed to ``vllm.LLM``, e.g. ``gpu_memory_utilization`` to leave room for a
model already on the GPU). vLLM is imported only on that path. The vLLM path is tested against a
stand-in of vLLM's API (``tests/model/test_generate.py``), not yet run on a GPU with vLLM itself.
"""

from __future__ import annotations

import gc
import importlib.util
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from poise.data.tokenize import _bos_to_add
from poise.errors import ConfigError
from poise.model.modes import eval_mode

#: A prompt: token ids, or a string tokenized by :func:`prompt_ids`.
Prompt = str | Sequence[int]

#: The generation backends (module doc): "auto" picks vLLM when it can run, else Hugging Face.
Backend = Literal["auto", "hf", "vllm"]
BACKENDS = ("auto", "hf", "vllm")


def prompt_ids(tokenizer: Any, text: str) -> tuple[int, ...]:
    """Token ids of a prompt string as poise's data pipeline makes them (:mod:`poise.data.tokenize`): no
    special tokens added, except BOS in front when the tokenizer adds one and the text lacks it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = _bos_to_add(tokenizer)
    return tuple(ids if bos is None or ids[:1] == [bos] else [bos, *ids])


def vllm_unavailable() -> str | None:
    """Why vLLM cannot run here (not installed, or no CUDA GPU), or None when it can."""
    if "vllm" in sys.modules:
        installed = sys.modules["vllm"] is not None
    else:
        installed = importlib.util.find_spec("vllm") is not None
    if not installed:
        return "vLLM is not installed (pip install vllm, on a machine with a CUDA GPU)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available (torch.cuda.is_available() is False); vLLM runs on CUDA GPUs"
    return None


def choose_backend(backend: str = "auto", model_path: str | Path | None = None) -> Literal["hf", "vllm"]:
    """The backend a call runs on: ``"hf"`` as asked; ``"vllm"`` as asked when vLLM can run and
    ``model_path`` is given (else a ConfigError saying what is missing); ``"auto"``: vLLM when it could
    be asked for, Hugging Face otherwise."""
    if backend not in BACKENDS:
        raise ConfigError(f"generation backend {backend!r}: use one of {', '.join(map(repr, BACKENDS))}.")
    if backend == "hf":
        return "hf"
    why = vllm_unavailable()
    if backend == "vllm":
        if why is not None:
            raise ConfigError(f"generation backend 'vllm': {why}. Install vLLM and run on a CUDA GPU, or use "
                              "backend 'hf' (Hugging Face generate) or 'auto' (vLLM only where it can run).")
        if model_path is None:
            raise ConfigError("generation backend 'vllm' needs the model's folder (model_path): vLLM loads the "
                              "weights itself and cannot use a model in memory; pass model_path or use "
                              "backend 'hf' or 'auto'.")
        return "vllm"
    return "vllm" if why is None and model_path is not None else "hf"


@torch.no_grad()
def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    temperature: float | None = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    backend: Backend = "auto",
    model_path: str | Path | None = None,
    vllm_options: Mapping[str, Any] | None = None,
) -> list[list[int]]:
    """The new token ids of one completion per prompt, cut before the first EOS (module doc).

    Args:
        model: a causal LM with ``generate`` (transformers, optionally peft); put in eval mode for the
            call and back in its former mode afterwards. On the vLLM backend only its dtype is read, and
            it may be None.
        tokenizer: its tokenizer (pad and EOS ids; it tokenizes string prompts).
        prompts: token-id sequences, or strings (tokenized by :func:`prompt_ids`).
        max_new_tokens: at most this many new tokens per completion.
        temperature: 0 (or None) for greedy decoding, > 0 to sample at that temperature.
        seed: seeds the sampling; the global RNG is restored afterwards.
        batch_size: prompts per ``generate`` call (the completions sampled depend on it); HF only.
        backend: "auto", "hf" or "vllm" (:func:`choose_backend`, module doc).
        model_path: the folder ``model`` was loaded from (a full model); vLLM needs it, and "auto" uses
            Hugging Face without it.
        vllm_options: further keyword arguments of ``vllm.LLM`` (``gpu_memory_utilization``,
            ``max_model_len``, ``tensor_parallel_size``, ...).
    """
    temperature = 0.0 if temperature is None else float(temperature)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chosen = choose_backend(backend, model_path)
    ids = [prompt_ids(tokenizer, p) if isinstance(p, str) else tuple(p) for p in prompts]
    eos = tokenizer.eos_token_id
    if chosen == "vllm":
        return _vllm_generate_ids(str(model_path), ids, eos=eos, max_new_tokens=max_new_tokens,
                                  temperature=temperature, seed=seed, dtype=_dtype_name(model),
                                  options=vllm_options)
    if model is None:
        raise ConfigError("generation on the Hugging Face backend needs the model (got None); pass it, or "
                          "model_path with backend 'vllm'.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    device = _device(model)
    out: list[list[int]] = []
    with eval_mode(model), _seeded(seed, device):
        for start in range(0, len(ids), batch_size):
            out += _generate_batch(model, ids[start:start + batch_size], pad=pad, eos=eos, device=device,
                                   max_new_tokens=max_new_tokens, temperature=temperature)
    return out


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    temperature: float | None = 0.0,
    seed: int = 0,
    batch_size: int = 16,
    backend: Backend = "auto",
    model_path: str | Path | None = None,
    vllm_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """:func:`generate_ids`, decoded: one string per prompt, special tokens dropped, not stripped (testbed
    responses start with a space, so ``prompt + response`` re-tokenizes as generated). Both backends'
    ids are decoded here, with ``tokenizer``."""
    out = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                       seed=seed, batch_size=batch_size, backend=backend, model_path=model_path,
                       vllm_options=vllm_options)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in out]


def _generate_batch(model: Any, chunk: list[tuple[int, ...]], *, pad: int, eos: int | None, device: torch.device,
                    max_new_tokens: int, temperature: float) -> list[list[int]]:
    width = max(len(p) for p in chunk)
    ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (b, width), left-padded
    mask = torch.zeros_like(ids)
    for r, p in enumerate(chunk):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         pad_token_id=pad, eos_token_id=eos, **_decoding(temperature))
    return [_until_eos(row, eos) for row in out[:, width:].tolist()]


def _decoding(temperature: float) -> dict[str, Any]:
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    # greedy; None clears sampling settings of the model's generation config (no warnings about them)
    return {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}


def _vllm_sampling(temperature: float, max_new_tokens: int, *, n: int, seed: int,
                   eos: int | None) -> dict[str, Any]:
    """``vllm.SamplingParams`` arguments with the HF path's settings (:func:`_decoding`): greedy at 0, else
    the full distribution at ``temperature`` (top-p 1, top-k off); stop at ``eos``; special tokens skipped
    in vLLM's own text (poise decodes the ids itself)."""
    return {"n": n, "temperature": temperature, "top_p": 1.0, "top_k": -1, "max_tokens": max_new_tokens,
            "seed": seed, "stop_token_ids": [] if eos is None else [eos], "skip_special_tokens": True}


def _request_seed(seed: int, j: int) -> int:
    """The seed of the ``j``-th distinct prompt's request: independent streams for different prompts and
    seeds (not ``seed + j``, whose streams the next seed would reuse shifted by one prompt)."""
    return int(np.random.SeedSequence(seed, spawn_key=(j,)).generate_state(1, np.uint32)[0])


def _vllm_generate_ids(model_path: str, ids: list[tuple[int, ...]], *, eos: int | None, max_new_tokens: int,
                       temperature: float, seed: int, dtype: str,
                       options: Mapping[str, Any] | None) -> list[list[int]]:
    """:func:`generate_ids` on vLLM: one request per distinct prompt (``n`` = its copies when sampling; one
    greedy completion shared by the copies), the completions put back in the callers' order."""
    if not ids:
        return []
    import vllm  # lazy: importing poise never imports vLLM

    groups: dict[tuple[int, ...], list[int]] = {}  # distinct prompt -> its positions, in first-seen order
    for i, p in enumerate(ids):
        groups.setdefault(p, []).append(i)
    greedy = temperature == 0
    params = [vllm.SamplingParams(**_vllm_sampling(temperature, max_new_tokens, n=1 if greedy else len(where),
                                                   seed=_request_seed(seed, j), eos=eos))
              for j, where in enumerate(groups.values())]
    llm = vllm.LLM(model=model_path, dtype=dtype, seed=seed, **dict(options or {}))
    try:
        results = llm.generate([{"prompt_token_ids": list(p)} for p in groups], params, use_tqdm=False)
    finally:
        del llm
        gc.collect()  # vLLM frees its GPU memory when the engine is collected
    if len(results) != len(groups):
        raise RuntimeError(f"vLLM returned {len(results)} results for {len(groups)} prompts")
    out: list[list[int] | None] = [None] * len(ids)
    for (prompt, where), result in zip(groups.items(), results):
        got = getattr(result, "prompt_token_ids", None)
        if got is not None and list(got) != list(prompt):
            raise RuntimeError("vLLM returned its results in another order than the prompts")
        completions = [_until_eos(list(c.token_ids), eos) for c in result.outputs]
        if len(completions) != (1 if greedy else len(where)):
            raise RuntimeError(f"vLLM returned {len(completions)} completions for a prompt asked {len(where)}")
        for k, i in enumerate(where):
            out[i] = list(completions[0 if greedy else k])
    return out  # type: ignore[return-value]


def _dtype_name(model: Any) -> str:
    """The model's dtype as vLLM names it ("bfloat16", ...), or "auto" (the folder's config) without one."""
    dtype = getattr(model, "dtype", None)
    return str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else "auto"


def _until_eos(row: list[int], eos: int | None) -> list[int]:
    return row[:row.index(eos)] if eos is not None and eos in row else row


def _device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Inside: torch's CPU generator and ``device``'s seeded with ``seed``. Afterwards: both as they were."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
        return
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else 0
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        torch.default_generator.manual_seed(seed)
        with module.device(index) if hasattr(module, "device") else nullcontext():
            module.manual_seed(seed)  # this device only; torch.manual_seed would reseed every GPU
        yield
