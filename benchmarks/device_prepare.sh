#!/usr/bin/env bash
# Prepare, here, what benchmarks/device_check.sh needs on a lent GPU machine, where nothing can be fetched and only the
# repo travels (64 MiB in all): into .whl/ the wheels of the packages cryocli needs that the machine's image lacks, for
# its Python (3.12), at the versions this checkout's .venv holds; into .device_shared/ a copy of ../shared/data, which
# the tests read (the ../shared beside a checkout does not travel). Both folders are ignored by git; carry them.
set -euo pipefail
cd "$(dirname "$0")/.."
versions=$(.venv/bin/python -c "
from importlib.metadata import version
print(' '.join(f'{n}=={version(n)}' for n in ('starfile', 'mrcfile', 'gemmi')))")
rm -rf .whl .device_shared
# shellcheck disable=SC2086  # one argument per package
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $versions
mkdir -p .device_shared && cp -r ../shared/data .device_shared/
du -sh .whl .device_shared
