"""Model zoo: parameter counts, the feature API, checkpoint compatibility and FeatureTap.

Every test parametrised over ``list_models()`` picks up a newly registered model automatically; counts and shape
checks build on the meta device, so they cost nothing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kdforge.errors import CheckpointError
from kdforge.models import Features, FeatureTap, count_parameters, create_model, list_models, load_weights
from kdforge.registry import MODELS, UnknownNameError

# Published counts with a 100-class head (cifar) or 1000-class head (imagenet): RepDistiller's table for the CIFAR
# networks, torchvision's model cards for the ImageNet ResNets.
PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "MobileNetV2": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
    "ResNet18": 11_220_132,
    "ResNet50": 23_705_252,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    # DATS main networks: the backbone plus a detail refiner of C·9 + C² + 4C parameters (C = last-stage channels).
    "dats_resnet8": 83_892 + 64 * 9 + 64**2 + 4 * 64,
    "dats_resnet20": 278_324 + 64 * 9 + 64**2 + 4 * 64,
    "dats_resnet8x4": 1_233_540 + 256 * 9 + 256**2 + 4 * 256,
}
ALL = list_models()


def _size(name: str) -> int:
    return 64 if MODELS.meta(name)["family"] == "imagenet" else 32


def _input(name: str, batch: int = 2, device: str | None = None) -> torch.Tensor:
    size = _size(name)
    return torch.randn(batch, 3, size, size, device=device)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("name", ALL)
def test_parameter_count(name):
    meta = MODELS.meta(name)
    assert meta["family"] in ("cifar", "imagenet") and meta["input_size"] and meta["kind"]
    assert name in PARAMS, f"record the reference parameter count of new model {name!r} in PARAMS"
    with torch.device("meta"):
        model = create_model(name)
    assert model.num_classes == (1000 if meta["family"] == "imagenet" else 100)
    assert count_parameters(model) == PARAMS[name]


@pytest.mark.parametrize("name", ALL)
def test_feature_api_shapes_on_meta(name):
    with torch.device("meta"):
        model = create_model(name, num_classes=10)
        x = _input(name, device="meta")
        feats = model.forward_features(x)
        logits = model(x)
    size = _size(name)
    assert logits.shape == (2, 10) and feats.logits.shape == (2, 10)
    assert len(feats.feats) == len(feats.preact_feats) == len(model.feature_info)
    for feat, pre, info in zip(feats.feats, feats.preact_feats, model.feature_info, strict=True):
        assert feat.shape == (2, info.channels, size // info.stride, size // info.stride), info
        assert pre.shape == feat.shape, info
    assert feats.pooled.shape == (2, model.num_features)
    head = model.get_classifier()
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (model.num_features, 10)


@pytest.mark.parametrize("name", ALL)
def test_forward_features_and_gradients(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    x = _input(name)
    out = model.forward_features(x)
    assert isinstance(out, Features)
    assert torch.equal(model(x), out.logits)
    for feat, pre in zip(out.feats, out.preact_feats, strict=True):
        # Either the stage ends without a ReLU (pre is the map itself) or the map is exactly relu(pre).
        assert torch.equal(pre, feat) or torch.equal(F.relu(pre), feat)
    assert torch.equal(model.get_classifier()(out.pooled), out.logits)
    out.logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"])
def test_eval_mode_is_deterministic_and_batch_independent(name):
    model = create_model(name).eval()
    x = _input(name, batch=3)
    with torch.no_grad():
        full = model(x)
        single = model(x[:1])
    torch.testing.assert_close(full[:1], single, rtol=1e-4, atol=1e-5)


def test_resnet18_has_torchvision_state_dict_keys():
    state = create_model("resnet18").state_dict()
    # conv1 + bn1 (5 entries: weight, bias, running_mean, running_var, num_batches_tracked), 8 basic blocks of
    # 2 conv + 2 BN (12 entries), 3 of them with a downsample conv + BN (6 more), fc weight + bias.
    assert len(state) == 1 + 5 + 8 * 12 + 3 * 6 + 2 == 122
    expected = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_var": (64,),
        "bn1.num_batches_tracked": (),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer1.1.bn2.bias": (64,),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_mean": (128,),
        "layer3.1.conv2.weight": (256, 256, 3, 3),
        "layer4.0.downsample.0.weight": (512, 256, 1, 1),
        "layer4.1.bn2.weight": (512,),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert "layer1.0.downsample.0.weight" not in state
    assert list(state)[:6] == [
        "conv1.weight",
        "bn1.weight",
        "bn1.bias",
        "bn1.running_mean",
        "bn1.running_var",
        "bn1.num_batches_tracked",
    ]
    assert list(state)[-2:] == ["fc.weight", "fc.bias"]


def test_resnet50_has_torchvision_bottleneck_keys():
    with torch.device("meta"):
        state = create_model("resnet50").state_dict()
    # 16 bottlenecks of 3 conv + 3 BN (18 entries), 4 with a downsample (6 more), stem 6, fc 2.
    assert len(state) == 6 + 16 * 18 + 4 * 6 + 2
    assert tuple(state["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(state["layer3.5.conv3.weight"].shape) == (1024, 256, 1, 1)
    assert tuple(state["layer4.0.conv2.weight"].shape) == (512, 512, 3, 3)
    assert tuple(state["fc.weight"].shape) == (1000, 2048)


def test_repdistiller_keys():
    with torch.device("meta"):
        keys = {
            n: set(create_model(n).state_dict())
            for n in ("resnet8x4", "wrn_40_2", "vgg13", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50")
        }
    assert {"layer1.0.downsample.0.weight", "layer3.0.bn2.running_var", "fc.weight"} <= keys["resnet8x4"]
    assert {"block1.layer.0.convShortcut.weight", "block3.layer.5.bn2.weight", "bn1.weight"} <= keys["wrn_40_2"]
    assert {"block0.0.weight", "block0.4.running_mean", "classifier.weight"} <= keys["vgg13"]
    assert {"conv1.0.weight", "blocks.6.0.conv.7.weight", "conv2.1.weight", "classifier.0.weight"} <= keys[
        "MobileNetV2"
    ]
    assert {"layer1.0.conv1.weight", "layer3.3.bn3.bias", "linear.weight"} <= keys["ShuffleV1"]
    assert {"layer2.0.conv5.weight", "layer2.7.bn3.weight", "conv2.weight", "linear.weight"} <= keys["ShuffleV2"]
    assert {"layer1.0.shortcut.0.weight", "layer4.2.conv3.weight", "linear.weight"} <= keys["ResNet50"]


def test_repdistiller_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    source = create_model("resnet8x4", num_classes=10).eval()
    wrapped = nn.DataParallel(source)  # a CPU DataParallel only renames keys with "module."
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": wrapped.state_dict(), "epoch": 1, "accuracy": 75.0}, path)
    assert next(iter(torch.load(path, weights_only=True)["model"])).startswith("module.")

    target = create_model("resnet8x4", num_classes=10).eval()
    assert load_weights(target, path) is target
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))


def test_compiled_and_nested_containers_load():
    source = create_model("resnet8", num_classes=10)
    state = {f"_orig_mod.{k}": v for k, v in source.state_dict().items()}
    target = create_model("resnet8", num_classes=10)
    load_weights(target, {"state_dict": {"student": state}})
    expected, loaded = source.state_dict(), target.state_dict()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)


def test_pretrained_argument_and_old_checkpoints_without_num_batches_tracked(tmp_path):
    source = create_model("wrn_16_1", num_classes=10)
    path = tmp_path / "old.pt"
    torch.save({k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}, path)
    model = create_model("wrn_16_1", num_classes=10, pretrained=path)
    assert torch.equal(model.fc.weight, source.fc.weight)


def test_wrong_class_count_names_the_shape_mismatch():
    state = create_model("resnet8", num_classes=10).state_dict()
    with pytest.raises(CheckpointError) as err:
        load_weights(create_model("resnet8"), state)
    msg = _one_line(err)
    assert "fc.weight: checkpoint [10, 64] vs model [100, 64]" in msg
    assert "fc.bias: checkpoint [10] vs model [100]" in msg
    assert "2 shape mismatches" in msg and "class count" in msg


def test_other_architecture_names_missing_and_unexpected_keys():
    state = create_model("wrn_16_1", num_classes=10).state_dict()
    with pytest.raises(CheckpointError) as err:
        load_weights(create_model("resnet8", num_classes=10), state)
    msg = _one_line(err)
    assert "40 missing keys (layer1.0.conv1.weight, " in msg and "74 unexpected keys (block1.layer.0.bn1.weight" in msg
    assert "bn1.weight: checkpoint [64] vs model [16]" in msg
    assert "more)" in msg  # long key lists are cut to five names
    assert "another architecture" in msg


def test_non_strict_ignores_extra_and_missing_keys_but_not_shapes():
    model = create_model("resnet8", num_classes=10)
    state = {k: v for k, v in create_model("resnet8", num_classes=10).state_dict().items() if k != "fc.bias"}
    state["projector.weight"] = torch.zeros(3)
    load_weights(model, state, strict=False)
    assert torch.equal(model.fc.weight, state["fc.weight"])
    with pytest.raises(CheckpointError):
        load_weights(model, create_model("resnet8", num_classes=5).state_dict(), strict=False)


def test_unreadable_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint\n\x00\x01")
    for path in (bad, tmp_path / "missing.pt"):
        with pytest.raises(CheckpointError) as err:
            load_weights(create_model("resnet8"), path)
        assert str(path) in _one_line(err)
    with pytest.raises(CheckpointError) as err:
        load_weights(create_model("resnet8"), {"epoch": 3, "lr": 0.1})
    assert "no state dict" in _one_line(err)


def test_feature_tap_captures_and_removes_hooks():
    model = create_model("resnet8").eval()
    paths = ["layer1", "layer2.0.conv1", "fc"]
    modules = [model.get_submodule(p) for p in paths]
    with FeatureTap(model, paths) as tap:
        logits = model(torch.randn(2, 3, 32, 32))
        assert all(m._forward_hooks for m in modules)
    assert [tuple(t.shape) for t in tap.outputs] == [(2, 16, 32, 32), (2, 32, 16, 16), (2, 100)]
    assert torch.equal(tap.outputs[2], logits)
    assert not any(m._forward_hooks for m in model.modules())


def test_feature_tap_removes_hooks_on_exceptions():
    model = create_model("resnet8")
    with pytest.raises(RuntimeError), FeatureTap(model, ["layer3", "layer3.0.bn1"]):
        model(torch.randn(2, 5, 32, 32))  # wrong channel count fails inside the forward
    assert not any(m._forward_hooks for m in model.modules())


def test_feature_tap_unknown_path_suggests_names():
    model = create_model("resnet8")
    with pytest.raises(KeyError) as err:
        FeatureTap(model, ["layer4"])
    msg = _one_line(err)
    assert "layer4" in msg and "'layer1'" in msg


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownNameError) as err:
        create_model("resnet9")
    assert "'resnet8'" in _one_line(err)


def test_list_models_by_family():
    cifar, imagenet = list_models("cifar"), list_models("imagenet")
    assert imagenet == ["resnet18", "resnet34", "resnet50"]
    assert cifar == sorted(cifar) and "resnet32x4" in cifar and not set(cifar) & set(imagenet)
    assert sorted(cifar + imagenet) == list_models()


def test_count_parameters_counts_shared_parameters_once():
    lin = nn.Linear(4, 4)
    assert count_parameters(nn.Sequential(lin, lin)) == 20
