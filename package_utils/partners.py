"""Stage 5 (BI only): exact blend-partner search over landmarks, LAA-Net style.

Usage::

    python -m package_utils.partners --input processed_data/train.json --output processed_data/train_bi.json \\
        --k 30 [--metric l2|laa] [--device cpu|cuda] [--block-size N] [--laa-paths] [--candidates other.json] \\
        [--max-tile-mb 128] [--laa-kernel auto|fused|eager] [--pool real|all] [--keep-bad-landmarks] \\
        [--config partners.yaml] [key=value ...]

For every item with landmarks (``aligned_lms``, the points on ``image_path``'s pixels) the ``k`` nearest faces
of **other videos** are found by brute force over every candidate frame (no sampling, unlike LAA-Net's 10,000
random frames). Candidates are the **real** items (label 0; BI blends two real faces) with landmarks of
``--candidates`` (default: the input itself); ``--pool all`` searches every label. They should be train frames
only, and a warning is logged when they are not. Items whose landmarks failed the landmark stage's keypoint
check (``landmark_ok`` false) are neither queries nor candidates unless ``--keep-bad-landmarks``. The summary
(``stats.partners``) says how many reals have fewer than k real partners.

Each item gets ``partners`` (candidate ids, nearest first), ``partner_distances`` (rounded to 4 decimals) and
``partner_status``: ``ok``, ``fewer_than_k`` (fewer eligible candidates than k; all of them are kept),
``no_landmarks`` or ``bad_landmarks`` (the item stays in the file, with no partners). ``--laa-paths`` adds
``best_match``, the partners' ``image_path`` strings as LAA-Net's BI loader reads them. With ``--candidates``,
partner ids and paths refer to the items of that file (recorded as ``stats.partners.partner_source``); its image
paths are made absolute when its ``data_root`` differs from the input's.

Metrics (distances in landmark pixels):

* ``laa``: the references' D = sum_k ||a_k - b_k||_2 (LAA-Net, Face X-ray).
* ``l2``: Euclidean distance of the flattened (2L)-vectors (DeepfakeBench), via ||b||^2 - 2 a.b matmuls.

The search runs in tiles of ``block_size`` queries x a candidate block (float32 tiles bounded by
``max_tile_mb``), keeping a running top-(k + margin) per query; same-video pairs are set to +inf before each
top-k. The survivors are then re-scored in float64 and sorted by (distance, candidate id), so ties break
deterministically and the result does not depend on the tile sizes.

laa costs L square roots per pair, so it computes each pair once when a file is searched against itself
(symmetric tiles) and, on CPU, uses a torch.compile'd kernel (one pass per tile instead of six per landmark;
needs a C++ compiler, built once in ~15 s and cached by torch). ``--laa-kernel auto`` checks that kernel against
the eager one on the first tile and falls back to eager, with a warning, when it is unavailable or differs.
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from package_utils import metadata
from package_utils.config import Option, StageSpec
from package_utils.io_utils import output_file_lock, remove_leftovers

__all__ = ["METRICS", "SPEC", "find_partners", "add_partners", "run", "main"]

log = logging.getLogger("package_utils.partners")

METRICS = ("l2", "laa")
#: Candidate pools: ``real`` (label 0 only: BI blends two real faces) or ``all`` labels.
POOLS = ("real", "all")
DEFAULT_BLOCK_SIZE = 1024
#: Bound on the float32 distance tile(s) held at once, in MiB.
DEFAULT_TILE_MB = 128.0
#: laa tile side (1024-4096 measured within 10% of each other with the fused kernel; 1024 was fastest).
LAA_TILE = 1024
#: The eager kernel works in sub-tiles of at most this side, so its per-landmark temporaries stay in cache
#: (1024 is ~1.6x faster per pair than 2048 on a 2-core EPYC).
EAGER_SUBTILE = 1024
LAA_KERNELS = ("auto", "fused", "eager")
#: "auto" compiles the fused kernel only for searches with more pair-landmark terms than this (~10 s of eager
#: work on a 2-core CPU, N ~ 17k searched against itself), because a cold build takes ~15 s.
FUSED_MIN_WORK = 1e10
#: Extra candidates kept per query in the float32 pass, so float32 rounding cannot push a true top-k
#: neighbour out before the float64 re-scoring, and ties at the k-th place can be broken by id.
TIE_MARGIN = 8
_REFINE_ELEMENTS = 1 << 22  # float64 values per re-scoring chunk (32 MiB)


def _as_landmarks(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 3 or array.shape[2] != 2:
        raise ValueError(f"{name} must have shape (N, L, 2), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return array


def _video_codes(query_video: Sequence | np.ndarray, candidate_video: Sequence | np.ndarray,
                 n_query: int, n_candidate: int) -> tuple[np.ndarray, np.ndarray]:
    """Map both video id lists onto one integer code space."""
    qv, cv = np.asarray(query_video), np.asarray(candidate_video)
    if qv.shape != (n_query,) or cv.shape != (n_candidate,):
        raise ValueError(f"video ids must be 1-D and match the landmarks: {qv.shape} for {n_query} queries, "
                         f"{cv.shape} for {n_candidate} candidates")
    if qv.dtype.kind != cv.dtype.kind:
        qv, cv = qv.astype(str), cv.astype(str)
    _, codes = np.unique(np.concatenate([qv, cv]), return_inverse=True)
    return codes[:n_query].astype(np.int64), codes[n_query:].astype(np.int64)


def _exact(query: np.ndarray, candidates: np.ndarray, metric: str) -> np.ndarray:
    """float64 distances between query (n, L, 2) and its candidates (n, m, L, 2) -> (n, m)."""
    diff = candidates - query[:, None]
    if metric == "l2":
        return np.sqrt(np.einsum("nmlc,nmlc->nm", diff, diff))
    return np.sqrt(np.einsum("nmlc,nmlc->nml", diff, diff)).sum(axis=-1)


def _laa_eager(qx: torch.Tensor, qy: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, out: torch.Tensor,
               t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """laa tile with in-place ops: qx, qy (L, B, 1), cx, cy (L, 1, C) -> out (B, C); six passes per landmark.

    Works in sub-tiles of ``t1``'s shape (cache-sized temporaries).
    """
    out.zero_()
    rows, cols = t1.shape
    for r0 in range(0, out.shape[0], rows):
        for c0 in range(0, out.shape[1], cols):
            part = out[r0:r0 + rows, c0:c0 + cols]
            a, b = t1[:part.shape[0], :part.shape[1]], t2[:part.shape[0], :part.shape[1]]
            for k in range(qx.shape[0]):
                torch.sub(qx[k, r0:r0 + rows], cx[k, :, c0:c0 + cols], out=a).square_()
                torch.sub(qy[k, r0:r0 + rows], cy[k, :, c0:c0 + cols], out=b)
                a.addcmul_(b, b)
                part.add_(a.sqrt_())
    return out


def _laa_fused(qx: torch.Tensor, qy: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """The same tile as one expression, for torch.compile to fuse into a single sqrt-bound loop."""
    return torch.sqrt((qx - cx) ** 2 + (qy - cy) ** 2).sum(dim=0)


_compiled_laa: Any = None


def _fused_kernel() -> Any:
    global _compiled_laa
    if _compiled_laa is None:
        _compiled_laa = torch.compile(_laa_fused, dynamic=False)
    return _compiled_laa


class _Searcher:
    """Float32 tiled top-(k + margin) search over queries and candidates sorted by video code.

    laa tiles always have the full (rows, cols) shape (edge blocks are zero-padded and cropped), so the
    compiled kernel is built once and the eager buffers are allocated once.
    """

    def __init__(self, query: np.ndarray, candidates: np.ndarray, query_codes: np.ndarray,
                 candidate_codes: np.ndarray, keep: int, metric: str, device: torch.device, tile_shape: tuple[int, int],
                 laa_kernel: str):
        self.metric, self.device, self.keep, self.tile_shape = metric, device, keep, tile_shape
        self.query_codes, self.candidate_codes = query_codes, candidate_codes
        self.kernel = "matmul" if metric == "l2" else laa_kernel
        if metric == "l2":
            self.q = torch.from_numpy(query.reshape(len(query), -1).astype(np.float32)).to(device)
            self.c = torch.from_numpy(candidates.reshape(len(candidates), -1).astype(np.float32)).to(device)
            self.c_norm = (self.c * self.c).sum(dim=1)
            self.out = torch.empty(tile_shape, dtype=torch.float32, device=device)
        else:
            # (2, L, N): a block of one coordinate is a contiguous (L, B) slice; padded to whole tiles
            self.q = self._padded(query, tile_shape[0])
            self.c = self._padded(candidates, tile_shape[1])
            sub_tile = (min(tile_shape[0], EAGER_SUBTILE), min(tile_shape[1], EAGER_SUBTILE))
            self.buffers = [torch.empty(shape, dtype=torch.float32, device=device)
                            for shape in (tile_shape, sub_tile, sub_tile)]
        n = len(query)
        self.best_d = torch.full((n, keep), math.inf, dtype=torch.float32, device=device)
        self.best_i = torch.full((n, keep), -1, dtype=torch.int64, device=device)

    def _padded(self, points: np.ndarray, block: int) -> torch.Tensor:
        total = -(-len(points) // block) * block
        padded = np.zeros((2, points.shape[1], total), dtype=np.float32)
        padded[:, :, :len(points)] = points.transpose(2, 1, 0)
        return torch.from_numpy(padded).to(self.device)

    def _laa(self, r0: int, c0: int) -> torch.Tensor:
        rows, cols = self.tile_shape
        qx, qy = (self.q[i, :, r0:r0 + rows, None].contiguous() for i in (0, 1))
        cx, cy = (self.c[i, :, None, c0:c0 + cols].contiguous() for i in (0, 1))
        if self.kernel == "eager":
            return _laa_eager(qx, qy, cx, cy, *self.buffers)
        if self.kernel == "fused":
            return _fused_kernel()(qx, qy, cx, cy)
        # auto: the first tile compiles the fused kernel and checks it against the eager one
        eager = _laa_eager(qx, qy, cx, cy, *self.buffers)
        try:
            fused = _fused_kernel()(qx, qy, cx, cy)
            if not torch.allclose(fused, eager, rtol=1e-4, atol=1e-2):
                raise RuntimeError(f"fused kernel differs from eager by {float((fused - eager).abs().max()):.3g}")
        except Exception as error:  # noqa: BLE001 - no compiler, unsupported platform, ...: eager still works
            log.warning("torch.compile laa kernel unavailable, using the eager kernel (2-4x slower on CPU): "
                        "%s", str(error).splitlines()[0] if str(error) else type(error).__name__)
            self.kernel = "eager"
            return eager
        self.kernel = "fused"
        return fused

    def tile(self, r0: int, r1: int, c0: int, c1: int) -> torch.Tensor:
        """Ranking distances of queries [r0, r1) x candidates [c0, c1), same-video pairs = +inf."""
        if self.metric == "l2":
            out = self.out[:r1 - r0, :c1 - c0]
            # ||a||^2 is constant per row, so ||b||^2 - 2 a.b ranks like the squared distance
            torch.addmm(self.c_norm[c0:c1], self.q[r0:r1], self.c[c0:c1].T, alpha=-2.0, out=out)
        else:
            out = self._laa(r0, c0)[:r1 - r0, :c1 - c0]
        # both sides are sorted by video, so each shared video is one rectangle of the tile
        for code in np.unique(self.query_codes[r0:r1]):
            q0, q1 = np.searchsorted(self.query_codes, [code, code + 1])
            s0, s1 = np.searchsorted(self.candidate_codes, [code, code + 1])
            q0, q1, s0, s1 = max(q0, r0), min(q1, r1), max(s0, c0), min(s1, c1)
            if q0 < q1 and s0 < s1:
                out[q0 - r0:q1 - r0, s0 - c0:s1 - c0] = math.inf
        return out

    def merge(self, r0: int, r1: int, distances: torch.Tensor, c0: int) -> None:
        """Fold a (r1 - r0, C) tile whose column 0 is candidate c0 into the running top-keep of rows r0..r1."""
        count = min(self.keep, distances.shape[1])
        values, index = torch.topk(distances, count, dim=1, largest=False, sorted=False)
        values = torch.cat([self.best_d[r0:r1], values], dim=1)
        index = torch.cat([self.best_i[r0:r1], index + c0], dim=1)
        values, pick = torch.topk(values, self.keep, dim=1, largest=False, sorted=False)
        self.best_d[r0:r1] = values
        self.best_i[r0:r1] = index.gather(1, pick)


def _search(query: np.ndarray, query_video: Any, candidates: np.ndarray, candidate_video: Any, k: int,
            metric: str, device: str | torch.device, block_size: int | None, candidate_block_size: int | None,
            max_tile_mb: float, laa_kernel: str, progress: bool) -> tuple[np.ndarray, np.ndarray, dict]:
    """find_partners with float64 distances (the CLI rounds them to 4 decimals) and a dict of what ran."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if laa_kernel not in LAA_KERNELS:
        raise ValueError(f"laa_kernel must be one of {LAA_KERNELS}, got {laa_kernel!r}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    query = _as_landmarks(query, "query_landmarks")
    candidates = _as_landmarks(candidates, "candidate_landmarks")
    n, m = len(query), len(candidates)
    if n and m and query.shape[1] != candidates.shape[1]:
        raise ValueError(f"query landmarks have {query.shape[1]} points but candidate landmarks have "
                         f"{candidates.shape[1]}; both sides need the same landmark model")
    qv, cv = _video_codes(query_video, candidate_video, n, m)
    indices = np.full((n, k), -1, dtype=np.int64)
    distances = np.full((n, k), np.inf, dtype=np.float64)
    if n == 0 or m == 0:
        return indices, distances, {}

    # one search over the input itself: the laa tiles are symmetric, so each pair is computed once
    self_search = metric == "laa" and n == m and np.array_equal(query, candidates) and np.array_equal(qv, cv)
    bq = int(block_size or (DEFAULT_BLOCK_SIZE if metric == "l2" else LAA_TILE))
    if bq < 1 or (candidate_block_size is not None and candidate_block_size < 1):
        raise ValueError("block sizes must be >= 1")
    bq = min(bq, n)
    tile_floats = int(max_tile_mb * 2**20 / 4 / (1 if metric == "l2" else 2))  # laa: eager output + fused output
    if candidate_block_size:
        bc = min(int(candidate_block_size), m)
    elif metric == "l2":
        bc = max(1, min(m, tile_floats // bq))
    else:
        bc = max(1, min(bq, m, tile_floats // bq))
        if self_search:
            bq = bc = min(bq, bc)
    self_search = self_search and bq == bc
    pair_terms = n * m * query.shape[1] / (2 if self_search else 1)
    if laa_kernel == "auto" and (torch.device(device).type != "cpu" or pair_terms < FUSED_MIN_WORK):
        laa_kernel = "eager"  # GPU eager ops are bandwidth-cheap; small CPU searches do not repay the build

    q_order = np.argsort(qv, kind="stable")
    c_order = np.argsort(cv, kind="stable")
    # centring on the candidate mean shrinks the float32 values, and so the rounding of ||b||^2 - 2 a.b
    centre = candidates.mean(axis=0)
    keep = min(k + TIE_MARGIN, m)
    searcher = _Searcher(query[q_order] - centre, candidates[c_order] - centre, qv[q_order], cv[c_order], keep,
                         metric, torch.device(device), (bq, bc), laa_kernel)
    row_blocks = [(r, min(r + bq, n)) for r in range(0, n, bq)]
    col_blocks = [(c, min(c + bc, m)) for c in range(0, m, bc)]
    with torch.inference_mode():
        for bi, (r0, r1) in enumerate(tqdm(row_blocks, desc=f"partners ({metric})", unit="block",
                                           disable=not progress)):
            for bj, (c0, c1) in enumerate(col_blocks):
                if self_search and bj < bi:
                    continue  # already merged as the transpose of tile (bj, bi)
                tile = searcher.tile(r0, r1, c0, c1)
                searcher.merge(r0, r1, tile, c0)
                if self_search and bj > bi:
                    searcher.merge(c0, c1, tile.T, r0)
        approx = searcher.best_d.cpu().numpy()
        found = searcher.best_i.cpu().numpy()

    # float64 re-scoring of the survivors, then a stable (distance, id) order
    sorted_query, sorted_qv = query[q_order], qv[q_order]
    chunk = max(1, _REFINE_ELEMENTS // (keep * query.shape[1] * 2))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        valid = np.isfinite(approx[start:stop]) & (found[start:stop] >= 0)
        ids = np.where(valid, c_order[np.clip(found[start:stop], 0, None)], m)
        valid &= cv[np.clip(ids, 0, m - 1)] != sorted_qv[start:stop, None]
        exact = _exact(sorted_query[start:stop], candidates[np.clip(ids, 0, m - 1)], metric)
        exact = np.where(valid, exact, np.inf)
        ids = np.where(valid, ids, m)
        order = np.lexsort((ids, exact), axis=-1)[:, :k]
        best_ids = np.take_along_axis(ids, order, axis=1)
        best_d = np.take_along_axis(exact, order, axis=1)
        width = best_ids.shape[1]
        rows = q_order[start:stop]
        indices[rows, :width] = np.where(best_ids < m, best_ids, -1)
        distances[rows, :width] = best_d
    info = {"kernel": searcher.kernel, "block_size": bq, "candidate_block_size": bc, "symmetric": self_search}
    return indices, distances, info


def find_partners(query_landmarks: np.ndarray, query_video: Sequence[str] | np.ndarray,
                  candidate_landmarks: np.ndarray, candidate_video: Sequence[str] | np.ndarray, k: int = 30,
                  metric: str = "l2", device: str | torch.device = "cpu", block_size: int | None = None,
                  candidate_block_size: int | None = None, max_tile_mb: float = DEFAULT_TILE_MB,
                  laa_kernel: str = "auto", progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest landmark sets from other videos.

    Args:
        query_landmarks: (N, L, 2) landmarks of the faces that need partners.
        query_video: N video ids (strings or ints); a query never gets a candidate of its own video.
        candidate_landmarks: (M, L, 2) landmarks to search, with the same L; pass the query arrays to search
            a set against itself.
        candidate_video: M video ids, comparable with ``query_video``.
        k: partners per query.
        metric: ``l2`` (Euclidean distance of the flattened vectors) or ``laa`` (sum of per-landmark
            Euclidean distances, as LAA-Net).
        device: torch device for the distance tiles (``cpu``, ``cuda``...).
        block_size: queries per tile (default 1024 for l2, 2048 for laa).
        candidate_block_size: candidates per tile; default: as many as fit ``max_tile_mb`` for l2, and square
            tiles (``block_size`` again) for laa.
        max_tile_mb: bound on the float32 tile memory in MiB.
        laa_kernel: ``fused`` (torch.compile, one pass per tile; needs a C++ compiler; built on first use,
            about 15 s, then cached), ``eager`` (plain torch ops, 2-4x slower on CPU) or ``auto`` (fused for
            large CPU searches, checked against eager on the first tile, with a warning and eager whenever it
            fails; eager otherwise).
        progress: show a tqdm bar over query blocks.

    Returns:
        ``(indices, distances)``: (N, k) int64 candidate positions, nearest first, ties by lower position,
        padded with -1; and (N, k) float32 distances padded with +inf (rows of queries with fewer than k
        candidates from other videos).

    Raises:
        ValueError: malformed shapes, non-finite coordinates, differing landmark counts or a bad metric / k.
    """
    indices, distances, _ = _search(query_landmarks, query_video, candidate_landmarks, candidate_video, k, metric,
                                    device, block_size, candidate_block_size, max_tile_mb, laa_kernel, progress)
    return indices, distances.astype(np.float32)


def _landmark_items(document: dict, source: str, keep_bad_landmarks: bool = False,
                    labels: tuple[int, ...] | None = None) -> tuple[list[int], np.ndarray]:
    """Positions of the items with landmarks and their (n, L, 2) ``aligned_lms``; one L per file.

    Items whose landmarks failed the keypoint check are left out unless ``keep_bad_landmarks``; with
    ``labels`` only items of those labels are kept.
    """
    positions = [i for i, item in enumerate(document["data"])
                 if item["aligned_lms"] and (keep_bad_landmarks or not metadata.landmarks_failed(item))
                 and (labels is None or item["label"] in labels)]
    counts = Counter(len(document["data"][i]["aligned_lms"]) for i in positions)
    if len(counts) > 1:
        examples = ", ".join(
            f"item {next(i for i in positions if len(document['data'][i]['aligned_lms']) == c)} has {c}"
            for c in sorted(counts))
        raise metadata.MetadataError(
            f"{source}: items mix landmark counts {dict(sorted(counts.items()))} ({examples}); partner search "
            "compares landmarks point by point, so all items need the same landmark model")
    if not positions:
        return positions, np.zeros((0, 0, 2))
    return positions, np.array([document["data"][i]["aligned_lms"] for i in positions], dtype=np.float64)


def add_partners(document: dict, candidates: dict | None = None, *, k: int = 30, metric: str = "l2",
                 device: str = "cpu", block_size: int | None = None, max_tile_mb: float = DEFAULT_TILE_MB,
                 laa_kernel: str = "auto", laa_paths: bool = False, source: str = "<input>",
                 candidate_source: str | None = None, progress: bool = False, pool: str = "real",
                 keep_bad_landmarks: bool = False) -> dict:
    """Fill ``partners``, ``partner_distances``, ``partner_status`` (and ``best_match``) in place.

    Args:
        document: metadata document whose items get partners.
        candidates: metadata document to search (default ``document``); ids refer to its items.
        k, metric, device, block_size, max_tile_mb, laa_kernel: as find_partners.
        pool: ``real`` (BI blends two real faces: candidates are the label-0 items) or ``all``.
        keep_bad_landmarks: also use items whose landmarks failed the keypoint check, as queries and as
            candidates (by default they get ``partner_status`` ``bad_landmarks`` and are nobody's partner).
        laa_paths: also write ``best_match``, the partners' ``image_path`` strings.
        source: name of ``document`` in messages.
        candidate_source: name of ``candidates`` in messages and in ``stats.partners.partner_source``.
        progress: tqdm bar over query blocks.

    Returns:
        The stats stored in ``document['stats']['partners']``.

    Raises:
        MetadataError: a file mixes landmark counts, or the two files use different ones.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if candidates is None:
        candidates, candidate_source = document, source
    candidate_source = candidate_source or "<candidates>"
    splits = Counter(item["split"] for item in candidates["data"])
    if set(splits) - {"train"}:
        log.warning("%s: candidates include non-train frames (%s); blend partners should come from train "
                    "frames only", candidate_source, ", ".join(f"{s}: {c}" for s, c in sorted(splits.items())))
    q_pos, q_points = _landmark_items(document, source, keep_bad_landmarks)
    pool_labels = (0,) if pool == "real" else None
    if candidates is document and pool_labels is None:
        c_pos, c_points = q_pos, q_points
    else:
        c_pos, c_points = _landmark_items(candidates, candidate_source, keep_bad_landmarks, pool_labels)
    if len(q_pos) and len(c_pos) and q_points.shape[1] != c_points.shape[1]:
        raise metadata.MetadataError(f"{source} has {q_points.shape[1]}-point landmarks but {candidate_source} "
                                     f"has {c_points.shape[1]}-point ones; use files of one landmark model")
    q_video = [document["data"][i]["video_id"] for i in q_pos]
    c_video = [candidates["data"][i]["video_id"] for i in c_pos]

    start = time.perf_counter()
    indices, distances, info = _search(q_points, q_video, c_points, c_video, k, metric, device, block_size, None,
                                       max_tile_mb, laa_kernel, progress)
    seconds = time.perf_counter() - start

    c_items = candidates["data"]
    same_root = candidates is document or candidates["data_root"] == document["data_root"]
    paths = [item["image_path"] if same_root else str(metadata.resolve(candidates, item["image_path"]))
             for item in c_items]
    for item in document["data"]:
        item.update(partners=[], partner_distances=[], partner_status="no_landmarks")
        if laa_paths:
            item["best_match"] = []
        else:
            item.pop("best_match", None)  # a previous run's paths would no longer match the partners
    queried = set(q_pos)
    for position, item in enumerate(document["data"]):
        if position not in queried and item["aligned_lms"]:
            item["partner_status"] = "bad_landmarks"
    status = Counter(item["partner_status"] for position, item in enumerate(document["data"])
                     if position not in queried)
    for row, position in enumerate(q_pos):
        width = int((indices[row] >= 0).sum())
        ids = [c_items[c_pos[j]]["id"] for j in indices[row, :width]]
        item = document["data"][position]
        item["partners"] = ids
        item["partner_distances"] = [round(float(d), 4) for d in distances[row, :width]]
        item["partner_status"] = "ok" if width == k else "fewer_than_k"
        status[item["partner_status"]] += 1
        if laa_paths:
            item["best_match"] = [paths[i] for i in ids]

    real_queries = [p for p in q_pos if document["data"][p]["label"] == 0]
    reals_short = sum(1 for p in real_queries
                      if sum(c_items[i]["label"] == 0 for i in document["data"][p]["partners"]) < k)
    if reals_short:
        log.warning("%s: %d of %d real faces have fewer than k=%d real blend partners", source, reals_short,
                    len(real_queries), k)
    stats = {
        "k": k, "metric": metric, "pool": pool, "keep_bad_landmarks": keep_bad_landmarks,
        "seconds": round(seconds, 3),
        "items_with_partners": sum(1 for p in q_pos if document["data"][p]["partners"]),
        "items_ok": status["ok"], "items_fewer_than_k": status["fewer_than_k"],
        "items_no_landmarks": status["no_landmarks"], "items_bad_landmarks": status["bad_landmarks"],
        "reals": len(real_queries), "reals_fewer_than_k_real_partners": reals_short,
        "queries": len(q_pos), "candidates": len(c_pos), "candidate_splits": dict(sorted(splits.items())),
        "landmarks": int(q_points.shape[1]) if len(q_pos) else None,
        "partner_source": candidate_source, **info,
    }
    document.setdefault("stats", {})["partners"] = stats
    return stats


def _options() -> list[Option]:
    """The partner search's settings."""
    return [
        Option("input", help="metadata JSON whose items need partners", type=str, output=True),
        Option("output", help="metadata JSON to write (may equal --input)", type=str),
        Option("k", 30, "partners per item (LAA-Net: 30)", output=True),
        Option("metric", "l2", "l2: flattened Euclidean (fast); laa: sum of per-landmark distances (LAA-Net)",
               choices=METRICS, output=True),
        Option("device", "cpu", "torch device: cpu, cuda, cuda:1 ..."),
        Option("block_size", None, f"queries per tile (default {DEFAULT_BLOCK_SIZE})", type=int),
        Option("max_tile_mb", DEFAULT_TILE_MB, "bound on the float32 distance tiles held at once, MiB"),
        Option("laa_kernel", "auto", "laa tile kernel: fused (torch.compile), eager, or auto (fused, else eager)",
               choices=LAA_KERNELS),
        Option("laa_paths", False, "also write best_match (partner image paths)", switch=True, output=True),
        Option("candidates", help="metadata JSON to search (train frames; default: --input)", type=str, output=True),
        Option("pool", "real", "candidates: real faces (label 0) only, as BI blends two reals (default), or all",
               choices=POOLS, output=True),
        Option("keep_bad_landmarks", False, "also search with and for faces whose landmarks failed the landmark "
               "stage's check", switch=True, output=True),
        Option("data_root", help="override the input's data_root header", type=str, output=True),
    ]


#: The search's results do not depend on tile sizes, kernel or device; its fingerprint is the output settings.
SPEC = StageSpec("partners", _options(), __doc__.split("\n\n")[0])
DEFAULTS: dict[str, Any] = SPEC.defaults


def run(config: dict | None = None, /, **settings: Any) -> dict:
    """Search blend partners for one metadata file and write it; returns the summary.

    Pass a full config (as ``main`` builds it) or keyword settings named as the flags, the others keeping their
    defaults, e.g. ``run(input="train_68.json", output="train_68.json", k=30)`` (:data:`SPEC` lists them).
    """
    config = SPEC.resolve(config, settings)
    if config["input"] is None or config["output"] is None:
        raise ValueError("--input and --output are required")
    # torch.compile's C++ toolchain probe warns "No CUDA runtime is found" on CPU machines: not our concern
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # one writer per output file, and a read-only or full output folder is found before the search
    with output_file_lock(config["output"], "metadata file"):
        output = Path(config["output"])
        for path in remove_leftovers(output.parent, (f".{output.name}.*.tmp", ".write-check.*.tmp")):
            log.info("removed %s, left by an interrupted run", path)
        if str(config["device"]).startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {config['device']}: torch sees no CUDA device")
        document = metadata.load(config["input"], config["data_root"])
        candidates = metadata.load(config["candidates"]) if config["candidates"] else None
        stats = add_partners(document, candidates, k=config["k"], metric=config["metric"], device=config["device"],
                             block_size=config["block_size"], max_tile_mb=config["max_tile_mb"],
                             laa_kernel=config["laa_kernel"], laa_paths=config["laa_paths"], pool=config["pool"],
                             keep_bad_landmarks=config["keep_bad_landmarks"], source=config["input"],
                             candidate_source=config["candidates"], progress=True)
        document.setdefault("config", {})["partners"] = {**config, "tie_margin": TIE_MARGIN}
        metadata.save(config["output"], document)
    log.info("partners: %d queries x %d candidates (%s pool), k=%d, %s, %.1f s: %d ok, %d fewer than k, %d without "
             "landmarks, %d with failed landmarks; %d of %d reals have fewer than k real partners -> %s",
             stats["queries"], stats["candidates"], stats["pool"], stats["k"], stats["metric"], stats["seconds"],
             stats["items_ok"], stats["items_fewer_than_k"], stats["items_no_landmarks"],
             stats["items_bad_landmarks"], stats["reals_fewer_than_k_real_partners"], stats["reals"],
             config["output"])
    keys = ("queries", "candidates", "items_ok", "items_fewer_than_k", "items_no_landmarks", "items_bad_landmarks",
            "reals_fewer_than_k_real_partners", "seconds")
    return {**{key: stats[key] for key in keys}, "index": str(config["output"])}


def build_parser() -> argparse.ArgumentParser:
    return SPEC.build_parser()


def main(argv: list[str] | None = None) -> int:
    return SPEC.main(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
