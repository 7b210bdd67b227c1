"""Declared hyperparameters: one source for validation, defaults, CLI help and the generated docs.

Every loss and balancer declares its hyperparameters as :class:`Param` objects. A value is checked
when an objective is built, never during training: a wrong type or an out-of-range value is a
:class:`~poise.errors.ConfigError` that names the key, the value and the valid range.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from poise.errors import ConfigError

_NUM = (int, float)


@dataclass(frozen=True)
class Param:
    """One hyperparameter.

    Args:
        name: the flat keyword name (spec section 9).
        default: the default value.
        doc: one or two sentences: meaning, paper, when to change it.
        kind: "float", "int", "choice", "float|auto" (a number or the string "auto") or
            "float|none" (a number or None).
        low, high: bounds for numbers; ``low_open``/``high_open`` make them strict.
        choices: the allowed strings for kind "choice".
    """

    name: str
    default: Any
    doc: str
    kind: str = "float"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()

    def range_text(self) -> str:
        if self.kind == "choice":
            return " | ".join(repr(c) for c in self.choices)
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        text = f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"
        if self.kind == "float|auto":
            text = f"'auto' or a number in {text}"
        elif self.kind == "float|none":
            text = f"null or a number in {text}"
        return text

    def type_text(self) -> str:
        return {"float": "float", "int": "int", "choice": "str", "float|auto": "float | 'auto'",
                "float|none": "float | None"}[self.kind]

    def validate(self, value: Any, owner: str) -> Any:
        """Return the value (ints widened to float where a float is declared) or raise ConfigError."""
        if self.kind == "choice":
            if value not in self.choices:
                raise self._error(value, owner)
            return value
        if self.kind == "float|auto" and value == "auto":
            return value
        if self.kind == "float|none" and value is None:
            return value
        if isinstance(value, bool) or not isinstance(value, _NUM):
            raise self._error(value, owner)
        if self.kind == "int" and not float(value).is_integer():
            raise self._error(value, owner)
        if not math.isfinite(value) or not self._in_range(float(value)):
            raise self._error(value, owner)
        return int(value) if self.kind == "int" else float(value)

    def _in_range(self, v: float) -> bool:
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return not (self.high is not None and (v > self.high or (self.high_open and v == self.high)))

    def _error(self, value: Any, owner: str) -> ConfigError:
        return ConfigError(
            f"{self.name}={value!r} is not valid for {owner}: expected {self.type_text()} in "
            f"{self.range_text()}. {self.doc}"
        )


def suggest(name: str, candidates: Iterable[str]) -> str:
    """' Did you mean 'x'?' when a close match exists, else ''."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


NLL_WEIGHT = Param(
    "nll_weight", 0.0,
    "Weight of an added token-mean NLL of the chosen completions (RPO-style SFT mixing; 0 disables it).",
    low=0.0,
)


def beta_param(default: float = 0.1, doc: str | None = None) -> Param:
    return Param(
        "beta", default,
        doc or "Inverse temperature of the implicit reward beta*log(pi/pi_ref); larger keeps the policy "
        "closer to the reference.",
        low=0.0, low_open=True,
    )
