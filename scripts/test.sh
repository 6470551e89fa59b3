#!/usr/bin/env bash
# Set up .venv if needed and run the whole test suite (reads ../shared/data beside the repo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Lint and type-check the library (configured in pyproject.toml), then the tests.
.venv/bin/ruff check cryocli benchmarks
.venv/bin/mypy
# Two pytest-xdist workers of one thread each (tests/conftest.py), whole files per worker so that module fixtures
# are built once: on 2 cores 15 min against 20 min for one process of two threads (906 tests, 2026-12-07). Files go
# to the workers in collection order, which tests/conftest.py makes longest first (--no-loadscope-reorder).
# A later -n on the command line overrides it (-n 0: one process).
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder "$@"
