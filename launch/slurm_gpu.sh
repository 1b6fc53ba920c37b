#!/usr/bin/env bash
# Runs tim_jax on a multi-node GPU cluster under SLURM: one process per node
# with all its GPUs; jax.distributed.initialize() reads the job from SLURM's
# environment.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh CONFIG WORKDIR \
#       [--config.KEY=VALUE ...]
#
# e.g. sbatch --nodes=2 launch/slurm_gpu.sh configs/c2i.py:xl2_256 \
#        /shared/runs/xl2 --config.data.data_dir=/shared/latents/in256
#
# This checkout, WORKDIR and the data must be on storage every node sees.
# Each node installs the checkout with the GPU extra (pip, once per node),
# then every node starts the same trainer command.
#
# Mesh and remat per card, from compiles for 8-card nodes
# (docs/results/benchmarks.md): FSDP over the 8 cards of a node, data
# across nodes: --config.mesh.fsdp=8 --config.mesh.data=-1, and
#   XL/2-256 and XL/1-512, 64 rows a card (H100, H200, A100 80 GB):
#     --config.model.remat=none (35-36 GiB a card);
#   T2I-XL, 64 rows a card: the config's remat=full (27 GiB a card);
#     dots_saveable does not fit even an H200;
#   T2I-XL, 256 rows a card (the paper's 2048 on one node): remat=full,
#     on H200 as is (89 GiB), on H100 with --config.microbatches=2 (52).
# JAX's allocator takes 90 % of each card (JAX's default: 75 %).
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,25p' "$0"; exit 2
fi
config=$1 workdir=$2; shift 2
case "$workdir" in
  /*|gs://*) ;;
  *) echo "WORKDIR must be an absolute path on shared storage (or gs://...)," \
          "got '$workdir'" >&2; exit 2 ;;
esac
here=$(cd "$(dirname "$0")/.." && pwd)
nodes=${SLURM_JOB_NUM_NODES:?run this inside a SLURM allocation (sbatch or salloc)}
python=${TIM_JAX_PYTHON:-python3}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
srun --nodes="$nodes" --ntasks-per-node=1 bash -c \
  "cd '$here' && $python -m pip install -q -e '.[gpu]'"
srun --nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  "$python" -m tim_jax.main --distributed --config="$config" \
  --workdir="$workdir" "$@"
