"""Loading models and tokenizers, and checking that they belong together.

``model`` may be a hub name, a local folder written by ``save_pretrained``, or a GGUF file (or a
folder plus ``gguf_file``), which transformers dequantises on load so that community quantized
checkpoints train too. Weights are read through safetensors (or GGUF); ``trust_remote_code`` stays off
unless the config sets it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from poise.errors import ConfigError

log = logging.getLogger("poise")


def resolve_source(name: str, gguf_file: str | None) -> tuple[str, dict[str, Any]]:
    """(name or folder for from_pretrained, extra kwargs) for a hub name, folder or .gguf path."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model: GGUF file {path} does not exist.")
        return str(path.parent), {"gguf_file": path.name}
    if gguf_file:
        return str(path) if path.exists() else name, {"gguf_file": gguf_file}
    if (path.is_absolute() or name.startswith(".")) and not path.exists():
        raise ConfigError(f"model: folder {path} does not exist. Give a hub name or an existing folder.")
    return (str(path) if path.exists() else name), {}


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype | str:
    """auto: float32 on a CPU (bf16 without native support runs ~27x slower there), else the
    checkpoint's own dtype."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    return getattr(torch, dtype)


def load_tokenizer(name: str, *, gguf_file: str | None = None, trust_remote_code: bool = False,
                   tokenizer_class: str | None = None):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src, extra = resolve_source(name, gguf_file)
    cls = PreTrainedTokenizerFast if tokenizer_class == "PreTrainedTokenizerFast" else AutoTokenizer
    try:
        tok = cls.from_pretrained(src, trust_remote_code=trust_remote_code, **extra)
    except OSError as e:
        raise ConfigError(f"tokenizer: could not load {name!r} ({e}). Give a folder with tokenizer files, "
                          "or set tokenizer: to one.") from None
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token  # padding positions are masked out; any id works
    return tok


def load_model(name: str, *, gguf_file: str | None = None, dtype: str = "auto",
               device: torch.device | None = None, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    device = device or torch.device("cpu")
    src, extra = resolve_source(name, gguf_file)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=pick_dtype(dtype, device), trust_remote_code=trust_remote_code, **extra)
    except OSError as e:
        raise ConfigError(f"model: could not load {name!r} ({e}). Give a hub name (with a network), a "
                          "folder written by save_pretrained, or a .gguf file.") from None
    if extra.get("gguf_file"):
        model = _plain_weights(model)
        if device.type == "cpu" and model.dtype != torch.float32:
            model = model.float()
    return model


def _plain_weights(model):
    """A GGUF checkpoint is dequantised on load, but transformers still marks the model as quantized and
    then refuses ``save_pretrained`` (so checkpoints and the final model could not be written). The
    weights are ordinary tensors: drop the mark."""
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def add_lora(model, *, r: int, alpha: float, dropout: float, target_modules: list[str] | str):
    """Wrap ``model`` with LoRA adapters (peft); the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def _sample_texts(texts: list[str], n: int = 16) -> list[str]:
    step = max(1, len(texts) // n)
    return [t for t in texts[::step][:n] if t.strip()]


def check_tokenizer(tokenizer, model, texts: list[str], *, source: str, folder: str | None = None) -> None:
    """Fail early, with the fix, when the tokenizer does not belong to the model.

    Checks: special tokens exist; every id fits the model's embedding; the data's text round-trips
    through encode/decode; and when ``folder`` holds a saved tokenizer.json, the tokenizer gives the
    same ids as that file (AutoTokenizer on a folder whose config names another model type can return
    a tokenizer with different ids than the one saved there).
    """
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer of {source} has no EOS token; completions need one. Set "
                          "tokenizer.eos_token or use the model's own tokenizer.")
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ConfigError(f"tokenizer of {source} has {len(tokenizer)} tokens but the model's embedding has "
                          f"{rows} rows: they do not belong together. Use the model's own tokenizer.")
    sample = _sample_texts(texts)
    bad = [t for t in sample if tokenizer.decode(tokenizer.encode(t, add_special_tokens=False),
                                                 skip_special_tokens=True,
                                                 clean_up_tokenization_spaces=False).strip() != t.strip()]
    if sample and len(bad) > len(sample) // 2:
        raise ConfigError(f"tokenizer of {source} does not round-trip the data's text ({len(bad)} of "
                          f"{len(sample)} samples differ after encode/decode, e.g. {bad[0][:60]!r}). It "
                          "probably belongs to another model; use the model's own tokenizer.")
    _check_saved_tokenizer(tokenizer, sample, folder)


def _check_saved_tokenizer(tokenizer, sample: list[str], folder: str | None) -> None:
    if not folder or not (Path(folder) / "tokenizer.json").is_file():
        return
    from transformers import PreTrainedTokenizerFast

    saved = PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"))
    for t in sample:
        a, b = tokenizer.encode(t, add_special_tokens=False), saved.encode(t, add_special_tokens=False)
        if a != b:
            raise ConfigError(
                f"the tokenizer loaded for {folder} ({type(tokenizer).__name__}) gives different ids than "
                f"the tokenizer.json saved there (for {t[:40]!r}: {a[:8]} vs {b[:8]}). AutoTokenizer picks "
                "its class from the folder's config, which can name another model type. Fix: set "
                "tokenizer_class: PreTrainedTokenizerFast in the config to load the saved file as it is.")


def check_chat_template(tokenizer, *, source: str) -> None:
    """A chat template, when present, must render a simple conversation."""
    if not getattr(tokenizer, "chat_template", None):
        return
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                      add_generation_prompt=True)
    except Exception as e:  # jinja errors come in many types
        raise ConfigError(f"the chat template of {source}'s tokenizer does not render ({e}). Fix the "
                          "template or use standard (string) data.") from None
