#!/usr/bin/env bash
# python -m training.infer with the project's .venv; all arguments are passed on (--help lists them).
# Example: scripts/infer.sh --weights pretrained/runs/laanet_sbi/best.pth photo.jpg clip.mp4 --out processed_data/infer
set -euo pipefail
caller_dir=$PWD
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"  # changes into the repository
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cd "$caller_dir"  # relative INPUT and --out paths are the caller's
exec python -m training.infer "$@"
