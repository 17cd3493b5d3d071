"""Dense distillation losses: pixel-wise KD, CWD and FCKDNet, against hand and numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdforge.losses.dense import (
    condensation_matrix,
    cwd_loss,
    fckd_losses,
    match_size,
    pixel_entropy,
    pixel_kd_loss,
    soft_enhancement,
)
from kdforge.losses.feature import at_loss, hint_loss
from kdforge.models.dense.segmentation import fcn_resnet8, pspnet_resnet20


@pytest.fixture(autouse=True)
def _one_thread():
    # These networks are tiny: one intra-op thread is as fast, and it avoids the large slowdowns of two spinning
    # threads on a loaded shared CPU.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _np_log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def _np_kl(t_logits: np.ndarray, s_logits: np.ndarray, axis: int) -> np.ndarray:
    lt, ls = _np_log_softmax(t_logits, axis), _np_log_softmax(s_logits, axis)
    return (np.exp(lt) * (lt - ls)).sum(axis=axis)


def _maps(seed: int, shape: tuple[int, ...] = (2, 3, 4, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    return student, torch.randn(shape, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ pixel KD


def test_pixel_kd_hand_value() -> None:
    # One pixel, two classes: p_t = (1/4, 3/4), p_s = (1/2, 1/2).
    t = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)
    s = torch.zeros(1, 2, 1, 1)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert pixel_kd_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    # At τ = 2 the same distributions come from doubled logits, and τ² = 4 scales the KL.
    assert pixel_kd_loss(2 * s, 2 * t, temperature=2.0).item() == pytest.approx(4 * expected, rel=1e-6)


def test_pixel_kd_matches_numpy_and_masks_pixels() -> None:
    s, t = _maps(0)
    tau = 3.0
    kl = _np_kl(t.numpy() / tau, s.numpy() / tau, axis=1)  # [B, H, W]
    assert pixel_kd_loss(s, t, tau).item() == pytest.approx(kl.mean() * tau**2, rel=1e-5)
    valid = torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    expected = kl[valid.numpy()].mean() * tau**2
    assert pixel_kd_loss(s, t, tau, valid=valid).item() == pytest.approx(expected, rel=1e-5)
    zero = pixel_kd_loss(s.float().requires_grad_(), t.float(), tau, valid=torch.zeros(2, 4, 5, dtype=torch.bool))
    assert zero.item() == 0.0 and zero.requires_grad


def test_pixel_kd_rejects_mismatched_maps() -> None:
    with pytest.raises(ValueError, match="match_size"):
        pixel_kd_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 8, 8))


# ------------------------------------------------------------------------------------------------------ CWD


def test_cwd_hand_value() -> None:
    # One sample, one channel, two positions: the spatial distributions are (1/4, 3/4) and (1/2, 1/2).
    t = torch.tensor([0.0, math.log(3.0)]).view(1, 1, 1, 2)
    s = torch.zeros(1, 1, 1, 2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert cwd_loss(s, t).item() == pytest.approx(expected, rel=1e-6)
    assert cwd_loss(4 * s, 4 * t, temperature=4.0).item() == pytest.approx(16 * expected, rel=1e-6)


def test_cwd_matches_numpy_mmrazor_formula() -> None:
    # mmrazor ChannelWiseDivergence: sum over all (n, c) of the KL between H·W-softmaxes, × τ², / (C·N).
    s, t = _maps(2, (3, 4, 5, 6))
    tau = 4.0
    n, c = s.shape[:2]
    kl = _np_kl(t.numpy().reshape(n * c, -1) / tau, s.numpy().reshape(n * c, -1) / tau, axis=1)
    expected = kl.sum() * tau**2 / (c * n)
    assert cwd_loss(s, t, tau).item() == pytest.approx(expected, rel=1e-5)


def test_cwd_gradient_reaches_student_only_and_vanishes_at_identity() -> None:
    s, t = _maps(3)
    s = s.float().requires_grad_()
    t = t.float().requires_grad_()
    cwd_loss(s, t, 2.0).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0
    assert cwd_loss(t.detach(), t.detach()).item() == pytest.approx(0.0, abs=1e-7)


# --------------------------------------------------------------------------------------------------- FCKDNet


def test_pixel_entropy_hand_values() -> None:
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)], [0.0, 50.0]]).t().reshape(1, 2, 1, 3)
    ent = pixel_entropy(logits)[0, 0]
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert ent.tolist() == pytest.approx([1.0, h, 0.0], abs=1e-6)


def test_condensation_matrix_soft_and_hard() -> None:
    # Four pixels, three classes: confidence decreasing from left to right.
    logits = torch.tensor([[9.0, 0, 0], [3.0, 0, 0], [1.0, 0, 0], [0.0, 0, 0]]).t().reshape(1, 3, 1, 4)
    ent = pixel_entropy(logits)[0, 0]
    soft = condensation_matrix(logits, "soft")
    assert soft.shape == (1, 1, 1, 4)
    assert soft[0, 0, 0].tolist() == pytest.approx((1 - ent).tolist(), abs=1e-7)
    assert soft[0, 0, 0, -1].item() == pytest.approx(0.0, abs=1e-6)  # a uniform pixel is pure "noise"
    hard = condensation_matrix(logits, "hard", quantile=0.5)
    assert hard[0, 0, 0].tolist() == [1.0, 1.0, 0.0, 0.0]  # the more confident half is kept
    with pytest.raises(ValueError, match="soft"):
        condensation_matrix(logits, "median")  # type: ignore[arg-type]


def test_soft_enhancement_uniform_and_peaked() -> None:
    w = soft_enhancement(torch.zeros(2, 3, 4, 4))
    assert torch.allclose(w, torch.full_like(w, 4.0))  # uniform attention is its own maximum: (1 + 1)(1 + 1)
    z = torch.zeros(1, 2, 2, 2)
    z[0, 0, 0, 0] = 5.0
    w = soft_enhancement(z)
    assert w.min() >= 1.0 and w.max() <= 4.0
    assert w[0, 0, 0, 0] == w.max()  # the strongest position of the strongest channel is enhanced most


def _np_fckd(s: np.ndarray, t: np.ndarray, tau: float, hard: bool = False) -> tuple[float, float]:
    """FCKDNet (soft or hard condensation, enhancement) written out in numpy."""
    k = t.shape[1]
    lt = _np_log_softmax(t, 1)
    m = 1 + (np.exp(lt) * lt).sum(1, keepdims=True) / math.log(k)
    if hard:  # keep the pixels at or below each image's median entropy (linear-interpolated quantile)
        ent = 1 - m
        q = np.quantile(ent.reshape(len(ent), -1), 0.5, axis=1).reshape(-1, 1, 1, 1)
        m = (ent <= q).astype(np.float64)
    zt, zs = m * t, m * s
    b, c, h, w = zt.shape
    sp = np.exp(_np_log_softmax(zt.mean(1).reshape(b, -1), 1)).reshape(b, 1, h, w)
    ch = np.exp(_np_log_softmax(zt.mean((2, 3)), 1)).reshape(b, c, 1, 1)
    e = (1 + sp / sp.max(axis=(2, 3), keepdims=True)) * (1 + ch / ch.max(axis=1, keepdims=True))
    zt, zs = e * zt, e * zs
    spatial = _np_kl(zt.reshape(b * c, -1) / tau, zs.reshape(b * c, -1) / tau, 1).sum() * tau**2 / (b * c)
    channel = _np_kl(zt / tau, zs / tau, 1).mean() * tau**2
    return spatial, channel


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_fckd_matches_numpy_reconstruction(mode: str) -> None:
    s, t = _maps(4, (2, 5, 4, 4))
    spatial, channel = _np_fckd(s.numpy(), t.numpy(), 4.0, hard=mode == "hard")
    got = fckd_losses(s, t, temperature=4.0, mode=mode)  # type: ignore[arg-type]
    assert got["spatial"].item() == pytest.approx(spatial, rel=1e-4)
    assert got["channel"].item() == pytest.approx(channel, rel=1e-4)


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("enhance", [True, False])
def test_fckd_identical_outputs_give_zero(mode: str, enhance: bool) -> None:
    _, t = _maps(5)
    got = fckd_losses(t.clone(), t, mode=mode, enhance=enhance)  # type: ignore[arg-type]
    assert got["spatial"].item() == pytest.approx(0.0, abs=1e-6)
    assert got["channel"].item() == pytest.approx(0.0, abs=1e-6)


def test_fckd_gradient_reaches_student_only_and_resizes_student() -> None:
    s = torch.randn(2, 4, 4, 4, requires_grad=True)
    t = torch.randn(2, 4, 8, 8, requires_grad=True)
    got = fckd_losses(s, t)
    (got["spatial"] + got["channel"]).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_fckd_ignores_student_errors_where_the_teacher_is_uncertain() -> None:
    # Teacher: confident at pixel 0, uniform at pixel 1. A student wrong only at pixel 1 is not penalised (M = 0
    # there); the same error at pixel 0 is.
    t = torch.tensor([[8.0, 0.0, 0.0], [0.0, 0.0, 0.0]]).t().reshape(1, 3, 1, 2)
    wrong_at_uncertain = t.clone()
    wrong_at_uncertain[0, :, 0, 1] = torch.tensor([0.0, 0.0, 8.0])
    wrong_at_confident = t.clone()
    wrong_at_confident[0, :, 0, 0] = torch.tensor([0.0, 0.0, 8.0])
    quiet = fckd_losses(wrong_at_uncertain, t)
    loud = fckd_losses(wrong_at_confident, t)
    assert quiet["channel"].item() == pytest.approx(0.0, abs=1e-6)
    assert quiet["spatial"].item() == pytest.approx(0.0, abs=1e-6)
    assert loud["channel"].item() > 1.0 and loud["spatial"].item() > 0.1
    # Plain pixel KD, without condensation, does penalise the uncertain pixel.
    assert pixel_kd_loss(wrong_at_uncertain, t, 4.0).item() > 0.1


def test_match_size_bilinear() -> None:
    s = torch.arange(4.0).view(1, 1, 2, 2)
    t = torch.zeros(1, 1, 4, 4)
    out = match_size(s, t)
    assert out.shape == (1, 1, 4, 4)
    assert out[0, 0, 0, 0].item() == 0.0 and out[0, 0, -1, -1].item() == 3.0  # align_corners=False edge clamp
    assert match_size(t, t) is t


# --------------------------------------------------------------------- FitNets and AT on the dense models' maps


def test_feature_losses_accept_dense_maps() -> None:
    torch.manual_seed(0)
    teacher, student = pspnet_resnet20().eval(), fcn_resnet8()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tf = teacher.forward_features(x)
    sf = student.forward_features(x)
    # AT pairs every stage (the teacher's dilated layer3 is 16×16, the student's 8×8: at_loss pools to the smaller).
    at = sum(at_loss(s, t) for s, t in zip(sf.feats[1:], tf.feats[1:], strict=True))
    # FitNets: the student's head map regressed by a 1×1 conv and resized onto the teacher's head map.
    regressor = nn.Conv2d(sf.feats[-1].shape[1], tf.feats[-1].shape[1], 1)
    hint = hint_loss(match_size(regressor(sf.feats[-1]), tf.feats[-1]), tf.feats[-1])
    (at + hint).backward()
    assert torch.isfinite(at) and torch.isfinite(hint) and at > 0 and hint > 0
    assert regressor.weight.grad is not None and student.backbone.layer1[0].conv1.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
