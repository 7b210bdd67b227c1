"""Run under torchrun by tests/training/test_engines.py: trains each config given, one after the other, in
one multi-process job (Python, torch and the process group start once for all of them). ``copy:SRC:DST``
between two configs copies the folder SRC to DST first (the main process; the others wait)."""

import shutil
import sys

import torch.distributed as dist

from poise.training.config import load_config
from poise.training.loop import train

if __name__ == "__main__":
    for arg in sys.argv[1:]:
        if arg.startswith("copy:"):
            _, src, dst = arg.split(":")
            if dist.get_rank() == 0:
                shutil.copytree(src, dst)
            dist.barrier()
        else:
            train(load_config(arg))
