"""Distributed helpers: single-process fallbacks, and two real gloo processes on the CPU.

The two-process checks share one spawn (importing torch twice per spawn dominates the cost): each worker
joins through ``comm.init_distributed`` with torchrun's environment variables, runs every scenario and saves
what it saw; the tests below compare that with single-process references.
"""
from __future__ import annotations

import math
import os
import pickle
import random
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from training import comm
from training.metrics import BinaryEvaluator

WORLD_SIZE = 2
# 7 frames of 4 videos: a 2-rank DistributedSampler pads them to 8 by repeating frame 0.
FRAME_SCORES = [0.1, 0.6, 0.4, 0.8, 0.7, 0.2, 0.55]
FRAME_LABELS = [0, 0, 1, 1, 1, 1, 0]
FRAME_KEYS = ["ff/real/001", "ff/real/001", "ff/Deepfakes/000_003", "ff/Deepfakes/000_003",
              "ff/Face2Face/000_003", "ff/Face2Face/000_003", "ff/real/002"]
FAILED_VIDEO = ("ff/real/003", 0)


# ------------------------------------------------------------------------------------------------------------
# Single process
# ------------------------------------------------------------------------------------------------------------
def test_single_process_fallbacks():
    assert not dist.is_initialized()
    assert (comm.get_world_size(), comm.get_rank(), comm.get_local_rank()) == (1, 0, 0)
    assert comm.is_main_process()
    comm.synchronize()
    payload = {"a": np.arange(3)}
    assert comm.all_gather(payload) == [payload]
    assert comm.broadcast_object(payload) is payload
    reduced = comm.reduce_dict({"loss": torch.tensor(0.25, requires_grad=True), "count": torch.tensor(3)})
    assert reduced["loss"].item() == 0.25 and not reduced["loss"].requires_grad
    assert reduced["count"].dtype == torch.float64  # integer counts are averaged as floats
    assert comm.reduce_dict({"count": torch.tensor(3)}, average=False)["count"].dtype == torch.int64
    with pytest.raises(ValueError, match="expects scalars"):
        comm.reduce_dict({"loss": torch.ones(2)})
    comm.cleanup()  # harmless when nothing was initialised


def test_init_without_torchrun_variables_stays_single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    rank, world_size, local_rank, device = comm.init_distributed()
    assert (rank, world_size, local_rank) == (0, 1, 0)
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_nccl_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError, match="nccl.*CUDA"):
        comm.init_distributed(backend="nccl")
    assert not dist.is_initialized()


def test_unwrap_removes_every_wrapper():
    model = nn.Linear(2, 1)
    assert comm.unwrap(model) is model
    assert comm.unwrap(nn.DataParallel(nn.DataParallel(model))) is model


def test_seed_everything_repeats_every_generator():
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    comm.seed_everything(123)
    first = draws()
    comm.seed_everything(123)
    assert draws() == first
    comm.seed_everything(124)
    assert draws() != first
    comm.seed_everything(2**40 + 5)  # larger than NumPy's 32-bit seeds


# ------------------------------------------------------------------------------------------------------------
# Two gloo processes
# ------------------------------------------------------------------------------------------------------------
class SmallConvNet(nn.Module):
    """Conv -> ReLU -> global pool -> linear: no BatchNorm, so the loss is a per-sample mean."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3))).squeeze(1)


def make_model_and_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    comm.seed_everything(0)
    model = SmallConvNet().double()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 6, 6, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 2, (8,), generator=generator).double()
    return model, images, labels


def gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> list[np.ndarray]:
    model.zero_grad()
    nn.functional.binary_cross_entropy_with_logits(model(images), labels).backward()
    return [parameter.grad.detach().clone().numpy() for parameter in comm.unwrap(model).parameters()]


def evaluate_sharded(rank: int, world_size: int) -> dict:
    """The toy test set through a padded DistributedSampler, batches of 2, one failure reported by each rank."""
    sampler = torch.utils.data.DistributedSampler(range(len(FRAME_SCORES)), num_replicas=world_size, rank=rank,
                                                  shuffle=False)
    indices = list(sampler)
    evaluator = BinaryEvaluator(failure_score=0.5)
    for start in range(0, len(indices), 2):
        batch = indices[start:start + 2]
        scores = torch.tensor([FRAME_SCORES[i] for i in batch], dtype=torch.float64)  # as exact as the reference
        evaluator.process(scores, torch.tensor([FRAME_LABELS[i] for i in batch]), [FRAME_KEYS[i] for i in batch],
                          sample_ids=torch.tensor(batch))
    evaluator.add_failures([FAILED_VIDEO[0]], [FAILED_VIDEO[1]])
    return evaluator.evaluate()


def two_rank_worker(rank: int, port: int, output_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank))
    seen = {"init": comm.init_distributed(timeout=timedelta(seconds=60))}
    seen.update(rank=comm.get_rank(), world_size=comm.get_world_size(), local_rank=comm.get_local_rank(),
                main=comm.is_main_process())
    comm.synchronize()
    seen["gathered"] = comm.all_gather({"rank": rank, "items": list(range(rank + 2))})
    seen["broadcast"] = comm.broadcast_object(f"from rank {rank}", src=1)
    # Keys in a different order on each rank: reduce_dict must match them by name.
    values = {"loss": torch.tensor(1.0 + rank), "count": torch.tensor(10 * (rank + 1))}
    if rank == 1:
        values = dict(reversed(list(values.items())))
    seen["mean"] = {k: v.item() for k, v in comm.reduce_dict(values).items()}
    seen["sum"] = {k: (v.item(), v.dtype) for k, v in comm.reduce_dict(values, average=False).items()}

    seen["evaluation"] = evaluate_sharded(rank, WORLD_SIZE)

    model, images, labels = make_model_and_batch()
    half = slice(rank * 4, rank * 4 + 4)
    seen["local_gradients"] = gradients(model, images[half], labels[half])
    ddp = nn.parallel.DistributedDataParallel(model)
    seen["ddp_gradients"] = gradients(ddp, images[half], labels[half])

    comm.cleanup()
    seen["initialised_after_cleanup"] = dist.is_initialized()
    with open(os.path.join(output_dir, f"rank{rank}.pkl"), "wb") as handle:
        pickle.dump(seen, handle)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """What each of 2 spawned gloo processes observed, by rank."""
    output_dir = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(two_rank_worker, args=(free_port(), str(output_dir)), nprocs=WORLD_SIZE, join=True)
    results = []
    for rank in range(WORLD_SIZE):
        with open(output_dir / f"rank{rank}.pkl", "rb") as handle:
            results.append(pickle.load(handle))
    return results


def test_init_reads_torchrun_variables_and_cleanup_leaves(two_ranks):
    for rank, seen in enumerate(two_ranks):
        assert seen["init"] == (rank, WORLD_SIZE, rank, torch.device("cpu"))
        assert (seen["rank"], seen["world_size"], seen["local_rank"], seen["main"]) == (rank, 2, rank, rank == 0)
        assert seen["initialised_after_cleanup"] is False


def test_all_gather_broadcast_and_reduce_dict_across_ranks(two_ranks):
    for seen in two_ranks:
        assert seen["gathered"] == [{"rank": 0, "items": [0, 1]}, {"rank": 1, "items": [0, 1, 2]}]
        assert seen["broadcast"] == "from rank 1"
        assert seen["mean"] == {"loss": 1.5, "count": 15.0}
        assert seen["sum"] == {"loss": (3.0, torch.float32), "count": (30, torch.int64)}


def assert_results_equal(actual: dict, expected: dict) -> None:
    for level in ("frame", "video"):
        assert actual[level].keys() == expected[level].keys()
        for key, value in expected[level].items():
            assert actual[level][key] == value or (math.isnan(value) and math.isnan(actual[level][key])), key
    assert actual["videos"] == expected["videos"]
    assert actual["failed_videos"] == expected["failed_videos"]


def test_evaluator_across_two_ranks_equals_one_process(two_ranks):
    single = BinaryEvaluator(failure_score=0.5)
    single.process(FRAME_SCORES, FRAME_LABELS, FRAME_KEYS)
    single.add_failures([FAILED_VIDEO[0]], [FAILED_VIDEO[1]])
    expected = single.evaluate()
    assert expected["frame"]["n"] == 7 and expected["failed_videos"] == 1
    for seen in two_ranks:  # every rank gets the whole result
        assert_results_equal(seen["evaluation"], expected)


def test_ddp_gradient_on_two_halves_equals_the_full_batch_gradient(two_ranks):
    model, images, labels = make_model_and_batch()
    full = gradients(model, images, labels)
    for seen in two_ranks:
        for ddp, reference in zip(seen["ddp_gradients"], full):
            np.testing.assert_allclose(ddp, reference, rtol=0, atol=1e-12)
    # The check has teeth: each half alone gives a different gradient.
    for seen in two_ranks:
        assert not all(np.allclose(local, reference) for local, reference in zip(seen["local_gradients"], full))
