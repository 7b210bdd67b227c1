"""poise: preference optimization with balanced gradients.

Only re-exports, each loaded on first use: ``import poise`` itself loads nothing heavy (so the
command line can answer Ctrl-C with one line even while torch is still loading), and
``import poise.losses`` stays a torch-only import. ``train`` and ``evaluate`` load the trainer.
"""

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "Objective", "ObjectiveOutput", "PRESETS", "PairLogps",
           "PoiseError", "evaluate", "objective", "train", "__version__"]

_LAZY = {
    "ConfigError": "poise.errors", "DataError": "poise.errors", "PoiseError": "poise.errors",
    "Objective": "poise.compose", "objective": "poise.compose", "PRESETS": "poise.presets",
    "ObjectiveOutput": "poise.types", "PairLogps": "poise.types",
    "train": "poise.api", "evaluate": "poise.api",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'poise' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
