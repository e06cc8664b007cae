"""scripts/crop.sh, landmarks.sh and partners.sh: one convention (caller_env.sh), paths from the caller's folder."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO_ROOT

STAGE_SCRIPTS = ("crop.sh", "landmarks.sh", "partners.sh")


def venv_ready() -> bool:
    """setup_env.sh installs the project when .venv lacks the stamp of this pyproject.toml (minutes, network)."""
    digest = hashlib.sha256((REPO_ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    return (REPO_ROOT / ".venv" / f".installed-{digest}").is_file()


def run_script(name: str, caller: Path, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return subprocess.run(["bash", str(REPO_ROOT / "scripts" / name), *args], cwd=caller, env=env,
                          capture_output=True, text=True, timeout=600)


def test_stage_scripts_share_the_caller_env_helper() -> None:
    for name in STAGE_SCRIPTS:
        lines = (REPO_ROOT / "scripts" / name).read_text().splitlines()
        sourced = [line for line in lines if line.startswith("source ")]
        assert sourced == ['source "$(dirname "${BASH_SOURCE[0]}")/caller_env.sh"'], name
        assert not any(line.startswith("cd ") for line in lines), f"{name} must not change folder"


@pytest.mark.skipif(not venv_ready(), reason="the project's .venv is not installed (scripts/setup_env.sh)")
def test_relative_paths_resolve_from_the_callers_folder(tmp_path: Path, media_dir: Path) -> None:
    """crop -> landmarks -> partners through the scripts, called from another folder with relative paths only."""
    caller = tmp_path / "elsewhere"
    for name in ("obama.jpg", "biden.jpg"):
        target = caller / "photos" / "real" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(media_dir / "photos/face_recognition" / name)
    steps = [
        ("crop.sh", "--input", "photos", "--dataset", "folder", "--split", "test", "--num-frames", "1",
         "--crop-size", "128", "--output", "crops", "--data-root", ".", "--backend", "sequential"),
        ("landmarks.sh", "--input", "crops/test", "--output", "meta/test_68.json", "--backend", "sequential"),
        ("partners.sh", "--input", "meta/test_68.json", "--output", "meta/test_bi.json", "--k", "1"),
    ]
    for name, *args in steps:
        result = run_script(name, caller, *args)
        assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
    index = json.loads((caller / "crops/test/crop_index.json").read_text())
    assert index["summary"]["ok"] == 2 and Path(index["data_root"]) == caller.resolve()
    document = json.loads((caller / "meta/test_bi.json").read_text())
    assert Path(document["data_root"]) == caller.resolve()
    assert [item["partner_status"] for item in document["data"]] == ["ok", "ok"]
    for leftover in ("crops", "meta", "photos"):  # nothing landed in the repository
        assert not (REPO_ROOT / leftover).exists()


@pytest.mark.skipif(not venv_ready(), reason="the project's .venv is not installed (scripts/setup_env.sh)")
def test_a_missing_relative_input_is_named_from_the_callers_folder(tmp_path: Path) -> None:
    result = run_script("landmarks.sh", tmp_path, "--input", "no_such_split")
    assert result.returncode == 2 and f"{tmp_path.resolve()}/no_such_split: no crop index" in result.stderr
