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
out="${2:-docs/results/nfe_study}"
# The recipe the study was measured with (configs/t2i.py: words without
# context, training times of logit-normal std 1.6, 1500 steps of 48, lr
# 1e-3, EMA decay 0.998) and its flow-matching twin.
python -m tim_jax.main --config=configs/t2i.py:tiny_b48_words --workdir="$runs/tim"
python -m tim_jax.main --config=configs/t2i.py:tiny_b48_words_fm --workdir="$runs/fm"
python -m tim_jax.commands.nfe_study --run=TiM="$runs/tim" --run=FM="$runs/fm" \
  --num_steps=1,2,4,8,16,32,64 --num_images=500 --out="$out"
