"""The feature API every kdforge model implements, and a scoped hook tap for models that do not.

Methods read stage features through :class:`Features` (returned by ``model.forward_features(x)``) and plan their
adapters from the static ``model.feature_info`` list, so a method never needs model-specific code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class FeatureInfo:
    """Static description of one feature map: its name, channel count and stride relative to the input."""

    name: str
    channels: int
    stride: int


@dataclass
class Features:
    """Everything a distillation method may read from one forward pass.

    Attributes:
        logits: ``[B, num_classes]``.
        feats: post-activation maps ``[stem, stage1, ..., stageL]``, each ``[B, C_l, H_l, W_l]``; matches
            ``model.feature_info`` one to one.
        preact_feats: the same maps before their final ReLU (equal to ``feats`` where a stage ends without one).
        pooled: the pooled penultimate vector ``[B, D]`` that the classifier consumes.
    """

    logits: Tensor
    feats: list[Tensor]
    preact_feats: list[Tensor]
    pooled: Tensor


# Reading features. kdforge models answer through ``forward_features``/``feature_info``; any other network (a user
# module, a third-party model) is read with temporary forward hooks, so every feature method runs on it too.


def classifier_of(model: nn.Module) -> nn.Linear:
    """The final linear layer: ``model.get_classifier()`` when the model has one, else its last ``nn.Linear``."""
    if hasattr(model, "get_classifier"):
        return model.get_classifier()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to read pooled features from")
    return linears[-1]


def pooled_dim(model: nn.Module) -> int:
    """Width ``D`` of the pooled vector the classifier consumes, read statically."""
    dim = getattr(model, "num_features", 0)
    return dim if dim else classifier_of(model).in_features


def _hooked_features(model: nn.Module, x: Tensor) -> Features:
    """Features of a model without ``forward_features``, read by hooks that are removed before returning.

    Stage maps are the *last* 4-D output at each spatial size, in the order the sizes first appear (a stage's
    container module reports after its inner layers, so this is the stage output); 1×1 maps (global pooling) are
    skipped. ``pooled`` is the classifier's input.
    """
    maps: list[Tensor] = []
    pooled: list[Tensor] = []

    def keep(_module: nn.Module, _inputs: object, out: object) -> None:
        if isinstance(out, Tensor) and out.ndim == 4:
            maps.append(out)

    def keep_input(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        pooled.append(inputs[0])

    handles = [m.register_forward_hook(keep) for m in model.modules() if m is not model]
    handles.append(classifier_of(model).register_forward_pre_hook(keep_input))
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    by_size: dict[tuple[int, int], Tensor] = {}
    for f in maps:
        if tuple(f.shape[-2:]) != (1, 1):
            by_size[(f.shape[-2], f.shape[-1])] = f  # a dict keeps the first-seen order and the last value
    feats = list(by_size.values())
    return Features(logits=logits, feats=feats, preact_feats=feats, pooled=pooled[-1].flatten(1))


def read_features(model: nn.Module, x: Tensor) -> Features:
    """``model.forward_features(x)`` for kdforge models, hook-read :class:`Features` for any other network."""
    if hasattr(model, "forward_features"):
        return model.forward_features(x)
    return _hooked_features(model, x)


def feature_layout(model: nn.Module, probe_size: int = 32) -> list[FeatureInfo]:
    """Static ``feature_info`` of a kdforge model; for other networks, one probe forward in eval mode.

    Args:
        model: the network.
        probe_size: side of the zero image used to probe a network that has no ``feature_info``.

    Returns:
        One :class:`FeatureInfo` per entry of ``read_features(model, x).feats``.
    """
    info = getattr(model, "feature_info", None)
    if info and hasattr(model, "forward_features"):
        return list(info)
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"{type(model).__name__} has neither feature_info nor a Conv2d to probe")
    ref = next(model.parameters())
    was_training = model.training
    model.eval()  # a probe must not move BN statistics
    try:
        with torch.no_grad():
            probe = torch.zeros(2, conv.in_channels, probe_size, probe_size, device=ref.device, dtype=ref.dtype)
            feats = _hooked_features(model, probe).feats
    finally:
        model.train(was_training)
    return [FeatureInfo(f"map{i}", f.shape[1], max(probe_size // f.shape[-1], 1)) for i, f in enumerate(feats)]
