"""Fixtures shared by the synthesis tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread: the tensors here are small, and on a busy shared machine extra threads only wait."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
