#!/usr/bin/env bash
# The NFE study of the README: trains the tiny text-to-image TiM and its
# flow-matching baseline (same network, data, batch and steps; every row a
# diffusion row) and scores both at 1..64 steps with the shapes oracle.
#
#   bash launch/nfe_study.sh [RUNS_DIR] [OUT_DIR]
#
# Re-running resumes finished or interrupted trainings from their
# checkpoints. On a 2-core CPU: about 15 minutes per training and 20 for the
# study.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-workdir/nfe_study}"
out="${2:-launch/nfe_study}"

python -m tim_jax.main --config=configs/t2i.py --workdir="$runs/tim" --config.data.caption_context=0
python -m tim_jax.main --config=configs/t2i.py:tiny_fm --workdir="$runs/fm" --config.data.caption_context=0
python -m tim_jax.eval.nfe_study --run=TiM="$runs/tim" --run=FM="$runs/fm" \
  --nfe=1,2,4,8,16,32,64 --num=500 --out="$out"
