"""poise: preference optimization with balanced gradients."""

from .api import evaluate, train
from .errors import ConfigError, DataError, PoiseError
from .objective import Objective, objective
from .presets import PRESETS
from .types import ObjectiveOutput, PairLogps

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "Objective", "ObjectiveOutput", "PRESETS", "PairLogps",
           "PoiseError", "evaluate", "objective", "train", "__version__"]
