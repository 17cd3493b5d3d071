"""Image-restoration losses: SSIM, finite-difference gradients, and low-light enhancement distillation.

The SSIM kernel (:func:`kdforge.ops.image_metrics.ssim_map`) is the one the PSNR/SSIM metric uses too, so the loss
and the reported number cannot drift apart: a Gaussian window of 11 taps, σ = 1.5
(scikit-image ``structural_similarity(gaussian_weights=True)``, Wang et al. 2004), K1 = 0.01, K2 = 0.03 and the
population (biased) covariance. The metric keeps only the *valid* region (every window inside the image, as
scikit-image's crop of ``(win_size − 1) // 2`` pixels per side); the training loss pads by reflection so that every
pixel, border included, is the centre of a window (see :func:`ssim_loss`).

Distillation parts (FitNets adapters, attention transfer on encoder/decoder stages, output L1) and their
combination :func:`lowlight_kd_loss` reconstruct Li, Wang & Zhang, "Low-light image enhancement with knowledge
distillation", Neurocomputing 2022 (doi 10.1016/j.neucom.2022.10.083); docs/methods/lowlight_kd.md names every
reconstructed choice.

Pure functions compute in float32 (float64 stays float64, for ``gradcheck``); the one module with parameters is the
FitNets :class:`FeatureAdapter`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdforge.losses.feature import at_loss, hint_loss
from kdforge.ops.image_metrics import Padding, ssim_map, work_dtype


def ssim_loss(pred: Tensor, target: Tensor, data_range: float = 1.0, *, padding: Padding = "reflect") -> Tensor:
    """``1 − mean SSIM`` over batch, channels and pixels.

    The training default pads by reflection rather than keeping the metric's valid region: on the 32×32 crops of
    the synthetic CIFAR task the valid region is the central 22×22 (47 % of the pixels), and a pixel ``d < 5`` px
    from the border lies in fewer valid windows the closer it is, so its structure would be learned ever more
    weakly. With padding every pixel centres one window; the metric is still the valid one.

    Args:
        pred: ``[B, C, H, W]``.
        target: ``[B, C, H, W]``, a constant target.
        data_range: see :func:`ssim_map`.
        padding: ``"reflect"`` (default) or ``"valid"``.

    Returns:
        Scalar float32 (float64 for float64 inputs).
    """
    return 1.0 - ssim_map(pred, target.detach(), data_range, padding=padding).mean()


def image_gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    """Forward finite differences ``(x[..., :, j+1] − x[..., :, j], x[..., i+1, :] − x[..., i, :])``.

    Args:
        x: ``[B, C, H, W]``.

    Returns:
        ``dx`` ``[B, C, H, W − 1]`` and ``dy`` ``[B, C, H − 1, W]``, in the working dtype.
    """
    x = x.to(work_dtype(x))
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def gradient_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Edge loss ``mean|∂x P − ∂x T| + mean|∂y P − ∂y T|`` between forward-difference gradients.

    The usual structure-preserving term of enhancement and super-resolution losses (an L1 on image gradients, e.g.
    the "gradient loss" of the gradient-guided low-light networks); each direction is averaged over its own
    ``B·C·H·(W−1)`` or ``B·C·(H−1)·W`` differences and the two means are added.

    Args:
        pred: ``[B, C, H, W]``.
        target: ``[B, C, H, W]``, a constant target.

    Returns:
        Scalar float32 (float64 for float64 inputs).
    """
    if pred.shape != target.shape:
        raise ValueError(f"gradient_loss shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    pdx, pdy = image_gradients(pred)
    tdx, tdy = image_gradients(target.detach())
    return (pdx - tdx).abs().mean() + (pdy - tdy).abs().mean()


def l1_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean absolute error ``mean|P − T|`` over every element. Scalar float32 (float64 for float64 inputs)."""
    if pred.shape != target.shape:
        raise ValueError(f"l1_loss shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    dtype = work_dtype(pred)
    return (pred.to(dtype) - target.detach().to(dtype)).abs().mean()


def enhancement_loss(
    pred: Tensor,
    target: Tensor,
    *,
    l1_weight: float = 1.0,
    ssim_weight: float = 1.0,
    gradient_weight: float = 0.0,
    ssim_padding: Padding = "reflect",
) -> dict[str, Tensor]:
    """The enhancement task loss ``w1·L1 + ws·(1 − SSIM) + wg·L_grad`` as named, weighted parts.

    Args:
        pred: ``[B, 3, H, W]`` the network output (unclamped: a clamp would cut the gradient of saturated pixels).
        target: ``[B, 3, H, W]`` clean image in [0, 1].
        l1_weight, ssim_weight, gradient_weight: weights; a part with weight 0 is left out of the dict.
        ssim_padding: see :func:`ssim_loss`.

    Returns:
        ``{"l1": ..., "ssim": ..., "gradient": ...}`` (weighted scalars; their sum is the loss).
    """
    parts: dict[str, Tensor] = {}
    if l1_weight:
        parts["l1"] = l1_weight * l1_loss(pred, target)
    if ssim_weight:
        parts["ssim"] = ssim_weight * ssim_loss(pred, target, 1.0, padding=ssim_padding)
    if gradient_weight:
        parts["gradient"] = gradient_weight * gradient_loss(pred, target)
    return parts


# ------------------------------------------------------------------------------------------------ distillation


def output_distill_loss(student_out: Tensor, teacher_out: Tensor) -> Tensor:
    """L1 between the student's and the (constant) teacher's enhanced images, ``mean|Î_s − Î_t|``.

    Args:
        student_out: ``[B, 3, H, W]``.
        teacher_out: ``[B, 3, H, W]``; detached here.

    Returns:
        Scalar float32.
    """
    return l1_loss(student_out, teacher_out.detach())


class FeatureAdapter(nn.Module):
    """FitNets regressors: one 1×1 convolution per stage from the student's to the teacher's channel count.

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015 (a convolutional regressor on the student's
    guided layer). A 1×1 convolution with bias keeps the spatial layout (teacher and student enhancers share their
    resolutions), as the 1×1 adapters of the dense-prediction KD literature; it is trained with the student and
    discarded at export.

    Args:
        student_channels: channels of each distilled student stage.
        teacher_channels: channels of the matching teacher stages (same length).
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int]) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError(
                f"FeatureAdapter needs one teacher stage per student stage, got {len(student_channels)} "
                f"and {len(teacher_channels)}"
            )
        self.convs = nn.ModuleList(
            nn.Conv2d(cs, ct, kernel_size=1) for cs, ct in zip(student_channels, teacher_channels, strict=True)
        )

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        """``[B, C_s^l, H_l, W_l]`` per stage → ``[B, C_t^l, H_l, W_l]`` per stage."""
        if len(feats) != len(self.convs):
            raise ValueError(f"FeatureAdapter has {len(self.convs)} stages, got {len(feats)} feature maps")
        return [conv(f) for conv, f in zip(self.convs, feats, strict=True)]


def feature_distill_loss(
    student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], adapter: FeatureAdapter
) -> Tensor:
    """FitNets on every stage: ``mean_l MSE(r_l(F_s^l), F_t^l)`` with the 1×1 regressors of ``adapter``.

    Each stage's term is :func:`kdforge.losses.feature.hint_loss` (the element mean, as RepDistiller/mdistiller);
    the stages are averaged so the weight does not grow with the number of stages.

    Args:
        student_feats: ``L`` maps ``[B, C_s^l, H_l, W_l]``.
        teacher_feats: ``L`` maps ``[B, C_t^l, H_l, W_l]``, constant targets.
        adapter: a :class:`FeatureAdapter` built for these channel counts.

    Returns:
        Scalar float32.
    """
    if len(student_feats) != len(teacher_feats):
        raise ValueError(f"{len(student_feats)} student stages vs {len(teacher_feats)} teacher stages")
    adapted = adapter(student_feats)
    return torch.stack([hint_loss(s, t) for s, t in zip(adapted, teacher_feats, strict=True)]).mean()


def attention_distill_loss(student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor], p: float = 2.0) -> Tensor:
    """Attention transfer summed over stages: ``Σ_l mean_{b,pos} (Q(F_s^l) − Q(F_t^l))²``.

    Zagoruyko & Komodakis, ICLR 2017, via :func:`kdforge.losses.feature.at_loss` (the channel-mean ``F^p`` map,
    L2-normalized over positions; RepDistiller's ``AT``): channel counts may differ, spatial sizes are pooled to the
    smaller. Summed over stages as RepDistiller's ``sum(loss_group)``, so the AT weight β = 1000 keeps its meaning.

    Args:
        student_feats: ``L`` maps ``[B, C_s^l, H_l, W_l]``.
        teacher_feats: ``L`` maps ``[B, C_t^l, H_l, W_l]``, constant targets.
        p: the attention power.

    Returns:
        Scalar float32.
    """
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"{len(student_feats)} student stages vs {len(teacher_feats)} teacher stages")
    return torch.stack([at_loss(s, t, p) for s, t in zip(student_feats, teacher_feats, strict=True)]).sum()


def lowlight_kd_loss(
    student_out: Tensor,
    teacher_out: Tensor,
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    *,
    attention_weight: float = 1000.0,
    output_weight: float = 1.0,
    gradient_weight: float = 1.0,
    feature_weight: float = 0.0,
    adapter: FeatureAdapter | None = None,
    p: float = 2.0,
) -> dict[str, Tensor]:
    """Distillation parts of low-light KD (reconstructed): attention maps of every stage, teacher output and edges.

    ``L_kd = β·Σ_l AT_l + λ_o·|Î_s − Î_t|₁ + λ_g·L_grad(Î_s, Î_t) + λ_f·mean_l MSE(r_l(F_s^l), F_t^l)``; the student's
    own task loss (L1 + SSIM (+ gradient) to the ground truth) is added by the task. Only the title, venue and
    abstract-level summary of Li, Wang & Zhang (Neurocomputing 2022) are known: teacher and student share a
    gradient-guided architecture differing in width, and the student learns from the ground truth and from the
    teacher "via an attention-map-based distillation loss". The defaults: β = 1000 (AT's own weight for this exact
    normalization), output L1 at the weight of the ground-truth L1, the teacher's edges (the reconstructed
    gradient guidance) at weight 1, FitNets off (it needs an adapter the abstract does not mention).

    Args:
        student_out, teacher_out: ``[B, 3, H, W]`` enhanced images (teacher detached).
        student_feats, teacher_feats: the ``L`` encoder/decoder stage maps of both networks, same resolutions.
        attention_weight: β.
        output_weight: λ_o.
        gradient_weight: λ_g.
        feature_weight: λ_f; needs ``adapter``.
        adapter: the FitNets regressors when ``feature_weight`` > 0.
        p: the attention power.

    Returns:
        ``{"kd_attention", "kd_output", "kd_gradient", "kd_feature"}`` weighted scalars (weight-0 parts left out).
    """
    if not all(math.isfinite(w) and w >= 0 for w in (attention_weight, output_weight, gradient_weight, feature_weight)):
        raise ValueError("lowlight_kd_loss weights must be finite and non-negative")
    parts: dict[str, Tensor] = {}
    teacher_out = teacher_out.detach()
    if attention_weight:
        parts["kd_attention"] = attention_weight * attention_distill_loss(student_feats, teacher_feats, p)
    if output_weight:
        parts["kd_output"] = output_weight * output_distill_loss(student_out, teacher_out)
    if gradient_weight:
        parts["kd_gradient"] = gradient_weight * gradient_loss(student_out, teacher_out)
    if feature_weight:
        if adapter is None:
            raise ValueError("lowlight_kd_loss: feature_weight > 0 needs a FeatureAdapter (adapter=...)")
        parts["kd_feature"] = feature_weight * feature_distill_loss(student_feats, teacher_feats, adapter)
    return parts
