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
* ``l2``: Euclidean distance of the flattened (2L)-vectors (DeepfakeBench), via matmuls.

The search is exact (the same partners, in the same order, as a float64 brute force with ties broken by the
lower candidate id) but skips what a lower bound rules out. Each face gets a few features, projections on the
candidates' principal axes, whose differences bound the metric from below (see ``_features``). Queries and
candidates are put in k-d order of these features; each block of ``block_size`` queries visits the candidate
leaves nearest first and keeps a running float32 top-(k + margin) per query (same-video pairs are +inf). Once a
query block's lists are full, a candidate (or a whole leaf) whose bound exceeds every list's last value cannot
enter them and is not scored. The survivors are re-scored in float64 and sorted by (distance, candidate id);
a row where float32 rounding or ties at the k-th place could have hidden a neighbour is redone with every
candidate that could be one (see ``_redo_uncertain``). On FF++-like landmarks about 6% of the pairs are
scored at 92k faces; on unstructured landmarks (no pair can be ruled out) all are.

laa costs L square roots per pair; on CPU it uses a torch.compile'd kernel (one pass instead of six per
landmark; needs a C++ compiler, built once in ~15 s and cached by torch). ``--laa-kernel auto`` checks that
kernel against the eager one on its first call and falls back to eager, with a warning, when it is unavailable
or differs. Query blocks run in ``torch.get_num_threads()`` threads of one torch thread each.
"""
from __future__ import annotations

import argparse
import logging
import math
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

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
#: Queries searched together (k-d leaves: faces with nearby features), sharing the candidates that survive
#: the bound: laa, whose pairs are dear, in small blocks (16-128 measured within 20% of each other at 46k
#: faces, 32 the fastest), l2, whose pairs are cheap matmul work, in larger ones.
DEFAULT_BLOCK_SIZE = 32
L2_BLOCK_SIZE = 64
#: Candidates scored per kernel call and merge.
DEFAULT_CANDIDATE_BLOCK = 4096
#: Bound on the float32 values held per kernel call, in MiB.
DEFAULT_TILE_MB = 128.0
#: The eager kernel works in sub-tiles of at most this side, so its per-landmark temporaries stay in cache.
EAGER_SUBTILE = 1024
LAA_KERNELS = ("auto", "fused", "eager")
#: "auto" compiles the fused kernel only for searches of more query x candidate x landmark terms than this
#: (N ~ 38k searched against itself), because a cold build takes ~15 s and the bound skips most pairs.
FUSED_MIN_WORK = 1e11
#: Extra candidates kept per query in the float32 pass, so float32 rounding rarely pushes a true top-k
#: neighbour out before the float64 re-scoring (rows where it could are redone; see _redo_uncertain).
TIE_MARGIN = 8
#: Lower-bound features per face (see _features): 4 for laa (the max of 4 single bounds) and 8 for l2 (one
#: Euclidean bound); more prune no better on the benchmark's FF++-like landmarks.
LAA_FEATURES = 4
L2_FEATURES = 8
#: Leaf size of the k-d order of the candidates: the bound first rules out whole leaves.
KD_LEAF = 32
#: Candidate leaves a query block starts with (its nearest by the bound), and how many times more each
#: later round takes: early rounds lower the block's T, so later ones skip more.
SEED_LEAVES = 32
GROWTH = 4
#: Query blocks whose leaf bounds are computed and sorted in one go (and handed to a thread together).
BATCH_BLOCKS = 16
#: Every SAMPLE_EVERY-th query block runs first; if those scored more than DENSE_ABOVE of their pairs, a set
#: searched against itself switches to a pass over every pair once, in DENSE_TILE x DENSE_TILE tiles.
SAMPLE_EVERY = 32
DENSE_ABOVE = 0.5
DENSE_TILE = 1024
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
    if metric == "l2":  # one dot product over the contiguous 2L coordinates of each pair
        flat = diff.reshape(*diff.shape[:2], -1)
        return np.sqrt(np.einsum("nmd,nmd->nm", flat, flat))
    squares = diff[..., 0] ** 2 + diff[..., 1] ** 2  # (n, m, L); einsum is several times slower at this shape
    return np.sqrt(squares).sum(axis=-1)


def _laa_eager(qx: torch.Tensor, qy: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, out: torch.Tensor,
               t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """laa with in-place ops: qx, qy (B, L), cx, cy (C, L) -> out (B, C); six passes per landmark.

    Works in sub-tiles of ``t1``'s shape (cache-sized temporaries).
    """
    qx, qy, cx, cy = (side.T.contiguous() for side in (qx, qy, cx, cy))  # (L, B) and (L, C): rows per landmark
    out.zero_()
    rows, cols = t1.shape
    for r0 in range(0, out.shape[0], rows):
        for c0 in range(0, out.shape[1], cols):
            part = out[r0:r0 + rows, c0:c0 + cols]
            a, b = t1[:part.shape[0], :part.shape[1]], t2[:part.shape[0], :part.shape[1]]
            for k in range(qx.shape[0]):
                torch.sub(qx[k, r0:r0 + rows, None], cx[k, None, c0:c0 + cols], out=a).square_()
                torch.sub(qy[k, r0:r0 + rows, None], cy[k, None, c0:c0 + cols], out=b)
                a.addcmul_(b, b)
                part.add_(a.sqrt_())
    return out


def _laa_fused(qx: torch.Tensor, qy: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, q_video: torch.Tensor,
               c_video: torch.Tensor, limit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """laa values as one expression for torch.compile to fuse: qx, qy (B, L), cx, cy (C, L) -> (B, C), +inf
    for same-video pairs, and which rows hold a value below their ``limit`` (B,).

    The sum runs along contiguous landmarks, which keeps the loop fast for any B and C.
    """
    values = torch.sqrt((qx[:, None] - cx[None]) ** 2 + (qy[:, None] - cy[None]) ** 2).sum(dim=-1)
    values = values.masked_fill(q_video[:, None] == c_video[None], math.inf)
    return values, (values < limit[:, None]).any(dim=1)


_compiled_laa: Any = None


def _fused_kernel() -> Any:
    global _compiled_laa
    if _compiled_laa is None:
        # dynamic shapes: one build serves every block (the number of surviving candidates varies); one
        # thread per call and a C++ wrapper that releases the GIL, so that blocks run in parallel threads
        _compiled_laa = torch.compile(_laa_fused, dynamic=True, options={"cpp_wrapper": True, "cpp.threads": 1})
    return _compiled_laa


def _features(query: np.ndarray, candidates: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(n, P) and (m, P) float64 features of centred landmarks whose differences bound the metric from below.

    The axes are the candidates' top principal axes. l2: they are orthonormal, so the projection is a
    contraction and ||f(a) - f(b)|| <= l2(a, b). laa: each axis is cut into its L 2-vectors and each of them
    scaled to unit length, so for every feature |f(a) - f(b)| = |sum_p u_p . (a_p - b_p)|
    <= sum_p ||a_p - b_p|| (Cauchy-Schwarz per landmark). Any axes give valid bounds; principal ones are tight.
    """
    points = candidates.shape[1]
    flat = candidates.reshape(len(candidates), -1)
    count = min(L2_FEATURES if metric == "l2" else LAA_FEATURES, flat.shape[1])
    axes = np.linalg.eigh(flat.T @ flat)[1][:, ::-1][:, :count].copy()
    if metric == "laa":
        axes = axes.reshape(points, 2, count)
        norms = np.linalg.norm(axes, axis=1, keepdims=True)
        axes = np.divide(axes, norms, out=np.zeros_like(axes), where=norms > 1e-12).reshape(2 * points, count)
    return query.reshape(len(query), -1) @ axes, flat @ axes


def _kd_order(features: np.ndarray, leaf: int = KD_LEAF) -> np.ndarray:
    """Leaf order of a k-d tree: halves split at the median of their widest feature, down to ``leaf`` faces.

    Runs of this order hold faces with nearby features: query blocks share their surviving candidates, and
    candidate leaves have small feature boxes.
    """
    order = np.arange(len(features))
    pending = [(0, len(order))]
    while pending:
        start, stop = pending.pop()
        if stop - start <= leaf:
            continue
        part = order[start:stop]
        values = features[part]
        axis = int(np.argmax(values.max(axis=0) - values.min(axis=0)))
        half = (stop - start) // 2
        order[start:stop] = part[np.argpartition(values[:, axis], half)]
        pending += [(start, start + half), (start + half, stop)]
    return order


def _box_bound(low: np.ndarray, high: np.ndarray, other_low: np.ndarray, other_high: np.ndarray,
               metric: str) -> np.ndarray:
    """Lower bound of the value (laa: distance, l2: squared distance) between any face of the feature box
    [low, high] (P,) and any face of each box [other_low, other_high] (P, K columns; a face is a box of no
    width). Feature by feature on contiguous rows: numpy is slow at reducing short axes."""
    bound = np.zeros(other_low.shape[1])
    for j in range(len(low)):
        gap = np.maximum(np.maximum(low[j] - other_high[j], other_low[j] - high[j]), 0.0)
        if metric == "laa":
            np.maximum(bound, gap, out=bound)
        else:
            bound += gap * gap
    return bound


class _Search:
    """Exact float32 top-``keep`` lists for blocks of queries, skipping candidates a lower bound rules out.

    Queries and candidates are in k-d order of their features (see _features), so a block of queries has
    nearby features. Each block visits the candidate leaves nearest first (by the bound between its feature
    box and the leaf's): its ``SEED_LEAVES`` nearest, then in rounds of 4x more every leaf whose bound is
    within the block's largest T (a query's keep-th value so far), dropping the candidates whose own bound
    exceeds it and scoring the rest exactly. It stops at the first leaf beyond that T. Values are laa
    distances or squared l2 distances.
    """

    def __init__(self, query: np.ndarray, candidates: np.ndarray, query_features: np.ndarray,
                 candidate_features: np.ndarray, query_codes: np.ndarray, candidate_codes: np.ndarray, keep: int,
                 metric: str, device: torch.device, block_shape: tuple[int, int], max_values: int,
                 laa_kernel: str, symmetric: bool = False):
        self.metric, self.device, self.keep, self.block_shape = metric, device, keep, block_shape
        self.symmetric = symmetric  # one set against itself, in one order: a pair may serve both of its faces
        self.max_values = max_values
        self.kernel = "matmul" if metric == "l2" else laa_kernel
        self.n, self.m = len(query), len(candidates)
        # (P, N): one feature of every face is a contiguous row (see _box_bound)
        self.q_features, self.c_features = query_features.T.copy(), candidate_features.T.copy()
        self.q_codes = torch.from_numpy(query_codes).to(device)
        self.c_codes = torch.from_numpy(candidate_codes).to(device)
        if metric == "l2":
            # [a, |a|^2, 1] . [-2b, 1, |b|^2] = |a - b|^2: one matmul gives the squared distances
            q_flat, c_flat = query.reshape(self.n, -1), candidates.reshape(self.m, -1)
            q_norm = (q_flat ** 2).sum(axis=1, keepdims=True)
            c_norm = (c_flat ** 2).sum(axis=1, keepdims=True)
            q_aug = np.hstack([q_flat, q_norm, np.ones_like(q_norm)])
            c_aug = np.hstack([-2 * c_flat, np.ones_like(c_norm), c_norm])
            self.q = torch.from_numpy(q_aug.astype(np.float32)).to(device)
            self.c = torch.from_numpy(c_aug.astype(np.float32)).to(device)
        else:
            # (N, 2L): the x then the y coordinates of a face, one contiguous row gathered whole
            self.q = torch.from_numpy(np.concatenate([query[:, :, 0], query[:, :, 1]], axis=1).astype(np.float32))
            self.c = torch.from_numpy(np.concatenate([candidates[:, :, 0], candidates[:, :, 1]], axis=1)
                                      .astype(np.float32))
            self.q, self.c = self.q.to(device), self.c.to(device)
            self.local = threading.local()  # the eager kernel's buffers, one pair per thread
            self.choosing = threading.Lock()  # "auto" picks the kernel once
        self.best_d = torch.full((self.n, keep), math.inf, dtype=torch.float32, device=device)
        self.best_i = torch.full((self.n, keep), -1, dtype=torch.int64, device=device)
        self.T = torch.full((self.n,), math.inf, dtype=torch.float32, device=device)
        self.pairs_scored, self.went_dense = 0, False

    def buffers(self, rows: int, cols: int) -> list[torch.Tensor]:
        """This thread's sub-tile buffers for the eager kernel on a rows x cols block."""
        shape = (min(rows, EAGER_SUBTILE), min(cols, EAGER_SUBTILE))
        if getattr(self.local, "shape", None) != shape:
            self.local.shape = shape
            self.local.buffers = [torch.empty(shape, dtype=torch.float32, device=self.device) for _ in range(2)]
        return self.local.buffers

    def values(self, rows: slice | torch.Tensor, cols: torch.Tensor,
               limit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float32 values of queries ``rows`` x candidates ``cols`` (k-d positions), same-video pairs = +inf,
        and (given ``limit``, one per row) which rows hold a value below their limit."""
        # fresh tensors (no storage offsets, all made in inference mode): torch.compile guards on both
        if isinstance(rows, slice):
            q, q_video = self.q[rows].clone(), self.q_codes[rows].clone()
            limit = None if limit is None else limit.clone()
        else:
            q, q_video = self.q.index_select(0, rows), self.q_codes[rows]
        c, c_video = self.c.index_select(0, cols), self.c_codes[cols]
        # sizes 0 and 1 would make torch.compile specialise (a rebuild each): eager is cheap for them
        if self.metric == "laa" and self.kernel != "eager" and len(q) > 1 and len(cols) > 1:
            points = q.shape[1] // 2
            inputs = (q[:, :points], q[:, points:], c[:, :points], c[:, points:], q_video, c_video,
                      torch.full((len(q),), math.inf, device=self.device) if limit is None else limit)
            if self.kernel == "fused":
                values, hit = _fused_kernel()(*inputs)
                return values, None if limit is None else hit
            with self.choosing:  # auto: the first call builds the fused kernel and checks it against eager
                if self.kernel != "auto":
                    return self.values(rows, cols, limit)
                self.kernel = "eager"
                eager, eager_hit = self.values(rows, cols, limit)
                try:
                    values, hit = _fused_kernel()(*inputs)
                    if not torch.allclose(values, eager, rtol=1e-4, atol=1e-2):
                        gap = torch.where(torch.isfinite(eager), (values - eager).abs(), 0).max()
                        raise RuntimeError(f"fused kernel differs from eager by {float(gap):.3g}")
                except Exception as error:  # noqa: BLE001 - no compiler, unsupported platform...: eager works
                    log.warning("torch.compile laa kernel unavailable, using the eager kernel (3-6x slower on "
                                "CPU): %s", str(error).splitlines()[0] if str(error) else type(error).__name__)
                    return eager, eager_hit
                self.kernel = "fused"
                return values, None if limit is None else hit
        if self.metric == "l2":
            values = q @ c.T
        else:
            values = torch.empty((len(q), len(cols)), dtype=torch.float32, device=self.device)
            points = q.shape[1] // 2
            _laa_eager(q[:, :points], q[:, points:], c[:, :points], c[:, points:], values, *self.buffers(*values.shape))
        values.masked_fill_(q_video[:, None] == c_video[None, :], math.inf)
        return values, None if limit is None else (values < limit[:, None]).any(dim=1)

    def merge(self, r0: int, r1: int, values: torch.Tensor, hit: torch.Tensor, cols: torch.Tensor) -> None:
        """Fold ``values`` (queries r0..r1 x candidate positions ``cols``) into the running top-keep lists.

        Only rows with a value below their keep-th (``hit``) are merged, as contiguous copies; when few values
        are below, only those are gathered (a topk over all of them cost ~25% of an unstructured search).
        """
        if bool(hit.all()):
            rows, values = slice(r0, r1), values.contiguous()
        else:
            rows = hit.nonzero()[:, 0]
            if rows.numel() == 0:
                return
            values = values.index_select(0, rows)
            rows = rows + r0
        below = values < self.T[rows][:, None]
        counts = below.sum(dim=1)
        width = int(counts.max())
        if width * 4 <= values.shape[1]:
            # few values beat the lists (the usual case once they fill): gather those instead of a topk over all
            row, col = below.nonzero(as_tuple=True)
            slot = torch.arange(len(row), device=self.device) - (counts.cumsum(0) - counts)[row]
            found_d = torch.full((len(values), width), math.inf, device=self.device)
            found_d[row, slot] = values[row, col]
            found_i = torch.full((len(values), width), -1, dtype=torch.int64, device=self.device)
            found_i[row, slot] = cols[col]
        else:
            found_d, found_i = torch.topk(values, min(self.keep, values.shape[1]), dim=1, largest=False,
                                          sorted=False)
            found_i = cols[found_i]
        merged_d = torch.cat([self.best_d[rows], found_d], dim=1)
        merged_i = torch.cat([self.best_i[rows], found_i], dim=1)
        best_d, pick = torch.topk(merged_d, self.keep, dim=1, largest=False, sorted=False)
        self.best_d[rows] = best_d
        self.best_i[rows] = merged_i.gather(1, pick)
        self.T[rows] = best_d.max(dim=1).values

    def score(self, r0: int, r1: int, cols: np.ndarray) -> int:
        """Score queries r0..r1 against ``cols`` and merge, in pieces of at most ``max_values`` values; returns
        the number of pairs scored."""
        step = max(1, min(self.block_shape[1], self.max_values // (r1 - r0)))
        for c0 in range(0, len(cols), step):
            part = torch.from_numpy(cols[c0:c0 + step]).to(self.device)
            self.merge(r0, r1, *self.values(slice(r0, r1), part, self.T[r0:r1]), part)
        return (r1 - r0) * len(cols)

    @torch.inference_mode()
    def blocks(self, starts: Sequence[int]) -> int:
        """Search the query blocks starting at ``starts``; returns the number of pairs scored.

        The blocks' bounds to every candidate leaf are computed and sorted together (few, large numpy calls).
        """
        size = self.block_shape[0]
        features = [self.q_features[:, r0:r0 + size] for r0 in starts]
        low = np.stack([f.min(axis=1) for f in features], axis=1)  # (P, blocks)
        high = np.stack([f.max(axis=1) for f in features], axis=1)
        bounds = np.zeros((len(starts), self.leaf_low.shape[1]))
        for j in range(len(low)):
            gap = np.maximum(np.maximum(low[j, :, None] - self.leaf_high[j], self.leaf_low[j] - high[j, :, None]), 0)
            if self.metric == "laa":
                np.maximum(bounds, gap, out=bounds)
            else:
                bounds += gap * gap
        orders = np.argsort(bounds, axis=1, kind="stable")
        bounds = np.take_along_axis(bounds, orders, axis=1)
        return sum(self.block(r0, low[:, i], high[:, i], orders[i], bounds[i]) for i, r0 in enumerate(starts))

    def block(self, r0: int, low: np.ndarray, high: np.ndarray, order: np.ndarray, leaf_bounds: np.ndarray) -> int:
        """Search the query block starting at ``r0`` with feature box [low, high], visiting the candidate leaves
        in ``order`` (ascending ``leaf_bounds``); returns the number of pairs scored."""
        r1 = min(r0 + self.block_shape[0], self.n)
        done, chunk, scored = 0, SEED_LEAVES, 0
        while done < len(order):
            limit = float(self.T[r0:r1].max()) + self.margin
            stop = min(done + chunk, int(np.searchsorted(leaf_bounds, limit, side="right")))
            if stop <= done:
                break  # every remaining leaf is beyond every T of the block
            leaves = np.sort(order[done:stop])
            done, chunk = stop, chunk * GROWTH
            counts = self.leaf_sizes[leaves]
            cols = np.repeat(self.leaf_starts[leaves] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
            if math.isfinite(limit):
                features = self.c_features[:, cols]
                cols = cols[_box_bound(low, high, features, features, self.metric) <= limit]
            if len(cols):
                scored += self.score(r0, r1, cols)
        return scored

    def run(self, pool: ThreadPoolExecutor, threads: int, progress: bool) -> None:
        """Every query block, in batches spread over the threads of ``pool`` (blocks write disjoint rows)."""
        self.leaf_starts = np.arange(0, self.m, KD_LEAF)
        self.leaf_sizes = np.minimum(KD_LEAF, self.m - self.leaf_starts)
        self.leaf_low = np.minimum.reduceat(self.c_features, self.leaf_starts, axis=1)
        self.leaf_high = np.maximum.reduceat(self.c_features, self.leaf_starts, axis=1)
        # float64 features carry rounding of ~1e-16 of their size: keep what lies that close to T
        scale = 1.0 + max(np.abs(self.q_features).max(initial=0), np.abs(self.c_features).max(initial=0))
        self.margin = 1e-9 * (scale if self.metric == "laa" else scale * scale)
        starts = list(range(0, self.n, self.block_shape[0]))
        # a sample of the blocks first, spread over the k-d order: when the bound rules out little, a pass over
        # every pair once (a set against itself) costs less than the blocks' pass over every pair twice
        sample, rest = starts[::SAMPLE_EVERY], [r0 for i, r0 in enumerate(starts) if i % SAMPLE_EVERY]
        window = 2 * threads  # batches queued at once

        def batches(blocks: list[int]) -> list[list[int]]:
            return [blocks[i:i + BATCH_BLOCKS] for i in range(0, len(blocks), BATCH_BLOCKS)]

        def queries(batch: list[int]) -> int:
            return sum(min(r0 + self.block_shape[0], self.n) - r0 for r0 in batch)

        with tqdm(total=self.n, desc=f"partners ({self.metric})", unit="query", disable=not progress,
                  mininterval=1.0) as bar:
            self.pairs_scored += self.blocks(sample[:1])  # alone: "auto" builds and checks the fused kernel
            bar.update(queries(sample[:1]))
            for batch, scored in zip(batches(sample[1:]), _bounded_map(pool, self.blocks, batches(sample[1:]), window)):
                self.pairs_scored += scored
                bar.update(queries(batch))
            if self.symmetric and self.pairs_scored > DENSE_ABOVE * queries(sample) * self.m:
                self.best_d.fill_(math.inf), self.best_i.fill_(-1), self.T.fill_(math.inf)
                self.pairs_scored, self.went_dense = 0, True
                bar.reset()
                self.dense(pool, window, bar)
                return
            for batch, scored in zip(batches(rest), _bounded_map(pool, self.blocks, batches(rest), window)):
                self.pairs_scored += scored
                bar.update(queries(batch))

    def dense(self, pool: ThreadPoolExecutor, window: int, bar: tqdm) -> None:
        """Every pair once, in tiles on and above the diagonal merged into both sides: for a set against
        itself when the bound rules out little. Tiles are scored in ``pool``, merged here in order."""
        size = DENSE_TILE

        @torch.inference_mode()
        def score(tile: tuple[int, int]) -> torch.Tensor:
            r0, c0 = tile
            return self.values(slice(r0, min(r0 + size, self.n)),
                               torch.arange(c0, min(c0 + size, self.m), device=self.device))[0]

        tiles = [(r0, c0) for r0 in range(0, self.n, size) for c0 in range(r0, self.m, size)]
        with torch.inference_mode():
            for (r0, c0), values in zip(tiles, _bounded_map(pool, score, tiles, window)):
                r1, c1 = min(r0 + size, self.n), min(c0 + size, self.m)
                rows = torch.arange(r0, r1, device=self.device)
                cols = torch.arange(c0, c1, device=self.device)
                self.merge(r0, r1, values, (values < self.T[r0:r1, None]).any(dim=1), cols)
                if c0 != r0:
                    flipped = values.T
                    self.merge(c0, c1, flipped, (flipped < self.T[c0:c1, None]).any(dim=1), rows)
                self.pairs_scored += values.numel() * (1 if c0 == r0 else 2)
                if c1 == self.m:
                    bar.update(r1 - r0)

    def scan(self, rows: torch.Tensor, limits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(row, candidate) positions of every candidate of another video whose value is <= ``limits[row]``."""
        found_rows, found_cols = [], []
        step = max(1, self.max_values // len(rows))
        for c0 in range(0, self.m, step):
            cols = torch.arange(c0, min(c0 + step, self.m), device=self.device)
            values = self.values(rows, cols)[0]
            row, col = ((values <= limits[:, None]) & (values < math.inf)).nonzero(as_tuple=True)
            found_rows.append(row.cpu().numpy())
            found_cols.append((col + c0).cpu().numpy())
        return np.concatenate(found_rows), np.concatenate(found_cols)


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
    if (block_size is not None and block_size < 1) or (candidate_block_size is not None and candidate_block_size < 1):
        raise ValueError("block sizes must be >= 1")
    bq = min(int(block_size or (L2_BLOCK_SIZE if metric == "l2" else DEFAULT_BLOCK_SIZE)), n)
    bc = min(int(candidate_block_size or DEFAULT_CANDIDATE_BLOCK), m)
    max_values = max(bq * bc, int(max_tile_mb * 2**20 / 4 / 3))  # values, their mask and topk's copy
    points = query.shape[1]
    if laa_kernel == "auto" and (torch.device(device).type != "cpu" or n * m * points < FUSED_MIN_WORK):
        laa_kernel = "eager"  # GPU eager ops are bandwidth-cheap; small CPU searches do not repay the build

    # centring on the candidates' mean face shrinks the float32 values, and so their rounding
    centre = candidates.mean(axis=0)
    centred_q, centred_c = query - centre, candidates - centre
    q_features, c_features = _features(centred_q, centred_c, metric)
    self_search = n == m and np.array_equal(query, candidates) and np.array_equal(qv, cv)
    q_order = _kd_order(q_features)
    c_order = q_order if self_search else _kd_order(c_features)
    keep = min(k + TIE_MARGIN, m)
    searcher = _Search(centred_q[q_order], centred_c[c_order], q_features[q_order], c_features[c_order],
                       qv[q_order], cv[c_order], keep, metric, torch.device(device), (bq, bc), max_values,
                       laa_kernel, self_search)
    sorted_query = query[q_order]
    # Query blocks run in threads of one torch thread each: a block's many small operations parallelise far
    # better this way than inside each operation, and the fused kernel releases the GIL.
    threads = torch.get_num_threads() if searcher.device.type == "cpu" else 1
    with _search_settings(), ThreadPoolExecutor(threads) as pool:
        searcher.run(pool, threads, progress)
        best_ids, best_d = _rescore(searcher, sorted_query, candidates, c_order, k, pool)
        redo = _redo_uncertain(searcher, sorted_query, centred_q[q_order], centred_c, candidates, c_order, k,
                               best_ids, best_d)
    indices[q_order] = np.where(best_ids < m, best_ids, -1)
    distances[q_order] = best_d
    info = {"kernel": searcher.kernel, "block_size": bq, "candidate_block_size": bc,
            "pairs_scored_fraction": round(searcher.pairs_scored / (n * m), 6), "rows_redone": redo,
            "dense": searcher.went_dense}
    return indices, distances, info


def _bounded_map(pool: ThreadPoolExecutor, function: Any, items: Sequence, window: int) -> Iterator[Any]:
    """``pool.map`` that keeps at most ``window`` calls queued (results are large tiles)."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


@contextmanager
def _search_settings() -> Iterator[None]:
    """One torch thread (the search runs blocks in threads of its own), and float32 matmuls in full float32:
    the l2 values' error bound (see _redo_uncertain) does not hold for TF32 or bfloat16 passes."""
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)


def _rescore(searcher: _Search, sorted_query: np.ndarray, candidates: np.ndarray, c_order: np.ndarray, k: int,
             pool: ThreadPoolExecutor) -> tuple[np.ndarray, np.ndarray]:
    """float64 distances of each query's survivors, the k nearest in (distance, candidate id) order:
    (n, k) candidate ids (m = none) and distances (inf = none)."""
    n, m = len(sorted_query), len(candidates)
    approx, found = searcher.best_d.cpu().numpy(), searcher.best_i.cpu().numpy()
    best_ids = np.full((n, k), m, dtype=np.int64)
    best_d = np.full((n, k), np.inf)

    def chunk(start: int) -> None:
        stop = min(start + step, n)
        valid = np.isfinite(approx[start:stop]) & (found[start:stop] >= 0)
        ids = np.where(valid, c_order[np.clip(found[start:stop], 0, None)], m)
        exact = _exact(sorted_query[start:stop], candidates[np.clip(ids, 0, m - 1)], searcher.metric)
        exact = np.where(valid, exact, np.inf)
        order = np.lexsort((ids, exact), axis=-1)[:, :k]
        best_ids[start:stop, :order.shape[1]] = np.take_along_axis(ids, order, axis=1)
        best_d[start:stop, :order.shape[1]] = np.take_along_axis(exact, order, axis=1)

    step = max(1, _REFINE_ELEMENTS // (searcher.keep * sorted_query.shape[1] * 2))
    list(pool.map(chunk, range(0, n, step)))  # numpy releases the GIL in its loops
    return best_ids, best_d


def _redo_uncertain(searcher: _Search, sorted_query: np.ndarray, centred_q: np.ndarray, centred_c: np.ndarray,
                    candidates: np.ndarray, c_order: np.ndarray, k: int, best_ids: np.ndarray,
                    best_d: np.ndarray) -> int:
    """Makes the result exact: redoes (in place) the rows whose float32 search could have missed a neighbour.

    A candidate missing from a query's list has a float32 value >= the list's last value T (it lost a merge)
    or a lower bound > T (skipped). When T, less the float32 error bound, still exceeds the k-th re-scored
    distance, no such candidate can be among the k nearest. Rows where it does not (ties or near-ties at the
    k-th place beyond the margin) are redone with every candidate whose value could be within that distance.
    Returns the number of rows redone.
    """
    n, m, points = len(sorted_query), len(candidates), sorted_query.shape[1]
    last = searcher.best_d.max(dim=1).values.cpu().numpy().astype(np.float64)
    kth = best_d[:, k - 1] * (1 + 1e-12)
    unit = 2.0 ** -24
    if searcher.metric == "laa":
        # per landmark: coordinates rounded to float32, a difference, two squares, a sum and a square root;
        # then an L-term float32 sum: |value - distance| <= relative * distance + absolute
        relative = max(2.0 ** -16, 4 * (points + 4) * unit)
        absolute = relative * points * max(np.abs(centred_q).max(), np.abs(centred_c).max())
        exact_enough = (last - absolute) / (1 + relative) > kth
        limits = kth * (1 + relative) + absolute
    else:
        # a (2L + 2)-term float32 dot product of the augmented vectors: error <= relative * (|a| + |b|)^2
        relative = max(2.0 ** -16, 2 * (2 * points + 8) * unit)
        q_norms = np.linalg.norm(centred_q.reshape(n, -1), axis=1)
        error = relative * (q_norms + np.linalg.norm(centred_c.reshape(m, -1), axis=1).max()) ** 2
        exact_enough = last - error > kth ** 2
        limits = kth ** 2 + error
    redo = np.flatnonzero(~(np.isinf(last) | (searcher.keep >= m) | exact_enough))
    with torch.inference_mode():
        for start in range(0, len(redo), searcher.block_shape[0]):
            rows = redo[start:start + searcher.block_shape[0]]
            # rounded up to float32: a candidate right at the limit is kept
            row_limits = torch.from_numpy(limits[rows].astype(np.float32)).to(searcher.device)
            row_limits = torch.nextafter(row_limits, torch.full_like(row_limits, math.inf))
            hit_rows, hit_cols = searcher.scan(torch.from_numpy(rows).to(searcher.device), row_limits)
            for local, row in enumerate(rows):
                ids = c_order[hit_cols[hit_rows == local]]
                exact = _exact(sorted_query[row:row + 1], candidates[ids][None], searcher.metric)[0]
                order = np.lexsort((ids, exact))[:k]
                best_ids[row], best_d[row] = m, np.inf
                best_ids[row, :len(order)], best_d[row, :len(order)] = ids[order], exact[order]
    return int(len(redo))


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
        block_size: queries searched together (default 32 for laa, 64 for l2).
        candidate_block_size: candidates scored per kernel call (default 4096).
        max_tile_mb: bound on the float32 values held per kernel call in MiB.
        laa_kernel: ``fused`` (torch.compile, one pass over each pair's landmarks; needs a C++ compiler;
            built on first use, about 15 s, then cached), ``eager`` (plain torch ops, 3-6x slower on CPU) or
            ``auto`` (fused for large CPU searches, checked against eager on its first call, with a warning
            and eager whenever it fails; eager otherwise).
        progress: show a tqdm bar over the queries.

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
        progress: tqdm bar over the queries.

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
        Option("block_size", None, f"queries searched together (default {DEFAULT_BLOCK_SIZE} for laa, "
               f"{L2_BLOCK_SIZE} for l2)", type=int),
        Option("max_tile_mb", DEFAULT_TILE_MB, "bound on the float32 values held per kernel call, MiB"),
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
