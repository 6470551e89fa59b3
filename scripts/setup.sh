#!/usr/bin/env bash
# Create (or reuse) the local virtualenv .venv and install cryocli with its test extra.
# torch is pinned first: on a CPU machine `pip install torch==2.13.0` takes the CPU build,
# while an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CRYOCLI_VENV:-.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi
stamp="$VENV/.cryocli-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    touch "$stamp"
fi
