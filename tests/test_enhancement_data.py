"""Low-light data: the LOL folder layout, the pair loader with joint augmentation, synthetic CIFAR pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.data.lowlight import InMemoryPairs, PairLoader, joint_crop, joint_flip, lol_split, random_joint_augment
from kdforge.data.synth.lowlight import (
    ALPHA_RANGE,
    BETA_RANGE,
    GAMMA_RANGE,
    TEST_SEED,
    lowlight_pairs_from_folder,
    lowlight_splits_from_arrays,
    synthesize,
)
from kdforge.errors import DataError


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _lol(root: Path, sizes: dict[str, tuple[int, int]], split: str = "our485") -> dict[str, np.ndarray]:
    """Writes high images and low = high // 4 (so the pairing is checkable after augmentation)."""
    rng = np.random.default_rng(0)
    highs = {}
    for name, (h, w) in sizes.items():
        high = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        _write(root / split / "high" / name, high)
        _write(root / split / "low" / name, high // 4)
        highs[name] = high
    return highs


def _assert_paired(low: torch.Tensor, high: torch.Tensor) -> None:
    """Input and target still come from the same pixels: low = ⌊high / 4⌋ element-wise."""
    lo = torch.round(low * 255).long()
    hi = torch.round(high * 255).long()
    assert torch.equal(lo, torch.div(hi, 4, rounding_mode="floor"))


# --------------------------------------------------------------------------------------------------------- LOL


def test_lol_folder_reads_pairs(tmp_path: Path) -> None:
    highs = _lol(tmp_path, {"2.png": (12, 10), "1.png": (9, 14)}, "eval15")
    ds = lol_split(tmp_path, "eval")
    assert ds.names == ["1.png", "2.png"] and len(ds) == 2
    low, high = ds.pair(1)
    assert low.dtype == torch.uint8 and tuple(high.shape) == (3, 12, 10)
    assert np.array_equal(high.permute(1, 2, 0).numpy(), highs["2.png"])
    assert ds.size(0) == (9, 14)


def test_lol_errors_name_the_file(tmp_path: Path) -> None:
    _lol(tmp_path, {"a.png": (8, 8), "b.png": (8, 8)})
    _write(tmp_path / "our485" / "low" / "c.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"low/c\.png has no normal-light partner"):
        lol_split(tmp_path, "train")
    (tmp_path / "our485" / "low" / "c.png").unlink()
    _write(tmp_path / "our485" / "high" / "d.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"high/d\.png has no low-light partner"):
        lol_split(tmp_path, "train")
    (tmp_path / "our485" / "high" / "d.png").unlink()
    _write(tmp_path / "our485" / "high" / "b.png", np.zeros((8, 9, 3), np.uint8))
    with pytest.raises(DataError, match=r"low/b\.png is 8×8 but its target .*b\.png is 8×9"):
        lol_split(tmp_path, "train")
    (tmp_path / "our485" / "high" / "b.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot read image .*b\.png"):
        lol_split(tmp_path, "train")
    with pytest.raises(DataError, match="eval15 does not exist"):
        lol_split(tmp_path, "eval")
    with pytest.raises(DataError, match="unknown LOL split"):
        lol_split(tmp_path, "val")


def test_loader_train_crops_jointly_and_is_deterministic(tmp_path: Path) -> None:
    _lol(tmp_path, {"a.png": (12, 10), "b.png": (9, 14), "c.png": (16, 16), "d.png": (10, 11)})
    ds = lol_split(tmp_path, "train")
    loader = PairLoader(ds, 2, train=True, crop_size=8, seed=5)
    assert len(loader) == 2
    first = list(loader)
    for low, high in first:
        assert low.shape == (2, 3, 8, 8) and low.dtype == torch.float32
        _assert_paired(low, high)
    again = list(PairLoader(ds, 2, train=True, crop_size=8, seed=5))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again, strict=True))
    loader.set_epoch(1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, list(loader), strict=True))
    with pytest.raises(DataError, match=r"image b\.png is 9×14, smaller than crop_size 10"):
        PairLoader(ds, 2, train=True, crop_size=10)
    with pytest.raises(DataError, match="differ in size"):
        PairLoader(ds, 2, train=True)


def test_loader_eval_whole_images_in_order(tmp_path: Path) -> None:
    _lol(tmp_path, {"a.png": (8, 8), "b.png": (8, 8), "c.png": (9, 8), "d.png": (8, 8)}, "eval15")
    ds = lol_split(tmp_path, "eval")
    batches = list(PairLoader(ds, 4, train=False))
    assert [tuple(b[0].shape) for b in batches] == [(2, 3, 8, 8), (1, 3, 9, 8), (1, 3, 8, 8)]
    for low, high in batches:
        _assert_paired(low, high)
    assert torch.equal(batches[1][1][0], ds.pair(2)[1].float() / 255)


# ------------------------------------------------------------------------------------------------ augmentation


def test_joint_crop_and_flip_match_slicing() -> None:
    x = torch.arange(2 * 3 * 6 * 7, dtype=torch.float32).view(2, 3, 6, 7)
    y = -x
    lo, hi = joint_crop(x, y, torch.tensor([0, 2]), torch.tensor([3, 1]), 4)
    assert torch.equal(lo[0], x[0, :, 0:4, 3:7]) and torch.equal(lo[1], x[1, :, 2:6, 1:5])
    assert torch.equal(hi, -lo)
    fl, fh = joint_flip(x, y, torch.tensor([True, False]), torch.tensor([True, True]))
    assert torch.equal(fl[0], x[0].flip(2).flip(1)) and torch.equal(fl[1], x[1].flip(1))
    assert torch.equal(fh, -fl)


def test_random_joint_augment_same_size_batch() -> None:
    high = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8)
    pairs = InMemoryPairs(high // 4, high, [str(i) for i in range(6)])
    loader = PairLoader(pairs, 3, train=True, crop_size=8, seed=1)
    out = list(loader)
    assert len(out) == 2
    for low, hi in out:
        assert low.shape == (3, 3, 8, 8)
        _assert_paired(low, hi)
    gen_a, gen_b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 10, 10)
    a = random_joint_augment(x, x * 2, gen_a, 6)
    b = random_joint_augment(x, x * 2, gen_b, 6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], 2 * a[0])
    with pytest.raises(DataError, match="crop_size 11"):
        random_joint_augment(x, x, gen_a, 11)


# ---------------------------------------------------------------------------------------------------- synthetic


def _cifar(n: int) -> np.ndarray:
    from kdforge.data import _embedded_arrays

    return _embedded_arrays().train_images[:n]


def test_synthesis_deterministic_per_seed_and_index() -> None:
    images = _cifar(12)
    a, pa = synthesize(images, seed=7)
    b, _ = synthesize(images, seed=7)
    c, _ = synthesize(images, seed=8)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    # Image i depends on (seed, i) only: a prefix of the set is degraded identically.
    assert synthesize(images[:5], seed=7)[0].tobytes() == a[:5].tobytes()
    assert a.dtype == np.uint8 and a.shape == images.shape
    for p in pa:
        assert ALPHA_RANGE[0] <= p.alpha <= ALPHA_RANGE[1] and BETA_RANGE[0] <= p.beta <= BETA_RANGE[1]
        assert GAMMA_RANGE[0] <= p.gamma <= GAMMA_RANGE[1]


def test_synthesis_follows_the_degradation_model() -> None:
    images = _cifar(16)
    low, params = synthesize(images, seed=0)
    x = images.astype(np.float64) / 255
    for i, p in enumerate(params):
        clean = p.beta * (p.alpha * x[i]) ** p.gamma
        # Poisson–Gaussian around the curve: variance y/P + σ², plus the uniform rounding error 1/12 level².
        sd = np.sqrt(clean / p.photons + p.read_sigma**2 + 1 / (12 * 255**2))
        z = (low[i] / 255.0 - clean) / sd
        keep = (clean > 0.05) & (low[i] < 255)  # away from the clipping at 0 and 255
        if keep.sum() > 300:
            assert abs(z[keep].mean()) < 0.2
            assert 0.8 < z[keep].std() < 1.2
    assert low.mean() < 0.5 * images.mean()


def test_splits_use_fixed_test_seed() -> None:
    images = _cifar(6)
    tr1, te1 = lowlight_splits_from_arrays(images[:3], images[3:], seed=1)
    tr2, te2 = lowlight_splits_from_arrays(images[:3], images[3:], seed=2)
    assert torch.equal(te1.lows, te2.lows)
    assert not torch.equal(tr1.lows, tr2.lows)
    assert torch.equal(te1.lows, torch.from_numpy(synthesize(images[3:], TEST_SEED)[0]))
    assert torch.equal(tr1.highs, torch.from_numpy(images[:3]))


def test_synthesis_from_folder_keeps_native_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    _write(tmp_path / "b.jpg", rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    _write(tmp_path / "a.png", rng.integers(0, 256, (17, 13, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    pairs = lowlight_pairs_from_folder(tmp_path, seed=0)
    assert pairs.names == ["a.png", "b.jpg"]
    assert pairs.size(0) == (17, 13) and pairs.size(1) == (20, 30)
    again = lowlight_pairs_from_folder(tmp_path, seed=0)
    assert all(torch.equal(pairs.pair(i)[0], again.pair(i)[0]) for i in range(2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        lowlight_pairs_from_folder(tmp_path / "empty", seed=0)
    with pytest.raises(DataError, match="does not exist"):
        lowlight_pairs_from_folder(tmp_path / "nope", seed=0)


def test_bad_source_arrays() -> None:
    with pytest.raises(DataError, match=r"uint8 \[N, 3, H, W\]"):
        synthesize(np.zeros((2, 32, 32, 3), np.uint8), seed=0)
    with pytest.raises(DataError, match="one size"):
        InMemoryPairs([torch.zeros(3, 4, 4, dtype=torch.uint8)], [torch.zeros(3, 4, 5, dtype=torch.uint8)], ["x"])


def test_loader_rank_shards_cover_the_one_process_order() -> None:
    high = torch.randint(0, 256, (10, 3, 6, 6), dtype=torch.uint8)
    pairs = InMemoryPairs(high // 4, high, [str(i) for i in range(10)])
    one = list(PairLoader(pairs, 4, train=True, seed=3, flips=False))
    ranks = [list(PairLoader(pairs, 2, train=True, seed=3, flips=False, rank=r, world_size=2)) for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 2
    for k in range(2):
        assert torch.equal(torch.cat([ranks[0][k][1], ranks[1][k][1]]), one[k][1])
    evals = [list(PairLoader(pairs, 3, train=False, rank=r, world_size=2)) for r in (0, 1)]
    seen = torch.cat([b[1] for r in (0, 1) for b in evals[r]])
    assert seen.shape[0] == 10 and torch.equal(seen.sort(dim=0).values, (high.float() / 255).sort(dim=0).values)
    with pytest.raises(DataError, match="outside world_size"):
        PairLoader(pairs, 2, train=True, rank=2, world_size=2)
