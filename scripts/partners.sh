#!/usr/bin/env bash
# Stage 5 (BI): exact blend-partner search. Runs from the repo root (relative paths start there); the
# arguments go to python -m package_utils.partners, e.g.
#   scripts/partners.sh --input processed_data/train.json --output processed_data/train_bi.json --k 30 --laa-paths
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
else
    PYTHON=python3
fi
exec "$PYTHON" -m package_utils.partners "$@"
