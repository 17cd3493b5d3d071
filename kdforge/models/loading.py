"""Loading weight files from kdforge, RepDistiller/mdistiller and torchvision into zoo models.

Every failure is a one-line :class:`~kdforge.errors.CheckpointError` that names the offending keys and shapes,
instead of PyTorch's multi-line ``load_state_dict`` report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdforge.errors import CheckpointError

# Keys under which training scripts nest the weights: RepDistiller saves {"model": sd, "epoch": ..,
# "accuracy": ..}, Lightning-style code "state_dict", kdforge's student-only exports "student", older repos "net".
CONTAINER_KEYS = ("model", "state_dict", "student", "net")
# Wrapper prefixes: DataParallel/DDP add "module.", torch.compile's OptimizedModule adds "_orig_mod.".
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
MAX_LISTED = 5


def _read(path: str | Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file (missing, truncated, pickled code) is the user's input problem
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read weights from {path}: {first}") from None


def _unwrap(obj: Any) -> Mapping[str, Any]:
    """The innermost state dict: descends through container keys while their value is a mapping."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        kind = type(obj).__name__
        keys = ", ".join(map(str, list(obj)[:MAX_LISTED])) if isinstance(obj, Mapping) else ""
        raise CheckpointError(
            f"no state dict found (got {kind}{' with keys ' + keys if keys else ''}); "
            f"expected tensors, possibly under one of {', '.join(CONTAINER_KEYS)}"
        )
    return obj


def _strip_prefixes(state: Mapping[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Removes wrapper prefixes from keys, unless the model itself has keys with that prefix."""
    out = dict(state)
    for prefix in WRAPPER_PREFIXES:
        if any(k.startswith(prefix) for k in model_keys):
            continue
        # Nested wrappers (DDP around a compiled model) stack prefixes; torch.compile of a submodule puts
        # "_orig_mod." mid-key, so that one is removed wherever it occurs as a path segment.
        renamed = {}
        for key, value in out.items():
            while key.startswith(prefix):
                key = key[len(prefix) :]
            if prefix == "_orig_mod.":
                key = key.replace("._orig_mod.", ".")
            renamed[key] = value
        out = renamed
    return out


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f", ... ({len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def load_weights(
    model: nn.Module, source: Mapping[str, Any] | str | Path, strict: bool = True, drop: Sequence[str] = ()
) -> nn.Module:
    """Loads a state dict or weight file into ``model`` in place.

    Accepts plain state dicts, RepDistiller/mdistiller checkpoints (``{"model": sd, "epoch": ...}``), the
    containers ``state_dict``/``student``/``net``, and keys prefixed by DataParallel/DDP (``module.``) or
    ``torch.compile`` (``_orig_mod.``). BatchNorm ``num_batches_tracked`` buffers missing from old checkpoints are
    tolerated.

    Args:
        model: the model to fill.
        source: a state dict (possibly wrapped) or the path of a file written by ``torch.save``.
        strict: when False, missing and unexpected keys are ignored; shape mismatches always fail.
        drop: key prefixes of the source left out before any check (a classifier replaced by another head).

    Returns:
        ``model``.

    Raises:
        CheckpointError: the file cannot be read, holds no state dict, or does not fit ``model`` (one line naming
            up to five missing keys, five unexpected keys and five shape mismatches).
    """
    obj = _read(source) if isinstance(source, (str, Path)) else source
    own = model.state_dict()
    state = _strip_prefixes(_unwrap(obj), set(own))
    state = {k: v for k, v in state.items() if not k.startswith(tuple(drop))}

    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing key{'s' * (len(missing) != 1)} ({_listed(missing)})")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key{'s' * (len(unexpected) != 1)} ({_listed(unexpected)})")
    if mismatched:
        shown = [f"{k}: checkpoint {_shape(state[k])} vs model {_shape(own[k])}" for k in mismatched[:MAX_LISTED]]
        more = f", ... ({len(mismatched) - MAX_LISTED} more)" if len(mismatched) > MAX_LISTED else ""
        problems.append(f"{len(mismatched)} shape mismatch{'es' * (len(mismatched) != 1)} ({', '.join(shown)}{more})")
    if problems:
        raise CheckpointError(
            f"weights do not fit {type(model).__name__}: {'; '.join(problems)}; "
            "is this checkpoint for another architecture or class count?"
        )
    if not strict:
        state = {k: v for k, v in state.items() if k in own}
    try:
        # strict=False: the checks above already did strict's job, and BatchNorm fills num_batches_tracked.
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CheckpointError(f"weights do not fit {type(model).__name__}: {first}") from None
    return model


__all__ = ["CONTAINER_KEYS", "load_weights"]
