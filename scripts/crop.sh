#!/usr/bin/env bash
# Stage 1: python -m package_utils.crop with the project's .venv; all arguments are passed on (--help lists
# them) and relative paths resolve from the caller's folder, e.g.
#   scripts/crop.sh --input datasets_df/FaceForensics++ --dataset ff --split train --output datasets_df/processed/ff_c23
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/caller_env.sh"
exec python -m package_utils.crop "$@"
