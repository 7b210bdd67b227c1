"""The command line: `poise ls` lists every loss, balancer and preset with its paper."""

import subprocess
import sys

from poise.balance import BALANCERS
from poise.cli import main
from poise.losses import LOSSES
from poise.presets import PRESETS


def test_ls_lists_everything(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    for name in list(LOSSES) + list(BALANCERS) + list(PRESETS):
        line = next(line for line in lines if line.strip().split()[0].rstrip("*") == name)
        assert "arXiv" in line or "note" in line, line


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "poise", "ls"], capture_output=True, text=True)
    assert out.returncode == 0 and "adadpo" in out.stdout
