#!/usr/bin/env bash
# Issue 15's GPU checks in one call, prepared for a session that is lent a GPU machine (which has PyTorch with CUDA,
# typer, rich, pandas, scipy, matplotlib, pytest and pytest-xdist, but not starfile, mrcfile or gemmi, and no network).
#
# Here, once:   bash benchmarks/device_prepare.sh   # the three missing packages as wheels in .whl/, ../shared/data in
#                                                   # .device_shared/ (both ignored by git; about 60 MB with the repo)
# Then:         run(command="bash benchmarks/device_check.sh", carry=[".whl", ".device_shared"], timeout_s=600)
# Parts:        bash benchmarks/device_check.sh [tests] [cryospin] [scale]   (default: all three, about 8 minutes at most)
#
# 1. tests: the suite with --device auto, so every engine the tests run goes to CUDA (4 xdist workers share the GPU;
#    the torchrun tests are left out: they start 2 ranks, and one GPU cannot hold 2 nccl ranks).
# 2. cryospin: one epoch at 128 px on 50,000 simulated particles (the issue's figure: the paper's 82-100 s per epoch
#    on an A40; goal under 20 s on an H100-class GPU) with its peak GPU memory, and the same at 64 px / 10,000.
# 3. scale: benchmarks/scale.py on 1 GPU (reconstruct, one refine iteration, one cryospin epoch at three counts).
# Logs go to $OUT (the device tool brings them back) or ./device_out; each part has its own time limit, so the
# summary at the end is always printed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
parts=${*:-tests cryospin scale}

if ! python3 -c "import starfile, mrcfile, gemmi" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "device_check: no wheels in .whl/ (run benchmarks/device_prepare.sh here and carry .whl)"; exit 1; }
    export PYTHONPATH=/tmp/site
fi
# The tests read ../shared beside the repo, as CI does.
if [ ! -e ../shared ]; then
    [ -d .device_shared/data ] || { echo "device_check: no .device_shared/ (run benchmarks/device_prepare.sh, carry it)"; exit 1; }
    ln -s "$PWD/.device_shared" ../shared
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The shell-chain test runs the console script, as a user does.
mkdir -p /tmp/cryocli-bin && printf '#!/bin/sh\nexec python3 -m cryocli "$@"\n' > /tmp/cryocli-bin/cryocli
chmod +x /tmp/cryocli-bin/cryocli && export PATH=/tmp/cryocli-bin:$PATH

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nproc; } 2>&1 | tee "$OUT/machine.txt"

summary=()
for part in $parts; do
    start=$SECONDS
    case $part in
        tests)
            timeout 300 python3 -m pytest -q -p no:cacheprovider -n 4 --ignore tests/test_distributed.py \
                --durations 25 > "$OUT/tests.log" 2>&1
            rc=$?
            summary+=("tests: rc $rc, $(grep -E '(passed|failed)' "$OUT/tests.log" | tail -1)")
            grep -E '^(FAILED|ERROR)' "$OUT/tests.log" | head -20
            ;;
        cryospin)
            timeout 240 python3 benchmarks/abinitio.py --method cryospin --device cuda --cases 64:10000 128:50000 \
                --epochs 1 --grid-orders 2 > "$OUT/cryospin.log" 2>&1
            rc=$?
            summary+=("cryospin one epoch: rc $rc")
            tail -4 "$OUT/cryospin.log"
            ;;
        scale)
            timeout 150 python3 benchmarks/scale.py --ranks 1 --box 32 --counts 10000,40000,160000 \
                --refine-counts 1000,4000,16000 --abinitio-counts 1000,4000,16000 > "$OUT/scale.log" 2>&1
            rc=$?
            summary+=("scale: rc $rc")
            tail -12 "$OUT/scale.log"
            ;;
        *) echo "device_check: unknown part '$part' (tests, cryospin, scale)"; exit 2 ;;
    esac
    summary[-1]+=" ($((SECONDS - start)) s)"
done
printf '%s\n' "${summary[@]}"
