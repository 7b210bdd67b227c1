"""The ``poise`` command line. Each subcommand is a small function; errors of poise are printed as one
paragraph without a traceback (``--debug`` shows it)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import PoiseError


def cmd_ls(args: argparse.Namespace) -> int:
    """List every loss, balancer and preset, one line each, with its paper."""
    from .balance import BALANCERS
    from .losses import LOSSES
    from .presets import PRESETS

    def table(title: str, rows: list[tuple[str, str, str]]) -> None:
        print(title)
        for name, summary, paper in rows:
            print(f"  {name:<14} {summary}  [{paper}]")
        print()

    table("losses (poise.Objective(loss=NAME)):", [
        (s.name + ("" if s.needs_reference else "*"), s.summary, s.paper) for s in LOSSES.values()])
    table("balancers (poise.Objective(loss=..., balance=[NAME])):",
          [(b.name, b.summary, b.paper) for b in BALANCERS.values()])
    table("presets (poise.objective(NAME)):", [
        (p.name, f"{p.loss} + {' + '.join(p.balance)}: {p.summary}", p.paper) for p in PRESETS.values()])
    print("* reference-free")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "ls": (cmd_ls, "list every loss, balancer and preset with its paper"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poise", description="Preference optimization with balanced gradients.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][0](args)
    except PoiseError as e:
        if args.debug:
            raise
        print(f"poise: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
