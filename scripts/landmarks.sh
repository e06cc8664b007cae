#!/usr/bin/env bash
# python -m package_utils.landmarks with the project's .venv; all arguments are passed on (--help lists them).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec python -m package_utils.landmarks "$@"
