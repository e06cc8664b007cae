#!/usr/bin/env bash
# GPU check (issue 13): the device paths a CPU-only machine cannot run (SBI/BI synthesis and LAA-Net targets,
# LAA-Net train steps in fp32/bf16/fp16, RetinaFace on onnxruntime's CUDA provider, a 2-GPU torchrun step)
# against the CPU path, in one table. ./benchmarks/gpu_check.sh [--device cuda:0] [--tiny]; see gpu_check.py.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/setup_env.sh"  # changes into the repository
exec python benchmarks/gpu_check.py "$@"
