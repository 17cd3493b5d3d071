"""PURF teacher smoothing: spectral-norm estimates against dense SVDs, each loss term, switches, checkpoints, and a
smoothed teacher used by KD end to end.

Reference spectral norms are computed independently: numpy's SVD of the weight matrix, and for a convolution the SVD
of its dense matrix, built by applying the layer to every basis image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kdforge.config import config_from_dict, load_config
from kdforge.data.batch import Batch
from kdforge.errors import ConfigError
from kdforge.losses.smoothness import (
    ConvGeometry,
    consistency_loss,
    conv_adjoint,
    conv_operator,
    conv_power_iteration,
    feature_smoothness,
    matrix_power_iteration,
    matrix_sigma,
    spectral_penalty,
)
from kdforge.methods import Progress, create_method
from kdforge.models import create_model

START = Progress(epoch=0, step=0, epoch_float=0.0, fraction=0.0)
LATE = Progress(epoch=1, step=8, epoch_float=1.0, fraction=0.5)
ALL_OFF = {"lip_weight": 0.0, "cons_weight": 0.0, "smooth_weight": 0.0}


def _batch(n: int = 6, size: int = 8, classes: int = 4, seed: int = 3) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g), torch.arange(n)
    )


def _dense_conv_matrix(conv: nn.Module, in_shape: tuple[int, int, int]) -> np.ndarray:
    """The layer's linear map as a dense ``[out, in]`` matrix: its response to each input basis image."""
    n = int(np.prod(in_shape))
    basis = torch.eye(n, dtype=torch.float64).view(n, *in_shape)
    with torch.no_grad():
        out = conv.double()(basis).reshape(n, -1)
    conv.float()
    return out.T.numpy()


def _bias_free(conv: nn.Conv2d) -> nn.Conv2d:
    """A copy of ``conv`` without its bias: the linear part whose norm is estimated."""
    copy = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    copy.weight.data.copy_(conv.weight.data)
    return copy


def _top_sv(matrix: np.ndarray) -> float:
    return float(np.linalg.svd(matrix, compute_uv=False)[0])


# ---------------------------------------------------------------- power iteration


def test_matrix_power_iteration_matches_svd_per_group():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, 7, generator=g)
    v = torch.nn.functional.normalize(torch.randn(3, 7, generator=g), dim=1)
    v = matrix_power_iteration(w, v, 300)
    expected = max(_top_sv(w[i].double().numpy()) for i in range(3))
    assert matrix_sigma(w, v).item() == pytest.approx(expected, rel=1e-4)
    # Also against torch.linalg.svdvals, and the estimate of a few iterations never overshoots σ.
    assert expected == pytest.approx(torch.linalg.svdvals(w.double()).max().item(), rel=1e-9)
    v0 = torch.nn.functional.normalize(torch.randn(3, 7, generator=g), dim=1)
    assert matrix_sigma(w, matrix_power_iteration(w, v0, 2)).item() <= expected + 1e-5


@pytest.mark.parametrize(
    "c_in, c_out, kernel, stride, padding, dilation, groups, size",
    [
        (3, 4, 3, 1, 1, 1, 1, 6),
        (3, 5, 3, 2, 1, 1, 1, 7),  # stride 2, odd input
        (4, 4, 3, 2, 1, 1, 4, 6),  # depthwise, stride 2, even input: the adjoint needs output_padding
        (4, 6, 3, 1, 2, 2, 2, 5),  # grouped and dilated
        (2, 3, 1, 2, 0, 1, 1, 6),  # 1x1 strided shortcut (output_padding too)
    ],
)
def test_conv_operator_norm_matches_dense_svd(c_in, c_out, kernel, stride, padding, dilation, groups, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, groups, bias=False)
    geo, in_shape = ConvGeometry.of(conv), (c_in, size, size)
    dense = _dense_conv_matrix(conv, in_shape)
    # The adjoint is exact: <A x, y> = <x, Aᵀ y>.
    x = torch.randn(1, *in_shape, dtype=torch.float64)
    y = torch.randn(conv_operator(x, conv.weight.double(), geo).shape, dtype=torch.float64)
    lhs = (conv_operator(x, conv.weight.double(), geo) * y).sum()
    rhs = (x * conv_adjoint(y, conv.weight.double(), geo, in_shape)).sum()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-10)
    v = torch.nn.functional.normalize(torch.randn(1, int(np.prod(in_shape))), dim=1).view(1, *in_shape)
    v = conv_power_iteration(conv.weight, v, geo, 150)
    sigma = conv_operator(v, conv.weight, geo).norm().item()
    assert sigma == pytest.approx(_top_sv(dense), rel=1e-3)


class ConvBNNet(nn.Module):
    """conv → BN → ReLU → conv → ReLU → pool → linear, on 6×6 inputs."""

    def __init__(self, bn: bool = True) -> None:
        super().__init__()
        self.num_classes = 4
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def _converged_sigmas(method, steps: int = 150) -> torch.Tensor:
    for _ in range(steps):
        method.layer_sigmas(update=True)
    return method.layer_sigmas(update=False).detach()


@pytest.mark.parametrize("mode", ["operator", "matrix"])
def test_layer_sigmas_fold_batchnorm_and_match_references(mode):
    torch.manual_seed(0)
    net = ConvBNNet()
    with torch.no_grad():
        net.bn1.weight.uniform_(-2.0, 2.0)
        net.bn1.running_var.uniform_(0.2, 3.0)
    method = create_method("purf", net, spectral_mode=mode, cons_weight=0.0, smooth_weight=0.0)
    assert [(layer.name, layer.kind) for layer in method.lip_layers] == [
        ("conv1", mode),
        ("conv2", mode),
        ("fc", "matrix"),
    ]
    method.eval()  # running statistics fixed; the first step only sizes the operator vectors
    method(_batch(size=6), START)
    sigmas = _converged_sigmas(method)
    scale = (net.bn1.weight.abs() / torch.sqrt(net.bn1.running_var + net.bn1.eps)).detach().double().numpy()
    if mode == "operator":
        # Output rows are channel-major, so the BN gain of channel c scales its 6·6 rows.
        conv1 = _dense_conv_matrix(_bias_free(net.conv1), (3, 6, 6)) * np.repeat(scale, 36)[:, None]
        conv2 = _dense_conv_matrix(_bias_free(net.conv2), (4, 6, 6))
    else:
        conv1 = net.conv1.weight.detach().double().reshape(4, -1).numpy() * scale[:, None]
        conv2 = net.conv2.weight.detach().double().reshape(6, -1).numpy()
    expected = [_top_sv(conv1), _top_sv(conv2), _top_sv(net.fc.weight.detach().double().numpy())]
    np.testing.assert_allclose(sigmas.numpy(), expected, rtol=1e-3)


def test_unfolded_batchnorm_counts_its_own_gain():
    torch.manual_seed(0)
    net = ConvBNNet()
    with torch.no_grad():
        net.bn1.weight.copy_(torch.tensor([0.5, -3.0, 1.0, 2.0]))
        net.bn1.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 1.0]))
    method = create_method("purf", net, lip_fold_bn=False, spectral_mode="matrix", cons_weight=0.0, smooth_weight=0.0)
    assert [layer.kind for layer in method.lip_layers] == ["matrix", "matrix", "matrix", "bn"]
    gains = torch.tensor([0.5, 3.0 / 2.0, 1.0 / 0.5, 2.0]) / torch.sqrt(torch.tensor(1.0 + net.bn1.eps))
    assert method.layer_sigmas(update=False)[-1].item() == pytest.approx(gains.max().item(), rel=1e-3)


def test_sigmas_stay_float32_under_autocast():
    torch.manual_seed(0)
    method = create_method("purf", ConvBNNet(), cons_weight=0.0, smooth_weight=0.0)
    method.eval()
    method(_batch(size=6), START)
    ref = method.layer_sigmas(update=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = method.layer_sigmas(update=False)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref)


# ---------------------------------------------------------------- penalties and loss terms


@pytest.mark.parametrize("penalty", ["sum", "square", "hinge", "log"])
def test_penalty_reduces_sigma(penalty):
    torch.manual_seed(0)
    net = ConvBNNet(bn=False)
    params = {**ALL_OFF, "lip_weight": 1.0}  # the penalty alone moves the weights
    method = create_method("purf", net, ce_weight=0.0, lip_penalty=penalty, lip_target=0.1, **params)
    method.train()
    opt = torch.optim.SGD(method.parameters(), lr=0.05)
    batch = _batch(size=6)
    first = None
    for _ in range(8):
        out = method(batch, START)
        first = out.losses["sigma_max"].item() if first is None else first
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    last = method.layer_sigmas(update=True).max().item()
    assert last < 0.9 * first, (first, last)


def test_spectral_penalty_forms():
    s = torch.tensor([0.5, 2.0, 3.0])
    assert spectral_penalty(s, "sum").item() == pytest.approx(5.5)
    assert spectral_penalty(s, "square").item() == pytest.approx(0.5 * (0.25 + 4 + 9))
    assert spectral_penalty(s, "hinge", target=1.0).item() == pytest.approx(1.0 + 4.0)
    assert spectral_penalty(s, "log").item() == pytest.approx(float(np.log(3.0)))
    assert spectral_penalty(torch.tensor([0.5, 0.9]), "hinge", target=1.0).item() == 0.0


def test_consistency_zero_for_identical_views_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for kind in ("mse", "kl"):
        assert consistency_loss(a, a.clone(), kind).item() == pytest.approx(0.0, abs=1e-7)
        assert consistency_loss(a, b, kind).item() > 1e-3
    pa, pb = torch.softmax(a, 1).numpy(), torch.softmax(b, 1).numpy()
    assert consistency_loss(a, b, "mse").item() == pytest.approx(((pa - pb) ** 2).sum(1).mean(), rel=1e-5)
    # kl: the first view is a fixed target, only the second receives gradient.
    a.requires_grad_(True)
    b.requires_grad_(True)
    consistency_loss(a, b, "kl").backward()
    assert a.grad is None and b.grad is not None


def test_method_consistency_zero_when_the_second_view_is_the_batch(tiny_net):
    same = create_method("purf", tiny_net(), lip_weight=0.0, smooth_weight=0.0, view_padding=0, view_flip=0.0)
    same.train()
    assert same(_batch(), LATE).losses["cons"].item() == pytest.approx(0.0, abs=1e-7)
    other = create_method("purf", tiny_net(), lip_weight=0.0, smooth_weight=0.0, view_padding=2, view_flip=1.0)
    other.train()
    assert other(_batch(), LATE).losses["cons"].item() > 0.0


def test_consistency_ramps_in(tiny_net):
    method = create_method("purf", tiny_net(), lip_weight=0.0, smooth_weight=0.0, cons_rampup=0.5, view_flip=1.0)
    method.eval()
    torch.manual_seed(0)
    full = method(_batch(), Progress(1, 8, 1.0, 0.5)).losses["cons"]
    torch.manual_seed(0)
    half = method(_batch(), Progress(0, 4, 0.5, 0.25)).losses["cons"]
    torch.manual_seed(0)
    none = method(_batch(), START).losses["cons"]
    assert full.item() > 0 and half.item() == pytest.approx(0.5 * full.item(), rel=1e-5) and none.item() == 0.0


def test_feature_smoothness_values():
    g = torch.Generator().manual_seed(0)
    v, m = torch.randn(4, 6, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    assert feature_smoothness([v, m], [v.clone(), m.clone()]).item() == 0.0
    dv, dm = torch.randn(4, 6, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    expected = (dv**2).sum(1).mean() + (dm**2).sum(1).mean(dim=(1, 2)).mean()
    assert feature_smoothness([v, m], [v + dv, m + dm]).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("smooth_on", ["pooled", "feats", "logits"])
def test_method_smoothness_zero_without_noise(smooth_on):
    torch.manual_seed(0)
    params = {"lip_weight": 0.0, "cons_weight": 0.0, "smooth_on": smooth_on}
    quiet = create_method("purf", create_model("resnet8", num_classes=4), noise_std=0.0, **params)
    quiet.train()
    assert quiet(_batch(n=4), LATE).losses["smooth"].item() == pytest.approx(0.0, abs=1e-8)
    noisy = create_method("purf", create_model("resnet8", num_classes=4), noise_std=0.5, **params)
    noisy.train()
    assert noisy(_batch(n=4), LATE).losses["smooth"].item() > 1e-6


# ---------------------------------------------------------------- switches, gradients, state


@pytest.mark.parametrize(
    "off, part, batch_factor",
    [("lip_weight", "lip", 3), ("cons_weight", "cons", 2), ("smooth_weight", "smooth", 2)],
)
def test_each_weight_zero_removes_its_part_and_its_compute(tiny_net, off, part, batch_factor):
    net = tiny_net()
    seen: list[int] = []
    net.body[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    method = create_method("purf", net, **{off: 0.0})
    method.train()
    out = method(_batch(), LATE)
    assert part not in out.losses and set(out.losses) >= {"ce"}
    assert seen == [batch_factor * 6]  # one joint forward of the batch and the views still in use
    if off == "lip_weight":
        assert "sigma_max" not in out.losses
        assert not [n for n, _ in method.named_buffers() if n.startswith("lip_")]
    torch.testing.assert_close(out.loss, sum(v for k, v in out.losses.items() if k != "sigma_max"))


def test_all_terms_off_is_plain_cross_entropy(tiny_net):
    method = create_method("purf", tiny_net(), **ALL_OFF)
    method.eval()
    batch = _batch()
    out = method(batch, LATE)
    assert set(out.losses) == {"ce"}
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(method.student(batch.input), batch.target))


def test_gradients_reach_every_parameter_and_the_penalty_alone_reaches_every_layer():
    torch.manual_seed(0)
    method = create_method("purf", create_model("resnet8", num_classes=4), smooth_on="feats")
    method.train()
    out = method(_batch(n=4), LATE)
    assert set(out.losses) == {"ce", "lip", "cons", "smooth", "sigma_max"}
    out.loss.backward()
    missing = [n for n, p in method.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing
    # Lipschitz term only: every conv and linear weight and every BN gain receives its gradient.
    method.zero_grad()
    method.layer_sigmas(update=False).sum().backward()
    layers = [m for m in method.student.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    assert all(m.weight.grad is not None and m.weight.grad.any() for m in layers)


def test_power_iteration_vectors_restore_through_state_dict():
    torch.manual_seed(0)
    method = create_method("purf", create_model("resnet8", num_classes=4), cons_weight=0.0, smooth_weight=0.0)
    method.train()
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    for _ in range(2):
        out = method(_batch(n=4), LATE)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    state = method.state_dict()
    vectors = {k: v for k, v in state.items() if k.startswith("lip_v")}
    assert vectors and all(v.numel() > 0 for v in vectors.values())
    assert not any(k.startswith("student.lip") for k in state)  # the exported network carries no PURF state

    torch.manual_seed(1)
    fresh = create_method("purf", create_model("resnet8", num_classes=4), cons_weight=0.0, smooth_weight=0.0)
    fresh.load_state_dict(state)
    for key, value in vectors.items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(fresh.layer_sigmas(update=False), method.layer_sigmas(update=False))
    # Restored vectors are used as they are: the next training step continues the iteration, it does not restart.
    assert not fresh._pending_layers()


def test_invalid_arguments_raise_clear_errors(tiny_net):
    with pytest.raises(ConfigError, match="lip_weight must be >= 0"):
        create_method("purf", tiny_net(), lip_weight=-1.0)
    with pytest.raises(ConfigError, match="n_power_iterations must be >= 1"):
        create_method("purf", tiny_net(), n_power_iterations=0)
    with pytest.raises(ConfigError, match="cons_rampup must be in"):
        create_method("purf", tiny_net(), cons_rampup=1.5)
    with pytest.raises(ConfigError, match="needs a model with forward_features"):
        create_method("purf", tiny_net(), smooth_on="pooled")
    with pytest.raises(ConfigError, match="trains without a teacher"):
        create_method("purf", tiny_net(), tiny_net())


# ---------------------------------------------------------------- the smoothed teacher, then KD


def test_purf_teacher_then_kd_through_the_api(tmp_path):
    from kdforge.api import build_network, resolve_weights, run

    data = {"name": "embedded", "batch_size": 32, "train_subset": 64, "test_subset": 32, "num_workers": 0}
    train = {"epochs": 1, "seed": 0, "progress": False}
    purf_cfg = config_from_dict(
        {"model": {"name": "resnet8"}, "method": {"name": "purf"}, "data": data, "train": train}
    )
    purf_dir = tmp_path / "purf"
    run(purf_cfg, "distill", purf_dir)
    assert (purf_dir / "student.pt").is_file()
    metrics = (purf_dir / "metrics.jsonl").read_text()
    assert '"loss_lip"' in metrics and '"loss_sigma_max"' in metrics

    # The smoothed network loads as a teacher from the run directory and from the training checkpoint alike.
    teacher = build_network("resnet8", 10, purf_dir)
    from_ckpt, _ = resolve_weights(purf_dir / "last.pt")
    assert set(from_ckpt) == set(teacher.state_dict())
    x = torch.randn(2, 3, 32, 32)
    teacher.eval()
    ckpt_net = create_model("resnet8", num_classes=10)
    ckpt_net.load_state_dict(from_ckpt)
    ckpt_net.eval()
    torch.testing.assert_close(teacher(x), ckpt_net(x))

    kd_cfg = config_from_dict(
        {
            "model": {"name": "resnet8"},
            "teacher": {"name": "resnet8", "checkpoint": str(purf_dir)},
            "method": {"name": "kd"},
            "data": data,
            "train": train,
        }
    )
    result = run(kd_cfg, "distill", tmp_path / "kd")
    assert result.final_top1 == result.final_top1 and (tmp_path / "kd" / "student.pt").is_file()


def test_smoke_config_is_purf():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "smoke" / "purf.yaml")
    assert cfg.method.name == "purf" and cfg.teacher is None
