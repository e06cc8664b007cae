#!/usr/bin/env bash
# Blend partners (BI): python -m package_utils.partners (exact blend-partner search) with the project's .venv; all
# arguments are passed on (--help lists them) and relative paths resolve from the caller's folder, e.g.
#   scripts/partners.sh --input processed_data/train.json --output processed_data/train_bi.json --k 30 --laa-paths
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/caller_env.sh"
exec python -m package_utils.partners "$@"
