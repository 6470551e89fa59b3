#!/usr/bin/env bash
# The main job on the bundled example: simulate adenylate kinase (PDB 4AKE) particles, reconstruct
# them at their true poses with gold-standard halves, postprocess as relion_postprocess, and score the
# result against the ground truth. Output goes to demo_out/ (replaced on every run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CRYOCLI=.venv/bin/cryocli
OUT=demo_out
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== simulate: 5,000 particles of 4AKE, 64 px at 1.8 A/px, SNR 0.1, CTF, 2 A shifts"
$CRYOCLI simulate cryocli/data/4ake_adk_open.pdb -o "$OUT/sim" -n 5000 --box 64 --apix 1.8 --snr 0.1 \
    --shift-sigma 2 --seed 1
$CRYOCLI info "$OUT/sim/particles.star"

echo "== reconstruct at the true poses, both half sets"
$CRYOCLI reconstruct "$OUT/sim/particles.star" -o "$OUT/rec/map.mrc" --halves

echo "== postprocess the half maps (auto mask, masked FSC, B-factor)"
$CRYOCLI postprocess "$OUT/rec/map_half1.mrc" "$OUT/rec/map_half2.mrc" --auto-mask -o "$OUT/post"

echo "== FSC of the full reconstruction against the ground truth"
$CRYOCLI fsc "$OUT/rec/map.mrc" "$OUT/sim/ground_truth.mrc" --plot "$OUT/fsc_vs_truth.png" -o "$OUT/fsc_vs_truth.star"
echo "Done: maps, STAR files and plots are in $OUT/"
