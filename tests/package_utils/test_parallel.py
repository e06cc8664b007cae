"""run_jobs: a failing job becomes a failed result, the others still run, results come in input order."""
from __future__ import annotations

import os
import time

import pytest

from package_utils.parallel import run_jobs


def square_or_fail(item: int, delay: float) -> dict:
    """Module-level so worker processes can import it; later items finish first."""
    time.sleep(delay * (5 - item))
    if item % 3 == 2:
        raise ValueError(f"item {item} is bad")
    return {"status": "ok", "value": item * item, "pid": os.getpid()}


def check(results: list[dict]) -> None:
    assert [r["status"] for r in results] == ["ok", "ok", "failed", "ok", "ok", "failed"]
    assert [r.get("value") for r in results] == [0, 1, None, 9, 16, None]
    assert results[2]["reason"] == "ValueError: item 2 is bad"
    assert "square_or_fail" in results[5]["traceback"] and results[5]["item"] == "5"


def test_sequential() -> None:
    results = run_jobs(square_or_fail, range(6), 0.0, backend="sequential", show_progress=False)
    check(results)
    assert {r["pid"] for r in results if "pid" in r} == {os.getpid()}


def test_loky_processes_keep_input_order() -> None:
    results = run_jobs(square_or_fail, list(range(6)), 0.05, workers=2, backend="loky", show_progress=False)
    check(results)
    assert os.getpid() not in {r["pid"] for r in results if "pid" in r}


def test_dask_local_client() -> None:
    results = run_jobs(square_or_fail, list(range(6)), 0.02, workers=2, backend="dask", show_progress=False)
    check(results)


def test_one_worker_runs_in_process() -> None:
    results = run_jobs(square_or_fail, [0, 1], 0.0, workers=1, backend="loky", show_progress=False)
    assert {r["pid"] for r in results} == {os.getpid()}


def test_no_items() -> None:
    assert run_jobs(square_or_fail, [], 0.0, workers=2, show_progress=False) == []


def test_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown backend 'ray'"):
        run_jobs(square_or_fail, [0], 0.0, workers=2, backend="ray", show_progress=False)
