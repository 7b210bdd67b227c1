"""poise: preference optimization with balanced gradients.

Only re-exports. The maths (``Objective``, the loss and balancer tables) loads at once; ``train`` and
``evaluate`` load the trainer (transformers, accelerate) on first use, so that ``import poise.losses``
stays a torch-only import.
"""

from poise.compose import Objective, objective
from poise.errors import ConfigError, DataError, PoiseError
from poise.presets import PRESETS
from poise.types import ObjectiveOutput, PairLogps

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "Objective", "ObjectiveOutput", "PRESETS", "PairLogps",
           "PoiseError", "evaluate", "objective", "train", "__version__"]

_LAZY = {"train": "poise.api", "evaluate": "poise.api"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'poise' has no attribute {name!r}")
