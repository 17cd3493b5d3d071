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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from kdforge import errors
from kdforge.errors import ConfigError, KDForgeError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: its global rank, the number of processes, its GPU index on the node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and writes files."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def launched_world_size() -> int:
    """The ``WORLD_SIZE`` torchrun set for this process (1 without torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def current() -> DistInfo:
    """This process's rank facts: from the initialised process group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return DistInfo()


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


def _device() -> torch.device:
    # nccl moves tensors between GPUs only; gloo works on host tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place (on its own device for nccl, via the host for gloo); returns ``t``."""
    if not current().enabled:
        return t
    comm = _device()
    if t.device == comm:
        dist.all_reduce(t)
        return t
    buf = t.to(comm)
    dist.all_reduce(buf)
    t.copy_(buf)
    return t


def all_gather_cat(t: Tensor) -> Tensor:
    """``[W·B, ...]``: every rank's ``[B, ...]`` tensor (same shape on every rank), concatenated in rank order."""
    info = current()
    if not info.enabled:
        return t
    comm = _device()
    src = t.detach().to(comm).contiguous()
    out = [torch.empty_like(src) for _ in range(info.world_size)]
    dist.all_gather(out, src)
    return torch.cat(out).to(t.device)


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module, ignore: list[str] | tuple[str, ...] = ()) -> None:
    """Copy rank 0's buffers (BN statistics, method counters) to every rank, except those named in ``ignore``.

    DDP broadcasts buffers at the start of each forward, so after the last step of an epoch every rank still holds
    its own last update; evaluation and checkpoints need the one set of statistics rank 0 saves.
    """
    if not current().enabled:
        return
    comm = _device()
    for name, buf in module.named_buffers():
        if name in ignore:
            continue
        tmp = buf.to(comm)
        dist.broadcast(tmp, src=0)
        buf.copy_(tmp)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each rank the summed gradient of its own rows (any backend: one all-reduce)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        ctx.rows = t.shape[0]
        return all_gather_cat(t)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = all_reduce_sum(grad.contiguous().clone())
        start = current().rank * ctx.rows
        return grad[start : start + ctx.rows]


def all_gather_with_grad(t: Tensor) -> Tensor:
    """``[W·B, ...]``: every rank's rows, differentiable with respect to this rank's ``t``.

    For a loss every rank computes identically over the gathered rows (a relation over the global batch), rank r's
    rows receive the sum of all ranks' gradients, ``W·∂L/∂x_r``; DDP's averaging then divides by W, so the parameters
    get exactly ``∂L/∂θ`` of one process computing ``L`` on the union of the batches.
    """
    if not current().enabled:
        return t
    return _GatherWithGrad.apply(t)


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` has it, on every rank (pickled; meant for small things and one-off checkpoints)."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_device())
    return box[0]


def gather_objects(obj: T) -> list[T] | None:
    """Every rank's ``obj`` in rank order on rank 0 (``None`` elsewhere); ``[obj]`` for a single process."""
    info = current()
    if not info.enabled:
        return [obj]
    out: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and hand its result, or the kdforge error it raised, to every rank.

    Used for what only rank 0 may do or decide (create the run directory, read the checkpoint): if it fails, every
    rank raises the same error and exits together instead of waiting at the next collective for rank 0.
    """
    info = current()
    if not info.enabled:
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    if info.is_main:
        try:
            outcome = ("ok", fn())
        except Exception as err:
            # Any failure is announced before rank 0 raises it, or the others would wait for the broadcast.
            broadcast_object(("error", (type(err).__name__, str(err))))
            raise
    kind, value = broadcast_object(outcome)
    if kind == "error":
        name, message = value
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, KDForgeError):
            raise cls(message)
        raise KDForgeError(f"rank 0 failed with {name}: {message}")
    return value


__all__ = [
    "DistInfo",
    "all_gather_cat",
    "all_gather_with_grad",
    "all_reduce_sum",
    "broadcast_buffers",
    "broadcast_object",
    "current",
    "gather_objects",
    "init_distributed",
    "launched_world_size",
    "on_main",
    "shutdown",
]
