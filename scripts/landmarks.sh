#!/usr/bin/env bash
# Stage 2: python -m package_utils.landmarks with the project's .venv; all arguments are passed on (--help lists
# them) and relative paths resolve from the caller's folder, e.g.
#   scripts/landmarks.sh --input datasets_df/processed/ff_c23/train --output processed_data/train_ff_68.json
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/caller_env.sh"
exec python -m package_utils.landmarks "$@"
