#!/usr/bin/env bash
# Sourced by every script that runs a stage or a tool (crop, landmarks, partners, train, evaluate, infer): set
# up .venv (setup_env.sh), then return to the caller's folder, so relative paths on the command line resolve
# from where the script was called, with the project importable from anywhere.
caller_dir=$PWD
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"  # changes into the repository
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
cd "$caller_dir"
