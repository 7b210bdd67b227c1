"""Every module imports (ruff's undefined-name check guards the rest), and the maths layers do not
pull in transformers, accelerate or the trainer."""

import importlib
import importlib.util
import pkgutil
import subprocess
import sys

import poise


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(poise.__path__, "poise.")]
    assert len(names) > 10
    for name in names:
        if name == "poise.__main__":
            continue
        if name == "poise.integrations.trl" and importlib.util.find_spec("trl") is None:
            continue  # optional extra; without TRL its import must fail with an install hint
        importlib.import_module(name)


def test_maths_layers_import_only_torch():
    code = ("import sys, poise.compose, poise.losses, poise.balance; "
            "bad = [m for m in ('transformers', 'accelerate', 'peft', 'datasets') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
