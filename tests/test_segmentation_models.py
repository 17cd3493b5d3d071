"""Segmentation networks: shapes, strides, features, gradients, checkpoint compatibility, MACs and export."""

from __future__ import annotations

import pytest
import torch

from kdforge.export import export_onnx, export_torchscript
from kdforge.models import count_parameters
from kdforge.models.cifar.resnet import CifarResNet
from kdforge.models.dense.segmentation import SEGMENTATION_MODELS, SegmentationNet, fcn_resnet8, pspnet_resnet20
from kdforge.profile import count_macs
from kdforge.tasks.segmentation import SegmentationTask

# Parameters and MACs per 64×64 image as stated in docs/tasks/segmentation.md (K = 11).
EXPECTED_COST = {
    "pspnet_resnet20": (483_526, 127_705_088),
    "pspnet_resnet32x4": (8_501_238, 2_393_636_864),
    "fcn_resnet8": (96_251, 13_703_168),
    "fcn_resnet14": (212_315, 29_061_120),
}


@pytest.fixture(autouse=True)
def _one_thread():
    # These networks are tiny: one intra-op thread is as fast, and it avoids the large slowdowns of two spinning
    # threads on a loaded shared CPU.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _x(b: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(SEGMENTATION_MODELS))
def test_shapes_feature_info_and_forward_equals_features(name: str) -> None:
    torch.manual_seed(0)
    model = SEGMENTATION_MODELS[name](num_classes=7).eval()
    size = 32  # any multiple of the output stride; smaller than the 64×64 canvases to keep the test fast
    x = _x(size=size)
    with torch.no_grad():
        out = model(x)
        f = model.forward_features(x)
    assert out.shape == (2, 7, size, size)
    assert torch.equal(out, f.logits)
    assert len(f.feats) == len(model.feature_info) == len(f.preact_feats) == 5
    for feat, info in zip(f.feats, model.feature_info, strict=True):
        assert feat.shape == (2, info.channels, size // info.stride, size // info.stride), info
    assert f.seg_logits.shape == (2, 7, size // model.output_stride, size // model.output_stride)
    assert model.feature_info[-1].name == "head"
    assert (f.aux_logits is not None) == name.startswith("pspnet")
    if f.aux_logits is not None:
        assert f.aux_logits.shape == (2, 7, size, size)


def test_teacher_is_dilated_student_is_strided() -> None:
    teacher, student = pspnet_resnet20(), fcn_resnet8()
    assert teacher.output_stride == 4 and student.output_stride == 8
    layer3 = teacher.backbone.layer3
    assert layer3[0].conv1.stride == (1, 1) and layer3[0].downsample[0].stride == (1, 1)
    assert layer3[0].conv1.dilation == (1, 1)  # the first conv keeps the previous dilation (torchvision)
    assert all(b.conv2.dilation == (2, 2) for b in layer3) and layer3[1].conv1.dilation == (2, 2)
    assert student.backbone.layer3[0].conv1.stride == (2, 2)
    assert teacher.backbone.conv1.stride == (2, 2) and student.backbone.conv1.stride == (2, 2)


def test_backbone_loads_a_cifar_classification_checkpoint() -> None:
    cls_net = CifarResNet(20, [16, 16, 32, 64], num_classes=100)
    state = {k: v for k, v in cls_net.state_dict().items() if not k.startswith("fc.")}
    seg = pspnet_resnet20()
    seg.backbone.load_state_dict(state, strict=True)  # same keys and shapes: dilation changes no weight
    assert torch.equal(seg.backbone.layer3[1].conv2.weight, cls_net.layer3[1].conv2.weight)


@pytest.mark.parametrize("name", ["pspnet_resnet20", "fcn_resnet8"])
def test_task_loss_reaches_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    task = SegmentationTask(num_classes=5)
    model = task.build_model(name)
    masks = torch.randint(0, 5, (2, 32, 32))
    parts = task.loss(model.forward_features(_x(size=32)), masks)
    assert set(parts) == ({"ce", "aux_ce"} if name.startswith("pspnet") else {"ce"})
    sum(parts.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


@pytest.mark.parametrize("name", sorted(SEGMENTATION_MODELS))
def test_parameter_and_mac_counts(name: str) -> None:
    model: SegmentationNet = SEGMENTATION_MODELS[name]()
    params, macs = EXPECTED_COST[name]
    assert count_parameters(model) == params
    assert count_macs(model, (1, 3, 64, 64)) == macs


def test_mac_count_scales_with_batch() -> None:
    assert count_macs(fcn_resnet8(), (3, 3, 64, 64)) == 3 * EXPECTED_COST["fcn_resnet8"][1]


def test_mac_count_of_the_student_by_hand() -> None:
    # fcn_resnet8 at 64×64, K = 11: every conv's output elements × (C_in/groups × k²), written out layer by layer.
    k = 11
    convs = [
        (32 * 32 * 16, 3 * 9),  # stem, stride 2
        (32 * 32 * 16, 16 * 9),  # layer1 conv1
        (32 * 32 * 16, 16 * 9),  # layer1 conv2
        (16 * 16 * 32, 16 * 9),  # layer2 conv1 (stride 2)
        (16 * 16 * 32, 32 * 9),  # layer2 conv2
        (16 * 16 * 32, 16),  # layer2 shortcut 1×1
        (8 * 8 * 64, 32 * 9),  # layer3 conv1 (stride 2)
        (8 * 8 * 64, 64 * 9),  # layer3 conv2
        (8 * 8 * 64, 32),  # layer3 shortcut
        (8 * 8 * 32, 64 * 9),  # FCN head 3×3
        (8 * 8 * k, 32),  # classifier 1×1
    ]
    assert count_macs(fcn_resnet8(k), (1, 3, 64, 64)) == sum(a * b for a, b in convs)


def test_student_exports_to_torchscript(tmp_path) -> None:
    torch.manual_seed(0)
    model = fcn_resnet8().eval()
    check = export_torchscript(model, _x(), tmp_path / "student.pt", atol=1e-4)
    assert check["max_abs_diff"] <= 1e-4
    traced = torch.jit.load(str(tmp_path / "student.pt"))
    other = _x(3, size=96, seed=1)  # another batch and image size: the upsampling size is traced as dynamic
    with torch.no_grad():
        out = traced(other)
        assert out.shape == (3, 11, 96, 96) and torch.allclose(out, model(other), atol=1e-5)


@pytest.mark.slow
def test_student_exports_to_onnx(tmp_path) -> None:
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = fcn_resnet8().eval()
    check = export_onnx(model, _x(), tmp_path / "student.onnx", atol=1e-4)
    assert check["max_abs_diff"] is not None and check["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "student.onnx"), providers=["CPUExecutionProvider"])
    other = _x(3, seed=2)
    got = session.run(None, {session.get_inputs()[0].name: other.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), model(other), atol=1e-4)
