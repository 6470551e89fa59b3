#!/usr/bin/env bash
# Download, into .whl/, the wheels that benchmarks/device_check.sh installs on a lent GPU machine: the packages cryocli
# needs that its image lacks, for its Python (3.12), at the versions this checkout's .venv holds.
set -euo pipefail
cd "$(dirname "$0")/.."
versions=$(.venv/bin/python -c "
from importlib.metadata import version
print(' '.join(f'{n}=={version(n)}' for n in ('starfile', 'mrcfile', 'gemmi')))")
rm -rf .whl
# shellcheck disable=SC2086  # one argument per package
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $versions
ls .whl
