"""Model cards and the Hugging Face Hub.

:func:`write_model_card` writes ``README.md`` into a run's final model folder (``RUN/model``): YAML
front matter the Hub reads (``library_name: transformers``, ``tags: [poise, dpo, <method>]``,
``base_model`` when the policy came from the Hub), the method with every resolved hyperparameter and
its papers, the data, the final metrics, how to load the model, and the full config to reproduce it.

:func:`push_to_hub` uploads a model folder with ``huggingface_hub``; nothing in poise calls it unless
the user does, and nothing else in poise opens a network connection for it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from poise import fsutil
from poise.errors import ConfigError
from poise.training.config import TrainConfig, dump_config
from poise.training.runfolder import read_changes

__all__ = ["model_card", "push_to_hub", "write_model_card"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FILE_SUFFIXES = (".gguf", ".jsonl", ".json", ".parquet", ".csv", ".safetensors", ".bin", ".yaml", ".yml")
_TRAINING_KEYS = ("learning_rate", "batch_size", "micro_batch_size", "epochs", "max_steps", "scheduler",
                  "warmup_ratio", "weight_decay", "max_grad_norm", "max_length", "max_prompt_length", "lora_r",
                  "mixed_precision", "seed")


def hub_name(source: str | None) -> str | None:
    """``source`` when it names a Hub repository (``org/name``), not a local file or folder."""
    if not source or Path(source).expanduser().exists() or source.lower().endswith(_FILE_SUFFIXES):
        return None
    return source if _HUB_ID.match(source) and "/" in source else None


def _front_matter(cfg: TrainConfig, tags: list[str]) -> str:
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": tags}
    base = hub_name(cfg.model)
    if base:
        meta["base_model"] = base
    data = hub_name(cfg.train_file)
    if data:
        meta["datasets"] = [data]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _method(cfg: TrainConfig) -> tuple[str, list[str], list[str], dict[str, Any]]:
    """(description, tags, papers, resolved hyperparameters) of the run's method."""
    obj = cfg.build_objective()
    if obj is None:
        kind = "extended SFT (chosen and rejected completions)" if cfg.extended_sft else "SFT"
        return kind, ["poise", "sft"], (["arXiv 2407.10490"] if cfg.extended_sft else []), {}
    parts = [f"loss `{obj.loss_spec.name}`"] + [f"balancer `{b.name}`" for b in obj.balancers]
    papers = [obj.loss_spec.paper] + [b.paper for b in obj.balancers]
    tags = list(dict.fromkeys(["poise", "dpo", cfg.method, *obj.balance]))
    return f"`{cfg.method}` ({', '.join(parts)})", tags, papers, dict(obj.hyperparameters)


def _calibrated(hp: dict[str, Any], calibrated: dict[str, Any], metrics: dict[str, float]) -> dict[str, Any]:
    """'auto' hyperparameters shown with the values the run resolved them to: what its calibration step
    decided (saved in the checkpoint and the resolved config.yaml), else its metrics."""
    out = dict(hp)
    for name, metric in (("gate_tau", "gate/tau"), ("gate_sharpness", "gate/sharpness")):
        value = calibrated.get(name, metrics.get(metric))
        if out.get(name) == "auto" and value is not None:
            out[name] = f"auto (calibrated: {value:.6g})"
    return out


def _table(rows: dict[str, Any], head: tuple[str, str]) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(v)} |" for k, v in rows.items()]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return "`null`" if value is None else str(value)


def _metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k in sorted(metrics):
        v = metrics[k]
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
        elif hasattr(v, "item") and getattr(v, "numel", lambda: 0)() == 1:
            out[k] = float(v.item())
    return out


def _data_section(cfg: TrainConfig, num_pairs: int | None) -> str:
    lines = [f"- Training data: `{cfg.train_file}`" + (f" ({num_pairs} preference pairs)" if num_pairs else "")]
    if cfg.eval_file:
        lines.append(f"- Held-out data: `{cfg.eval_file}`")
    if cfg.columns:
        lines.append(f"- Column mapping: `{cfg.columns}`")
    if cfg.reference_model:
        lines.append(f"- Reference: `{cfg.reference_model}`")
    else:
        lines.append("- Reference: the initial policy" + (" (the base model, adapters disabled)" if cfg.lora_r else ""))
    return "\n".join(lines)


def _usage(load_from: str) -> str:
    return (
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{load_from}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{load_from}")\n'
        'messages = [{"role": "user", "content": "Hello!"}]\n'
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",\n"
        "                                       return_dict=True)\n"
        "out = model.generate(**inputs, max_new_tokens=64)\n"
        "print(tokenizer.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))\n"
        "```\n\nWithout a chat template, encode the prompt with `tokenizer(prompt, return_tensors=\"pt\")`."
    )


def _changes_section(changes: list[dict[str, Any]]) -> str:
    """The config changes accepted when the run was resumed (config_changes.jsonl)."""
    lines = ["## Config changes during the run", "",
             "The run was resumed with a config that differs from the one it started with "
             "(`config_changes.jsonl` in the run folder); the config below is the last one.", "",
             "| from step | key | old | new | alters the trajectory |", "|---|---|---|---|---|"]
    lines += [f"| {c.get('step')} | `{c.get('key')}` | {_fmt(c.get('old'))} | {_fmt(c.get('new'))} | "
              f"{'yes' if c.get('alters_trajectory') else 'no'} |" for c in changes]
    return "\n".join(lines)


def model_card(cfg: TrainConfig, metrics: dict[str, Any], *, num_pairs: int | None = None,
               load_from: str = "path/to/model", calibrated: dict[str, Any] | None = None,
               changes: list[dict[str, Any]] | None = None) -> str:
    """The text of a run's model card (see the module docstring). ``calibrated``: the values the run's
    calibration step decided (``{"gate_tau": ...}``); ``changes``: the rows of the run's
    config_changes.jsonl (a section lists them when there are any)."""
    description, tags, papers, hp = _method(cfg)
    values = _metrics(metrics)
    hp = _calibrated(hp, calibrated or {}, values)
    sections = [
        _front_matter(cfg, tags),
        f"# {Path(cfg.output_dir).name or 'poise model'}\n\nTrained with poise (preference optimization with balanced gradients) from "
        f"`{cfg.model}` with {description}.",
        "## Method\n\n" + ("\n".join(f"- {p}" for p in papers) + "\n\n" if papers else "")
        + (_table(hp, ("hyperparameter", "value")) if hp else "No method hyperparameters (supervised fine-tuning)."),
        "## Training\n\n" + _table({k: getattr(cfg, k) for k in _TRAINING_KEYS}, ("setting", "value")),
        *([_changes_section(changes)] if changes else []),
        "## Data\n\n" + _data_section(cfg, num_pairs),
        "## Final metrics\n\n" + (_table(values, ("metric", "value")) if values else "None logged.")
        + "\n\nThe metrics are defined in poise's docs/metrics.md.",
        "## Use\n\n" + _usage(load_from),
        "## Reproduce\n\n`poise train config.yaml` with this config:\n\n```yaml\n" + dump_config(cfg) + "```",
    ]
    return "\n\n".join(s.strip("\n") for s in sections) + "\n"


def _num_pairs(run_dir: Path) -> int | None:
    """Training pairs from the run's data_summary.json ("kept N of M rows"), when it is there."""
    try:
        summary = json.loads((run_dir / "data_summary.json").read_text()).get("train", "")
    except (OSError, ValueError, AttributeError):
        return None
    m = re.match(r"kept (\d+) of", str(summary))
    return int(m.group(1)) if m else None


def write_model_card(run_dir: str | Path, cfg: TrainConfig, metrics: dict[str, Any], *,
                     repo_id: str | None = None, calibrated: dict[str, Any] | None = None) -> Path:
    """Write ``README.md`` into ``run_dir/model`` and return its path.

    Args:
        run_dir: the run folder; its ``model/`` holds the final model.
        cfg: the run's config.
        metrics: final metrics (``TrainResult.metrics``); numeric values are tabulated.
        repo_id: the Hub repository the card's loading example names; default the model folder.
        calibrated: what the run's calibration step decided (``{"gate_tau": ...}``).
    """
    model_dir = Path(run_dir) / "model"
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir} does not exist: write the model card after the final model is saved.")
    text = model_card(cfg, metrics, num_pairs=_num_pairs(Path(run_dir)),
                      load_from=repo_id or str(model_dir.resolve()), calibrated=calibrated,
                      changes=read_changes(run_dir))
    path = model_dir / "README.md"
    fsutil.atomic_write_text(path, text)
    return path


def push_to_hub(model_dir: str | Path, repo_id: str, token: str | None = None, *, private: bool | None = None,
                commit_message: str = "Upload a model trained with poise") -> Any:
    """Upload ``model_dir`` to the Hub repository ``repo_id`` (created if needed); returns the commit
    info of ``huggingface_hub.HfApi.upload_folder``.

    The model card's loading example, written with the local folder, is pointed at ``repo_id`` first.
    ``token`` defaults to the one ``huggingface_hub`` finds (``HF_TOKEN`` or ``hf auth login``).
    """
    from huggingface_hub import HfApi

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir} is not a model folder (no config.json); pass RUN_DIR/model.")
    card = model_dir / "README.md"
    if card.is_file():
        card.write_text(card.read_text().replace(f'"{model_dir.resolve()}"', f'"{repo_id}"'))
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(folder_path=str(model_dir), repo_id=repo_id, repo_type="model",
                             commit_message=commit_message)
