"""The README's drop-in example runs as written, and its first screen gives the two commands."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    text = README.read_text()
    block = text.split("<!-- README example")[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1", "2"]


def test_first_screen_has_the_two_commands():
    first = "\n".join(README.read_text().splitlines()[:12])
    assert "bash scripts/setup.sh && .venv/bin/poise quickstart" in first
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest" in first
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest" in ci
