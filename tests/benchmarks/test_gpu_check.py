"""benchmarks/gpu_check.py on the CPU (--tiny, in a subprocess, from another folder): without CUDA it says so,
prints the CPU column of every row and exits 0; ``--device cpu`` runs every comparison (a dry run) and finds
everything equal."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
FIGURES = [
    "SBI valid fakes (CPU generator)", "SBI mask (CPU generator)", "SBI real (CPU generator)",
    "SBI fake (CPU generator)", "SBI fake (generator on the device)", "BI labels (jitter on)", "BI mask", "BI image",
    "targets heatmap (32 px)", "targets consistency (32 px)", "targets anchor",
    "LAA-Net step fp32: loss 1st / 2nd", "LAA-Net step fp32: s/step", "LAA-Net step bf16: loss 1st / 2nd",
    "LAA-Net step bf16: s/step", "LAA-Net step fp16: loss 1st / 2nd", "LAA-Net step fp16: s/step",
    "partner search laa (1500 faces, k=30)", "partner search l2 (1500 faces, k=30)",
    "RetinaFace (2008_001322.jpg): faces, mean score", "2-process DDP: loss 1st / 2nd (emulated 2nd)",
]


def run(tmp_path: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict[str, list[str]]]:
    # No GPU visible even on a GPU machine; the cwd is not the repository (the script finds its own root).
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", *options], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    rows = {}
    for line in done.stdout.splitlines():
        cells = [cell.strip() for cell in line.split(" | ")]
        if len(cells) == 4 and cells[0] != "figure":
            rows[cells[0]] = cells[1:]
    return done, rows


def test_without_cuda_it_says_so_prints_the_cpu_column_and_exits_0(tmp_path):
    done, rows = run(tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CUDA is not available on this machine: only the CPU column is measured" in done.stdout
    assert list(rows) == FIGURES, done.stdout
    for figure, (cpu, device, _) in rows.items():
        assert cpu and "error" not in cpu and "failed" not in cpu, figure
        assert device == "no CUDA", figure
    assert rows["SBI valid fakes (CPU generator)"][0] == "4 of 4"
    assert rows["RetinaFace (2008_001322.jpg): faces, mean score"][0].startswith("3 faces")
    # The gloo DDP run checks itself against a one-process emulation even without a GPU.
    assert rows["2-process DDP: loss 1st / 2nd (emulated 2nd)"][2].startswith("yes (cpu: ranks identical")


@pytest.mark.slow
def test_device_cpu_dry_run_compares_every_row_and_finds_it_equal(tmp_path):
    done, rows = run(tmp_path, "--device", "cpu")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "CUDA is not available" not in done.stdout
    assert list(rows) == FIGURES
    for figure, (cpu, device, equal) in rows.items():
        if figure.endswith("s/step"):
            assert equal.startswith("- (speed"), figure
        elif figure.startswith("2-process DDP"):
            assert device.startswith("skipped: --device cpu") and equal.startswith("yes"), figure
        else:  # the same path twice: identical cells, and the verdict says so
            assert device == cpu and equal.startswith("yes ("), (figure, device, equal)
