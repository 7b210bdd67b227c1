"""docs/methods.md's tables are generated from the declarations (run `poise methods-docs`)."""

from pathlib import Path

from poise.balance import BALANCERS
from poise.losses import LOSSES
from poise.methodsdoc import BLOCKS, render, update
from poise.presets import PRESETS

DOC = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


def test_docs_methods_md_is_what_the_declarations_make():
    text = DOC.read_text()
    assert update(text) == text, "docs/methods.md is stale: run `poise methods-docs`"
    for name in BLOCKS:
        assert f"<!-- generated: {name} -->" in text, name


def test_every_loss_balancer_option_and_preset_has_a_row():
    losses = render("losses")
    for s in LOSSES.values():
        assert f"| `{s.name}` |" in losses and s.paper in losses and s.equation.replace("|", "\\|") in losses
    for b in BALANCERS.values():
        block = render(f"{b.name}-options")
        assert all(f"| `{p.name}` |" in block for p in b.params)
    assert all(f"| `{p}` |" in render("presets") for p in PRESETS)
    assert all(f"| `{s}` |" in render("ada-constructions") for s in LOSSES)
