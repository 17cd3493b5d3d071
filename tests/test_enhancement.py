"""Enhancement: image losses (golden values, gradcheck), distillation losses, the U-Net enhancer and the task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdforge.errors import ConfigError
from kdforge.losses.image import (
    FeatureAdapter,
    attention_distill_loss,
    enhancement_loss,
    feature_distill_loss,
    gradient_loss,
    image_gradients,
    l1_loss,
    lowlight_kd_loss,
    output_distill_loss,
    ssim_loss,
)
from kdforge.models import count_parameters
from kdforge.models.dense.enhancer import ENHANCEMENT_MODELS, EnhancerFeatures, UNetEnhancer
from kdforge.ops.image_metrics import gaussian_window, psnr, ssim_map
from kdforge.profile import count_macs
from kdforge.tasks.enhancement import EnhancementEvaluator, EnhancementTask

# ------------------------------------------------------------------------------------------ numpy references


def np_ssim_map(x: np.ndarray, y: np.ndarray, pad: str | None, L: float = 1.0) -> np.ndarray:
    """Brute-force SSIM map of one [H, W] channel: explicit 11×11 Gaussian window sums at every centre."""
    t = np.arange(11) - 5.0
    g = np.exp(-0.5 * (t / 1.5) ** 2)
    w2 = np.outer(g, g) / np.outer(g, g).sum()
    if pad is not None:
        x, y = np.pad(x, 5, mode=pad), np.pad(y, 5, mode=pad)
    h, w = x.shape[0] - 10, x.shape[1] - 10
    out = np.empty((h, w))
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    for i in range(h):
        for j in range(w):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (w2 * px).sum(), (w2 * py).sum()
            vx = (w2 * (px - mx) ** 2).sum()
            vy = (w2 * (py - my) ** 2).sum()
            cxy = (w2 * (px - mx) * (py - my)).sum()
            out[i, j] = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return out


def np_attention(f: np.ndarray) -> np.ndarray:
    a = (f**2).mean(axis=1).reshape(len(f), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------ image losses


def test_gaussian_window_is_scipys_kernel() -> None:
    g = gaussian_window(dtype=torch.float64).numpy()
    t = np.arange(-5, 6)
    ref = np.exp(-(t**2) / (2 * 1.5**2))
    np.testing.assert_allclose(g, ref / ref.sum(), rtol=1e-15)
    with pytest.raises(ValueError, match="odd"):
        gaussian_window(10)


@pytest.mark.parametrize("padding,np_pad", [("valid", None), ("reflect", "reflect")])
def test_ssim_map_brute_force(padding: str, np_pad: str | None) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((1, 2, 13, 14))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    got = ssim_map(torch.from_numpy(x), torch.from_numpy(y), padding=padding).numpy()
    for c in range(2):
        np.testing.assert_allclose(got[0, c], np_ssim_map(x[0, c], y[0, c], np_pad), rtol=0, atol=1e-12)
    assert got.shape[-2:] == ((3, 4) if padding == "valid" else (13, 14))


def test_ssim_loss_limits_and_constant_golden() -> None:
    x = torch.rand(2, 3, 12, 12)
    assert float(ssim_loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    a, b, c1 = 0.2, 0.6, 1e-4
    loss = ssim_loss(torch.full((1, 3, 8, 8), a, dtype=torch.float64), torch.full((1, 3, 8, 8), b, dtype=torch.float64))
    assert float(loss) == pytest.approx(1 - (2 * a * b + c1) / (a * a + b * b + c1), abs=1e-12)
    with pytest.raises(ValueError, match="padding"):
        ssim_loss(x, x, padding="same")  # type: ignore[arg-type]


def test_ssim_stays_float32_under_autocast() -> None:
    gen = torch.Generator().manual_seed(5)
    x, y = torch.rand(2, 3, 16, 16, generator=gen), torch.rand(2, 3, 16, 16, generator=gen)
    ref = ssim_loss(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ssim_loss(x.bfloat16(), y.bfloat16())
    assert got.dtype == torch.float32
    # Only the bf16 rounding of the inputs remains (~3 significant digits), not a half-precision variance.
    assert float(got) == pytest.approx(float(ref), abs=5e-3)


def test_gradient_and_l1_golden() -> None:
    p = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]])
    t = torch.zeros_like(p)
    dx, dy = image_gradients(p)
    assert dx.flatten().tolist() == [1.0, 2.0] and dy.flatten().tolist() == [2.0, 3.0]
    # mean|dx| = 1.5, mean|dy| = 2.5
    assert float(gradient_loss(p, t)) == pytest.approx(4.0)
    assert float(gradient_loss(p + 7.0, p)) == 0.0  # a brightness offset has no edges
    assert float(l1_loss(p, t)) == pytest.approx(7.0 / 4)


def test_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.rand(1, 2, 6, 7, generator=gen, dtype=torch.float64)
    x = (t + 0.1 * torch.randn(1, 2, 6, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: ssim_loss(a, t), (x,))
    assert torch.autograd.gradcheck(lambda a: gradient_loss(a, t), (x,))
    tv = torch.rand(1, 1, 11, 11, generator=gen, dtype=torch.float64)
    xv = (tv + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: ssim_loss(a, tv, padding="valid"), (xv,))
    # The target is a constant: no gradient flows into it.
    tt = t.clone().requires_grad_()
    enhancement_loss(x, tt, gradient_weight=1.0)["ssim"].backward()
    assert tt.grad is None


def test_enhancement_loss_parts() -> None:
    gen = torch.Generator().manual_seed(1)
    p, t = torch.rand(2, 3, 16, 16, generator=gen), torch.rand(2, 3, 16, 16, generator=gen)
    parts = enhancement_loss(p, t, l1_weight=2.0, ssim_weight=0.5, gradient_weight=0.25)
    assert set(parts) == {"l1", "ssim", "gradient"}
    assert torch.allclose(parts["l1"], 2 * (p - t).abs().mean())
    assert torch.allclose(parts["ssim"], 0.5 * ssim_loss(p, t))
    assert torch.allclose(parts["gradient"], 0.25 * gradient_loss(p, t))
    assert set(enhancement_loss(p, t)) == {"l1", "ssim"}  # gradient off by default


# ------------------------------------------------------------------------------------------------ distillation


def _feats(gen: torch.Generator, chans: list[int], req: bool = False) -> list[torch.Tensor]:
    sizes = [8, 4, 8]
    return [torch.rand(2, c, s, s, generator=gen).requires_grad_(req) for c, s in zip(chans, sizes, strict=True)]


def test_output_distill_golden() -> None:
    s = torch.tensor([[[[0.5, 1.0]]]], requires_grad=True)
    t = torch.tensor([[[[0.0, 0.0]]]], requires_grad=True)
    loss = output_distill_loss(s, t)
    assert float(loss.detach()) == pytest.approx(0.75)
    loss.backward()
    assert t.grad is None and s.grad is not None


def test_attention_distill_numpy_and_invariances() -> None:
    gen = torch.Generator().manual_seed(2)
    fs, ft = _feats(gen, [4, 8, 4]), _feats(gen, [16, 32, 16])
    want = sum(
        ((np_attention(s.double().numpy()) - np_attention(t.double().numpy())) ** 2).mean()
        for s, t in zip(fs, ft, strict=True)
    )
    assert float(attention_distill_loss(fs, ft)) == pytest.approx(want, rel=1e-5)
    # AT compares normalized maps: a scaled copy with duplicated channels transfers perfectly.
    twice = [torch.cat([3 * t, 3 * t], dim=1) for t in ft]
    assert float(attention_distill_loss(twice, ft)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="stages"):
        attention_distill_loss(fs[:2], ft)


def test_feature_adapter_and_hint_loss() -> None:
    gen = torch.Generator().manual_seed(3)
    fs, ft = _feats(gen, [4, 8, 4], req=True), _feats(gen, [16, 32, 16])
    adapter = FeatureAdapter([4, 8, 4], [16, 32, 16])
    loss = feature_distill_loss(fs, ft, adapter)
    want = 0.0
    for conv, s, t in zip(adapter.convs, fs, ft, strict=True):
        w, b = conv.weight.detach().double().numpy()[:, :, 0, 0], conv.bias.detach().double().numpy()
        r = np.einsum("oc,bchw->bohw", w, s.detach().double().numpy()) + b[None, :, None, None]
        want += ((r - t.double().numpy()) ** 2).mean() / 3
    assert float(loss) == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert all(f.grad is not None for f in fs)
    with pytest.raises(ValueError, match="one teacher stage per student stage"):
        FeatureAdapter([4], [16, 32])


def test_lowlight_kd_loss_parts() -> None:
    gen = torch.Generator().manual_seed(4)
    fs, ft = _feats(gen, [4, 8, 4], req=True), _feats(gen, [16, 32, 16])
    so = torch.rand(2, 3, 8, 8, generator=gen, requires_grad=True)
    to = torch.rand(2, 3, 8, 8, generator=gen, requires_grad=True)
    parts = lowlight_kd_loss(so, to, fs, ft)
    assert set(parts) == {"kd_attention", "kd_output", "kd_gradient"}  # FitNets off by default
    assert torch.allclose(parts["kd_attention"], 1000 * attention_distill_loss(fs, ft))
    assert torch.allclose(parts["kd_output"], (so - to).abs().mean())
    assert torch.allclose(parts["kd_gradient"], gradient_loss(so, to))
    adapter = FeatureAdapter([4, 8, 4], [16, 32, 16])
    parts = lowlight_kd_loss(so, to, fs, ft, feature_weight=2.0, output_weight=0.0, adapter=adapter)
    assert "kd_output" not in parts
    assert torch.allclose(parts["kd_feature"], 2 * feature_distill_loss(fs, ft, adapter))
    sum(parts.values()).backward()
    assert to.grad is None and so.grad is not None and all(f.grad is not None for f in fs)
    with pytest.raises(ValueError, match="adapter"):
        lowlight_kd_loss(so, to, fs, ft, feature_weight=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        lowlight_kd_loss(so, to, fs, ft, attention_weight=-1.0)


# ------------------------------------------------------------------------------------------------------ models


def _hand_macs(w: int, s: int) -> int:
    """Conv MACs of UNetEnhancer(width=w) on an s×s input (s a multiple of 8), layer by layer."""
    a = [s * s, (s // 2) ** 2, (s // 4) ** 2, (s // 8) ** 2]
    k = 9
    total = a[0] * (3 * w + w * w) * k + a[1] * 2 * w * w * k  # enc0 + down0
    total += a[1] * 2 * (2 * w) ** 2 * k + a[2] * 4 * w * 2 * w * k  # enc1 + down1
    total += a[2] * 2 * (4 * w) ** 2 * k + a[3] * 8 * w * 4 * w * k  # enc2 + down2
    total += a[3] * 2 * (8 * w) ** 2 * k  # bottleneck
    total += a[3] * 8 * w * 4 * w * 4 + a[2] * (8 * w * 4 * w + (4 * w) ** 2) * k  # up2 + dec2
    total += a[2] * 4 * w * 2 * w * 4 + a[1] * (4 * w * 2 * w + (2 * w) ** 2) * k  # up1 + dec1
    total += a[1] * 2 * w * w * 4 + a[0] * (2 * w * w + w * w) * k  # up0 + dec0
    return total + a[0] * w * 3 * k  # head


@pytest.mark.parametrize(
    "name,width,params",
    [("unet_enhancer_w32", 32, 2701027), ("unet_enhancer_w12", 12, 380727), ("unet_enhancer_w8", 8, 169531)],
)
def test_model_sizes_and_macs(name: str, width: int, params: int) -> None:
    model = ENHANCEMENT_MODELS[name]()
    assert model.width == width
    assert count_parameters(model) == params  # the numbers docs/tasks/enhancement.md reports
    assert count_macs(model, (1, 3, 32, 32)) == _hand_macs(width, 32)


@pytest.mark.parametrize("h,w", [(1, 1), (5, 7), (32, 32), (33, 17)])
def test_any_size_and_features(h: int, w: int) -> None:
    torch.manual_seed(0)
    model = UNetEnhancer(width=4)
    x = torch.rand(2, 3, h, w)
    ff = model.forward_features(x)
    assert isinstance(ff, EnhancerFeatures) and ff.out.shape == x.shape
    assert torch.equal(model(x), ff.out)
    assert [f.shape[1] for f in ff.feats] == model.stage_channels
    hp, wp = -(-h // 8) * 8, -(-w // 8) * 8
    assert [(f.shape[2], f.shape[3]) for f in ff.feats] == [(hp // s, wp // s) for s in model.stage_strides]
    # The near-zero head starts the residual network near the identity.
    assert (ff.out - x).abs().max() < 0.05


def test_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = UNetEnhancer(width=4)
    x, t = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    sum(EnhancementTask(gradient_weight=1.0).loss(model.forward_features(x), t).values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_torchscript_trace_equals_eager() -> None:
    torch.manual_seed(0)
    model = UNetEnhancer(width=4).eval()
    nn_init = [p for p in model.head.parameters()]
    for p in nn_init:
        torch.nn.init.normal_(p, std=0.1)  # a non-trivial head, so the comparison is not of near-identities
    x = torch.rand(1, 3, 12, 20)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        assert torch.allclose(traced(x), model(x), atol=1e-6)


def test_onnx_export_matches_eager(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = UNetEnhancer(width=4).eval()
    x = torch.rand(1, 3, 24, 24)
    path = tmp_path / "enh.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["low"], output_names=["enhanced"], dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"low": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-5)


# -------------------------------------------------------------------------------------------------------- task


def test_task_interface() -> None:
    task = EnhancementTask(l1_weight=1.0, ssim_weight=0.5, gradient_weight=0.1)
    assert task.name == "enhancement"
    assert isinstance(task.build_model("unet_enhancer_w8"), UNetEnhancer)
    with pytest.raises(ConfigError, match="unknown enhancement model"):
        task.build_model("resnet8")
    with pytest.raises(ConfigError, match="takes no options"):
        task.build_model("unet_enhancer_w8", width=3)
    with pytest.raises(ConfigError, match=">= 0"):
        EnhancementTask(l1_weight=-1.0)
    with pytest.raises(ConfigError, match="all zero"):
        EnhancementTask(l1_weight=0.0, ssim_weight=0.0)
    out = torch.tensor([[[[-0.5, 0.5], [1.5, 1.0]]]]).expand(1, 3, 2, 2)
    assert task.predict(out).flatten()[:4].tolist() == [0.0, 0.5, 1.0, 1.0]
    assert isinstance(task.evaluator(), EnhancementEvaluator)
    t = torch.rand(2, 3, 16, 16)
    parts = task.loss(t + 0.1, t)
    assert set(parts) == {"l1", "ssim", "gradient"} and float(parts["l1"]) == pytest.approx(0.1, abs=1e-6)


def test_student_training_beats_identity_baseline() -> None:
    """Sanity: a few dozen Adam steps on a few synthetic pairs raise PSNR over the dark input itself."""
    from kdforge.data import _embedded_arrays
    from kdforge.data.synth.lowlight import lowlight_pairs_from_arrays

    pairs = lowlight_pairs_from_arrays(_embedded_arrays().train_images[:4], seed=0)
    # The central 16×16 of four CIFAR images keeps the test fast on a shared CPU.
    low = torch.stack([pairs.pair(i)[0] for i in range(4)])[..., 8:24, 8:24].float() / 255
    high = torch.stack([pairs.pair(i)[1] for i in range(4)])[..., 8:24, 8:24].float() / 255
    torch.manual_seed(0)
    task = EnhancementTask()
    model = task.build_model("unet_enhancer_w8")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    baseline = float(psnr(low, high).mean())
    for _ in range(30):
        opt.zero_grad()
        sum(task.loss(model(low), high).values()).backward()
        opt.step()
    with torch.no_grad():
        ev = task.evaluator()
        ev.update(task.predict(model(low)), high)
        after = ev.compute()["psnr"]
    assert after > baseline + 3.0, (baseline, after)


def test_lowlight_kd_on_real_teacher_and_student() -> None:
    """The KD parts assemble on the real networks: stages align, FitNets adapters fit, the student gets gradients."""
    torch.manual_seed(0)
    task = EnhancementTask()
    teacher, student = task.build_model("unet_enhancer_w32").eval(), task.build_model("unet_enhancer_w8")
    adapter = FeatureAdapter(student.stage_channels, teacher.stage_channels)
    x, gt = torch.rand(2, 3, 13, 19), torch.rand(2, 3, 13, 19)
    with torch.no_grad():
        t = teacher.forward_features(x)
    s = student.forward_features(x)
    parts = task.loss(s, gt) | lowlight_kd_loss(s.out, t.out, s.feats, t.feats, feature_weight=1.0, adapter=adapter)
    assert set(parts) == {"l1", "ssim", "kd_attention", "kd_output", "kd_gradient", "kd_feature"}
    assert all(torch.isfinite(v) and v > 0 for v in parts.values())
    sum(parts.values()).backward()
    assert all(p.grad is not None for p in (*student.parameters(), *adapter.parameters()))
    assert all(p.grad is None for p in teacher.parameters())
