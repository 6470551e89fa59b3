#!/usr/bin/env bash
# Issue 15's GPU checks in one call, prepared for a session that is lent a GPU machine (which has PyTorch with CUDA,
# typer, rich, pandas, scipy, matplotlib, pytest and pytest-xdist, but not starfile, mrcfile or gemmi, and no network).
#
# Here, once:   bash benchmarks/device_prepare.sh   # the three missing packages as wheels in .whl/, ../shared/data in
#                                                   # .device_shared/ (both ignored by git; about 60 MB with the repo)
# Then:         run(command="bash benchmarks/device_check.sh", carry=[".whl", ".device_shared"], timeout_s=600)
# Parts:        bash benchmarks/device_check.sh [cryospin] [scale] [tests]   (default: all three, in that order)
#
# 1. cryospin: two epochs at 128 px on 50,000 simulated particles (the issue's figure: the paper's 82-100 s per epoch
#    on an A40; goal under 20 s on an H100-class GPU) with its peak GPU memory, and the same at 64 px / 10,000. The
#    benchmark reports the second epoch: the first also reads and prepares the particles and warms CUDA up.
# 2. scale: benchmarks/scale.py on 1 GPU (reconstruct, one refine iteration, one cryospin epoch at three counts).
# 3. tests: the suite with the commands' default --device auto, so every engine the tests run goes to CUDA (4 xdist
#    workers share the GPU; the device-parametrised tests run on cpu and cuda; the torchrun tests are left out: they
#    start 2 ranks, and one GPU cannot hold 2 nccl ranks). Verbose, so that a run cut short still names every test
#    that finished and how.
# The whole call keeps within DEVICE_CHECK_BUDGET seconds (default 560, under the device tool's 600-s limit per
# call): each part runs under its own limit, cut to what the budget has left, and a part with under 30 s left is
# skipped, so the summary at the end is always printed. Logs go to $OUT (the device tool brings them back) or
# ./device_out. The timing parts come first: they are the issue's done-means, and CI runs the tests on the CPU anyway.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
parts=${*:-cryospin scale tests}
budget=${DEVICE_CHECK_BUDGET:-560}
for part in $parts; do
    case $part in cryospin | scale | tests) ;; *) echo "device_check: unknown part '$part' (cryospin, scale, tests)"; exit 2 ;; esac
done

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
# Seconds a part may run: its own limit, or what the budget has left (less a margin for the summary), if smaller.
limit() { local left=$((budget - SECONDS - 10)); echo $((left < $1 ? left : $1)); }
for part in $parts; do
    start=$SECONDS
    case $part in
        cryospin) cap=$(limit 240) ;;
        scale) cap=$(limit 150) ;;
        tests) cap=$(limit 300) ;;
    esac
    if [ "$cap" -lt 30 ]; then
        summary+=("$part: skipped, ${cap} s of the ${budget}-s budget left")
        continue
    fi
    case $part in
        cryospin)
            timeout "$cap" python3 benchmarks/abinitio.py --method cryospin --device cuda --cases 64:10000 128:50000 \
                --epochs 2 --grid-orders 2 > "$OUT/cryospin.log" 2>&1
            rc=$?
            summary+=("cryospin two epochs: rc $rc")
            tail -4 "$OUT/cryospin.log"
            ;;
        scale)
            timeout "$cap" python3 benchmarks/scale.py --ranks 1 --box 32 --counts 10000,40000,160000 \
                --refine-counts 1000,4000,16000 --abinitio-counts 1000,4000,16000 > "$OUT/scale.log" 2>&1
            rc=$?
            summary+=("scale: rc $rc")
            tail -12 "$OUT/scale.log"
            ;;
        tests)
            workers=(-n 4)  # the device image has pytest-xdist; without it, one process
            python3 -c "import xdist" 2>/dev/null || workers=()
            OMP_NUM_THREADS=4 timeout "$cap" python3 -m pytest -v -p no:cacheprovider "${workers[@]}" \
                --ignore tests/test_distributed.py --durations 25 > "$OUT/tests.log" 2>&1
            rc=$?
            summary+=("tests: rc $rc, $(grep -cE ' PASSED ' "$OUT/tests.log") passed, $(grep -cE ' (FAILED|ERROR) ' \
                "$OUT/tests.log") failed or errors; $(grep -E '(passed|failed)' "$OUT/tests.log" | tail -1)")
            grep -E ' (FAILED|ERROR) ' "$OUT/tests.log" | head -20
            ;;
    esac
    summary[-1]+=" ($((SECONDS - start)) s, limit $cap s)"
done
printf '%s\n' "${summary[@]}"
