"""Conv + BatchNorm folding for a frozen, eval-mode network (a distillation teacher).

In eval mode a BatchNorm is a fixed per-channel affine map, ``y = γ·(z − μ)/√(σ² + ε) + β``, so when it reads a
convolution's output ``z = W∗x + b`` and nothing else reads ``z``, the pair is one convolution with
``W' = W·s`` and ``b' = (b − μ)·s + β`` where ``s = γ/√(σ² + ε)`` (Ioffe & Szegedy, "Batch Normalization", ICML 2015,
§3.2, inference as a linear transform; the same rewrite as ``torch.nn.utils.fusion.fuse_conv_bn_eval``, written here
with the dataflow check the zoo needs). The folded network computes the same function within float rounding and
skips one memory-bound pass per BatchNorm, which is a sizeable part of a CPU forward.

What is preserved: every module output except the raw output of a folded convolution, which becomes the BatchNorm's
output (the BatchNorm itself is replaced by ``nn.Identity`` and still reports that value to forward hooks). So logits,
``forward_features`` (stage maps, pre-activations, pooled vector: all taken after a BatchNorm or later) and
hook-read features are unchanged; a :class:`~kdforge.models.taps.FeatureTap` on a folded convolution is not.

A pair is folded only where it provably is one. The dataflow is read on an example input: one forward (and, for
zoo models, one ``forward_features``) under a :class:`~torch.overrides.TorchFunctionMode` that counts every tensor
operation reading each tensor, with forward hooks naming the convolution and BatchNorm calls. A pair qualifies when
each call of the BatchNorm reads the output of a call of that convolution, that output is read by nothing else (no
residual sum, no hook-free functional use), and the two modules are called equally often. Pre-activation BatchNorms
(WRN's ``bn1`` before its convolution), a BatchNorm after a sum, and a convolution whose raw output is also used
elsewhere are left alone. Shape reads (``x.shape``, ``x.size(1)``) are not uses, so models whose control flow
depends on the input size (VGG, ShuffleNetV2) are read as they run on the example; inputs of another size must run
the same layers, as they do for every zoo model.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

Edge = tuple[str, str]


#: Value-reading tensor methods whose result is not a tensor; every other non-tensor result (``size``, ``dim``,
#: ``shape``) is metadata and does not count as a use of the tensor's values.
_VALUE_READS = frozenset({"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__len__"})


class _UseCounter(TorchFunctionMode):
    """Counts, per tensor ``id``, the torch operations that read its values (shape queries excluded).

    Every tensor seen is kept alive until the probe ends, so no ``id`` is reused by a later tensor.
    """

    def __init__(self) -> None:
        super().__init__()
        self.uses: Counter[int] = Counter()
        self.seen: list[Tensor] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        results = [o for o in pytree.tree_leaves(out) if isinstance(o, Tensor)]
        self.seen.extend(results)
        if results or getattr(func, "__name__", "") in _VALUE_READS:
            for leaf in pytree.tree_leaves((args, kwargs)):
                if isinstance(leaf, Tensor):
                    self.uses[id(leaf)] += 1
                    self.seen.append(leaf)
        return out


def _returned_tensors(out: Any) -> list[Tensor]:
    """The tensors a forward returns: pytree leaves, with dataclasses (``Features``) opened field by field."""
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    return [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]


def _probe(model: nn.Module, example: Tensor, run: Callable[[Tensor], Any]) -> tuple[Counter[str], Counter[Edge]]:
    """Calls per conv/BN module name and exclusive conv→BN edges during ``run(example)``."""
    names = {m: n for n, m in model.named_modules()}
    calls: Counter[str] = Counter()
    conv_out: dict[int, str] = {}
    bn_in: list[tuple[str, int]] = []
    keep: list[Tensor] = []  # holds every recorded tensor, so no id is reused while the probe runs

    def after_conv(module: nn.Module, inputs: Any, output: Any) -> None:
        calls[names[module]] += 1
        if isinstance(output, Tensor):
            conv_out[id(output)] = names[module]
            keep.append(output)

    def before_bn(module: nn.Module, inputs: Any) -> None:
        calls[names[module]] += 1
        x = inputs[0] if inputs else None
        if isinstance(x, Tensor) and len(inputs) == 1:
            bn_in.append((names[module], id(x)))
            keep.append(x)

    handles = []
    for m in model.modules():
        if type(m) is nn.Conv2d:
            handles.append(m.register_forward_hook(after_conv))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(before_bn))
    counter = _UseCounter()
    try:
        with torch.no_grad(), counter:
            out = run(example)
    finally:
        for h in handles:
            h.remove()
    for t in _returned_tensors(out):  # a returned map (WRN's stem feature is a raw conv output) is a use too
        counter.uses[id(t)] += 1
    edges: Counter[Edge] = Counter()
    for bn_name, tid in bn_in:
        # The BN's own batch_norm call is the one permitted reader of the convolution's output.
        if tid in conv_out and counter.uses[tid] == 1:
            edges[(conv_out[tid], bn_name)] += 1
    return calls, edges


def foldable_pairs(model: nn.Module, example: Tensor) -> list[tuple[str, str]]:
    """``(conv, batchnorm)`` submodule names that can be folded exactly, in call order.

    Args:
        model: any network, in eval mode (the probe must not move BatchNorm statistics).
        example: an input ``[B, C, H, W]`` of the size the network will see (values do not matter).

    Returns:
        Pairs whose BatchNorm only ever reads that convolution's output and whose convolution output is read by
        nothing else, in ``forward`` and (zoo models) ``forward_features``.
    """
    runs: list[Callable[[Tensor], Any]] = [model]
    if hasattr(model, "forward_features"):
        runs.append(model.forward_features)
    probes = [_probe(model, example, run) for run in runs]
    candidates: dict[Edge, None] = {}
    for _, edges in probes:
        candidates.update(dict.fromkeys(edges))
    return [
        (conv, bn)
        for conv, bn in candidates
        if all(calls[conv] == edges[(conv, bn)] == calls[bn] for calls, edges in probes)
    ]


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Rewrite ``conv`` in place as ``bn ∘ conv`` (float64 arithmetic, then the parameters' own dtype and layout)."""
    assert bn.running_mean is not None and bn.running_var is not None
    w = conv.weight.detach().double()
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    new_bias = (bias - bn.running_mean.double()) * scale
    if bn.bias is not None:
        new_bias = new_bias + bn.bias.detach().double()
    with torch.no_grad():
        conv.weight.copy_(w * scale.reshape(-1, 1, 1, 1))  # copy_ keeps dtype, device and channels_last layout
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)
        else:
            conv.bias.copy_(new_bias)


def fold_conv_bn(model: nn.Module, example: Tensor) -> list[tuple[str, str]]:
    """Fold every exactly foldable conv + BatchNorm pair of a frozen, eval-mode network, in place.

    Each folded convolution gets ``W·s`` and bias ``(b − μ)·s + β`` (``s = γ/√(σ² + ε)``) and its BatchNorm becomes
    ``nn.Identity``; logits and every ``forward_features`` output are unchanged within float rounding (about
    1e-6 relative in float32). Folding is one-way: the BatchNorm's statistics are gone, so only a network that will
    never train again may be folded (a distillation method's frozen teacher; never the copy a method fine-tunes).

    Args:
        model: the network, in eval mode with every parameter frozen (``requires_grad=False``).
        example: an input ``[B, C, H, W]`` of the size the network will see, for the dataflow probe.

    Returns:
        The folded ``(conv, batchnorm)`` names (empty when nothing is foldable).

    Raises:
        ValueError: the network is in training mode or has trainable parameters.
    """
    if any(m.training for m in model.modules()):
        raise ValueError("fold_conv_bn needs an eval-mode network (BatchNorm folds its running statistics)")
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("fold_conv_bn folds frozen networks only; call requires_grad_(False) first")
    pairs = [
        (c, b)
        for c, b in foldable_pairs(model, example)
        if model.get_submodule(b).track_running_stats and model.get_submodule(b).running_var is not None
    ]
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        _fold_into(conv, bn)
        parent_name, _, leaf = bn_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        identity = nn.Identity()
        identity.train(False)
        setattr(parent, leaf, identity)
    return pairs


__all__ = ["fold_conv_bn", "foldable_pairs"]
