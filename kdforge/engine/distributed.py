"""Distributed training through torchrun: process-group setup, rank facts and the few collectives the engine uses.

kdforge has no launcher of its own. ``torchrun --nproc_per_node=N -m kdforge distill ...`` starts N processes and sets
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous address; :func:`init_distributed` turns that into a
process group (nccl on CUDA, gloo on the CPU), and everything else asks :func:`current` where it stands. Without
torchrun (or with one process) every function here is a cheap no-op, so single-process code never branches on it.

Faults: a rank that raises exits, its sockets close, and a peer blocked in a gloo collective fails at once with a
connection error; torchrun then stops the remaining workers and reports the first failure. ``dist_timeout_s``
bounds how long a collective waits for a peer that neither answers nor dies (nccl watchdog, gloo timeout). Errors
that are decided on rank 0 alone (the run directory, the checkpoint to resume) go through :func:`on_main`, which
raises the same error on every rank, so no rank waits for a partner that has already left.
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
import warnings

import torch
import torch.distributed as dist

# The collectives live in the leaf module kdforge.collectives (methods use them too); they are re-exported here so
# engine code and existing callers keep reading `distributed.all_reduce_sum(...)`.
from kdforge import collectives
from kdforge.collectives import (  # noqa: F401 (re-exported: see collectives.__all__ below)
    CollectiveReducer,
    DistInfo,
    _env_int,
    all_gather_cat,
    all_gather_with_grad,
    all_reduce_sum,
    broadcast_buffers,
    broadcast_object,
    current,
    gather_objects,
    launched_world_size,
    on_main,
)
from kdforge.errors import ConfigError


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Join the process group torchrun prepared (idempotent; a no-op for a single process).

    Args:
        device: the run's ``train.device``; ``cpu`` forces gloo even where GPUs exist.
        timeout_s: how long a collective waits for a silent peer before failing.

    Raises:
        ConfigError: more processes per node than GPUs, or torchrun's variables are malformed.
    """
    world = launched_world_size()
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run a single process (without torchrun)")
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                "lower torchrun's --nproc_per_node to the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
    # DDP warns when a 1x1 convolution's weight gradient comes back with the (equivalent) channels-last strides of
    # its size-1 dimensions; the layouts hold the same bytes, so the warning only alarms users.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=torch.device("cuda", local_rank) if use_cuda else None,
    )
    return current()


def shutdown() -> None:
    """End a successful distributed run: wait until every rank is done, so none exits while a peer still talks to it.

    Do not call this after an error (a peer may be inside another collective and the barrier would pair with it);
    just exit, and torchrun stops the rest. The nccl group is destroyed here, as NCCL asks; the gloo group is left
    to process exit, because destroying it while its threads wind down aborted the process in about one run of
    eight here (torch 2.13, CPU).
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """Leave a torchrun worker with ``code`` without Python's interpreter teardown.

    Gloo's worker threads can still hold tensors when the interpreter finalizes, and their release then aborts the
    process (SIGABRT, "terminate called without an active exception"; about one finished run in sixteen here with
    torch 2.13, even after :func:`shutdown`), which torchrun reports as a failed job although every file was written.
    kdforge's files are written atomically and fsynced as they go, so nothing is lost by skipping the teardown.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


__all__ = ["exit_process", "init_distributed", "shutdown", *collectives.__all__]
