"""Conv + BN folding of a frozen teacher: exact on every zoo family, only where the dataflow allows it, and only for
methods whose teacher reads stay exact (never the teacher ATF/bilateral KD copy for tuning)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdforge.data.batch import Batch
from kdforge.engine.teacher_fold import fold_blocker, fold_frozen_teacher
from kdforge.errors import ConfigError
from kdforge.methods import METHODS, Progress, create_method
from kdforge.models import FeatureTap, create_model
from kdforge.models.fuse import fold_conv_bn, foldable_pairs

PROGRESS = Progress(epoch=0, step=0, epoch_float=0.0, fraction=0.0)

# One small member of every zoo family (CIFAR ResNet, WRN, VGG, MobileNetV2, ShuffleNet v1/v2, CIFAR big ResNet,
# ImageNet ResNet), at the input size each is built for.
FAMILIES = [
    ("resnet8", 32),
    ("resnet8x4", 32),
    ("wrn_16_1", 32),
    ("vgg8", 32),
    ("MobileNetV2", 32),
    ("ShuffleV1", 32),
    ("ShuffleV2", 32),
    pytest.param("ResNet18", 32, marks=pytest.mark.slow),
    pytest.param("resnet18", 64, marks=pytest.mark.slow),
]


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so a wrong fold cannot hide behind identity BNs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.data.copy_(0.4 * torch.rand(c, generator=g) - 0.2)
    return model.eval().requires_grad_(False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)).item()


@pytest.mark.parametrize(("name", "size"), FAMILIES)
def test_folding_keeps_logits_and_every_feature(name, size):
    torch.manual_seed(0)
    model = _randomize_bn(create_model(name, num_classes=10))
    x = torch.randn(2, 3, size, size)
    want, want_f = model(x), model.forward_features(x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    pairs = fold_conv_bn(model, x)
    assert pairs, f"{name}: nothing folded"
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn - len(pairs)
    got, got_f = model(x), model.forward_features(x)
    # Float32 folding error is a few ulps per layer: 1e-5 relative to the largest value, far below any real change.
    assert _rel(got, want) < 1e-5
    assert _rel(got_f.logits, want_f.logits) < 1e-5 and _rel(got_f.pooled, want_f.pooled) < 1e-5
    for a, b in zip(got_f.feats + got_f.preact_feats, want_f.feats + want_f.preact_feats, strict=True):
        assert _rel(a, b) < 1e-5


def test_every_post_conv_bn_of_a_resnet_is_folded_and_wrn_keeps_its_preactivation_bns():
    x = torch.zeros(2, 3, 32, 32)
    resnet = create_model("resnet20", num_classes=10).eval()
    assert len(foldable_pairs(resnet, x)) == sum(isinstance(m, nn.BatchNorm2d) for m in resnet.modules())
    wrn = create_model("wrn_16_1", num_classes=10).eval()
    folded_bns = {bn for _, bn in foldable_pairs(wrn, x)}
    # Pre-activation BNs read a sum or the raw stem, and WRN's stem conv output is itself the stem feature map.
    assert "block1.layer.0.bn1" not in folded_bns and "bn1" not in folded_bns
    assert "block1.layer.0.bn2" in folded_bns
    assert not any(conv == "conv1" for conv, _ in foldable_pairs(wrn, x))


def test_single_pair_matches_the_batch_norm_formula():
    torch.manual_seed(1)
    net = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4)))
    conv, bn = copy.deepcopy(net[0]), copy.deepcopy(net[1])
    x = torch.randn(2, 3, 5, 5)
    assert fold_conv_bn(net, x) == [("0", "1")]
    assert isinstance(net[1], nn.Identity)
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # by hand: W·s and (b − μ)·s + β
    torch.testing.assert_close(net[0].weight, conv.weight * s[:, None, None, None])
    torch.testing.assert_close(net[0].bias, (conv.bias - bn.running_mean) * s + bn.bias)
    assert not net[0].bias.requires_grad


class _Shared(nn.Module):
    """A conv whose raw output feeds a BN and a residual sum: folding it would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        return self.bn(z) + z


def test_a_conv_output_read_elsewhere_is_not_folded():
    net = _randomize_bn(_Shared())
    x = torch.randn(2, 3, 4, 4)
    want = net(x)
    assert fold_conv_bn(net, x) == []
    assert isinstance(net.bn, nn.BatchNorm2d)
    torch.testing.assert_close(net(x), want, rtol=0, atol=0)


def test_folding_refuses_a_training_or_trainable_network_and_leaves_no_hooks():
    net = create_model("resnet8", num_classes=10)
    with pytest.raises(ValueError, match="eval-mode"):
        fold_conv_bn(net, torch.zeros(2, 3, 32, 32))
    net.eval()
    with pytest.raises(ValueError, match="frozen"):
        fold_conv_bn(net, torch.zeros(2, 3, 32, 32))
    net.requires_grad_(False)
    fold_conv_bn(net, torch.zeros(2, 3, 32, 32))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_folding_keeps_channels_last_weights():
    net = _randomize_bn(create_model("resnet8", num_classes=10)).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    want = net(x)
    fold_conv_bn(net, x)
    assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert _rel(net(x), want) < 1e-5


def test_a_tap_on_the_bn_slot_still_sees_the_bn_output_but_the_raw_conv_output_is_gone():
    torch.manual_seed(2)
    net = _randomize_bn(create_model("resnet8", num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    with FeatureTap(net, ["layer1.0.conv1", "layer1.0.bn1"]) as tap:
        net(x)
    raw_conv, bn_out = tap.outputs
    fold_conv_bn(net, x)
    with FeatureTap(net, ["layer1.0.conv1", "layer1.0.bn1"]) as tap:
        net(x)
    assert _rel(tap.outputs[1], bn_out) < 1e-5 and _rel(tap.outputs[0], bn_out) < 1e-5
    assert _rel(tap.outputs[0], raw_conv) > 1e-2  # what folding does not preserve


def _method(name: str, seed: int = 0):
    torch.manual_seed(seed)
    teacher = _randomize_bn(create_model("resnet8", num_classes=4), seed=seed)
    student = create_model("resnet8", num_classes=4)
    context = {"num_classes": 4, "num_train": 64, "epochs": 2, "steps_per_epoch": 4, "train_targets": None}
    return create_method(name, student, teacher, context=context)


def _batch_for(method) -> Batch:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, 32, 32, generator=g)
    extra = (x + 0.1 * torch.randn(8, 3, 32, 32, generator=g),) if method.needs_views else ()
    batch = Batch(x, torch.randint(0, 4, (8,), generator=g), torch.arange(8), extra)
    if method.needs_negatives:
        batch.negative, batch.negative_index = torch.randn(8, 3, 32, 32, generator=g), torch.arange(8).flip(0)
    return batch


# Classification methods on zoo teachers; a dense task's teacher folds through the same pass (its own tests).
TEACHER_METHODS = [
    n for n in METHODS.names() if METHODS.get(n).needs_teacher and "classification" in METHODS.get(n).tasks
]


@pytest.mark.parametrize("name", TEACHER_METHODS)
def test_folding_is_exact_for_every_method_it_is_allowed_for(name):
    """Loss and student gradients of one step with the folded teacher equal the unfolded step's (resnet8 teacher)."""
    try:
        plain = _method(name)
    except (ConfigError, TypeError, ValueError) as e:  # a method that needs context this test does not give
        pytest.skip(f"{name}: {e}")
    folded = copy.deepcopy(plain)
    blocker = fold_blocker(folded)
    if METHODS.get(name).trains_teacher:
        assert blocker is not None and "fine-tunes" in blocker
        assert fold_frozen_teacher(folded, torch.zeros(2, 3, 32, 32)) == []
        with pytest.raises(ConfigError, match="fine-tunes"):
            fold_frozen_teacher(folded, torch.zeros(2, 3, 32, 32), mode="on")
        return
    assert blocker is None
    assert fold_frozen_teacher(folded, torch.zeros(2, 3, 32, 32), mode="on")
    batch = _batch_for(plain)
    outs = []
    for m in (plain, folded):
        m.train()
        torch.manual_seed(5)  # methods that draw (AMKD's attack start, CRD's negatives) draw alike
        out = m(batch, PROGRESS)
        out.loss.backward()
        outs.append((out.loss.detach(), [p.grad for p in m.student.parameters()]))
    (l0, g0), (l1, g1) = outs
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-5)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_fold_modes_and_the_teacherless_case():
    vanilla = create_method("vanilla", create_model("resnet8", num_classes=4), None, context={"num_classes": 4})
    assert fold_blocker(vanilla) == "the run has no frozen teacher"
    with pytest.raises(ConfigError, match="no frozen teacher"):
        fold_frozen_teacher(vanilla, torch.zeros(2, 3, 32, 32), mode="on")
    kd = _method("kd")
    assert fold_frozen_teacher(kd, torch.zeros(2, 3, 32, 32), mode="off") == []
    assert any(isinstance(m, nn.BatchNorm2d) for m in kd.teacher.modules())


def test_fit_with_a_folded_teacher_trains_like_the_unfolded_one(tmp_path):
    """``train.fold_teacher=auto`` inside ``fit``: the teacher really is folded (no BN left) and a short KD run ends
    within float tolerance of the same run with ``off`` (the folded teacher's logits differ by ~1e-6 relative)."""
    from kdforge.api import fit
    from kdforge.data import build_data

    results = {}
    for mode in ("off", "auto"):
        torch.manual_seed(0)
        teacher = create_model("resnet8", num_classes=10).eval()
        student = create_model("resnet8", num_classes=10)
        method = create_method("kd", student, teacher)
        data = build_data("embedded", batch_size=32, eval_batch_size=64, train_subset=64, test_subset=32)
        train = {"epochs": 1, "progress": False, "seed": 0, "fold_teacher": mode, "teacher_cache": "off"}
        results[mode] = fit(method, data, train=train, optim={"lr": 0.05})
        has_bn = any(isinstance(m, nn.BatchNorm2d) for m in method.teacher.modules())
        assert has_bn == (mode == "off")
    a, b = results["off"].history[-1], results["auto"].history[-1]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-3)
