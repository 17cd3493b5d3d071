"""TASN's trilinear attention and attention sampler, against a scalar transcription of the authors' code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdforge.models.dense.attention_sampling import (
    attention_grid,
    attention_sample,
    structure_and_detail_maps,
    trilinear_attention,
)


def _reference_axes(mapx: list[float], mapy: list[float], out_size: int, dense: float, iters: int):
    """The per-sample loop of researchmm/tasn ``att_grid_generator_gpu_kernel``, transcribed line by line in
    plain Python (scalars, no tensors). ``mapx`` is the row profile, ``mapy`` the column profile, both normalised
    to sum 1. Returns (row coordinates, column coordinates)."""
    a = len(mapx)
    threshold = dense * out_size / a  # scale * dense * input_size / att_size with scale = out/input, input = a
    mx = [v * out_size for v in mapx]
    my = [v * out_size for v in mapy]
    for j in range(iters):
        max_x = max([0.0, *mx])
        max_y = max([0.0, *my])
        max_x = max_y if max_x > max_y else max_x
        use = max_x
        if j == 0:
            use = max_x if threshold > max_x else threshold
        mx = [use if v > use else v for v in mx]
        my = [use if v > use else v for v in my]
        dx = (out_size - sum(mx)) / a
        dy = (out_size - sum(my)) / a
        mx = [v + dx for v in mx]
        my = [v + dy for v in my]
    xi = [0.0] * a
    yi = [0.0] * a
    for i in range(a - 1):
        xi[i + 1] = xi[i] + mx[i + 1]
        yi[i + 1] = yi[i] + my[i + 1]

    def invert(cum: list[float]) -> list[float]:
        step = cum[-1] / out_size
        out = [0.0] * out_size
        i, j = 0, 1
        scale = 2.0 / (a - 1)
        while i < out_size:
            if cum[j] >= i * step:
                out[i] = (j + (i * step - cum[j]) / (cum[j] - cum[j - 1])) * scale - 1.0
                i += 1
            else:
                j += 1
        return out

    return invert(xi), invert(yi)


def test_grid_matches_reference_kernel_in_reference_mode() -> None:
    g = torch.Generator().manual_seed(0)
    att = torch.rand(3, 1, 7, 7, generator=g, dtype=torch.float64) ** 3  # peaky maps so clipping is exercised
    size, out_size = 16, 12
    grid = attention_grid(att, size, out_size, endpoint=False)
    assert grid.shape == (3, out_size, out_size, 2)
    up = F.interpolate(att.float(), (size, size), mode="bilinear", align_corners=False)[:, 0].double()
    for b in range(3):
        rows = up[b].amax(dim=1)
        cols = up[b].amax(dim=0)
        ref_rows, ref_cols = _reference_axes(
            (rows / rows.sum()).tolist(), (cols / cols.sum()).tolist(), out_size, dense=4.0, iters=5
        )
        # grid[..., 0] is x (varies along columns), grid[..., 1] is y (varies along rows)
        np.testing.assert_allclose(grid[b, 0, :, 0].numpy(), ref_cols, atol=2e-5)
        np.testing.assert_allclose(grid[b, :, 0, 1].numpy(), ref_rows, atol=2e-5)
        assert torch.equal(grid[b, :, :, 0], grid[b, :1, :, 0].expand(out_size, -1))


def test_uniform_attention_is_the_identity_resampling() -> None:
    img = torch.rand(2, 3, 10, 10)
    out = attention_sample(img, torch.ones(2, 1, 5, 5), out_size=10)
    torch.testing.assert_close(out, img, atol=1e-5, rtol=0)


def test_high_attention_region_is_magnified_about_dense_times_at_most() -> None:
    size = 32
    att = torch.full((1, 1, size, size), 0.01)
    att[..., 12:16, 12:16] = 1.0  # a bright 4x4 patch
    grid = attention_grid(att, size, size, dense=4.0)
    xs = (grid[0, 0, :, 0] + 1) * (size - 1) / 2  # output column -> input x
    assert torch.all(xs[1:] >= xs[:-1] - 1e-6), "coordinates must be monotone"
    inside = ((xs >= 12) & (xs < 16)).sum().item()
    assert inside > 4, "the attended columns must get more output columns than their share"
    spacing = (xs[1:] - xs[:-1]).min().item()
    # clipped at 4x the uniform density, then the clipped mass is spread evenly, so a little above 4x at most
    assert 1 / 5 < spacing < 1 / 3, "magnification is capped near dense = 4"


def test_resampling_is_differentiable_with_respect_to_the_image_only() -> None:
    img = torch.rand(2, 3, 16, 16, requires_grad=True)
    att = torch.rand(2, 1, 4, 4, requires_grad=True)
    attention_sample(img, att, out_size=8).sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert att.grad is None


def test_trilinear_attention_against_an_explicit_computation() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64)
    got = trilinear_attention(x)
    for b in range(2):
        f = x[b].reshape(3, 20).numpy()
        e = np.exp(2 * f - (2 * f).max(axis=1, keepdims=True))
        f_norm = e / e.sum(axis=1, keepdims=True)
        rel = f_norm @ f.T
        e2 = np.exp(rel - rel.max(axis=1, keepdims=True))
        rel = e2 / e2.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(got[b].reshape(3, 20).numpy(), rel @ f, rtol=1e-5, atol=1e-6)
    assert not got.requires_grad


def test_structure_and_detail_maps() -> None:
    att = torch.rand(4, 6, 3, 3)
    s1, d1 = structure_and_detail_maps(att, torch.Generator().manual_seed(5))
    _, d2 = structure_and_detail_maps(att, torch.Generator().manual_seed(5))
    torch.testing.assert_close(s1, att.sum(dim=1, keepdim=True))
    assert torch.equal(d1, d2)
    for b in range(4):
        matches = [torch.allclose(d1[b, 0], att[b, c] + 0.01) for c in range(6)]
        assert sum(matches) == 1


def test_non_square_images_are_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        attention_sample(torch.rand(1, 3, 8, 6), torch.rand(1, 1, 2, 2), 4)
