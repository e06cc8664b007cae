"""Tests of the exact blend-partner search (package_utils.partners) against a brute-force Python loop."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from package_utils import metadata, partners
from package_utils.partners import find_partners, main

N_ITEMS, N_VIDEOS, N_POINTS = 60, 7, 68
# The compiled laa kernel costs ~15 s to build, too slow here; "auto" checks it against eager on every run and
# benchmarks/partners.py checks its results against brute force.
EAGER = {"laa_kernel": "eager"}


def brute_force(query: np.ndarray, query_video, candidates: np.ndarray, candidate_video, k: int, metric: str):
    """Reference: every pair by a Python loop, sorted by (distance, candidate index)."""
    indices = np.full((len(query), k), -1)
    distances = np.full((len(query), k), np.inf)
    for i, a in enumerate(query):
        scored = []
        for j, b in enumerate(candidates):
            if candidate_video[j] == query_video[i]:
                continue
            if metric == "l2":
                distance = float(np.sqrt(((a - b) ** 2).sum()))
            else:
                distance = float(sum(np.hypot(*(a[p] - b[p])) for p in range(len(a))))
            scored.append((distance, j))
        scored.sort()
        for rank, (distance, j) in enumerate(scored[:k]):
            indices[i, rank], distances[i, rank] = j, distance
    return indices, distances


def random_faces(n: int = N_ITEMS, videos: int = N_VIDEOS, points: int = N_POINTS, seed: int = 0):
    """Landmarks of n frames from ``videos`` videos: a face per video plus per-frame noise (pixels)."""
    rng = np.random.default_rng(seed)
    video = rng.integers(0, videos, n)
    per_video = rng.uniform(60, 200, (videos, points, 2))
    return per_video[video] + rng.normal(0, 4, (n, points, 2)), video


@pytest.mark.parametrize("metric", ["l2", "laa"])
def test_matches_brute_force_loop(metric):
    faces, video = random_faces()
    names = [f"ff/original/{v:03d}" for v in video]
    indices, distances = find_partners(faces, names, faces, names, k=12, metric=metric, **EAGER)
    want_i, want_d = brute_force(faces, video, faces, video, 12, metric)
    assert indices.dtype == np.int64 and distances.dtype == np.float32
    np.testing.assert_array_equal(indices, want_i)
    np.testing.assert_allclose(distances, want_d, rtol=1e-6)


@pytest.mark.parametrize("metric", ["l2", "laa"])
def test_separate_candidate_set_matches_brute_force(metric):
    faces, video = random_faces(seed=1)
    query, query_video = faces[:25], video[:25]
    candidates, candidate_video = faces[25:], video[25:]
    indices, distances = find_partners(query, query_video, candidates, candidate_video, k=6, metric=metric,
                                       **EAGER)
    want_i, want_d = brute_force(query, query_video, candidates, candidate_video, 6, metric)
    np.testing.assert_array_equal(indices, want_i)
    np.testing.assert_allclose(distances, want_d, rtol=1e-6)


@pytest.mark.parametrize("metric", ["l2", "laa"])
def test_partners_never_from_the_same_video(metric):
    # frames of one video are near-duplicates, so a search that forgot the mask would return them first
    rng = np.random.default_rng(2)
    video = np.repeat(np.arange(5), 12)
    faces = rng.uniform(0, 256, (5, N_POINTS, 2))[video] + rng.normal(0, 0.1, (60, N_POINTS, 2))
    indices, distances = find_partners(faces, video, faces, video, k=30, metric=metric, block_size=16, **EAGER)
    assert (indices >= 0).all() and np.isfinite(distances).all()
    assert (video[indices] != video[:, None]).all()
    assert (np.diff(distances, axis=1) >= 0).all()


@pytest.mark.parametrize("metric", ["l2", "laa"])
def test_fewer_than_k_candidates_are_padded(metric):
    faces, _ = random_faces(n=6)
    video = np.array(["a", "a", "b", "b", "b", "c"])
    indices, distances = find_partners(faces, video, faces, video, k=5, metric=metric, **EAGER)
    for row, own in enumerate(video):
        eligible = int((video != own).sum())  # 4 for a, 3 for b, 5 for c
        assert (indices[row, :eligible] >= 0).all() and (indices[row, eligible:] == -1).all()
        assert np.isfinite(distances[row, :eligible]).all() and np.isinf(distances[row, eligible:]).all()
        assert set(indices[row, :eligible]) == set(np.flatnonzero(video != own))


@pytest.mark.parametrize("metric", ["l2", "laa"])
def test_results_do_not_depend_on_block_sizes(metric, monkeypatch):
    faces, video = random_faces(n=53, seed=3)
    reference = find_partners(faces, video, faces, video, k=9, metric=metric, **EAGER)
    for block_size, candidate_block_size, sub_tile in [(7, None, 1024), (7, 5, 1024), (1, 1, 1024), (53, 4, 1024),
                                                       (4, 53, 1024), (None, None, 3), (20, 11, 6)]:
        monkeypatch.setattr(partners, "EAGER_SUBTILE", sub_tile)  # the laa kernel's cache-sized sub-tiles
        indices, distances = find_partners(faces, video, faces, video, k=9, metric=metric, block_size=block_size,
                                           candidate_block_size=candidate_block_size, **EAGER)
        np.testing.assert_array_equal(indices, reference[0])
        np.testing.assert_array_equal(distances, reference[1])


@pytest.mark.parametrize("metric", ["l2", "laa"])
def test_ties_break_by_lower_candidate_id(metric):
    faces, video = random_faces(n=30, seed=4)
    video = video % 3 + 10
    twins = [5, 11, 17, 23]  # identical faces in four other videos: equal distance to every query
    faces[twins] = faces[5]
    video[twins] = [0, 1, 2, 3]
    indices, _ = find_partners(faces[:1], [99], faces, video, k=30, metric=metric, block_size=1,
                               candidate_block_size=4, **EAGER)
    positions = [list(indices[0]).index(t) for t in twins]
    assert positions == sorted(positions) and np.ptp(positions) == 3


def test_mismatched_landmark_counts_raise():
    faces, video = random_faces(n=10)
    with pytest.raises(ValueError, match="68 points but candidate landmarks have 81"):
        find_partners(faces, video, np.zeros((4, 81, 2)), np.arange(4), k=2)


@pytest.mark.parametrize("broken", ["raises", "wrong"])
def test_auto_kernel_falls_back_to_eager(monkeypatch, caplog, broken):
    def build():
        def kernel(qx, qy, cx, cy, *_):
            if broken == "raises":
                raise RuntimeError("no C++ compiler")
            return torch.zeros(qx.shape[0], cx.shape[0]), torch.ones(qx.shape[0], dtype=torch.bool)
        return kernel

    monkeypatch.setattr(partners, "_fused_kernel", build)
    monkeypatch.setattr(partners, "FUSED_MIN_WORK", 0)  # auto would choose eager for so small a search
    faces, video = random_faces(n=40, seed=8)
    with caplog.at_level(logging.WARNING, logger="package_utils.partners"):
        indices, distances = find_partners(faces, video, faces, video, k=7, metric="laa", block_size=16)
    assert "using the eager kernel" in caplog.text
    want_i, want_d = brute_force(faces, video, faces, video, 7, "laa")
    np.testing.assert_array_equal(indices, want_i)
    np.testing.assert_allclose(distances, want_d, rtol=1e-6)


def brute_force_fast(query: np.ndarray, query_video, candidates: np.ndarray, candidate_video, k: int, metric: str):
    """The same reference vectorised over candidates, for the larger adversarial sets."""
    query_video, candidate_video = np.asarray(query_video), np.asarray(candidate_video)
    indices = np.full((len(query), k), -1)
    distances = np.full((len(query), k), np.inf)
    for i, a in enumerate(query):
        if metric == "l2":
            distance = np.sqrt(((candidates - a) ** 2).sum(axis=(1, 2)))
        else:
            distance = np.hypot(*(candidates - a).transpose(2, 0, 1)).sum(axis=1)
        distance[candidate_video == query_video[i]] = np.inf
        order = np.lexsort((np.arange(len(candidates)), distance))[:k]
        order = order[np.isfinite(distance[order])]
        indices[i, :len(order)], distances[i, :len(order)] = order, distance[order]
    return indices, distances


def assert_exact(query, query_video, candidates, candidate_video, k, metric, **options) -> dict:
    """find_partners equals the brute force; returns what the search reports it did."""
    indices, distances, info = partners._search(query, query_video, candidates, candidate_video, k, metric, "cpu",
                                                options.get("block_size"), None, 128.0, "eager", False)
    want_i, want_d = brute_force_fast(query, query_video, candidates, candidate_video, k, metric)
    np.testing.assert_array_equal(indices, want_i)
    np.testing.assert_allclose(distances, want_d, rtol=1e-9)
    return info


def clustered_faces(n: int, seed: int = 0, per_video: int = 16):
    """FF++-like landmarks: a mean face under a per-video pose (rotation, scale, shift) plus per-frame noise."""
    rng = np.random.default_rng(seed)
    mean_face = rng.uniform(60, 200, (N_POINTS, 2))
    video = np.arange(n) // per_video
    videos = int(video[-1]) + 1
    angle, scale = np.deg2rad(rng.uniform(-12, 12, videos)), rng.uniform(0.9, 1.1, videos)
    rotation = scale[:, None, None] * np.stack([np.stack([np.cos(angle), -np.sin(angle)], -1),
                                                np.stack([np.sin(angle), np.cos(angle)], -1)], -2)
    centre = mean_face.mean(axis=0)
    posed = (mean_face - centre) @ rotation.transpose(0, 2, 1) + centre + rng.normal(0, 6, (videos, 1, 2))
    return posed[video] + rng.normal(0, 1.5, (n, N_POINTS, 2)), video


@pytest.mark.parametrize("metric", ["l2", "laa"])
def test_features_bound_the_metric_from_below(metric):
    # the pruning is exact only if every feature difference is a lower bound of the distance
    faces, _ = clustered_faces(300, seed=11)
    centred = faces - faces.mean(axis=0)
    features, _ = partners._features(centred, centred, metric)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 300, 2000), rng.integers(0, 300, 2000)
    per_point = np.hypot(*(faces[a] - faces[b]).transpose(2, 0, 1))
    gap = np.abs(features[a] - features[b])
    if metric == "laa":
        assert (gap.max(axis=1) <= per_point.sum(axis=1) * (1 + 1e-12)).all()
    else:
        assert (np.sqrt((gap ** 2).sum(axis=1)) <= np.sqrt((per_point ** 2).sum(axis=1)) * (1 + 1e-12)).all()
    assert gap.max() > 1.0  # and they do separate faces


@pytest.mark.parametrize("metric", ["l2", "laa"])
def test_bound_skips_most_pairs_and_stays_exact(metric):
    faces, video = clustered_faces(3000, seed=12)
    info = assert_exact(faces, video, faces, video, 30, metric)
    assert info["pairs_scored_fraction"] < 0.6 and info["rows_redone"] == 0 and not info["dense"]


@pytest.mark.parametrize("metric", ["l2", "laa"])
def test_unstructured_landmarks_take_the_dense_pass_exactly(metric):
    # uniform random landmarks: every pair about equally far, nothing to rule out; a set against itself then
    # scores every pair once, merged into both faces' lists
    rng = np.random.default_rng(17)
    faces, video = rng.uniform(0, 256, (700, N_POINTS, 2)), rng.integers(0, 60, 700)
    info = assert_exact(faces, video, faces, video, 30, metric, block_size=8)
    assert info["dense"] and info["pairs_scored_fraction"] == 1.0
    info = assert_exact(faces[:300], video[:300], faces, video, 30, metric, block_size=8)  # two sets: no dense pass
    assert not info["dense"]
    # the same landmarks under other video ids are two sets too (a pair's same-video test is not symmetric)
    info = assert_exact(faces, video, faces, (video + 1) % 7, 30, metric, block_size=8)
    assert not info["dense"]


def test_search_uses_full_float32_matmuls_and_restores_the_settings():
    # TF32 / bfloat16 matmuls would break the l2 values' error bound: the search turns them off for its run
    faces, video = clustered_faces(800, seed=18)
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert_exact(faces, video, faces, video, 30, "l2")
        assert torch.get_float32_matmul_precision() == "medium" and torch.get_num_threads() == threads
    finally:
        torch.set_float32_matmul_precision(precision)


@pytest.mark.parametrize("metric", ["l2", "laa"])
def test_ties_beyond_the_margin_are_redone_exactly(metric):
    # 60 copies of one face in 60 videos: a query near it sees 60 candidates tied at the k-th place, more than
    # the float32 pass keeps; the lowest ids must win, as in the brute force
    rng = np.random.default_rng(13)
    faces, video = rng.normal(128, 20, (400, N_POINTS, 2)), rng.integers(0, 50, 400)
    faces[:60], video[:60] = faces[0], np.arange(1000, 1060)
    info = assert_exact(faces, video, faces, video, 30, metric)
    assert info["rows_redone"] > 0


@pytest.mark.parametrize("metric", ["l2", "laa"])
def test_identical_and_nearly_identical_faces(metric):
    rng = np.random.default_rng(14)
    same = np.repeat(rng.normal(128, 20, (1, N_POINTS, 2)), 120, axis=0)
    assert_exact(same, np.arange(120) // 4, same, np.arange(120) // 4, 30, metric)
    # differences far below float32 resolution at these coordinates
    near = same[:1] + rng.normal(0, 1e-5, (150, N_POINTS, 2))
    near[100:] = rng.normal(128, 20, (50, N_POINTS, 2))
    assert_exact(near, np.arange(150), near, np.arange(150), 30, metric)


@pytest.mark.parametrize("metric", ["l2", "laa"])
def test_integer_landmarks_and_far_coordinates(metric):
    rng = np.random.default_rng(15)
    grid = rng.integers(0, 3, (300, N_POINTS, 2)).astype(float) + 100  # many exactly equal distances
    video = rng.integers(0, 30, 300)
    assert_exact(grid, video, grid, video, 30, metric)
    far = rng.normal(0, 3, (300, N_POINTS, 2)) + 1e4  # float32 keeps ~1e-3 px here
    assert_exact(far, video, far, video, 30, metric)


@pytest.mark.parametrize("metric", ["l2", "laa"])
def test_real_landmarks_match_brute_force(dlib_annotations, metric):
    # the hand-annotated faces of the dlib photos, each cropped to its box and made a "video" of 8 frames
    faces = []
    for boxes in dlib_annotations.values():
        for (x0, y0, x1, y1), points in boxes:
            side = max(x1 - x0, y1 - y0) * 1.6
            faces.append((points - [(x0 + x1 - side) / 2, (y0 + y1 - side) / 2]) * (256 / side))
    rng = np.random.default_rng(16)
    frames = (np.array(faces)[:, None] + rng.normal(0, 1.0, (len(faces), 8, N_POINTS, 2))).reshape(-1, N_POINTS, 2)
    video = np.repeat(np.arange(len(faces)), 8)
    assert len(faces) >= 30
    assert_exact(frames, video, frames, video, 30, metric)
    assert_exact(frames, video, frames, video, 9, metric, block_size=5)
    assert_exact(frames[::2], video[::2], frames[1::2], video[1::2] + 1000, 30, metric)  # another candidate file


def make_item(video_id: str, frame: int, landmarks: np.ndarray | None, split: str = "train") -> dict:
    points = [] if landmarks is None else landmarks.round(3).tolist()
    return {
        "image_path": f"train/frames/original/{video_id}/{frame:03d}.png", "file_name": f"{frame:03d}.png",
        "id": 0, "fake_type": "original", "orig_lms": points, "aligned_lms": points,
        "video_id": f"ff/original/{video_id}", "frame_index": frame, "label": 0, "split": split, "dataset": "ff",
        "method": "original", "box": [0, 0, 256, 256], "landmark_model": "none" if landmarks is None else "dlib68",
    }


def write_document(path, items, tmp_path):
    metadata.save(path, metadata.new_document(items, tmp_path, config={"stage": "test"}))
    return path


def test_cli_end_to_end(tmp_path):
    faces, _ = random_faces(n=10, seed=5)
    layout = ["000"] * 5 + ["001"] * 3 + ["002"] * 2  # video 000 frames see 5 candidates, the rest 7 or 8
    items = [make_item(v, i, faces[i]) for i, v in enumerate(layout)]
    items.insert(3, make_item("001", 99, None))  # no landmarks: kept and marked
    source = write_document(tmp_path / "train.json", items, tmp_path)
    output = tmp_path / "out" / "train_partners.json"

    assert main(["--input", str(source), "--output", str(output), "--k", "6", "--metric", "laa", "--laa-paths",
                 "--block-size", "3", "--laa-kernel", "eager"]) == 0
    document = metadata.load(output)
    data = document["data"]
    assert len(data) == 11 and data[3]["partner_status"] == "no_landmarks" and data[3]["partners"] == []
    assert data[3]["best_match"] == []
    with_points = [item for item in data if item["aligned_lms"]]
    points = np.array([item["aligned_lms"] for item in with_points])
    videos = [item["video_id"] for item in with_points]
    want_i, want_d = brute_force(points, videos, points, videos, 6, "laa")
    for row, item in enumerate(with_points):
        width = int((want_i[row] >= 0).sum())
        assert item["partners"] == [with_points[j]["id"] for j in want_i[row, :width]]
        np.testing.assert_allclose(item["partner_distances"], want_d[row, :width], atol=6e-5)
        assert item["partner_distances"] == [round(d, 4) for d in item["partner_distances"]]
        assert item["best_match"] == [data[j]["image_path"] for j in item["partners"]]
        assert all(data[j]["video_id"] != item["video_id"] for j in item["partners"])
        assert item["partner_status"] == ("fewer_than_k" if item["video_id"].endswith("000") else "ok")
    stats = document["stats"]["partners"]
    assert (stats["k"], stats["metric"], stats["items_with_partners"], stats["items_no_landmarks"]) == (6, "laa", 10, 1)
    assert (stats["items_ok"], stats["items_fewer_than_k"], stats["partner_source"]) == (5, 5, str(source))
    assert document["config"]["partners"]["laa_paths"] is True and document["config"]["stage"] == "test"

    # a re-run without --laa-paths must not leave the old best_match lists behind
    assert main(["--input", str(output), "--output", str(output), "--k", "2"]) == 0
    rerun = metadata.load(output)["data"]
    assert all("best_match" not in item and len(item["partners"]) == (2 if item["aligned_lms"] else 0)
               for item in rerun)


def test_cli_document_without_landmarks(tmp_path):
    source = write_document(tmp_path / "train.json", [make_item("a", 0, None), make_item("b", 1, None)], tmp_path)
    assert main(["--input", str(source), "--output", str(source), "--laa-paths"]) == 0
    document = metadata.load(source)
    assert [item["partner_status"] for item in document["data"]] == ["no_landmarks"] * 2
    assert document["stats"]["partners"]["items_with_partners"] == 0


def test_cli_with_candidate_file_warns_on_non_train(tmp_path, caplog):
    faces, _ = random_faces(n=12, seed=6)
    queries = write_document(tmp_path / "val.json", [make_item(f"v{i % 2}", i, faces[i], "val") for i in range(4)],
                             tmp_path)
    pool_items = [make_item(f"t{i % 4}", i, faces[i], "train") for i in range(4, 12)]
    pool_items[-1]["split"] = "test"
    pool = write_document(tmp_path / "pool.json", pool_items, tmp_path)
    output = tmp_path / "val_partners.json"
    with caplog.at_level(logging.WARNING, logger="package_utils.partners"):
        assert main(["--input", str(queries), "--output", str(output), "--k", "3", "--candidates", str(pool),
                     "--laa-paths"]) == 0
    assert any("non-train" in r.getMessage() and str(pool) in r.getMessage() for r in caplog.records)
    document = metadata.load(output)
    want_i, _ = brute_force(faces[:4], ["v0", "v1"] * 2, faces[4:], [f"t{i % 4}" for i in range(4, 12)], 3, "l2")
    for row, item in enumerate(document["data"]):
        assert item["partners"] == list(want_i[row]) and item["partner_status"] == "ok"
        assert item["best_match"] == [pool_items[j]["image_path"] for j in want_i[row]]
    assert document["stats"]["partners"]["partner_source"] == str(pool)
    assert document["stats"]["partners"]["candidate_splits"] == {"test": 1, "train": 7}


def test_cli_mixed_landmark_counts_name_the_file(tmp_path, caplog):
    faces, _ = random_faces(n=3, points=81, seed=7)
    items = [make_item("a", 0, faces[0, :68]), make_item("b", 1, faces[1]), make_item("c", 2, faces[2, :68])]
    items[1]["landmark_model"] = "dlib81"
    source = write_document(tmp_path / "mixed.json", items, tmp_path)
    output = tmp_path / "never.json"
    with caplog.at_level(logging.ERROR, logger="package_utils.partners"):
        assert main(["--input", str(source), "--output", str(output)]) == 2
    message = " ".join(r.getMessage() for r in caplog.records)
    assert str(source) in message and "mix landmark counts" in message and "item 1 has 81" in message
    assert not output.exists()


def reals_and_fakes(tmp_path, bad_real: int | None = None):
    """4 real videos x 3 frames and 4 fake videos whose faces copy the reals' landmarks almost exactly, so that
    any search that may use fakes picks them first. Returns (metadata path, items)."""
    faces, _ = random_faces(n=12, seed=8)
    reals = [make_item(f"r{i // 3}", i % 3, faces[i]) for i in range(12)]
    fakes = [dict(make_item(f"f{i // 3}", i % 3, faces[i] + 0.01), label=1, fake_type=f"f{i // 3}",
                  method="Deepfakes", video_id=f"ff/Deepfakes/f{i // 3}") for i in range(12)]
    items = [item for pair in zip(reals, fakes) for item in pair]  # interleaved: ids do not follow labels
    if bad_real is not None:
        items[2 * bad_real].update(landmark_error=0.8, landmark_ok=False, landmark_fit="keypoint_box")
    return write_document(tmp_path / "mixed_labels.json", items, tmp_path), items


def test_default_pool_takes_partners_from_reals_only(tmp_path):
    source, _ = reals_and_fakes(tmp_path)
    output = tmp_path / "real_pool.json"
    assert main(["--input", str(source), "--output", str(output), "--k", "9"]) == 0
    document = metadata.load(output)
    data = document["data"]
    for item in data:
        assert item["partners"] and all(data[j]["label"] == 0 for j in item["partners"])
        assert all(data[j]["video_id"] != item["video_id"] for j in item["partners"])
    stats = document["stats"]["partners"]
    assert (stats["pool"], stats["candidates"], stats["reals"], stats["reals_fewer_than_k_real_partners"]) == (
        "real", 12, 12, 0)

    everything = tmp_path / "all_pool.json"
    assert main(["--input", str(source), "--output", str(everything), "--k", "9", "--pool", "all"]) == 0
    document = metadata.load(everything)
    data = document["data"]
    reals = [item for item in data if item["label"] == 0]
    assert all(data[item["partners"][0]]["label"] == 1 for item in reals)  # the near copies win without the pool
    assert document["stats"]["partners"]["reals_fewer_than_k_real_partners"] == 12


def test_faces_with_failed_landmarks_are_skipped_unless_kept(tmp_path, caplog):
    source, _ = reals_and_fakes(tmp_path, bad_real=0)
    output = tmp_path / "skipped.json"
    with caplog.at_level(logging.WARNING, logger="package_utils.partners"):
        assert main(["--input", str(source), "--output", str(output), "--k", "9"]) == 0
    document = metadata.load(output)
    data = document["data"]
    assert (data[0]["partner_status"], data[0]["partners"]) == ("bad_landmarks", [])
    assert all(0 not in item["partners"] for item in data)
    # reals of the 3 other videos now have 8 real candidates for k = 9
    stats = document["stats"]["partners"]
    assert (stats["items_bad_landmarks"], stats["reals_fewer_than_k_real_partners"]) == (1, 9)
    assert "9 of 11 real faces have fewer than k=9 real blend partners" in caplog.text

    kept = tmp_path / "kept.json"
    assert main(["--input", str(source), "--output", str(kept), "--k", "9", "--keep-bad-landmarks"]) == 0
    data = metadata.load(kept)["data"]
    assert data[0]["partner_status"] == "ok" and any(0 in item["partners"] for item in data)
