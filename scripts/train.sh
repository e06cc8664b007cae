#!/usr/bin/env bash
# Train a detector: ./scripts/train.sh --config configs/laanet_sbi.yaml [key=value ...]
# Several GPUs: NPROC=4 ./scripts/train.sh --config ... (runs torchrun with one process per GPU).
set -euo pipefail
caller="$(pwd)"
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
repo="$(pwd)"
cd "$caller"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# Idle OpenMP threads sleep instead of spinning: on shared CPUs spinning made steps several times slower.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
if [[ "${NPROC:-1}" -gt 1 ]]; then
  exec torchrun --standalone --nproc_per_node "$NPROC" -m training.train "$@"
fi
exec python -m training.train "$@"
