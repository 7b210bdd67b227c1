"""Loading models and tokenizers, and checking that they belong together.

``model`` may be a hub name, a local folder written by ``save_pretrained``, or a GGUF file (or a
folder plus ``gguf_file``), which transformers dequantises on load so that community quantized
checkpoints train too. Weights are read through safetensors (or GGUF); ``trust_remote_code`` stays off
unless the config sets it.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from poise.errors import ConfigError

log = logging.getLogger("poise")


#: Names of files that hold a tokenizer (any one of them in a folder is enough to try loading it).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tekken.json")
#: Suffixes that name a file, never a model folder or a hub repo.
FILE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".json",
                 ".model", ".jsonl", ".yaml", ".yml", ".txt", ".zip", ".tar", ".gz")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?$")
_HUB_CHECKED: dict[tuple[str, str | None], dict[str, Any]] = {}


def looks_local(name: str) -> bool:
    """Whether ``name`` was meant as a local path rather than a Hugging Face Hub name (``org/name``)."""
    if name in (".", "..") or name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or os.path.isabs(name):
        return True
    if Path(name).suffix.lower() in FILE_SUFFIXES:
        return True
    parts = re.split(r"[/\\]", name)
    if len(parts) > 1 and (Path(parts[0]).expanduser().exists() or len(parts) > 2):
        return True  # the start of the path exists here, or more slashes than a hub name has
    return not _HUB_ID.match(name)


def _no_such(path: Path, name: str, key: str, what: str = "folder") -> ConfigError:
    hint = ""
    parent = path.parent if str(path.parent) not in ("", ".") else Path(".")
    if parent.is_dir():
        close = difflib.get_close_matches(path.name, os.listdir(parent), n=1, cutoff=0.6)
        hint = f" Did you mean {str(parent / close[0])!r}?" if close else ""
    return ConfigError(f"{key}: no such {what} {name} (looked in {path.expanduser().resolve().parent}; relative "
                       f"paths start from the working directory).{hint} Give an existing folder written by "
                       "save_pretrained, a .gguf file, or a Hugging Face Hub name such as org/name.")


def resolve_source(name: str, gguf_file: str | None, *, key: str = "model") -> tuple[str, dict[str, Any]]:
    """(name or folder for from_pretrained, extra kwargs) for a hub name, folder or .gguf path.

    A local-looking name (see :func:`looks_local`) that is not an existing folder fails here, at once,
    with no attempt at the Hub; so does a file other than a .gguf (pass its folder)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{key}: empty; give a model folder, a .gguf file or a Hugging Face Hub name.")
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return str(path.parent), {"gguf_file": path.name}
        raise ConfigError(f"{key}: {name} is a file: pass its folder ({path.parent}), the folder written by "
                          "save_pretrained; for a GGUF file give the .gguf path (or the folder with gguf_file=NAME).")
    if path.suffix.lower() == ".gguf":
        raise _no_such(path, name, key, "GGUF file")
    if path.is_dir():
        if gguf_file:
            if not (path / gguf_file).is_file():
                found = sorted(p.name for p in path.glob("*.gguf"))
                raise ConfigError(f"gguf_file: no file {gguf_file!r} in {path} (GGUF files there: "
                                  f"{', '.join(found) or 'none'}). Set gguf_file to one of them.")
            return str(path), {"gguf_file": gguf_file}
        return str(path), {}
    if looks_local(name):
        raise _no_such(path, name, key)
    return name, ({"gguf_file": gguf_file} if gguf_file else {})


def require_gguf(key: str = "model") -> None:
    """Loading a GGUF file needs the gguf package (an optional extra of poise)."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError(f"{key}: loading a GGUF file needs the gguf package, which is not installed. Install "
                          "it with: pip install 'poise[gguf]' (or pip install gguf).") from None


def hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or env


def hub_access(name: str, *, key: str = "model", gguf_file: str | None = None) -> dict[str, Any]:
    """Check once that a Hub name can be loaded: in the local cache, or on the Hub (one request, no
    retries). Returns extra from_pretrained kwargs (``local_files_only`` when the Hub cannot be reached
    but a cached copy exists); raises one clear ConfigError otherwise, instead of the minute of retried
    requests and repeated warnings that from_pretrained prints for a name that cannot be resolved."""
    if (name, gguf_file) in _HUB_CHECKED:
        return _HUB_CHECKED[(name, gguf_file)]
    import logging as _logging

    from huggingface_hub import try_to_load_from_cache

    _logging.getLogger("huggingface_hub").propagate = False  # its own handler prints; not twice
    files = [gguf_file] if gguf_file else ["config.json", "tokenizer_config.json", "tokenizer.json"]
    cached = any(isinstance(try_to_load_from_cache(name, f), str) for f in files)
    here = f"{name!r} is not a folder here ({Path(name).resolve()} does not exist)"
    if hub_offline():
        if not cached:
            raise ConfigError(f"{key}: {here}, and the Hugging Face Hub is offline (HF_HUB_OFFLINE or "
                              "TRANSFORMERS_OFFLINE is set) with no cached copy of it. Give a local folder written "
                              f"by save_pretrained ({key}: ./path/to/model), or fetch it once with the network on.")
        extra: dict[str, Any] = {}
    else:
        extra = _ask_hub(name, key, here, cached)
    _HUB_CHECKED[(name, gguf_file)] = extra
    return extra


def _ask_hub(name: str, key: str, here: str, cached: bool) -> dict[str, Any]:
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(name, timeout=10)
        return {}
    except Exception as e:  # the Hub's HTTP errors, or no connection (several libraries' types)
        kind = type(e).__name__
        if kind == "RepositoryNotFoundError":
            raise ConfigError(f"{key}: {here}, and the Hugging Face Hub has no model {name!r} (or it is private: "
                              "log in with `hf auth login`). Check the name (org/name) or give a local folder.") from None
        if kind == "GatedRepoError":
            raise ConfigError(f"{key}: {name!r} is a gated model: accept its conditions on "
                              f"https://huggingface.co/{name} and log in with `hf auth login`.") from None
        if cached:
            log.warning("%s: the Hugging Face Hub cannot be reached (%s); using the cached copy of %s", key, e, name)
            return {"local_files_only": True}
        raise ConfigError(f"{key}: {here}, and the Hugging Face Hub cannot be reached to fetch it ({kind}: "
                          f"{e}). Give a local folder written by save_pretrained, or check the network "
                          "connection.") from None


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES) or any(folder.glob("*.tiktoken"))


def missing_tokenizer(folder: Path, key: str) -> ConfigError:
    return ConfigError(
        f"{key}: the folder {folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...), only the "
        "model. Point the config's tokenizer: at the folder or Hub name of the model's tokenizer (e.g. "
        "tokenizer: ./base-model, or the name it was fine-tuned from), or save the tokenizer into the folder "
        f"(tokenizer.save_pretrained('{folder}')).")


def check_weight_files(folder: Path, key: str = "model") -> None:
    """A model folder holds a config and readable weights: every .safetensors header parses (a truncated
    download or copy fails here, naming the file) and every shard an index lists is present."""
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key}: the folder {folder} has no config.json, so it is not a model written by "
                          "save_pretrained. Point it at the model's folder (or a .gguf file).")
    from safetensors import safe_open

    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (ValueError, AttributeError):
            raise ConfigError(f"{key}: {index} is not a valid weight index (JSON); copy the model again.") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ConfigError(f"{key}: {index.name} lists weight files that are not in {folder}: "
                              f"{', '.join(missing[:3])}. The download or copy is incomplete; fetch it again.")
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # SafetensorError: a truncated or damaged file
            raise ConfigError(f"{key}: the weight file {f} is damaged or incomplete ({e}); an interrupted "
                              "download or copy leaves such a file. Copy or download it again.") from None


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: float32 on every device. Training keeps fp32 master weights (the optimizer updates them in
    fp32) and computes in the autocast precision of ``mixed_precision``; bf16 weights would round
    away DPO's small updates (at 5e-7, about 1% of bf16 weights change over 10 AdamW steps)."""
    if dtype == "auto":
        return torch.float32
    return getattr(torch, dtype)


#: Relative spacing of each half precision's numbers (2**-mantissa bits): an update smaller than half of
#: it times |w| rounds away.
SPACING = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def updates_round_away(model, learning_rate: float) -> str | None:
    """A warning when the weights are in a half precision and an AdamW step of ``learning_rate``
    (about that much per weight) is below half the spacing of the median weight; else None."""
    from poise.model.shared_mask import model_dtype

    dtype = model_dtype(model)
    if dtype not in SPACING:
        return None
    sample = torch.cat([p.detach().reshape(-1)[:4096].abs().float().cpu() for p in model.parameters()
                        if p.is_floating_point() and p.dim() > 1])
    median = sample.median().item()
    if learning_rate >= median * SPACING[dtype] / 2:
        return None
    return (f"the weights are {str(dtype).removeprefix('torch.')} and learning_rate {learning_rate:g} is below half the "
            f"spacing of {str(dtype).removeprefix('torch.')} numbers at the median weight ({median:.3g}): most AdamW "
            "updates round away and the model barely trains. Use dtype: auto (fp32 master weights) with "
            "mixed_precision: bf16 (the default where the hardware has bf16).")


def _source(name: str, gguf_file: str | None, key: str) -> tuple[str, dict[str, Any]]:
    """resolve_source plus: the gguf package for a GGUF, the Hub checked once for a Hub name."""
    src, extra = resolve_source(name, gguf_file, key=key)
    if extra.get("gguf_file"):
        require_gguf(key)
    if not Path(src).is_dir():
        extra = {**extra, **hub_access(src, key=key, gguf_file=extra.get("gguf_file"))}
    return src, extra


def load_tokenizer(name: str, *, gguf_file: str | None = None, trust_remote_code: bool = False,
                   tokenizer_class: str | None = None, key: str = "tokenizer"):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    src, extra = _source(name, gguf_file, key)
    if Path(src).is_dir() and not extra.get("gguf_file") and not has_tokenizer_files(Path(src)):
        raise missing_tokenizer(Path(src), key)
    cls = PreTrainedTokenizerFast if tokenizer_class == "PreTrainedTokenizerFast" else AutoTokenizer
    try:
        tok = cls.from_pretrained(src, trust_remote_code=trust_remote_code, **extra)
    except ImportError as e:
        raise ConfigError(f"{key}: loading the tokenizer of {name!r} needs a package that is not installed "
                          f"({e}).") from None
    except Exception as e:  # OSError, ValueError (no usable tokenizer file), json errors, ...
        raise ConfigError(f"{key}: could not load a tokenizer from {name!r} ({type(e).__name__}: {e}). Give a "
                          "folder with the model's tokenizer files, or set tokenizer: to one.") from None
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token  # padding positions are masked out; any id works
    ids = tok.encode(PROBE_TEXT, add_special_tokens=False)
    unk = getattr(tok, "unk_token_id", None)
    if not ids or (unk is not None and all(i == unk for i in ids)):
        raise ConfigError(f"{key}: the tokenizer loaded from {name!r} turns text into nothing but the unknown "
                          f"token ({type(tok).__name__}, {len(tok)} tokens): its vocabulary files are missing or "
                          "broken. Point tokenizer: at the model's own tokenizer.")
    return tok


def load_model(name: str, *, gguf_file: str | None = None, dtype: str = "auto",
               device: torch.device | None = None, trust_remote_code: bool = False, key: str = "model"):
    from transformers import AutoModelForCausalLM

    device = device or torch.device("cpu")
    src, extra = _source(name, gguf_file, key)
    if Path(src).is_dir() and not extra.get("gguf_file") and not (Path(src) / "adapter_config.json").is_file():
        check_weight_files(Path(src), key)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src, dtype=pick_dtype(dtype, device), trust_remote_code=trust_remote_code, **extra)
    except ImportError as e:
        if extra.get("gguf_file"):
            raise ConfigError(f"{key}: loading a GGUF file needs the gguf package ({e}). Install it with: pip "
                              "install 'poise[gguf]'.") from None
        raise ConfigError(f"{key}: loading {name!r} needs a package that is not installed ({e}).") from None
    except Exception as e:  # OSError, SafetensorError, ValueError (unknown architecture), size mismatches
        raise ConfigError(f"{key}: could not load {name!r} ({type(e).__name__}: {e}). Give a folder written by "
                          "save_pretrained, a .gguf file, or a Hub name (with a network).") from None
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


#: A string with words, punctuation, digits, accents, CJK, an emoji and whitespace runs: two tokenizers
#: that give it the same ids agree on ordinary text.
PROBE_TEXT = "Hello, world! The quick brown fox: 1234 naïve café 東京 🙂\n  indented\tend."


def tokenizer_differences(a, b) -> list[str]:
    """How two tokenizers differ in what the model sees: vocabulary size, the ids of a probe string, and
    the BOS/EOS/PAD ids (empty when they agree)."""
    out = []
    if len(a) != len(b):
        out.append(f"vocabulary of {len(a)} vs {len(b)} tokens")
    ia, ib = a.encode(PROBE_TEXT, add_special_tokens=False), b.encode(PROBE_TEXT, add_special_tokens=False)
    if ia != ib:
        out.append(f"{PROBE_TEXT[:12]!r}... encodes as {ia[:6]} vs {ib[:6]}")
    for name in ("bos", "eos", "pad"):
        x, y = getattr(a, f"{name}_token_id", None), getattr(b, f"{name}_token_id", None)
        if x != y:
            out.append(f"{name} token id {x} vs {y}")
    return out


def check_reference_tokenizer(policy_tok, ref_tok, *, model: str, reference: str) -> None:
    """The reference scores the policy's token ids: its tokenizer must be the policy's."""
    diffs = tokenizer_differences(policy_tok, ref_tok)
    if diffs:
        raise ConfigError(
            f"reference_model: {reference} has another tokenizer than the policy {model} ({'; '.join(diffs)}), so "
            "it would score other tokens than the policy sees. Fix: set reference_model to a checkpoint of the "
            "same model (usually the one the policy was fine-tuned from), or remove reference_model to use the "
            "initial policy as the reference.")


def config_vocab_size(folder: str | Path) -> int | None:
    """vocab_size from a model folder's config.json (also under text_config), or None."""
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for d in (cfg, cfg.get("text_config") or {}):
        if isinstance(d, dict) and isinstance(d.get("vocab_size"), int):
            return d["vocab_size"]
    return None


def check_vocabulary_fits(tokenizer, rows: int | None, *, key: str, name: str, source: str = "") -> None:
    """Every token id of the tokenizer must have a row in the model's embedding (``rows``)."""
    if rows is not None and len(tokenizer) > rows:
        fix = ("use a reference_model of the same model as the policy, or remove reference_model"
               if key == "reference_model" else "use the model's own tokenizer (tokenizer:), or the model it belongs to")
        raise ConfigError(f"{key}: {name} has a vocabulary of {rows} tokens{source}, smaller than the tokenizer's "
                          f"{len(tokenizer)}: token ids above {rows - 1} would have no embedding. Fix: {fix}.")
