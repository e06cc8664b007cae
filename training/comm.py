"""Distributed helpers in one place (after detectron2's ``comm.py``).

Every function degrades to a single process when ``torch.distributed`` is not initialised, so training and
evaluation code calls them unconditionally: ``all_gather(x)`` is ``[x]``, ``reduce_dict(d)`` is ``d`` and
``synchronize()`` does nothing.

A launch under ``torchrun`` looks like::

    rank, world_size, local_rank, device = comm.init_distributed()
    comm.seed_everything(seed)                      # same seed on every rank: identical initial weights
    model = DistributedDataParallel(model.to(device), device_ids=[local_rank] if device.type == "cuda" else None)
    ...
    torch.save(comm.unwrap(model).state_dict(), path) if comm.is_main_process() else None
    comm.cleanup()

Pickled objects (``all_gather``, ``broadcast_object``) travel over a gloo group even when the training
backend is NCCL, so gathering evaluation results does not take GPU memory.
"""
from __future__ import annotations

import functools
import logging
import os
import random
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DataParallel, DistributedDataParallel

log = logging.getLogger(__name__)

__all__ = [
    "is_distributed", "get_world_size", "get_rank", "get_local_rank", "is_main_process", "synchronize",
    "all_gather", "broadcast_object", "reduce_dict", "init_distributed", "cleanup", "unwrap", "seed_everything",
    "resolve_device",
]


def is_distributed() -> bool:
    """True when a default process group exists (``init_process_group`` was called)."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes in the default group; 1 without torch.distributed."""
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    """Global rank of this process; 0 without torch.distributed."""
    return dist.get_rank() if is_distributed() else 0


def get_local_rank() -> int:
    """Rank of this process on its machine (torchrun's ``LOCAL_RANK``); 0 without torch.distributed."""
    return int(os.environ.get("LOCAL_RANK", 0)) if is_distributed() else 0


def is_main_process() -> bool:
    """True on rank 0: the process that logs, writes checkpoints and result files."""
    return get_rank() == 0


def synchronize() -> None:
    """Barrier across all processes; a no-op for a single process."""
    if get_world_size() == 1:
        return
    if dist.get_backend() == dist.Backend.NCCL:
        # Without device_ids NCCL guesses the device from the rank, which is wrong on multi-node launches.
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@functools.lru_cache(maxsize=None)
def _object_group() -> dist.ProcessGroup:
    """The group that carries pickled objects: the default group, or a gloo twin of an NCCL one."""
    if dist.get_backend() == dist.Backend.NCCL:
        return dist.new_group(backend="gloo")
    return dist.group.WORLD


def all_gather(obj: Any) -> list[Any]:
    """Gather any picklable object from every rank.

    Args:
        obj: the object of this rank (numpy arrays, dicts, lists, CPU tensors...).

    Returns:
        One object per rank, in rank order, on every rank. ``[obj]`` for a single process.
    """
    world_size = get_world_size()
    if world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj, group=_object_group())
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (the argument of other ranks is ignored); ``obj`` for one process."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_object_group())
    return box[0]


def _reduced_dtype(value: torch.Tensor, average: bool) -> torch.dtype:
    if value.is_floating_point():
        return value.dtype
    return torch.float64 if average else value.dtype


def reduce_dict(values: dict[str, torch.Tensor | float], average: bool = True) -> dict[str, torch.Tensor]:
    """Sum or average scalar values over all ranks, e.g. losses for logging.

    Every rank must pass the same keys. All ranks receive the result (an all-reduce, not a reduce to rank 0),
    so decisions taken from it agree across ranks. Values are detached: this is for logging and bookkeeping,
    not for back-propagation.

    Args:
        values: name -> scalar tensor (or Python number). With NCCL the tensors must be on this rank's GPU.
        average: divide the sum by the world size.

    Returns:
        name -> scalar tensor. Floating values keep their dtype; integers stay integers when summed and
        become float64 when averaged.
    """
    tensors = {name: torch.as_tensor(value).detach() for name, value in values.items()}
    for name, tensor in tensors.items():
        if tensor.numel() != 1:
            raise ValueError(f"reduce_dict expects scalars; {name!r} has shape {tuple(tensor.shape)}")
    world_size = get_world_size()
    if world_size == 1 or not tensors:
        return {name: tensor.reshape(()).to(_reduced_dtype(tensor, average)) for name, tensor in tensors.items()}
    names = sorted(tensors)  # dict order may differ between ranks; the stacked vector must not
    device = tensors[names[0]].device
    # float64 so that large integer counts and small losses survive the sum exactly enough.
    stacked = torch.stack([tensors[name].reshape(()).to(device, torch.float64) for name in names])
    dist.all_reduce(stacked)
    if average:
        stacked /= world_size
    return {name: stacked[i].to(_reduced_dtype(tensors[name], average)) for i, name in enumerate(names)}


def init_distributed(backend: str | None = None,
                     timeout: timedelta | None = None) -> tuple[int, int, int, torch.device]:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    Without those variables (a plain ``python train.py``) nothing is initialised and single-process values
    are returned. Calling it again once initialised returns the current values.

    Args:
        backend: "nccl" or "gloo"; default NCCL when CUDA is available, gloo otherwise.
        timeout: collective timeout (torch's default when None).

    Returns:
        (rank, world_size, local_rank, device): the device is ``cuda:<local_rank>`` (made current, so NCCL
        and ``.cuda()`` calls use this rank's GPU) or the CPU.

    Raises:
        RuntimeError: NCCL was requested on a machine without CUDA.
    """
    cuda = torch.cuda.is_available()
    if is_distributed():
        local_rank = get_local_rank()
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        return get_rank(), get_world_size(), local_rank, device
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0, torch.device("cuda", 0) if cuda else torch.device("cpu")

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise RuntimeError("backend 'nccl' needs CUDA, which is not available; use backend='gloo' on CPU")
    options: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    if cuda:
        # Before init: otherwise every rank's NCCL communicator (and stray .cuda() calls) lands on GPU 0.
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        if backend == "nccl":
            options["device_id"] = device
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size, **options)
    log.info("distributed: rank %d of %d (local rank %d, backend %s, device %s)",
             rank, world_size, local_rank, backend, device)
    return rank, world_size, local_rank, device


def resolve_device(name: str) -> torch.device:
    """The device a setting names: ``auto`` is this rank's own device under torchrun (its GPU, or the CPU with
    gloo) and otherwise CUDA when available; ``cpu``, ``cuda``, ``cuda:N`` as written.

    Raises:
        ValueError: CUDA requested where there is none (the message names the setting's value).
    """
    if name == "auto":
        if is_distributed():
            return init_distributed()[3]
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name}: requested but CUDA is not available (use device cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device {name!r}: not a device name (cpu, cuda, cuda:N or auto; {error})") from None


def cleanup() -> None:
    """Leave the process group (all groups are destroyed); a no-op when not initialised."""
    if is_distributed():
        if dist.get_backend() == "gloo":
            # Every rank first finishes its collectives: gloo aborts the process ("terminate called without an
            # active exception") when a rank tears down its connections while the other still uses them. A
            # monitored barrier times out instead of hanging when a rank is gone.
            try:
                dist.monitored_barrier(timeout=timedelta(seconds=30))
            except RuntimeError as error:
                log.warning("cleanup: ranks did not all reach the barrier (%s)", error)
        dist.destroy_process_group()
    _object_group.cache_clear()  # the cached gloo group died with the default group


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside (possibly nested) DistributedDataParallel / DataParallel wrappers.

    Save and load state dicts through this, so checkpoints carry no ``module.`` prefix whatever the launch.
    """
    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device).

    Use the same seed on every rank for identical initial weights; add the rank for per-rank randomness.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)  # NumPy only takes 32-bit seeds
    torch.manual_seed(seed)
