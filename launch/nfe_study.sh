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
# The recipe the study was measured with: words without context, training
# times of logit-normal std 1.6, 1500 steps of 48, lr 1e-3, EMA decay 0.998.
recipe=(--config.data.caption_context=0 --config.transport.params.P_std=1.6
        --config.batch_size=48 --config.optimizer.base_batch=48
        --config.num_steps=1500 --config.optimizer.warmup_steps=100
        --config.ema_decay=0.998 --config.optimizer.base_lr=1e-3)

python -m tim_jax.main --config=configs/t2i.py --workdir="$runs/tim" "${recipe[@]}"
python -m tim_jax.main --config=configs/t2i.py:tiny_fm --workdir="$runs/fm" "${recipe[@]}"
python -m tim_jax.eval.nfe_study --run=TiM="$runs/tim" --run=FM="$runs/fm" \
  --nfe=1,2,4,8,16,32,64 --num=500 --out="$out"
