#!/usr/bin/env bash
# Runs tim_jax on every worker of a Cloud TPU VM (single host or pod slice).
#
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]
#
# e.g. launch/tpu_vm.sh my-v5p-64 us-east5-a configs/c2i.py:xl2_256 \
#        gs://bucket/runs/xl2 --config.data.data_dir=gs://bucket/latents
#
# Copies this checkout to each worker, installs it with the TPU extra, and
# starts the trainer on all workers at once (jax.distributed joins them).
# WORKDIR must be visible to every worker (a GCS bucket or a shared disk).
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,12p' "$0"; exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4; shift 4
case "$workdir" in
  gs://*|/*) ;;
  *) echo "WORKDIR must be shared by every worker: gs://... or an absolute" \
          "path on a shared disk, got '$workdir'" >&2; exit 2 ;;
esac
here=$(cd "$(dirname "$0")/.." && pwd)
archive=$(mktemp -d)/tim_jax.tar.gz
tar -C "$here" --exclude=.git -czf "$archive" .
gcloud compute tpus tpu-vm scp "$archive" "$tpu":tim_jax.tar.gz \
  --zone="$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e
  mkdir -p tim_jax && tar -xzf tim_jax.tar.gz -C tim_jax && cd tim_jax
  python3 -m pip install -q -e '.[tpu]'
  python3 -m tim_jax.main --distributed --config=$config --workdir=$workdir $*
"
