#!/usr/bin/env bash
# The whole demo on the embedded demo data (about 6-7 minutes on 2 idle CPU cores, more when other jobs share
# them): set up .venv if needed, build the demo videos under datasets_df/demo, crop -> landmarks -> partners
# (package_utils.demo), then make the SBI/BI test videos, train the tiny LAA-Net and the SBI baseline (one core
# each), evaluate both with the flip test and draw LAA-Net's heatmaps (training.demo). Arguments go to
# training.demo, e.g. --reuse (keep the last demo models), --no-baseline or train.epochs=2 (LAA-Net); set
# FF_DATA_ROOT to build the demo data elsewhere.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
started=$SECONDS
python -m package_utils.demo
python -m training.demo "$@"
python -m training.demo_aigc   # NPR and LFM on AIGC-style image folders, per-generator table
echo "[demo.sh] total $((SECONDS - started)) s"
