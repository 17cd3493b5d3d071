"""PSNR / SSIM against scikit-image (test-only reference) and the enhancement evaluator's reduction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdforge.ops.image_metrics import default_data_range, psnr, ssim
from kdforge.tasks.base import LocalReducer
from kdforge.tasks.enhancement import EnhancementEvaluator

skm = pytest.importorskip("skimage.metrics")

SHARED_CIFAR10 = (
    __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared/data/cifar10/cifar10_jpeg.npz"
)


def sk_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """scikit-image SSIM of two [C, H, W] images, with the settings docs/tasks/enhancement.md names."""
    return skm.structural_similarity(
        x.transpose(1, 2, 0),
        y.transpose(1, 2, 0),
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        channel_axis=-1,
        data_range=data_range,
    )


def sk_psnr(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    return skm.peak_signal_noise_ratio(x, y, data_range=data_range)


def noisy_pair(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> tuple[np.ndarray, np.ndarray]:
    gt = rng.random(shape)
    pred = np.clip(gt + sigma * rng.standard_normal(shape) + 0.05, 0, 1)
    return gt, pred


@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 11, 11), (3, 23, 40), (1, 17, 12)])
def test_float64_matches_skimage(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(sum(shape))
    gt, pred = zip(*(noisy_pair(rng, shape, s) for s in (0.02, 0.1, 0.3)), strict=True)
    gt, pred = np.stack(gt), np.stack(pred)
    got_ssim = ssim(torch.from_numpy(pred), torch.from_numpy(gt)).numpy()
    got_psnr = psnr(torch.from_numpy(pred), torch.from_numpy(gt)).numpy()
    want_ssim = [sk_ssim(gt[i], pred[i], 1.0) for i in range(3)]
    want_psnr = [sk_psnr(gt[i], pred[i], 1.0) for i in range(3)]
    np.testing.assert_allclose(got_ssim, want_ssim, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_psnr, want_psnr, rtol=1e-12)
    assert got_ssim.dtype == np.float64


def test_float32_matches_skimage() -> None:
    rng = np.random.default_rng(1)
    gt, pred = noisy_pair(rng, (3, 48, 36), 0.1)
    gt32, pred32 = gt.astype(np.float32), pred.astype(np.float32)
    got = ssim(torch.from_numpy(pred32), torch.from_numpy(gt32))
    assert got.dtype == torch.float32
    # float32 filtering in both libraries, in different summation orders: agreement to ~1e-6.
    assert abs(float(got) - sk_ssim(gt32, pred32, 1.0)) < 1e-5
    assert abs(float(psnr(torch.from_numpy(pred32), torch.from_numpy(gt32))) - sk_psnr(gt32, pred32, 1.0)) < 1e-4


def test_uint8_uses_255_and_matches_skimage() -> None:
    rng = np.random.default_rng(2)
    gt = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    pred = np.clip(gt.astype(int) + rng.integers(-20, 21, gt.shape), 0, 255).astype(np.uint8)
    assert default_data_range(torch.from_numpy(gt)) == 255.0
    got_s = float(ssim(torch.from_numpy(pred), torch.from_numpy(gt)))
    got_p = float(psnr(torch.from_numpy(pred), torch.from_numpy(gt)))
    assert got_s == pytest.approx(sk_ssim(gt, pred, 255), abs=1e-12)
    assert got_p == pytest.approx(sk_psnr(gt, pred, 255), rel=1e-12)
    # The same images as floats in [0, 1] with data_range 1 give the same numbers.
    assert float(ssim(torch.from_numpy(pred / 255.0), torch.from_numpy(gt / 255.0))) == pytest.approx(got_s, abs=1e-12)
    assert float(psnr(torch.from_numpy(pred / 255.0), torch.from_numpy(gt / 255.0))) == pytest.approx(got_p, rel=1e-12)


def _cifar_images() -> np.ndarray:
    from kdforge.data import _embedded_arrays

    return _embedded_arrays().test_images[:6]


def _real_pairs(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from kdforge.data.synth.lowlight import synthesize

    low, _ = synthesize(images, seed=3)
    gt = images.astype(np.float64) / 255.0
    # A crude "enhancement" of the low-light images: brightened and clipped, realistic errors in structure.
    pred = np.clip(low.astype(np.float64) / 255.0 * 4.0, 0, 1)
    return gt, pred


def test_real_cifar_images_embedded() -> None:
    gt, pred = _real_pairs(_cifar_images())
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        g, p = gt.astype(dtype), pred.astype(dtype)
        got = ssim(torch.from_numpy(p), torch.from_numpy(g)).double().numpy()
        want = [sk_ssim(g[i], p[i], 1.0) for i in range(len(g))]
        np.testing.assert_allclose(got, want, rtol=0, atol=tol)
        got_p = psnr(torch.from_numpy(p), torch.from_numpy(g)).double().numpy()
        np.testing.assert_allclose(got_p, [sk_psnr(g[i], p[i], 1.0) for i in range(len(g))], rtol=0, atol=100 * tol)


def test_real_cifar_images_shared_npz() -> None:
    if not SHARED_CIFAR10.exists():
        pytest.skip("../shared CIFAR-10 JPEG npz not present")
    from kdforge.data.cifar import load_jpeg_npz

    images = load_jpeg_npz(SHARED_CIFAR10).test_images[100:104]
    gt, pred = _real_pairs(images)
    got = ssim(torch.from_numpy(pred), torch.from_numpy(gt)).numpy()
    np.testing.assert_allclose(got, [sk_ssim(gt[i], pred[i], 1.0) for i in range(4)], rtol=0, atol=1e-12)
    # uint8 pair (the stored images vs. their brightened low-light versions) with data_range 255.
    pred8 = np.rint(pred * 255).astype(np.uint8)
    got8 = ssim(torch.from_numpy(pred8), torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(got8, [sk_ssim(images[i], pred8[i], 255) for i in range(4)], rtol=0, atol=1e-12)


def test_limit_cases() -> None:
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    assert torch.isinf(psnr(x, x)).all()
    # Constant images a and b: SSIM = (2ab + C1) / (a² + b² + C1) (variances zero, the contrast term is C2/C2).
    a, b = 0.3, 0.7
    c1 = (0.01 * 1.0) ** 2
    got = ssim(torch.full((3, 12, 12), b, dtype=torch.float64), torch.full((3, 12, 12), a, dtype=torch.float64))
    assert float(got) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-12)
    # PSNR of a uniform error e: 10·log10(1 / e²).
    assert float(psnr(torch.full((3, 4, 4), 0.6), torch.full((3, 4, 4), 0.5))) == pytest.approx(20.0, abs=1e-4)


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.rand(1, 3, 10, 20), torch.rand(1, 3, 10, 20))
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(torch.rand(1, 3, 10, 20), torch.rand(1, 3, 10, 21))


class _Capture:
    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.seen.append(tensor)
        return tensor

    def gather(self, obj: object) -> list[object]:
        return [obj]


class _TwoRanks:
    """Rank 0 of a fake two-process group: ``sum`` adds the other rank's captured tensor."""

    def __init__(self, other: _Capture) -> None:
        self.other = other
        self.calls = 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor + self.other.seen[self.calls]
        self.calls += 1
        return out

    def gather(self, obj: object) -> list[object]:
        raise AssertionError("the enhancement evaluator only sums")


def test_evaluator_matches_skimage_and_two_rank_reduction() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for b in (3, 2, 4, 1):
        gt = torch.rand(b, 3, 16, 20, generator=gen)
        pred = (gt + 0.1 * torch.randn(b, 3, 16, 20, generator=gen)).clamp(0, 1)
        batches.append((pred, gt))
    one = EnhancementEvaluator()
    for pred, gt in batches:
        one.update(pred, gt)
    full = one.compute(LocalReducer())
    preds = torch.cat([p for p, _ in batches]).double().numpy()
    gts = torch.cat([g for _, g in batches]).double().numpy()
    assert full["num_images"] == 10
    assert full["psnr"] == pytest.approx(np.mean([sk_psnr(gts[i], preds[i], 1.0) for i in range(10)]), abs=1e-10)
    assert full["ssim"] == pytest.approx(np.mean([sk_ssim(gts[i], preds[i], 1.0) for i in range(10)]), abs=1e-12)
    assert EnhancementEvaluator.primary == "psnr" and EnhancementEvaluator.higher_is_better

    rank0, rank1 = EnhancementEvaluator(), EnhancementEvaluator()
    for k, (pred, gt) in enumerate(batches):
        (rank0 if k % 2 == 0 else rank1).update(pred, gt)
    cap = _Capture()
    rank1.compute(cap)
    split = rank0.compute(_TwoRanks(cap))
    assert split["num_images"] == full["num_images"]
    assert split["psnr"] == pytest.approx(full["psnr"], abs=1e-12)
    assert split["ssim"] == pytest.approx(full["ssim"], abs=1e-14)

    one.reset()
    assert math.isnan(one.compute()["psnr"])
