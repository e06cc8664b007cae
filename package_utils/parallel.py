"""Run per-video jobs in parallel: joblib processes on this machine, or a Dask cluster.

A job never takes the whole run down: an exception inside it becomes a ``failed`` result with the
error message, logged once; only a full or read-only output stops the run. Results arrive as they finish
(tqdm progress) and are returned in input order.
"""
from __future__ import annotations

import errno
import logging
import traceback
from contextlib import nullcontext
from typing import Any, Callable, Sequence

from tqdm import tqdm

log = logging.getLogger(__name__)

#: Errors of the output itself (full disk or quota, read-only file system): every later job would fail the
#: same way, so they stop the run (finished work is kept) instead of becoming one failed result per video.
STOP_THE_RUN = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _guarded(function: Callable[..., dict], item: Any, *args) -> dict:
    try:
        return function(item, *args)
    except Exception as error:  # one bad video must not stop the others
        if isinstance(error, OSError) and error.errno in STOP_THE_RUN:
            raise
        return {"status": "failed", "reason": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(limit=5), "item": repr(item)}


def run_jobs(function: Callable[..., dict], items: Sequence[Any], *args, workers: int = 1,
             backend: str = "loky", scheduler: str | None = None, desc: str = "videos",
             show_progress: bool = True) -> list[dict]:
    """Apply ``function(item, *args)`` to every item; returns the result dicts in input order.

    Args:
        workers: processes on this machine (``loky``); ignored for ``dask`` (the cluster decides).
        backend: ``loky`` (default), ``sequential`` (in this process, for debugging), or ``dask``.
        scheduler: Dask scheduler address (``tcp://host:8786``) for ``backend='dask'``; None starts a
            LocalCluster on this machine.
    """
    results: list[dict | None] = [None] * len(items)
    progress = tqdm(total=len(items), desc=desc, unit="video", disable=not show_progress, dynamic_ncols=True)
    with progress:
        if backend == "sequential" or (backend == "loky" and workers <= 1):
            for index, item in enumerate(items):
                results[index] = _guarded(function, item, *args)
                progress.update()
            return results  # type: ignore[return-value]
        import joblib

        if backend == "dask":
            try:
                from dask.distributed import Client
            except ImportError:
                raise RuntimeError("--backend dask needs the optional extra: pip install 'dask[distributed]'") from None
            client = Client(scheduler) if scheduler else Client(processes=False, n_workers=1,
                                                                 threads_per_worker=max(1, workers))
            context = joblib.parallel_config(backend="dask")
        elif backend == "loky":
            client, context = None, nullcontext()
        else:
            raise ValueError(f"unknown backend '{backend}' (choose loky, sequential or dask)")
        try:
            with context:
                parallel = joblib.Parallel(n_jobs=workers if backend == "loky" else -1,
                                           return_as="generator_unordered")
                indexed = joblib.delayed(_indexed)
                for index, result in parallel(indexed(i, function, item, *args) for i, item in enumerate(items)):
                    results[index] = result
                    progress.update()
        finally:
            if client is not None:
                client.close()
    return results  # type: ignore[return-value]


def _indexed(index: int, function: Callable[..., dict], item: Any, *args) -> tuple[int, dict]:
    return index, _guarded(function, item, *args)
