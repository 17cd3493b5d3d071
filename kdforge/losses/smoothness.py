"""Smoothness maths for teacher smoothing (PURF, kdforge METHODS.md §3.8): spectral norms by power iteration on
weight matrices and convolution operators, the Lipschitz penalty on them, prediction consistency between views and
feature smoothness under input noise.

Spectral norms: Miyato et al., "Spectral Normalization for GANs", ICLR 2018 (the iteration of
``torch.nn.utils.spectral_norm``); the convolution operator's norm: Sedghi, Gupta & Long, "The Singular Values of
Convolutional Layers", ICLR 2019, and Gouk et al., "Regularisation of Neural Networks by Enforcing Lipschitz
Continuity", Mach. Learn. 2021; consistency: SoTeacher (Dong, Liu & Shang, ICLR 2024; shwinshaker/SoTeacher
``helper/lip_util.py``, ``helper/consist_util.py``). Pure functions plus the table of a network's Lipschitz layers;
no method state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.losses.logit import kd_loss

LipPenalty = Literal["sum", "square", "hinge", "log"]
SpectralMode = Literal["operator", "matrix"]
ConsistencyLoss = Literal["mse", "kl"]

# Power iterations run when a layer's vector is first created (torch's parametrized spectral_norm runs 15), so the
# first estimate is already close to σ and the per-step iterations only have to track a slowly moving weight.
INIT_POWER_ITERATIONS = 20
_EPS = 1e-12
_BN = nn.modules.batchnorm._BatchNorm


# ---------------------------------------------------------------------------------------------------- pure functions


def unit_normalize(v: Tensor, dims: tuple[int, ...]) -> Tensor:
    return v / torch.linalg.vector_norm(v, dim=dims, keepdim=True).clamp_min(_EPS)


def matrix_power_iteration(weight: Tensor, v: Tensor, n_iterations: int) -> Tensor:
    """Power iteration for the top right singular vector of each matrix in a stack.

    ``u ← W v/‖W v‖``, ``v ← Wᵀu/‖Wᵀu‖``: the iteration of Miyato et al. (2018) and ``torch.nn.utils.spectral_norm``,
    written for the right vector only (``u`` is recomputed from it, so one vector per layer is stored).

    Args:
        weight: ``[G, M, N]`` matrices (``G`` = groups of a grouped conv, 1 otherwise).
        v: ``[G, N]`` current estimate, unit norm per group.
        n_iterations: iterations to run.

    Returns:
        ``[G, N]`` updated unit vectors (no graph).
    """
    with torch.no_grad():
        for _ in range(n_iterations):
            u = unit_normalize(torch.bmm(weight, v.unsqueeze(2)).squeeze(2), (1,))
            v = unit_normalize(torch.bmm(weight.transpose(1, 2), u.unsqueeze(2)).squeeze(2), (1,))
    return v


def matrix_sigma(weight: Tensor, v: Tensor) -> Tensor:
    """``σ ≈ max_g ‖W_g v_g‖`` for unit ``v`` (differentiable in ``weight``).

    With ``v`` the top right singular vector this is ``uᵀ W v`` of Miyato et al. and its gradient is ``u vᵀ``. A
    grouped conv is block-diagonal, so its norm is the largest of its groups' norms.

    Args:
        weight: ``[G, M, N]``.
        v: ``[G, N]`` unit vectors (treated as constants).

    Returns:
        Scalar tensor.
    """
    return torch.bmm(weight, v.unsqueeze(2)).squeeze(2).norm(dim=1).max()


@dataclass(frozen=True)
class ConvGeometry:
    """What fixes a conv layer's linear operator besides its weight: ``F.conv2d``'s arguments."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    @staticmethod
    def of(conv: nn.Conv2d) -> ConvGeometry:
        assert isinstance(conv.padding, tuple)
        return ConvGeometry(conv.stride, conv.padding, conv.dilation, conv.groups)  # type: ignore[arg-type]


def conv_operator(x: Tensor, weight: Tensor, geo: ConvGeometry, scale: Tensor | None = None) -> Tensor:
    """The conv layer as a linear operator ``A x`` (no bias), optionally followed by a per-channel scale.

    Args:
        x: ``[1, C_in, H, W]``.
        weight: ``[C_out, C_in/groups, k, k]``.
        geo: stride, padding, dilation, groups of the layer.
        scale: ``[C_out]`` (the folded BatchNorm's ``γ/√(var+ε)``) or ``None``.

    Returns:
        ``[1, C_out, H', W']``.
    """
    y = F.conv2d(x, weight, None, geo.stride, geo.padding, geo.dilation, geo.groups)
    return y if scale is None else y * scale.view(1, -1, 1, 1)


def conv_adjoint(
    y: Tensor, weight: Tensor, geo: ConvGeometry, in_shape: tuple[int, ...], scale: Tensor | None = None
) -> Tensor:
    """The adjoint ``Aᵀ y`` of :func:`conv_operator`: a transposed convolution back to the input shape.

    ``output_padding`` restores the rows and columns a strided conv drops, so ``⟨A x, y⟩ = ⟨x, Aᵀ y⟩`` holds exactly
    for inputs of ``in_shape``.

    Args:
        y: ``[1, C_out, H', W']``.
        weight: ``[C_out, C_in/groups, k, k]``.
        geo: the layer's geometry.
        in_shape: ``(C_in, H, W)`` of the layer's input.
        scale: the same per-channel scale as in :func:`conv_operator`.

    Returns:
        ``[1, C_in, H, W]``.
    """
    if scale is not None:
        y = y * scale.view(1, -1, 1, 1)
    k = weight.shape[2:]
    out_pad = tuple(
        in_shape[1 + i] - ((y.shape[2 + i] - 1) * geo.stride[i] - 2 * geo.padding[i] + geo.dilation[i] * (k[i] - 1) + 1)
        for i in range(2)
    )
    return F.conv_transpose2d(y, weight, None, geo.stride, geo.padding, out_pad, geo.groups, geo.dilation)


def conv_power_iteration(
    weight: Tensor, v: Tensor, geo: ConvGeometry, n_iterations: int, scale: Tensor | None = None
) -> Tensor:
    """Power iteration on the conv operator: ``v ← AᵀA v/‖AᵀA v‖`` (no graph).

    Args:
        weight: ``[C_out, C_in/groups, k, k]``.
        v: ``[1, C_in, H, W]`` unit-norm estimate of the top right singular vector.
        geo: the layer's geometry.
        n_iterations: iterations to run.
        scale: ``[C_out]`` folded BatchNorm scale or ``None``.

    Returns:
        ``[1, C_in, H, W]`` updated unit vector.
    """
    with torch.no_grad():
        for _ in range(n_iterations):
            u = unit_normalize(conv_operator(v, weight, geo, scale), (1, 2, 3))
            v = unit_normalize(conv_adjoint(u, weight, geo, tuple(v.shape[1:]), scale), (1, 2, 3))
    return v


def spectral_penalty(sigmas: Tensor, penalty: LipPenalty = "sum", target: float = 1.0) -> Tensor:
    """The Lipschitz penalty on per-layer spectral norms.

    ``sum``: ``Σ σ_l`` (METHODS.md §3.8); ``square``: ``½ Σ σ_l²`` (Yoshida & Miyato, "Spectral Norm Regularization for
    Improving the Generalizability of Deep Learning", 2017); ``hinge``: ``Σ max(σ_l − target, 0)²`` (no pull on layers
    already below ``target``); ``log``: ``Σ log σ_l``, the log of the product bound ``Π σ_l`` on the network's
    Lipschitz constant, whose gradient ``u vᵀ/σ`` does not depend on a layer's scale.

    Args:
        sigmas: ``[L]`` spectral-norm estimates.
        penalty: the form.
        target: σ below which ``hinge`` does not penalise.

    Returns:
        Scalar tensor.
    """
    if penalty == "sum":
        return sigmas.sum()
    if penalty == "square":
        return 0.5 * sigmas.pow(2).sum()
    if penalty == "hinge":
        return (sigmas - target).clamp_min(0).pow(2).sum()
    if penalty == "log":
        return sigmas.clamp_min(_EPS).log().sum()
    raise ValueError(f"lip_penalty must be sum, square, hinge or log, got {penalty!r}")


def consistency_loss(
    logits_a: Tensor, logits_b: Tensor, kind: ConsistencyLoss = "mse", temperature: float = 1.0
) -> Tensor:
    """Prediction consistency between two views of the same images.

    ``mse``: ``Σ_c (p_a,c − p_b,c)²``, batch mean, gradient through both views (SoTeacher's ``mse_soft``, there
    against a running average of past predictions). ``kl``: ``τ²·KL(sg p_a ‖ p_b)``, the first view a fixed target.

    Args:
        logits_a: ``[B, C]`` logits of the first view (the batch).
        logits_b: ``[B, C]`` logits of the second view.
        kind: ``mse`` or ``kl``.
        temperature: softmax temperature τ > 0.

    Returns:
        Scalar tensor, float32.
    """
    if kind == "mse":
        p_a = F.softmax(logits_a.float() / temperature, dim=1)
        p_b = F.softmax(logits_b.float() / temperature, dim=1)
        return (p_a - p_b).pow(2).sum(dim=1).mean()
    if kind == "kl":
        return kd_loss(logits_b, logits_a.detach(), temperature)
    raise ValueError(f"consistency must be mse or kl, got {kind!r}")


def feature_smoothness(clean: list[Tensor], noisy: list[Tensor]) -> Tensor:
    """``Σ_l E_b ‖h_l(x+δ) − h_l(x)‖²`` over feature tensors, gradient through both passes.

    A ``[B, D]`` vector counts its squared distance; a ``[B, C, H, W]`` map its channel-summed squared distance
    averaged over positions, so a stage map weighs like a pooled vector of its width.

    Args:
        clean: features of the clean inputs, each ``[B, D]`` or ``[B, C, H, W]``.
        noisy: the same features for the noisy inputs, same shapes.

    Returns:
        Scalar tensor, float32.
    """
    total = clean[0].new_zeros((), dtype=torch.float32)
    for c, n in zip(clean, noisy, strict=True):
        sq = (n.float() - c.float()).pow(2)
        per_sample = sq.sum(dim=1) if sq.ndim == 2 else sq.sum(dim=1).mean(dim=(1, 2))
        total = total + per_sample.mean()
    return total


# ------------------------------------------------------------------------------------------------------ layer table


@dataclass
class LipLayer:
    """One term of the Lipschitz penalty: a conv or linear layer (with the BatchNorm folded into it) or a lone BN."""

    name: str
    module: nn.Module
    kind: Literal["operator", "matrix", "bn"]
    buffer: str = ""
    bn: nn.Module | None = None


def bn_scale(bn: nn.Module) -> Tensor:
    """``|γ|/√(running_var + ε)`` ``[C]``: BatchNorm's per-channel gain at inference (``γ = 1`` without affine)."""
    assert isinstance(bn, _BN) and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    return scale * bn.weight.float().abs() if bn.weight is not None else scale


def plan_lipschitz_layers(model: nn.Module, mode: SpectralMode, fold_bn: bool) -> list[LipLayer]:
    """Every ``Conv2d``/``Linear`` of ``model``, each BatchNorm either folded into the conv it follows or on its own.

    A BatchNorm is folded into a conv when it is the next leaf module after it and has its width: true for the
    post-activation blocks of the whole CIFAR/ImageNet zoo (``conv → bn``); in the pre-activation WRN a block's last
    conv is followed by the next block's BN, which also scales the shortcut, and folding it into the conv still
    counts its gain once in the product bound.
    """
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    layers: list[LipLayer] = []
    folded: set[int] = set()
    for i, (name, m) in enumerate(leaves):
        if isinstance(m, nn.Conv2d):
            nxt = leaves[i + 1][1] if i + 1 < len(leaves) else None
            bn = None
            if (
                fold_bn
                and isinstance(nxt, nn.BatchNorm2d)
                and nxt.num_features == m.out_channels
                and nxt.running_var is not None
            ):
                bn = nxt
                folded.add(id(nxt))
            # conv_transpose2d is the exact adjoint only for zero padding given as numbers.
            operator_ok = m.padding_mode == "zeros" and not isinstance(m.padding, str)
            kind: Literal["operator", "matrix"] = "operator" if mode == "operator" and operator_ok else "matrix"
            layers.append(LipLayer(name, m, kind, bn=bn))
        elif isinstance(m, nn.Linear):
            layers.append(LipLayer(name, m, "matrix"))
    for name, m in leaves:
        if isinstance(m, _BN) and id(m) not in folded and m.running_var is not None:
            layers.append(LipLayer(name, m, "bn"))
    for i, layer in enumerate(layers):
        if layer.kind != "bn":
            layer.buffer = f"lip_v{i}"
    return layers


def matrix_view(layer: LipLayer) -> Tensor:
    """The layer's weight as ``[G, M, N]`` float32 matrices, the folded BN scale applied to the rows."""
    w = layer.module.weight.float()
    if isinstance(layer.module, nn.Conv2d):
        g = layer.module.groups
        w = w.reshape(g, w.shape[0] // g, -1)
    else:
        w = w.unsqueeze(0)
    if layer.bn is not None:
        w = w * bn_scale(layer.bn).view(w.shape[0], w.shape[1], 1)
    return w


__all__ = [
    "INIT_POWER_ITERATIONS",
    "ConsistencyLoss",
    "ConvGeometry",
    "LipLayer",
    "LipPenalty",
    "SpectralMode",
    "bn_scale",
    "consistency_loss",
    "conv_adjoint",
    "conv_operator",
    "conv_power_iteration",
    "feature_smoothness",
    "matrix_power_iteration",
    "matrix_sigma",
    "matrix_view",
    "plan_lipschitz_layers",
    "spectral_penalty",
]
