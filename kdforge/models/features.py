"""The feature API every kdforge model implements, and a scoped hook tap for models that do not.

Methods read stage features through :class:`Features` (returned by ``model.forward_features(x)``) and plan their
adapters from the static ``model.feature_info`` list, so a method never needs model-specific code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.models.taps import FeatureTap


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


# Stage maps by module path. AFT-KD aligns the stages of two networks by module outputs: the stage-end modules of a
# network without ``forward_features`` are found by one probe forward and then read with a FeatureTap.


def module_outputs(net: nn.Module, size: int, leaves_only: bool) -> list[tuple[str, int, tuple[int, int]]]:
    """``[(module path, channels, (H, W))]`` of every 4-D submodule output, in call order, of one probe forward on
    a ``size`` px zero image (eval mode, so BN statistics do not move; no grad)."""
    calls: list[tuple[str, int, tuple[int, int]]] = []

    def record(name: str, module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor) and output.ndim == 4:
            calls.append((name, output.shape[1], (output.shape[2], output.shape[3])))

    modules = [(n, m) for n, m in net.named_modules() if n and not (leaves_only and any(True for _ in m.children()))]
    handles = [m.register_forward_hook(partial(record, n)) for n, m in modules]
    was_training = net.training
    ref = next(net.parameters())
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(2, 3, size, size, device=ref.device, dtype=ref.dtype))
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    return calls


def probe_stage_taps(net: nn.Module, size: int) -> list[tuple[str, int]]:
    """``[(module path, channels)]`` of the last leaf module at each spatial resolution above 1×1: the stage ends of
    a network that has no ``forward_features``."""
    last: dict[tuple[int, int], tuple[int, str, int]] = {}
    for i, (name, channels, hw) in enumerate(module_outputs(net, size, leaves_only=True)):
        if hw != (1, 1):
            last[hw] = (i, name, channels)
    if not last:
        raise ValueError(f"{type(net).__name__} produced no spatial feature map on a {size}px probe input")
    return [(name, c) for _, name, c in sorted(last.values())]


class StageReader:
    """Stage maps ``[stage1, …, stageL]`` and logits of one network: through ``forward_features`` when the model has
    the kdforge feature API, else through a :class:`FeatureTap` on the given or probed module paths."""

    def __init__(self, net: nn.Module, layers: Sequence[str] | None, probe_size: int) -> None:
        if layers is None and hasattr(net, "forward_features") and getattr(net, "feature_info", None):
            self.paths: list[str] | None = None
            self.channels = [info.channels for info in net.feature_info[1:]]  # the stem is not a stage
            return
        if layers is None:
            taps = probe_stage_taps(net, probe_size)
        else:
            found = {name: c for name, c, _ in module_outputs(net, probe_size, leaves_only=False)}
            missing = [p for p in layers if p not in found]
            if missing:
                FeatureTap(net, missing)  # raises the registry's "did you mean" error for unknown paths
                raise ValueError(f"modules {missing} produce no [B, C, H, W] output on a {probe_size}px input")
            taps = [(p, found[p]) for p in layers]
        self.paths = [p for p, _ in taps]
        self.channels = [c for _, c in taps]

    def __call__(self, net: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        if self.paths is None:
            out = net.forward_features(x)
            return out.logits, list(out.feats[1:])
        with FeatureTap(net, self.paths) as tap:
            logits = net(x)
        return logits, list(tap.outputs)
