"""The blend-partner search as the library ran it before the bound (issue 13): dense float32 tiles over
every query x candidate pair, a running top-(k + 8) per query, float64 re-scoring of the survivors.

laa pairs are computed once when a file is searched against itself (symmetric 1024 x 1024 tiles, a
torch.compile'd kernel of one fixed shape); l2 runs 1024 queries x as many candidates as fit 128 MiB through
``||b||^2 - 2 a.b`` matmuls. Kept as the baseline of ``benchmarks/partners.py`` and as its oracle: the library's
pruned search must return the same partners. Its own weak spot, kept as it was: ties at the k-th place
among more than 8 candidates can come out in another order than a brute force's (the library redoes such rows).
Not part of the installed library.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from package_utils.partners import METRICS, _as_landmarks, _exact, _video_codes

__all__ = ["dense_search"]

DEFAULT_BLOCK_SIZE = 1024
DEFAULT_TILE_MB = 128.0
LAA_TILE = 1024
EAGER_SUBTILE = 1024
TIE_MARGIN = 8
_REFINE_ELEMENTS = 1 << 22


def _laa_eager(qx: torch.Tensor, qy: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, out: torch.Tensor,
               t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """laa tile with in-place ops: qx, qy (L, B, 1), cx, cy (L, 1, C) -> out (B, C); six passes per landmark."""
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
        raise ValueError(f"laa kernel must be fused or eager, got {self.kernel!r}")

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


def dense_search(query: np.ndarray, query_video: Any, candidates: np.ndarray, candidate_video: Any, k: int = 30,
                 metric: str = "laa", device: str | torch.device = "cpu", block_size: int | None = None,
                 candidate_block_size: int | None = None, max_tile_mb: float = DEFAULT_TILE_MB,
                 laa_kernel: str = "fused", progress: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """The dense search: (n, k) candidate positions (-1 = none), float64 distances (inf = none), what ran."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if laa_kernel not in ("fused", "eager"):
        raise ValueError(f"laa_kernel must be fused or eager, got {laa_kernel!r}")
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
