"""The Python API of the trainer: ``poise.train`` and ``poise.evaluate``.

    import poise
    result = poise.train("configs/adadpo.yaml", model="path/to/model", train_file="prefs.jsonl")
    result = poise.train({"model": "...", "train_file": "...", "method": "gate-dpo", "max_steps": 100})
    print(result.model_dir, result.metrics["rewards/margins"])
    scores = poise.evaluate(result.run_dir, eval_file="heldout.jsonl")

They are the ``poise train`` and ``poise eval`` commands as functions: the same validated config (every
key checked before any model is loaded; a bad key is a :class:`poise.ConfigError`), the same loop, the
same run folder. Keyword overrides are Python values (``beta=0.05``, ``balance=["gate"]``), not the
command line's ``key=value`` strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from poise.errors import ConfigError
from poise.eval.run import evaluate_run
from poise.training.config import TrainConfig, from_dict, load_config

if TYPE_CHECKING:
    from poise.training.loop import TrainResult

__all__ = ["evaluate", "resolve_config", "train"]


def resolve_config(config: dict[str, Any] | str | Path | TrainConfig, **overrides: Any) -> TrainConfig:
    """The validated :class:`~poise.training.config.TrainConfig` that :func:`train` would run.

    Args:
        config: a mapping of config keys (as in the YAML files), the path of a YAML config, or a
            ``TrainConfig``.
        **overrides: config keys that replace the config's values (Python values).

    Raises:
        ConfigError: an unknown key, a wrong type or value, a hyperparameter the method does not take,
            or a missing config file.
    """
    if isinstance(config, TrainConfig):
        raw, source = config.to_dict(), "config"
    elif isinstance(config, (str, Path)):
        if not overrides:
            return load_config(config)
        raw, source = load_config(config).to_dict(), str(config)
    elif isinstance(config, dict):
        raw, source = dict(config), "config"
    else:
        raise ConfigError(f"a config is a dict, the path of a YAML file or a TrainConfig, got {type(config).__name__}.")
    raw.update(overrides)
    return from_dict(raw, source=source)


def train(config: dict[str, Any] | str | Path | TrainConfig, /, **overrides: Any) -> TrainResult:
    """Train as ``poise train`` does and return where the results are.

    Args:
        config: a mapping of config keys, the path of a YAML config, or a ``TrainConfig``
            (``poise train --help`` and docs/config.md list every key).
        **overrides: config keys that replace the config's values, e.g. ``beta=0.05``, ``max_steps=10``.

    Returns:
        A :class:`~poise.training.loop.TrainResult`: ``run_dir`` (the run folder: ``metrics.jsonl``,
        ``config.yaml``, checkpoints), ``model_dir`` (the trained model in Hugging Face format),
        ``steps`` (optimizer steps taken), ``metrics`` (the last step's metrics, and the ``eval/*``
        metrics of ``eval_file`` when given; plain floats) and ``stopped_early`` (stopped by a signal).

    Raises:
        ConfigError: the config is invalid (nothing is loaded or written then).
        DataError: a bad row in the data (with ``on_bad_row: error``).
        NonFiniteError: a non-finite loss or gradient with ``on_nonfinite: stop``.
    """
    from poise.training.loop import train as run_training

    return run_training(resolve_config(config, **overrides))


def evaluate(run_dir: str | Path, *, eval_file: str | None = None, num_prompts: int = 64,
             max_new_tokens: int = 32, gold: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Evaluate a finished run folder as ``poise eval`` does; also writes ``eval.json`` there.

    Args:
        run_dir: a folder written by :func:`train` (``config.yaml`` and ``model/``).
        eval_file: held-out preference data; default the run's ``eval_file``.
        num_prompts: prompts used for generations and the KL estimate.
        max_new_tokens: length limit of the generations.
        gold: ``"testbed"`` to score the generations with the built-in task's gold reward, ``"instruct"``
            with the same task asked in plain English of an instruct model (:mod:`poise.testbed.instruct`).
        seed: seed of the sampled generations.

    Returns:
        A dict of plain values: ``eval/*`` (every metric of the run's objective on the held-out pairs),
        ``reward_accuracy``, ``margin``, ``kl_to_reference``, ``mean_length_tokens``, and with ``gold``
        the gold reward and win rates (docs/metrics.md defines each). Generations are written to
        ``generations.jsonl`` in the run folder.
    """
    return evaluate_run(run_dir, eval_file=eval_file, num_prompts=num_prompts, max_new_tokens=max_new_tokens,
                        gold=gold, seed=seed)
