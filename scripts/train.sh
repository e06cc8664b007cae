#!/usr/bin/env bash
# Train a detector: ./scripts/train.sh --config configs/laanet_sbi.yaml [key=value ...]
# Several GPUs: NPROC=4 ./scripts/train.sh --config ... (runs torchrun with one process per GPU).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/caller_env.sh"
if [[ "${NPROC:-1}" -gt 1 ]]; then
  exec torchrun --standalone --nproc_per_node "$NPROC" -m training.train "$@"
fi
exec python -m training.train "$@"
