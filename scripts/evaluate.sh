#!/usr/bin/env bash
# Evaluate weights on preprocessed test sets:
#   ./scripts/evaluate.sh --weights pretrained/runs/laanet_sbi/best.pth --test processed_data/test_cdf2_68.json --flip
set -euo pipefail
caller="$(pwd)"
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
repo="$(pwd)"
cd "$caller"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# Idle OpenMP threads sleep instead of spinning: on shared CPUs spinning made steps several times slower.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec python -m training.evaluate "$@"
