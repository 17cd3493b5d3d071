"""One optimizer update (:func:`update_step`): forward under autocast, scaled backward, clipping, the step, and the
non-finite skip that leaves everything as it was. ``fit`` and ``kdforge bench`` both train through it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdforge import collectives
from kdforge.data.batch import Batch
from kdforge.engine.env import autocast
from kdforge.methods.base import Progress, StepOutput


def _params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def update_step(
    step_fn: Callable[[Batch, Progress], StepOutput],
    batches: Batch | Sequence[Batch],
    progress: Progress,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    dtype: torch.dtype,
    grad_clip: float | None = None,
    skip_nonfinite: bool = False,
    buffers: list[Tensor] | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    distributed: bool = False,
) -> tuple[list[StepOutput], bool]:
    """One optimizer update: the method's forward under autocast, a (scaled) backward, optional clipping, the step.

    ``fit`` and ``kdforge bench`` both train through this function, so the benchmark times exactly the update
    users run. ``batches`` may be several micro-batches (``train.grad_accum``): each one's loss is divided by their
    number and backpropagated in turn, so the update uses the mean gradient over all of them; under DDP ``no_sync``
    (the wrapper's context) keeps all but the last backward from all-reducing. Nothing here reads a value back to
    the host. With ``skip_nonfinite``, an update whose losses or gradients are not finite changes nothing:
    parameters and optimizer state stay as they were, and ``buffers`` (the method's BN statistics, memory banks,
    ...), which the forward passes already updated, are put back; the verdict stays on the device (one copy of the
    parameters, optimizer state and buffers per step). fp16 runs detect the step through the GradScaler, which
    reads its verdict on the host as PyTorch's scaler always does. With ``distributed`` the verdict is agreed over
    all ranks, so no rank steps while another skips.

    Returns:
        ``(results, applied)``: the method's output for each micro-batch and whether the optimizer step was taken:
        a ``bool``, or with ``skip_nonfinite`` outside fp16 a 0-dim bool tensor on the device (reading it syncs).
    """
    group = [batches] if isinstance(batches, Batch) else list(batches)
    saved = [b.detach().clone() for b in buffers] if skip_nonfinite and buffers else []
    optimizer.zero_grad(set_to_none=True)
    results = []
    for k, batch in enumerate(group):
        # Gradients of the first micro-batches only accumulate locally; the last backward all-reduces their sum.
        sync = no_sync() if no_sync is not None and k < len(group) - 1 else contextlib.nullcontext()
        with sync:
            with autocast(device, dtype):
                result = step_fn(batch, progress)
            loss = result.loss / len(group) if len(group) > 1 else result.loss
            scaler.scale(loss).backward()
        results.append(result)

    if grad_clip is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        torch.nn.utils.clip_grad_norm_(_params(optimizer), grad_clip)
    if skip_nonfinite and not scaler.is_enabled():
        grads = [p.grad.detach().float().norm() for p in _params(optimizer) if p.grad is not None]
        finite = torch.isfinite(torch.stack([r.loss.detach().float() for r in results])).all()
        if grads:
            finite = finite & torch.isfinite(torch.stack(grads)).all()
        if distributed:
            # All-reduced gradients agree already; a rank's non-finite loss with finite gradients would not.
            bad = (~finite).to(torch.float64).reshape(1)
            finite = collectives.all_reduce_sum(bad)[0] == 0
        return results, _step_if_finite(optimizer, finite, buffers or [], saved)
    scale = scaler.get_scale() if skip_nonfinite and scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    if scale is not None and scaler.get_scale() < scale:  # the scaler found inf/NaN and skipped the step
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, old in zip(buffers or [], saved, strict=False):
                b.copy_(old)
        return results, False
    return results, True


@torch.no_grad()
def _step_if_finite(
    optimizer: torch.optim.Optimizer, finite: Tensor, buffers: list[Tensor], saved: list[Tensor]
) -> Tensor:
    """Take the optimizer step, then put parameters, optimizer state and ``buffers`` back wherever ``finite`` is false.

    Everything stays on the device: the verdict selects between new and old values with ``torch.where`` instead of
    being read by the host, at the price of one copy of the parameters and optimizer state per step. State the step
    created (SGD momentum, Adam moments and step count on a first step) is put back to zeros, which is exactly the
    state a fresh optimizer starts from (SGD without dampening, Adam/AdamW).

    Returns:
        ``finite`` (0-dim bool on the device): whether the step was kept.
    """
    params = [p for p in _params(optimizer) if p.grad is not None]
    old_params = [p.detach().clone() for p in params]
    old_state = {
        p: {k: v.clone() for k, v in optimizer.state[p].items() if isinstance(v, Tensor)}
        for p in params
        if p in optimizer.state
    }
    optimizer.step()
    for p, old in zip(params, old_params, strict=True):
        p.copy_(torch.where(finite, p, old))
    for p in params:
        before = old_state.get(p, {})
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, Tensor):
                old = before[key] if key in before else torch.zeros_like(value)
                value.copy_(torch.where(finite.to(value.device), value, old))
    for b, old in zip(buffers, saved, strict=False):
        b.copy_(torch.where(finite, b, old))
    return finite


__all__ = ["update_step"]
