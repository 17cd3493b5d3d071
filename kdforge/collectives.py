"""Collective operations and rank facts, usable from every layer: the engine, methods (CRD, RKD) and evaluators.

A leaf module: it imports only torch and :mod:`kdforge.errors`, so a method or a task can all-gather without
importing the engine. Without an initialised process group (no torchrun, or one process) every function here is a
cheap no-op. Joining and leaving the process group is the engine's business (:mod:`kdforge.engine.distributed`).
"""

from __future__ import annotations

import os
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


class CollectiveReducer:
    """The :class:`kdforge.tasks.base.Reducer` of this process group: ``sum`` all-reduces, ``gather`` gathers to
    rank 0. In a single process both are the identity (``gather`` returns ``[obj]``)."""

    def sum(self, tensor: Tensor) -> Tensor:
        return all_reduce_sum(tensor)

    def gather(self, obj: Any) -> list[Any] | None:
        return gather_objects(obj)


__all__ = [
    "CollectiveReducer",
    "DistInfo",
    "all_gather_cat",
    "all_gather_with_grad",
    "all_reduce_sum",
    "broadcast_buffers",
    "broadcast_object",
    "current",
    "gather_objects",
    "launched_world_size",
    "on_main",
]
