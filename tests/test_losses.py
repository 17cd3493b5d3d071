"""Golden values for the logit losses, computed independently with NumPy and by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdforge.losses import cross_entropy, kd_loss, kl_div


def _np_softmax(z: np.ndarray, t: float) -> np.ndarray:
    e = np.exp((z - z.max(axis=1, keepdims=True)) / t)
    return e / e.sum(axis=1, keepdims=True)


def _np_kd(zs: np.ndarray, zt: np.ndarray, t: float) -> float:
    p, q = _np_softmax(zt, t), _np_softmax(zs, t)
    return float((p * (np.log(p) - np.log(q))).sum(axis=1).mean() * t * t)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 10, generator=g, dtype=torch.float64) * 3, torch.randn(
        6, 10, generator=g, dtype=torch.float64
    ) * 3


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0, 8.0])
def test_kd_matches_numpy(logits, t):
    zs, zt = logits
    got = kd_loss(zs, zt, t).item()
    assert got == pytest.approx(_np_kd(zs.numpy(), zt.numpy(), t), rel=1e-5)


def test_kd_hand_value():
    # Two classes, τ=1: p_t = (0.5, 0.5), q = softmax(0, ln 3) = (0.25, 0.75).
    # KL = 0.5·ln(0.5/0.25) + 0.5·ln(0.5/0.75) = 0.5·ln 2 + 0.5·ln(2/3).
    zs = torch.tensor([[0.0, np.log(3.0)]])
    zt = torch.tensor([[1.0, 1.0]])
    expected = 0.5 * np.log(2) + 0.5 * np.log(2 / 3)
    assert kd_loss(zs, zt, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_kd_zero_for_equal_logits_and_shift_invariant(logits):
    zs, _ = logits
    assert kd_loss(zs, zs.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-7)
    # kd_loss works in float32, whose rounding of the shifted log-softmax differs per CPU kernel: τ² = 16 times a few
    # ulps of |log p| ≈ 5 bounds it near 1e-5 (seen: 6e-7), while a loss that were not shift invariant gives O(1)
    assert kd_loss(zs, zs + 5.0, 4.0).item() == pytest.approx(0.0, abs=1e-5)


def test_kd_tau_squared_factor(logits):
    zs, zt = logits
    for t in (2.0, 4.0):
        p = torch.softmax(zt / t, 1)
        plain_kl = (p * (torch.log_softmax(zt / t, 1) - torch.log_softmax(zs / t, 1))).sum(1).mean()
        assert kd_loss(zs, zt, t).item() == pytest.approx(t * t * plain_kl.item(), rel=1e-6)


def test_kd_gradient_is_tau_times_prob_gap(logits):
    # d/dz_s [τ²·KL(p_t‖p_s)] = τ·(p_s − p_t) per sample, divided by B for the batch mean.
    zs, zt = logits
    zs = zs.clone().requires_grad_(True)
    t = 3.0
    kd_loss(zs, zt, t).backward()
    expected = t * (torch.softmax(zs.detach() / t, 1) - torch.softmax(zt / t, 1)) / zs.shape[0]
    # The loss computes in float32 by design, so agreement is to float32 precision.
    torch.testing.assert_close(zs.grad, expected.to(zs.grad.dtype), rtol=1e-4, atol=1e-7)


def test_kd_in_half_precision_inputs_is_float32():
    zs = torch.randn(4, 10).to(torch.bfloat16)
    zt = torch.randn(4, 10).to(torch.bfloat16)
    out = kd_loss(zs, zt, 4.0)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(_np_kd(zs.float().numpy(), zt.float().numpy(), 4.0), rel=1e-5)


def test_kl_div_zero_probability_entries_are_finite():
    log_p = torch.log(torch.tensor([[1.0, 0.0]]))
    log_q = torch.log(torch.tensor([[0.5, 0.5]]))
    assert kl_div(log_p, log_q).item() == pytest.approx(np.log(2), rel=1e-6)


def test_cross_entropy_matches_numpy(logits):
    zs, _ = logits
    y = torch.tensor([0, 3, 9, 1, 1, 5])
    p = _np_softmax(zs.numpy(), 1.0)
    expected = -np.log(p[np.arange(6), y.numpy()]).mean()
    assert cross_entropy(zs, y).item() == pytest.approx(expected, rel=1e-6)
