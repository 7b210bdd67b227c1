#!/usr/bin/env bash
# Set up poise in a virtual environment (.venv, or $POISE_VENV) from this checkout's own files.
#
# torch: a torch that the Python already has (for example a CUDA build on a GPU machine) is kept and
# seen from the venv; otherwise torch==2.13.0 is installed first, which on a CPU machine is the CPU
# build (an unpinned `torch` would pull a multi-GB CUDA build). Extras: `bash scripts/setup.sh dev,trl`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${POISE_VENV:-.venv}
EXTRAS=${1:-dev}
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: keeping the torch of $PY ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[${EXTRAS}]"
python -c "import torch, poise; print(f'setup: poise {poise.__version__}, torch {torch.__version__}, venv $VENV')"
