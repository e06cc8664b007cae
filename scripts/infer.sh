#!/usr/bin/env bash
# python -m training.infer with the project's .venv; all arguments are passed on (--help lists them).
# Example: scripts/infer.sh --weights pretrained/runs/laanet_sbi/best.pth photo.jpg clip.mp4 --out processed_data/infer
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/caller_env.sh"
exec python -m training.infer "$@"
