#!/usr/bin/env bash
# Evaluate weights on preprocessed test sets:
#   ./scripts/evaluate.sh --weights pretrained/runs/laanet_sbi/best.pth --test processed_data/test_cdf2_68.json --flip
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/caller_env.sh"
exec python -m training.evaluate "$@"
