#!/usr/bin/env bash
# The whole demo on the embedded demo data (5-9 minutes on 2 CPU cores, depending on what else runs): set up
# .venv if needed, build the demo videos under datasets_df/demo, crop -> landmarks -> partners
# (package_utils.demo), then make the SBI/BI test videos, train the tiny config, evaluate with the flip test
# and draw heatmaps (training.demo). Arguments go to training.demo, e.g. --reuse (keep the last demo model)
# or train.epochs=2; set FF_DATA_ROOT to build the demo data elsewhere.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
started=$SECONDS
python -m package_utils.demo
python -m training.demo "$@"
python -m training.demo_aigc   # NPR and LFM on AIGC-style image folders, per-generator table
echo "[demo.sh] total $((SECONDS - started)) s"
