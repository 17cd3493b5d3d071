"""Logit-based distillation losses."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_div(log_p_target: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p ‖ q)`` from log-probabilities, summed over classes and averaged over the batch ("batchmean").

    Args:
        log_p_target: ``[B, C]`` log-probabilities of the target distribution ``p``.
        log_q: ``[B, C]`` log-probabilities of the model distribution ``q``.

    Returns:
        Scalar tensor.
    """
    p = log_p_target.exp()
    # 0·log 0 = 0: entries where the target has zero probability (log p = -inf) contribute nothing, not NaN.
    terms = torch.where(p > 0, p * (log_p_target - log_q), torch.zeros_like(p))
    return terms.sum(dim=1).mean()


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton KD term ``τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ))``, batch-mean.

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015. Checked against
    RepDistiller ``distiller_zoo/KD.py`` (``DistillKL``) and mdistiller ``distillers/KD.py``.

    The ``τ²`` factor keeps the gradient magnitude of the soft term independent of the temperature: the
    gradient of the KL with respect to the logits scales as ``1/τ²`` for large ``τ``.

    Args:
        student_logits: ``[B, C]``.
        teacher_logits: ``[B, C]``; treated as a constant target (detach it or compute it under ``no_grad``).
        temperature: ``τ > 0``.

    Returns:
        Scalar tensor, float32.
    """
    # Softmax at temperature is fragile in half precision, so the loss always computes in float32.
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return kl_div(log_p_t, log_p_s) * temperature**2


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy in float32. ``logits [B, C]``, ``target [B]`` int64; batch-mean scalar."""
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


LogitNorm = Literal["none", "zscore", "layernorm"]


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Logit standardization ``Z(z) = (z − mean_c z) / (std_c z + ε)`` with the unbiased std over classes.

    Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024; checked against
    sunshangquan/logit-standardization-KD ``mdistiller/distillers/KD.py`` (``normalize``). Dividing by each sample's
    own std is a per-sample temperature: teacher and student no longer need logits of the same magnitude, only
    of the same shape.

    Args:
        logits: ``[B, C]``.
        eps: keeps a constant row finite.

    Returns:
        ``[B, C]`` float32, zero mean and unit (unbiased) std per row.
    """
    z = logits.float()
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


def layer_norm_logits(logits: Tensor, scale: float = math.pi, eps: float = 1e-7) -> Tensor:
    """SHAKE's normalized logits ``LN(z)·κ``: LayerNorm over classes without affine (population std), times κ.

    Li & Jin, "Shadow Knowledge Distillation", NeurIPS 2022 (lilujunai/SHAKE, ``nn.LayerNorm(C,
    elementwise_affine=False)`` then ``× π``). Equals ``standardize_logits`` up to the factor ``κ·sqrt(C/(C−1))``.

    Args:
        logits: ``[B, C]``.
        scale: κ.
        eps: LayerNorm's ε.

    Returns:
        ``[B, C]`` float32.
    """
    z = logits.float()
    return F.layer_norm(z, (z.shape[1],), eps=eps) * scale


def normalize_logits(logits: Tensor, mode: LogitNorm = "none", scale: float = math.pi) -> Tensor:
    """Apply the logit normalization ``mode`` (``none``, ``zscore`` = LS, ``layernorm`` = SHAKE's ``LN·κ``).

    ``logits [B, C]`` → ``[B, C]`` float32; ``scale`` is κ and only used by ``layernorm``.
    """
    if mode == "none":
        return logits.float()
    if mode == "zscore":
        return standardize_logits(logits)
    if mode == "layernorm":
        return layer_norm_logits(logits, scale)
    raise ValueError(f"unknown logit normalization {mode!r}; choose none, zscore or layernorm")


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """Decoupled KD ``α·τ²·KL(b^T‖b^S) + β·τ²·KL(p̂^T‖p̂^S)`` (TCKD + NCKD), batch-mean.

    Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022; checked against mdistiller
    ``distillers/DKD.py`` (``dkd_loss``). ``b = [p_t, 1 − p_t]`` is the target-vs-rest binary distribution at
    temperature τ and ``p̂`` the distribution over the non-target classes. Hinton KD is exactly
    ``TCKD + (1 − p_t^T)·NCKD`` per sample; DKD decouples the two weights so NCKD is no longer suppressed when
    the teacher is confident.

    The non-target softmax subtracts ``1000·onehot(y)`` from ``z/τ`` (as the reference does) so the target class
    gets probability exactly 0 in float32 instead of being sliced out, which keeps the shapes static.
    ``log(1 − p_t)`` is computed as a log-sum-exp over the non-target log-probabilities, so a student that is
    certain (``p_t`` rounding to 1) does not produce ``log 0``.

    Args:
        student_logits: ``[B, C]``.
        teacher_logits: ``[B, C]``, a constant target.
        target: ``[B]`` int64 labels.
        alpha: TCKD weight.
        beta: NCKD weight.
        temperature: τ > 0.

    Returns:
        Scalar tensor, float32.
    """
    gt = F.one_hot(target, student_logits.shape[1]).bool()
    zs, zt = student_logits.float() / temperature, teacher_logits.float() / temperature

    def binary_log_probs(z: Tensor) -> Tensor:
        log_p = F.log_softmax(z, dim=1)
        log_target = log_p.masked_fill(~gt, float("-inf")).logsumexp(dim=1)
        log_rest = log_p.masked_fill(gt, float("-inf")).logsumexp(dim=1)
        return torch.stack([log_target, log_rest], dim=1)

    tckd = kl_div(binary_log_probs(zt), binary_log_probs(zs))
    nckd = kl_div(F.log_softmax(zt - 1000.0 * gt, dim=1), F.log_softmax(zs - 1000.0 * gt, dim=1))
    return (alpha * tckd + beta * nckd) * temperature**2


def _alpha_terms(log_p: Tensor, log_q: Tensor, alpha: float, iw_clip: float | None) -> tuple[Tensor, Tensor]:
    """Per-sample value of ``D_α(p‖q)`` and AlphaNet's gradient surrogate (``[B]`` each); ``log_q`` carries grad.

    Everything is formed as ``q·w`` in log space (``w`` the importance weight ``(p/q)^α``, clamped to
    ``iw_clip``), so a probability that underflows never turns into ``0·∞``.
    """
    q = log_q.detach().exp()
    log_r = log_p - log_q.detach()
    if abs(alpha - 1.0) < 1e-3:
        # α → 1: KL(p‖q); AlphaNet leaves this branch unclipped.
        p = log_p.exp()
        value = (p * log_r).sum(dim=1)
        surrogate = -(p * log_q).sum(dim=1)
        return value, surrogate
    if abs(alpha) < 1e-3:
        # α → 0: KL(q‖p), with the importance ratio clamped from above as in AlphaNet.
        if iw_clip is not None:
            log_r = log_r.clamp(max=math.log(iw_clip))
        value = -(q * log_r).sum(dim=1)
        surrogate = -(q * (log_r - 1.0) * log_q).sum(dim=1)
        return value, surrogate
    log_w = alpha * log_r
    if iw_clip is not None:
        log_w = log_w.clamp(max=math.log(iw_clip))
    qw = (log_q.detach() + log_w).exp()
    base = 1.0 / (alpha * (alpha - 1.0))
    value = ((qw - q) * base).sum(dim=1)
    # ∇D_α = −Σ_c q_c·ρ(r_c)·∇log q_c with ρ = r^α/α + 1/(α(α−1)); the constant part of ρ drops out because
    # Σ_c q_c ∇log q_c = ∇Σ_c q_c = 0, so without clipping this is the exact gradient.
    surrogate = -((qw / alpha + q * base) * log_q).sum(dim=1)
    return value, surrogate


def _value_with_grad(value: Tensor, surrogate: Tensor) -> Tensor:
    # Forward value: the divergence itself (what gets logged); backward: the surrogate's gradient.
    return value.detach() + surrogate - surrogate.detach()


def alpha_divergence(
    teacher_logits: Tensor,
    student_logits: Tensor,
    alpha: float = 0.5,
    temperature: float = 1.0,
    iw_clip: float | None = None,
) -> Tensor:
    """Amari α-divergence ``D_α(p‖q) = 1/(α(α−1)) · Σ_c q_c [(p_c/q_c)^α − 1]`` per sample.

    ``p = softmax(z_t/τ)`` is the (constant) target and ``q = softmax(z_s/τ)`` the model. ``α → 1`` gives
    ``KL(p‖q)`` (mass-covering), ``α → 0`` gives ``KL(q‖p)`` (mode-seeking); both limits are evaluated in closed
    form within 1e-3 of them. The gradient is AlphaNet's importance-weighted surrogate (Wang et al., "AlphaNet:
    Improved Training of Supernets with Alpha-Divergence", ICML 2021; facebookresearch/AlphaNet
    ``loss_ops.py:f_divergence``), equal to the exact gradient when ``iw_clip`` is ``None``.

    Args:
        teacher_logits: ``[B, C]`` target logits (no gradient flows into them).
        student_logits: ``[B, C]``.
        alpha: α (any real).
        temperature: τ > 0 applied to both.
        iw_clip: upper clamp of the importance weight ``(p/q)^α`` (AlphaNet uses 5), or ``None``.

    Returns:
        ``[B]`` float32 divergences (not scaled by τ²).
    """
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    return _value_with_grad(*_alpha_terms(log_p, log_q, alpha, iw_clip))


def adaptive_alpha_divergence(
    teacher_logits: Tensor,
    student_logits: Tensor,
    alpha_min: float = -1.0,
    alpha_max: float = 1.0,
    temperature: float = 1.0,
    iw_clip: float | None = 5.0,
) -> Tensor:
    """AlphaNet's adaptive loss: per sample, the larger of ``D_{α−}(p‖q)`` and ``D_{α+}(p‖q)``.

    Taking the max penalises whichever failure the student currently shows more: over-estimating the teacher's
    uncertainty (α− < 0, mode-seeking side) or under-estimating it (α+ > 0, mass-covering side).
    facebookresearch/AlphaNet ``loss_ops.py:AdaptiveLossSoft`` (α− = −1, α+ = 1, iw_clip = 5).

    Args:
        teacher_logits: ``[B, C]`` target logits (no gradient).
        student_logits: ``[B, C]``.
        alpha_min, alpha_max: α− and α+.
        temperature: τ > 0.
        iw_clip: importance-weight clamp, or ``None``.

    Returns:
        ``[B]`` float32.
    """
    log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    v_lo, s_lo = _alpha_terms(log_p, log_q, alpha_min, iw_clip)
    v_hi, s_hi = _alpha_terms(log_p, log_q, alpha_max, iw_clip)
    pick_lo = v_lo > v_hi
    return _value_with_grad(torch.where(pick_lo, v_lo, v_hi), torch.where(pick_lo, s_lo, s_hi))


AlphaMode = Literal["adaptive", "fixed"]


def alpha_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    mode: AlphaMode = "adaptive",
    alpha: float = 0.5,
    alpha_min: float = -1.0,
    alpha_max: float = 1.0,
    iw_clip: float | None = 5.0,
    weights: Tensor | None = None,
) -> Tensor:
    """``τ² · mean_b w_b·D(p_t ‖ p_s)`` with the adaptive (AlphaNet) or a fixed-α divergence; scalar float32.

    ``student_logits``/``teacher_logits`` are ``[B, C]``; the teacher side is a constant target. ``weights`` ``[B]``
    (constants) weight the samples; ``None`` means 1.
    """
    if mode == "adaptive":
        d = adaptive_alpha_divergence(teacher_logits, student_logits, alpha_min, alpha_max, temperature, iw_clip)
    elif mode == "fixed":
        d = alpha_divergence(teacher_logits, student_logits, alpha, temperature, iw_clip)
    else:
        raise ValueError(f"unknown alpha-divergence mode {mode!r}; choose adaptive or fixed")
    if weights is not None:
        d = d * weights.detach().float()
    return d.mean() * temperature**2


def ccd_soft_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """CCD's soft term ``(L_orig + L_aug)/2`` on an interleaved dual-view batch (not scaled by τ²).

    Li et al., "What Role Does Data Augmentation Play in Knowledge Distillation?", ACCV 2022; checked against
    liwei-group/CCD ``losses/SingleCCD.py``. Even rows are original views, odd rows their augmented views. The
    augmented sample's KL is weighted by ``w_i = cos(z^T_o,i, z^T_a,i) + 1 ∈ [0, 2]``: the teacher's own agreement
    between the two views says how far its prediction on the augmented view can be trusted.

    Args:
        student_logits: ``[2B, C]``, interleaved ``[orig_0, aug_0, orig_1, aug_1, ...]``.
        teacher_logits: ``[2B, C]``, the same layout; a constant target.
        temperature: τ > 0.

    Returns:
        Scalar float32.
    """
    if student_logits.shape[0] % 2:
        raise ValueError(f"CCD needs an interleaved dual-view batch (even size), got {student_logits.shape[0]} rows")
    zs, zt = student_logits.float(), teacher_logits.detach().float()
    weight = F.cosine_similarity(zt[0::2], zt[1::2], dim=1) + 1.0
    log_ps = F.log_softmax(zs / temperature, dim=1)
    log_pt = F.log_softmax(zt / temperature, dim=1)
    per_sample = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)
    orig = per_sample[0::2].mean()
    aug = (weight * per_sample[1::2]).mean()
    return (orig + aug) / 2


__all__ = [
    "AlphaMode",
    "LogitNorm",
    "adaptive_alpha_divergence",
    "alpha_divergence",
    "alpha_kd_loss",
    "ccd_soft_loss",
    "cross_entropy",
    "dkd_loss",
    "kd_loss",
    "kl_div",
    "layer_norm_logits",
    "normalize_logits",
    "standardize_logits",
]
