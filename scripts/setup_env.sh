#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project into it; sourced by the other scripts.
# Re-installs only when pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON_BIN=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON_BIN --version)"
  "$PYTHON_BIN" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing the project and its dependencies (first run: a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# Everything runs offline: no hub downloads, no update checks.
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
# Idle OpenMP threads sleep instead of spinning: on shared CPUs spinning made torch steps several times slower.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export PATH="$PWD/.venv/bin:$PATH"
