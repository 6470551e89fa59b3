#!/usr/bin/env bash
# Set up .venv if needed and run the whole test suite (reads ../shared/data beside the repo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Lint and type-check the library (configured in pyproject.toml), then the tests.
.venv/bin/ruff check cryocli benchmarks
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
