#!/usr/bin/env bash
# Set up .venv if needed, build the demo dataset under datasets_df/demo and run the pipeline on it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec python -m package_utils.demo "$@"
