"""Face-quality scores: the file formats, and their join to the frame table when it loads (FPG's side
information): every sample carries its frame's score, a frame without one is an error naming it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from facedata.faces import build_loader, load_frame_table
from facedata.quality import load_quality_scores
from package_utils import metadata


def test_quality_file_formats(tmp_path):
    (tmp_path / "q.csv").write_text("image_path,score\nv0/000.png,45.5\nv1/000.png,20\n")
    assert load_quality_scores(tmp_path / "q.csv") == {"v0/000.png": 45.5, "v1/000.png": 20.0}
    (tmp_path / "q.json").write_text(json.dumps({"v0/000.png": 45.5, "v1/000.png": 20}))
    assert load_quality_scores(tmp_path / "q.json") == {"v0/000.png": 45.5, "v1/000.png": 20.0}
    (tmp_path / "bad.csv").write_text("path,quality\na,1\n")
    with pytest.raises(ValueError, match="image_path,score"):
        load_quality_scores(tmp_path / "bad.csv")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_quality_scores(tmp_path / "list.json")
    (tmp_path / "nan.json").write_text('{"v0/000.png": NaN}')  # Python's json reads it
    with pytest.raises(ValueError, match="'v0/000.png' is nan, not a finite number"):
        load_quality_scores(tmp_path / "nan.json")
    (tmp_path / "word.csv").write_text("image_path,score\nv0/000.png,high\n")
    with pytest.raises(ValueError, match="not a number"):
        load_quality_scores(tmp_path / "word.csv")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_quality_scores(tmp_path / "missing.json")


def test_the_table_joins_a_score_to_every_sample(face_metadata, tmp_path):
    paths = sorted({item["image_path"] for item in metadata.load(face_metadata)["data"]})
    scores = {path: 10.0 + i for i, path in enumerate(paths)}
    (tmp_path / "q.json").write_text(json.dumps(scores))
    table = load_frame_table(face_metadata, labels=(0,), quality_scores=tmp_path / "q.json")
    assert table.quality.dtype == np.float32
    assert table.quality.tolist() == [scores[item["image_path"]] for item in table.items]
    batch = next(iter(build_loader(table, image_size=64, batch_size=6, frames_per_video=2, train=True, seed=0,
                                   workers=0)))
    expected = [scores[table.items[i]["image_path"]] for i in batch["item"].tolist()]
    assert batch["quality"].tolist() == expected  # follows the shuffled items
    plain = load_frame_table(face_metadata, labels=(0,))
    assert plain.quality is None
    assert "quality" not in next(iter(build_loader(plain, image_size=64, batch_size=2, frames_per_video=1,
                                                   train=True, seed=0, workers=0)))


def test_a_frame_without_a_score_is_named_when_the_table_loads(face_metadata, tmp_path):
    table = load_frame_table(face_metadata, labels=(0,))
    missing = table.items[3]["image_path"]
    (tmp_path / "q.csv").write_text("image_path,score\n" + "".join(
        f"{item['image_path']},50\n" for item in table.items if item["image_path"] != missing))
    with pytest.raises(ValueError, match=f"no score for image {missing!r} of {face_metadata}"):
        load_frame_table(face_metadata, labels=(0,), quality_scores=tmp_path / "q.csv")
