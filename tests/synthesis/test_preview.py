"""The preview picture: one row per real face, five panels; bad input is one clear line, never a traceback."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

from synthesis import preview


def test_preview_draws_one_row_per_sample(face_metadata: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "preview.png"
    assert preview.main(["--json", str(face_metadata), "--out", str(out), "--samples", "2", "--size", "64"]) == 0
    picture = cv2.imread(str(out))
    assert picture.shape == (28 + 2 * 64, 5 * 64, 3)
    assert f"[preview] {out}" in capsys.readouterr().out


def bad_inputs(face_metadata: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, expected words of the one-line error)."""
    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [')
    document = json.loads(face_metadata.read_text())
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**document, "data": []}))
    fakes_only = tmp_path / "fakes_only.json"
    fakes_only.write_text(json.dumps({**document, "data": [dict(item, label=1) for item in document["data"]]}))
    wrong_partner = tmp_path / "wrong_partner.json"
    wrong_partner.write_text(json.dumps({**document, "data": [dict(item, partners=[-1]) for item in document["data"]]}))
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps({**document, "data_root": str(tmp_path / "nowhere")}))
    return {
        "missing file": ([str(tmp_path / "absent.json")], "absent.json: no such metadata file"),
        "bad JSON": ([str(broken)], "broken.json: not valid JSON"),
        "no items": ([str(empty)], "empty.json: no usable items"),
        "no reals": ([str(fakes_only)], "fakes_only.json: no usable items"),
        "negative partner": ([str(wrong_partner), "--method", "bi"], "item 0: key 'partners'"),
        "images gone": ([str(moved)], "nowhere"),
        "no samples": ([str(face_metadata), "--samples", "0"], "--samples must be >= 1"),
    }


@pytest.mark.parametrize("case", ["missing file", "bad JSON", "no items", "no reals", "negative partner",
                                  "images gone", "no samples"])
def test_bad_input_is_one_clear_line(face_metadata: Path, tmp_path: Path, capsys, case: str) -> None:
    arguments, words = bad_inputs(face_metadata, tmp_path)[case]
    out = tmp_path / "preview.png"
    # the case's own flags come last and win over the small defaults
    assert preview.main(["--out", str(out), "--samples", "2", "--size", "64", "--json", *arguments]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("[preview] error: ") and words in error[0], error
    assert not out.exists()
