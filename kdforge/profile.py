"""What a network costs to ship: parameters, multiply-accumulates, weight size and CPU latency.

MACs are counted by forward hooks on the layers that hold nearly all of a CNN's arithmetic (convolutions, transposed
convolutions, linear layers); BatchNorm, activations, pooling and residual additions are left out, as torchvision's
and the KD papers' "FLOPs" columns leave them out (those columns count multiply-accumulates, not 2x of them).
Latency is measured, never assumed: the median and 90th percentile of timed forward passes after a warm-up, under
``torch.inference_mode`` with a stated number of CPU threads.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kdforge.errors import KDForgeError
from kdforge.models import count_parameters

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the state dict with floating tensors stored as fp32 (integer buffers at their own width).

    This is the size of ``student.pt`` on disk up to the container's few kilobytes of overhead.
    """
    total = 0
    for t in model.state_dict().values():
        total += t.numel() * (4 if t.is_floating_point() else t.element_size())
    return total


def _layer_macs(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    if isinstance(module, _CONV):
        # Every output element is a dot product over (in_channels / groups) x kernel area inputs.
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return output.numel() * per_output
    if isinstance(module, _CONV_T):
        # A transposed convolution scatters every input element into (out_channels / groups) x kernel area outputs.
        per_input = (module.out_channels // module.groups) * math.prod(module.kernel_size)
        return inputs[0].numel() * per_input
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on a zero tensor of ``input_shape`` (batch included).

    Counts ``Conv{1,2,3}d`` (output elements x in_channels/groups x kernel area), ``ConvTranspose{1,2,3}d`` (input
    elements x out_channels/groups x kernel area) and ``Linear`` (output elements x in_features). A layer called
    twice is counted twice. Divide by the batch size for MACs per image.

    Args:
        model: any module; its training mode is restored afterwards.
        input_shape: e.g. ``(1, 3, 32, 32)``.
    """
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += _layer_macs(module, inputs, output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (*_CONV, *_CONV_T, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model(torch.zeros(*input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    runs: int = 50,
    warmup: int = 10,
    threads: int | None = None,
) -> dict[str, float | int]:
    """CPU latency of ``model`` on a random batch of ``input_shape``: median and p90 of ``runs`` timed passes (ms).

    The model runs in eval mode on the CPU (it is moved there and back); ``threads`` sets ``torch.set_num_threads``
    for the measurement only (default: the current setting, which is reported).
    """
    if runs < 1 or warmup < 0 or (threads is not None and threads < 1):
        raise KDForgeError(
            f"latency needs runs >= 1, warmup >= 0, threads >= 1; got runs={runs}, warmup={warmup}, threads={threads}"
        )
    old_threads = torch.get_num_threads()
    param = next(model.parameters(), None)
    old_device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        model.to("cpu").eval()
        x = torch.randn(*input_shape)
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(old_threads)
        model.to(old_device).train(was_training)
    times.sort()
    p90 = times[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)]  # nearest-rank percentile
    return {
        "batch": int(input_shape[0]),
        "median_ms": statistics.median(times),
        "p90_ms": p90,
        "runs": runs,
        "threads": used,
    }


def profile_model(
    model: nn.Module,
    name: str,
    image_size: int,
    *,
    role: str = "",
    batch_sizes: Sequence[int] = (1,),
    runs: int = 50,
    warmup: int = 10,
    threads: int | None = None,
    in_channels: int = 3,
) -> dict[str, Any]:
    """Parameters, MACs per image, fp32 size and CPU latency at each of ``batch_sizes`` for one network."""
    macs = count_macs(model, (1, in_channels, image_size, image_size))
    latency = [
        measure_latency(model, (b, in_channels, image_size, image_size), runs=runs, warmup=warmup, threads=threads)
        for b in dict.fromkeys(batch_sizes)
    ]
    return {
        "role": role,
        "model": name,
        "image_size": image_size,
        "params": count_parameters(model),
        "macs": macs,
        "size_mib": state_dict_bytes(model) / 2**20,
        "latency": latency,
    }


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_profile(rows: list[dict[str, Any]]) -> str:
    """The profile rows as a Markdown table, plus one line comparing student and teacher when both are present."""
    batches = sorted({lat["batch"] for r in rows for lat in r["latency"]})
    head = ["role", "model", "input", "params", "MACs", "size (MiB)"]
    head += [f"CPU ms b{b} (median / p90)" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        by_batch = {lat["batch"]: lat for lat in r["latency"]}
        cells = [r.get("role") or "-", r["model"], f"{r['image_size']}x{r['image_size']}"]
        cells += [_human(r["params"]), _human(r["macs"]), f"{r['size_mib']:.2f}"]
        for b in batches:
            lat = by_batch.get(b)
            cells.append(f"{lat['median_ms']:.2f} / {lat['p90_ms']:.2f}" if lat else "-")
        lines.append("| " + " | ".join(cells) + " |")
    threads = sorted({lat["threads"] for r in rows for lat in r["latency"]})
    runs = sorted({lat["runs"] for r in rows for lat in r["latency"]})
    lines.append("")
    lines.append(
        f"CPU latency: {'/'.join(map(str, runs))} timed runs after warm-up, torch.inference_mode, fp32, "
        f"{'/'.join(map(str, threads))} thread(s) of {os.cpu_count()} cores; MACs per image."
    )
    roles = {r.get("role"): r for r in rows}
    if "student" in roles and "teacher" in roles:
        s, t = roles["student"], roles["teacher"]
        s1 = min(s["latency"], key=lambda lat: lat["batch"])
        t1 = next((lat for lat in t["latency"] if lat["batch"] == s1["batch"]), None)
        parts = [
            f"{t['params'] / max(s['params'], 1):.1f}x fewer parameters",
            f"{t['macs'] / max(s['macs'], 1):.1f}x fewer MACs",
        ]
        if t1 is not None:
            parts.append(f"{t1['median_ms'] / max(s1['median_ms'], 1e-9):.1f}x faster at batch {s1['batch']}")
        lines.append("Student vs teacher: " + ", ".join(parts) + ".")
    return "\n".join(lines)


__all__ = [
    "count_macs",
    "count_parameters",
    "format_profile",
    "measure_latency",
    "profile_model",
    "state_dict_bytes",
]
