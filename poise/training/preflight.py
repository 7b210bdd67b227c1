"""Every check of a run's inputs that needs no model weights, in one place: ``poise validate`` runs them,
and ``poise train`` runs them before it loads the model and before the run folder exists.

Cheapest first: the logging packages of ``report_to``; the model, tokenizer and reference paths (a
local-looking path that does not exist, a file instead of a folder, a folder without config.json, a
damaged .safetensors header, a folder without tokenizer files, a GGUF without the gguf package); the
data files (readable, one format per file, at least ``batch_size`` rows); the folders that will be
written (``output_dir``, and ``cache_dir`` when reference log-probs are cached); then, with the
tokenizer (loaded without the model), the reference's tokenizer against the policy's, the vocabulary
sizes in the config.json files, and the data tokenized: bad rows, rows all cut by ``max_length``,
``batch_size`` against the usable pairs, and the probe file.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import netrc
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from poise.data import Row, load_rows, tokenize_rows
from poise.data.formats import CONVERSATIONAL, check_one_format
from poise.data.load import hub_dataset_name
from poise.data.tokenize import TokenizedData, tokenize_completions
from poise.errors import ConfigError, DataError
from poise.model.load import (
    check_reference_tokenizer,
    check_vocabulary_fits,
    check_weight_files,
    config_vocab_size,
    has_tokenizer_files,
    hub_access,
    hub_offline,
    load_tokenizer,
    missing_tokenizer,
    require_gguf,
    resolve_source,
)
from poise.training.config import TrainConfig

log = logging.getLogger("poise")

#: The optional extra that installs both logging back ends.
LOGGING_EXTRA = "pip install 'poise[logging]'"


@dataclass
class Inputs:
    """What the checks loaded, for the run to reuse: the tokenizer and the tokenized data (None where
    a check could not run without the network), and notes for ``poise validate`` to print."""

    tokenizer: Any = None
    train: TokenizedData | None = None
    train_rows: list[Row] = field(default_factory=list)
    eval: TokenizedData | None = None
    probe: list[tuple[tuple[int, ...], tuple[int, ...]]] | None = None
    notes: list[str] = field(default_factory=list)


def check_inputs(cfg: TrainConfig, *, network: bool = True, tokenize: bool = True) -> Inputs:
    """Run every check that needs no model weights. ``network=False`` (``poise validate``) never asks the
    Hub: a Hub model name is checked against the local cache only when the Hub is offline, and a Hub
    model or dataset name is noted instead of fetched."""
    out = Inputs()
    objective = cfg.build_objective()
    check_report_to(cfg)
    hub = _check_model_sources(cfg, network, out.notes)
    rows = _read_data(cfg, network, out.notes)
    out.train_rows = rows.get("train", [])
    _check_folders(cfg, objective)
    if not tokenize or "train" not in rows:
        return out
    if not hub["tokenizer"]:
        out.notes.append(f"tokenizer {cfg.tokenizer or cfg.model}: a Hugging Face Hub name, not fetched by validate; "
                         "the data is tokenized when training starts")
        return out
    out.tokenizer = _tokenizer(cfg)
    if cfg.reference_model and objective is not None and objective.needs_reference and hub["reference_model"]:
        _check_reference(cfg, out.tokenizer)
    _check_vocabulary(cfg, out.tokenizer)
    _tokenize_all(cfg, out, rows)
    return out


def _tokenize_all(cfg: TrainConfig, out: Inputs, rows: dict[str, list[Row]]) -> None:
    out.train = _tokenize(cfg, out.tokenizer, rows["train"], cfg.train_file)
    _check_batch(cfg, len(out.train), f"usable pairs in {cfg.train_file} ({out.train.summary()})")
    out.notes.append(f"{cfg.train_file}: {out.train.summary()}")
    if "eval" in rows and cfg.stage != "sft":
        out.eval = _tokenize(cfg, out.tokenizer, rows["eval"], cfg.eval_file)
        out.notes.append(f"{cfg.eval_file}: {out.eval.summary()}")
    if "probe" in rows and cfg.diagnostics and cfg.stage != "sft":
        chat = check_one_format(rows["train"]) == CONVERSATIONAL
        out.probe = tokenize_completions(rows["probe"], out.tokenizer, max_length=cfg.max_length,
                                         max_prompt_length=cfg.max_prompt_length, chat=chat,
                                         on_bad_row=cfg.on_bad_row)


# -- report_to -----------------------------------------------------------------------------------------
def check_report_to(cfg: TrainConfig) -> None:
    """Each logging back end asked for is installed (and W&B can start without a prompt)."""
    for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if name in cfg.report_to and importlib.util.find_spec(module) is None:
            raise ConfigError(f"report_to: {name} is asked for, but the {module} package is not installed. "
                              f"Install the logging extra ({LOGGING_EXTRA}, or pip install {module}), or remove "
                              f"{name} from report_to (metrics.jsonl is always written).")
    if "wandb" in cfg.report_to and not _wandb_can_start():
        raise ConfigError("report_to: wandb is asked for, but W&B has no API key here and cannot ask for one (no "
                          "terminal). Log in once with `wandb login` (or set WANDB_API_KEY), or log offline with "
                          "WANDB_MODE=offline (upload later with `wandb sync`).")


def _wandb_can_start() -> bool:
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return True
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    if sys.stdin is not None and sys.stdin.isatty():
        return True  # W&B asks for the key itself
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


# -- model, tokenizer and reference paths --------------------------------------------------------------
def _check_model_sources(cfg: TrainConfig, network: bool, notes: list[str]) -> dict[str, bool]:
    """Resolve model, tokenizer and reference_model; returns, per key, whether its tokenizer can be loaded
    now (a local folder or file, or a Hub name that is cached or checked)."""
    ok = {"model": _check_source(cfg.model, cfg.gguf_file, "model", network, notes, weights=True)}
    if cfg.tokenizer:
        ok["tokenizer"] = _check_source(cfg.tokenizer, cfg.gguf_file if cfg.tokenizer == cfg.model else None,
                                        "tokenizer", network, notes, weights=False)
    else:
        ok["tokenizer"] = ok["model"]
    src, extra = resolve_source(cfg.tokenizer or cfg.model, cfg.gguf_file, key="tokenizer" if cfg.tokenizer else "model")
    if Path(src).is_dir() and not extra.get("gguf_file") and not has_tokenizer_files(Path(src)):
        raise missing_tokenizer(Path(src), "tokenizer" if cfg.tokenizer else "model")
    ok["reference_model"] = False
    if cfg.reference_model and cfg.stage != "sft":
        ok["reference_model"] = _check_source(cfg.reference_model, None, "reference_model", network, notes,
                                              weights=True)
    return ok


def _check_source(name: str, gguf_file: str | None, key: str, network: bool, notes: list[str], *,
                  weights: bool) -> bool:
    src, extra = resolve_source(name, gguf_file, key=key)  # a missing local path or a file fails here
    if extra.get("gguf_file"):
        require_gguf(key)
    if Path(src).is_dir():
        if weights and not extra.get("gguf_file") and not (Path(src) / "adapter_config.json").is_file():
            check_weight_files(Path(src), key)
        return True
    if network:
        hub_access(src, key=key, gguf_file=extra.get("gguf_file"))
        return True
    if hub_offline():
        hub_access(src, key=key, gguf_file=extra.get("gguf_file"))  # the cache only: no request
        return True
    notes.append(f"{key} {name}: not a local folder; taken as a Hugging Face Hub name (fetched when training)")
    return False


# -- data files ------------------------------------------------------------------------------------------
def _read_data(cfg: TrainConfig, network: bool, notes: list[str]) -> dict[str, list[Row]]:
    columns = cfg.columns or None
    files = {"train": ("train_file", cfg.train_file), "eval": ("eval_file", cfg.eval_file),
             "probe": ("probe_file", cfg.probe_file if cfg.stage != "sft" else None)}
    rows: dict[str, list[Row]] = {}
    for what, (key, path) in files.items():
        if not path:
            continue
        if not network and hub_dataset_name(path):
            notes.append(f"{key} {path}: not a local file; taken as a Hugging Face Hub dataset (fetched when "
                         "training)")
            continue
        if what == "probe":
            rows[what] = _probe_rows(path)
            continue
        rows[what] = _rows(key, path, split=cfg.split, columns=columns)
        check_one_format(rows[what])
        if what == "train":
            _check_batch(cfg, len(rows[what]), f"rows in {path}")
    return rows


def _rows(key: str, path: str, **kw: Any) -> list[Row]:
    """load_rows, with a problem of the file as a whole (missing, empty, unreadable) naming the key."""
    try:
        return load_rows(path, **kw)
    except DataError as e:
        raise DataError(f"{key}: {e}") from None


def _probe_rows(path: str) -> list[Row]:
    """The probe file's rows: prompt/response rows, so no ``chosen``/``rejected`` columns are required."""
    rows = _rows("probe_file", path, required=())
    first = rows[0]
    if not any(k in first.data for k in ("completion", "response", "messages", "chosen")):
        found = ", ".join(f"'{k}'" for k in first.data) or "none"
        raise DataError(f"{first.where}: a probe row needs a prompt and a response: {{prompt, completion}} (or "
                        "response), {messages: [...]} ending with the assistant's reply, or a preference row "
                        f"{{prompt, chosen, rejected}} (its chosen is used); found the fields {found}.")
    return rows


def _check_batch(cfg: TrainConfig, n: int, what: str) -> None:
    if cfg.stage == "sft" and cfg.extended_sft:
        n *= 2
    if n < cfg.batch_size:
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than the training data: {n} {what}. Lower "
                          f"batch_size (and micro_batch_size) to at most {n}, or give more data.")


# -- folders that will be written ------------------------------------------------------------------------
def _check_folders(cfg: TrainConfig, objective) -> None:
    check_writable(cfg.output_dir, "output_dir")
    if objective is not None and objective.needs_reference and cfg.precompute_reference:
        check_writable(cfg.cache_dir, "cache_dir")


def check_writable(folder: str, key: str) -> None:
    """``folder`` is, or can be created as, a folder this process can write (probed with an unnamed
    temporary file in the nearest existing folder, which leaves nothing behind)."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file, not a folder. Choose a folder path for {key}.")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: {path} cannot be created: {existing} is a file. Choose another {key}.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        what = "is not writable" if existing == path else f"cannot be created ({existing} is not writable)"
        raise ConfigError(f"{key}: {path} {what}: {e.strerror or e}. Choose a folder you can write (e.g. "
                          f"{key}: ./{Path(folder).name or key}) or fix its permissions.") from None


# -- with the tokenizer ----------------------------------------------------------------------------------
def _tokenizer(cfg: TrainConfig):
    return load_tokenizer(cfg.tokenizer or cfg.model, gguf_file=cfg.gguf_file, trust_remote_code=cfg.trust_remote_code,
                          tokenizer_class=cfg.tokenizer_class, key="tokenizer" if cfg.tokenizer else "model")


def _check_reference(cfg: TrainConfig, tokenizer) -> None:
    src, _ = resolve_source(cfg.reference_model, None, key="reference_model")
    if Path(src).is_dir() and not has_tokenizer_files(Path(src)):
        return  # nothing to compare with: the vocabulary size is checked below and after loading
    ref_tok = load_tokenizer(cfg.reference_model, trust_remote_code=cfg.trust_remote_code, key="reference_model")
    check_reference_tokenizer(tokenizer, ref_tok, model=cfg.model, reference=cfg.reference_model)


def _check_vocabulary(cfg: TrainConfig, tokenizer) -> None:
    for key, name in (("model", cfg.model), ("reference_model", cfg.reference_model)):
        if not name or (key == "reference_model" and cfg.stage == "sft"):
            continue
        src, extra = resolve_source(name, cfg.gguf_file if key == "model" else None, key=key)
        if Path(src).is_dir() and not extra.get("gguf_file"):
            check_vocabulary_fits(tokenizer, config_vocab_size(src), key=key, name=name,
                                  source=" (vocab_size in its config.json)")


def _tokenize(cfg: TrainConfig, tokenizer, rows: list[Row], path: str) -> TokenizedData:
    data = tokenize_rows(rows, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                         prompt_truncation=cfg.prompt_truncation, on_bad_row=cfg.on_bad_row)
    n = len(data)
    cut = max(data.truncated, data.prompt_truncated)
    if n and data.truncated == n:
        need = 2 ** math.ceil(math.log2(max(data.longest, 2)))
        raise DataError(f"{path}: every one of the {n} rows was cut to max_length={cfg.max_length} tokens (the "
                        f"longest row has {data.longest}): the completions lose their end and their EOS token, so "
                        f"training would teach cut-off answers. Raise max_length (e.g. max_length: {need}), or "
                        "shorten the data.")
    if n and data.prompt_truncated == n:
        raise DataError(f"{path}: every one of the {n} prompts was cut at its start to max_prompt_length="
                        f"{cfg.max_prompt_length} tokens. Raise max_prompt_length (and max_length, which holds the "
                        "prompt and the completion), or shorten the prompts.")
    if cut * 2 > n:
        log.warning("%s: %d of %d rows are cut to fit max_length=%d / max_prompt_length=%d; raise them to keep "
                    "whole rows", path, cut, n, cfg.max_length, cfg.max_prompt_length)
    return data
