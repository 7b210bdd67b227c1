"""The tables of docs/methods.md, generated from the declarations that the code reads: the loss table,
each balancer's hyperparameters, AdaDPO's per-loss constructions and the presets. ``poise methods-docs``
rewrites the marked blocks of docs/methods.md; a test holds the file equal to what this module makes.

A block in the Markdown file is ``<!-- generated: NAME -->`` ... ``<!-- end generated -->``.
"""

from __future__ import annotations

import re

from poise.balance import BALANCERS
from poise.balance.ada import GRADIENT_ONLY, LOG_RATIO, TOKEN_FORM_ONLY
from poise.losses import LOSSES
from poise.params import Param
from poise.presets import PRESETS

__all__ = ["BLOCKS", "render", "update"]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _value(v) -> str:
    return "`null`" if v is None else f"`{v}`" if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)


def _defaults(params: tuple[Param, ...]) -> str:
    return ", ".join(f"{p.name} {_value(p.default)}" for p in params) or "none"


def losses_table() -> str:
    rows = ["| name | reference | term | per-pair loss | defaults | paper |", "|---|---|---|---|---|---|"]
    for s in LOSSES.values():
        rows.append(f"| `{s.name}` | {'yes' if s.needs_reference else 'no'} | {_cell(s.term.symbol)} | "
                    f"{_cell(s.equation)} | {_cell(_defaults(s.params))} | {_cell(s.paper)} |")
    return "\n".join(rows)


def params_table(name: str) -> str:
    rows = ["| option | default | range | meaning |", "|---|---|---|---|"]
    for p in BALANCERS[name].params:
        rows.append(f"| `{p.name}` | {_value(p.default)} | {_cell(p.range_text())} | {_cell(p.doc)} |")
    return "\n".join(rows)


def ada_constructions() -> str:
    rows = ["| base | kappa (policy space, token form) | applied to | sequence form |", "|---|---|---|---|"]
    for s in LOSSES.values():
        kappa = LOG_RATIO[s.name][1] if s.name in LOG_RATIO else "exp(A_w - A_l)"
        mode = "gradient-only" if s.name in GRADIENT_ONLY else "forward"
        rows.append(f"| `{s.name}` | {_cell(kappa)} | {mode} on the chosen {_cell(s.term.symbol)} | "
                    f"{'no (token form only)' if s.name in TOKEN_FORM_ONLY else 'yes'} |")
    return "\n".join(rows)


def presets_table() -> str:
    rows = ["| preset | = loss + balancers | paper |", "|---|---|---|"]
    for p in PRESETS.values():
        rows.append(f"| `{p.name}` | `{p.loss}` + {' + '.join(f'`{b}`' for b in p.balance)} | {_cell(p.paper)} |")
    return "\n".join(rows)


#: Every generated block of docs/methods.md by name.
BLOCKS = {
    "losses": losses_table,
    "presets": presets_table,
    "ada-options": lambda: params_table("ada"),
    "ada-constructions": ada_constructions,
    "gate-options": lambda: params_table("gate"),
    "balanced-options": lambda: params_table("balanced"),
    "dynbeta-options": lambda: params_table("dynbeta"),
}

_BLOCK = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def render(name: str) -> str:
    return BLOCKS[name]() + "\n"


def update(text: str) -> str:
    """``text`` with every generated block rewritten; an unknown block name is an error."""
    def sub(m: re.Match) -> str:
        if m.group(2) not in BLOCKS:
            raise KeyError(f"unknown generated block {m.group(2)!r}; known: {', '.join(BLOCKS)}")
        return m.group(1) + render(m.group(2)) + m.group(4)
    return _BLOCK.sub(sub, text)
