"""JDA's batched tensor operations against PIL's (the AutoAugment definitions the CCD reference uses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from kdforge.data import jda
from kdforge.data.jda import CIFAR100_OPS, JDAPolicy, jda_augment


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    # Smooth-ish images with a full range of values: a gradient plus noise.
    base = np.linspace(0, 255, 32)[None, :, None, None] * np.ones((6, 32, 32, 3)) * 0.6
    return np.clip(base + rng.normal(0, 40, (6, 32, 32, 3)) + 30, 0, 255).astype(np.uint8)


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float()


def _pil(images: np.ndarray, fn) -> torch.Tensor:
    return _tensor(np.stack([np.asarray(fn(Image.fromarray(a))) for a in images]))


def _fixed_factor(monkeypatch, value: float) -> None:
    monkeypatch.setattr(jda, "_enhance_factor", lambda x, m, g: torch.full((x.shape[0],), value))


@pytest.mark.parametrize(
    ("name", "m", "reference"),
    [
        ("equalize", 0, ImageOps.equalize),
        ("autocontrast", 0, ImageOps.autocontrast),
        ("invert", 0, ImageOps.invert),
        ("posterize", 5, lambda im: ImageOps.posterize(im, jda._POSTERIZE[5])),
        ("solarize", 4, lambda im: ImageOps.solarize(im, jda._SOLARIZE[4])),
    ],
)
def test_pointwise_ops_match_pil_exactly(images, name, m, reference):
    torch.testing.assert_close(jda.OPS[name](_tensor(images), m, None), _pil(images, reference))


@pytest.mark.parametrize("factor", [0.4, 1.7])
@pytest.mark.parametrize(
    ("name", "enhancer"),
    [
        ("color", ImageEnhance.Color),
        ("contrast", ImageEnhance.Contrast),
        ("brightness", ImageEnhance.Brightness),
        ("sharpness", ImageEnhance.Sharpness),
    ],
)
def test_enhancers_match_pil_exactly(images, monkeypatch, name, enhancer, factor):
    _fixed_factor(monkeypatch, factor)
    out = jda.OPS[name](_tensor(images), 0, None)
    torch.testing.assert_close(out, _pil(images, lambda im: enhancer(im).enhance(factor)))


def test_rotate_matches_pil(images):
    def reference(im):
        rot = im.convert("RGBA").rotate(jda._ROTATE[3])
        return Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert("RGB")

    torch.testing.assert_close(jda.rotate(_tensor(images), 3, None), _pil(images, reference))


def test_integer_translate_matches_pil_and_shear_is_close(images):
    x = _tensor(images)
    ones, zeros = torch.ones(len(images)), torch.zeros(len(images))
    shifted = jda._grid_sample(x, jda._affine(ones, zeros, 5 * ones, zeros, ones, zeros), "bicubic")

    def translate(im):
        return im.transform(im.size, Image.AFFINE, (1, 0, 5, 0, 1, 0), Image.BICUBIC, fillcolor=(128, 128, 128))

    torch.testing.assert_close(shifted.round().clamp(0, 255), _pil(images, translate))
    assert (shifted[..., -5:] == 128).all()  # pixels shifted in from outside get the fill colour

    def shear(im):
        return im.transform(im.size, Image.AFFINE, (1, 0.2, 0, 0, 1, 0), Image.BICUBIC, fillcolor=(128, 128, 128))

    sheared = jda._grid_sample(x, jda._affine(ones, 0.2 * ones, zeros, zeros, ones, zeros), "bicubic")
    diff = (sheared.round().clamp(0, 255) - _pil(images, shear)).abs()
    assert diff.mean() < 6  # a different bicubic kernel (a = −0.75 vs PIL's −0.5) on noisy images


def test_jda_probability_limits_and_determinism(images):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    assert torch.equal(jda_augment(x, JDAPolicy(p=0.0)), x)
    # p = 1 applies every op in order: equal to the manual composition (the random signs drawn in the same order).
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    out = jda_augment(x, JDAPolicy(p=1.0), g1)
    manual = x.float()
    for name, m in CIFAR100_OPS:
        torch.rand(len(x), generator=g2)  # the firing draw
        manual = jda.OPS[name](manual, m, g2).round().clamp(0, 255)
    assert torch.equal(out, manual.to(torch.uint8))
    a = jda_augment(x, JDAPolicy(), torch.Generator().manual_seed(1))
    b = jda_augment(x, JDAPolicy(), torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape


def test_each_op_fires_with_probability_p():
    x = torch.full((4000, 3, 4, 4), 10, dtype=torch.uint8)
    out = jda_augment(x, JDAPolicy((("invert", 0),), p=0.3), torch.Generator().manual_seed(0))
    share = (out[:, 0, 0, 0] == 245).float().mean().item()
    assert abs(share - 0.3) < 0.03


def test_policy_parsing_and_errors():
    policy = JDAPolicy.parse(["rotate:3", "invert"], 0.5)
    assert policy.ops == (("rotate", 3), ("invert", 0)) and policy.p == 0.5
    with pytest.raises(ValueError, match="unknown JDA operation 'rotat'"):
        JDAPolicy.parse(["rotat:3"], 0.3)
    with pytest.raises(ValueError, match="magnitude index"):
        JDAPolicy.parse(["rotate:12"], 0.3)
    with pytest.raises(ValueError, match="name:magnitude"):
        JDAPolicy.parse(["rotate:x"], 0.3)
    with pytest.raises(ValueError, match="probability"):
        JDAPolicy(p=1.5)
