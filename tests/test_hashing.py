"""Hashing model, task, protocols, list files and two-view augmentation; a short real-image training check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kdforge.data.hashing import (
    CIFAR10_TOPK,
    _hsv_to_rgb,
    _rgb_to_hsv,
    brcd_cifar_split,
    color_jitter,
    eval_view,
    hashing_view,
    pool_arrays,
    random_gaussian_blur,
    random_grayscale,
    random_resized_crop,
    read_image_list,
    read_list_protocol,
    supervised_cifar_split,
    two_views,
)
from kdforge.errors import ConfigError, DataError
from kdforge.models import create_model
from kdforge.models.dense.hashing import HASHING_MODELS, BinaryHashExport, HashingNet, binary_codes
from kdforge.profile import count_macs
from kdforge.tasks.hashing import HashingEvaluator, HashingTask

# ---------------------------------------------------------------------------------------------------- model


def test_hash_head_shapes_features_and_gradients():
    torch.manual_seed(0)
    net = HASHING_MODELS["hash_resnet8"](bits=16, hidden=32)
    x = torch.randn(4, 3, 32, 32)
    h = net(x)
    assert h.shape == (4, 16)
    f = net.forward_features(x)
    torch.testing.assert_close(f.logits, h)
    assert len(f.feats) == len(net.feature_info) and f.pooled.shape == (4, net.num_features)
    task = HashingTask(bits=16)
    parts = task.loss((net(x), net(x.flip(3))))
    sum(parts.values()).backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert missing == []


def test_frozen_backbone_trains_only_the_head_and_keeps_bn_in_eval():
    net = HASHING_MODELS["hash_resnet8"](bits=16, freeze_backbone=True)
    net.train()
    assert not net.backbone.training and net.hash_head.training
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"hash_head.weight", "hash_head.bias"}


def test_binary_export_traces_and_equals_predict():
    torch.manual_seed(1)
    net = HASHING_MODELS["hash_resnet8"](bits=32).eval()
    wrapper = BinaryHashExport(net).eval()
    x = torch.randn(3, 3, 32, 32)
    traced = torch.jit.trace(wrapper, x)
    y = torch.randn(5, 3, 32, 32)
    expected = HashingTask(bits=32).predict(net(y))
    assert torch.equal(traced(y), expected)
    assert torch.equal(torch.jit.script(wrapper)(y), expected)
    assert set(expected.unique().tolist()) <= {-1.0, 1.0}


def test_binary_codes_map_zero_to_plus_one():
    assert binary_codes(torch.tensor([[-0.5, 0.0, 2.0]])).tolist() == [[-1.0, 1.0, 1.0]]


def test_mac_counter_counts_backbone_and_head():
    net = HASHING_MODELS["hash_resnet8"](bits=64, hidden=128)
    backbone = create_model("resnet8", num_classes=10)
    head = net.num_features * 128 + 128 * 64
    # the zoo model's classifier (num_features × 10) is replaced by the head
    assert count_macs(net, (1, 3, 32, 32)) == count_macs(backbone, (1, 3, 32, 32)) - net.num_features * 10 + head


def test_hashing_net_rejects_non_zoo_backbones():
    with pytest.raises(ValueError, match="zoo"):
        HashingNet(nn.Conv2d(3, 3, 1), bits=16)


# ---------------------------------------------------------------------------------------------------- task


@pytest.mark.parametrize("classes", [10, 1000])
def test_pretrained_backbone_loads_every_backbone_weight_of_a_classifier_of_any_width(tmp_path, classes):
    torch.manual_seed(0)
    classifier = create_model("resnet8", num_classes=classes)
    for p in classifier.parameters():
        nn.init.normal_(p)  # weights no fresh network has, so a skipped load cannot pass
    path = tmp_path / "resnet8.pt"
    torch.save({"model": classifier.state_dict()}, path)  # a RepDistiller-style container
    fresh = HashingTask(bits=16).build_model("hash_resnet8")
    net = HashingTask(bits=16).build_model("hash_resnet8", pretrained=str(path))
    want = {k: v for k, v in classifier.state_dict().items() if not k.startswith("fc.")}
    got = net.backbone.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the hash head is the task's own, freshly initialised as without weights
    assert net.hash_head.weight.shape == fresh.hash_head.weight.shape == (16, 64)
    assert not torch.equal(net.hash_head.weight, classifier.fc.weight[:16])


def test_pretrained_backbone_of_another_architecture_or_from_config_is_refused(tmp_path):
    from kdforge.api import build_network
    from kdforge.config import config_from_dict
    from kdforge.errors import CheckpointError
    from kdforge.tasks.classification import ClassificationTask
    from kdforge.validation import validate

    path = tmp_path / "resnet20.pt"
    torch.save(create_model("resnet20", num_classes=10).state_dict(), path)
    with pytest.raises(CheckpointError, match="model.pretrained .*missing|model.pretrained .*unexpected"):
        build_network("hash_resnet8", 10, task=HashingTask(bits=16), pretrained=path)
    ok = create_model("resnet8", num_classes=10).state_dict()
    torch.save(ok, tmp_path / "resnet8.pt")
    net = build_network("hash_resnet8", 10, task=HashingTask(bits=16), pretrained=tmp_path / "resnet8.pt")
    assert torch.equal(net.backbone.conv1.weight, ok["conv1.weight"])
    with pytest.raises(ConfigError, match="model.pretrained"):
        build_network("resnet8", 10, task=ClassificationTask(num_classes=10), pretrained=tmp_path / "resnet8.pt")
    cfg = config_from_dict({"model": {"name": "resnet8", "pretrained": str(path)}, "method": {"name": "vanilla"}})
    with pytest.raises(ConfigError, match="model.pretrained is for tasks that put their head on a zoo backbone"):
        validate(cfg, "train")


def test_task_interface_and_errors():
    task = HashingTask(bits=64)
    assert task.name == "hashing"
    assert isinstance(task.build_model("resnet8"), HashingNet)
    assert isinstance(task.build_model("hash_resnet8", hidden=16).hash_head, nn.Sequential)
    ev = task.evaluator()
    assert isinstance(ev, HashingEvaluator) and ev.topk == CIFAR10_TOPK and ev.primary == "map"
    with pytest.raises(ConfigError, match="bits"):
        HashingTask(bits=12)
    with pytest.raises(ConfigError, match="unknown hashing model"):
        task.build_model("nope")
    with pytest.raises(ValueError, match="two views"):
        task.loss(torch.zeros(2, 64))
    assert set(task.predict(torch.randn(3, 64)).unique().tolist()) <= {-1.0, 1.0}


# ---------------------------------------------------------------------------------------------------- protocols


def _cifar_like_labels():
    return np.repeat(np.arange(10), 5000), np.repeat(np.arange(10), 1000)


def test_brcd_protocol_sizes_and_determinism():
    tr, te = _cifar_like_labels()
    s = brcd_cifar_split(tr, te, seed=0)
    assert (len(s.train), len(s.val), len(s.query), len(s.database)) == (5000, 5000, 5000, 50000)
    assert s.topk == 1000
    assert np.bincount(tr[s.train], minlength=10).tolist() == [500] * 10
    assert s.train.max() < 50000 and s.val.min() >= 50000 and s.query.min() >= 50000
    assert not set(s.val) & set(s.query) and len(set(s.val) | set(s.query)) == 10000
    assert np.array_equal(s.database, np.arange(50000))
    again = brcd_cifar_split(tr, te, seed=0)
    other = brcd_cifar_split(tr, te, seed=1)
    assert all(np.array_equal(getattr(s, f), getattr(again, f)) for f in ("train", "val", "query"))
    assert not np.array_equal(s.train, other.train) and not np.array_equal(s.query, other.query)


@pytest.mark.parametrize("includes_train", [True, False])
def test_supervised_protocol_sizes(includes_train):
    tr, te = _cifar_like_labels()
    s = supervised_cifar_split(tr, te, seed=3, database_includes_train=includes_train)
    labels = np.concatenate([tr, te])
    assert len(s.query) == 1000 and np.bincount(labels[s.query]).tolist() == [100] * 10
    assert len(s.train) == 5000 and np.bincount(labels[s.train]).tolist() == [500] * 10
    assert not set(s.query) & set(s.database) and not set(s.query) & set(s.train)
    assert len(s.database) == (59000 if includes_train else 54000)
    assert set(s.train) <= set(s.database) if includes_train else not set(s.train) & set(s.database)
    assert s.topk is None and len(s.val) == 0


def test_protocols_on_the_embedded_subset():
    from kdforge.data import _embedded_arrays

    d = _embedded_arrays()
    s = brcd_cifar_split(d.train_labels, d.test_labels, seed=0)
    images, labels = pool_arrays(d.train_images, d.train_labels, d.test_images, d.test_labels)
    assert images.shape[0] == labels.shape[0] == len(d.train_labels) + len(d.test_labels)
    assert np.array_equal(labels[s.query], d.test_labels[s.query - len(d.train_labels)])
    with pytest.raises(DataError, match="per class"):
        supervised_cifar_split(d.train_labels, d.test_labels, train_per_class=5000)


# ---------------------------------------------------------------------------------------------------- list files


def test_list_file_reads_paths_and_multi_hot(tmp_path):
    f = tmp_path / "train.txt"
    f.write_text("img/a.jpg 0 1 0 1\n\nimg/b.jpg 1 0 0 0\n")
    lst = read_image_list(f)
    assert lst.paths == ["img/a.jpg", "img/b.jpg"]
    assert lst.labels.tolist() == [[0, 1, 0, 1], [1, 0, 0, 0]] and lst.labels.dtype == np.float32
    for name in ("test", "database"):
        (tmp_path / f"{name}.txt").write_text("x.jpg 0 0 1 0\n")
    proto = read_list_protocol(tmp_path, num_classes=4)
    assert set(proto) == {"train", "test", "database"}


@pytest.mark.parametrize(
    "content,match",
    [
        ("", "no entries"),
        ("a.jpg\n", "no label columns"),
        ("a.jpg 0 1\nb.jpg 0 1 1\n", "3 label columns, expected 2"),
        ("a.jpg 0 2\n", "must be 0 or 1"),
        ("a.jpg 0 x\n", "not a number"),
    ],
)
def test_list_file_errors(tmp_path, content, match):
    f = tmp_path / "bad.txt"
    f.write_text(content)
    with pytest.raises(DataError, match=match):
        read_image_list(f)


def test_list_file_missing_and_disagreeing_protocol(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_image_list(tmp_path / "nope.txt")
    (tmp_path / "train.txt").write_text("a.jpg 0 1\n")
    (tmp_path / "test.txt").write_text("a.jpg 0 1 0\n")
    (tmp_path / "database.txt").write_text("a.jpg 0 1\n")
    with pytest.raises(DataError, match="disagree"):
        read_list_protocol(tmp_path)
    with pytest.raises(DataError, match="expected 2"):
        read_image_list(tmp_path / "test.txt", num_classes=2)


# ---------------------------------------------------------------------------------------------------- augmentation


def _images(n=6, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_two_views_are_deterministic_per_seed_and_differ():
    x = _images()
    a1, b1 = two_views(x, 32, torch.Generator().manual_seed(0))
    a2, b2 = two_views(x, 32, torch.Generator().manual_seed(0))
    a3, _ = two_views(x, 32, torch.Generator().manual_seed(1))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, b1) and not torch.equal(a1, a3)
    assert a1.shape == (6, 3, 32, 32) and a1.dtype == torch.float32
    assert hashing_view(x, 48, torch.Generator().manual_seed(0)).shape == (6, 3, 48, 48)


def test_augmentation_pieces_limit_cases():
    x = _images().float() / 255
    g = torch.Generator().manual_seed(0)
    full = random_resized_crop(x, 32, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=g)
    torch.testing.assert_close(full, x, atol=1e-5, rtol=0)
    assert torch.equal(color_jitter(x, p=0.0, generator=g), x)
    same = color_jitter(x, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, p=1.0, generator=g)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(_hsv_to_rgb(_rgb_to_hsv(x)), x, atol=1e-5, rtol=0)
    gray = random_grayscale(x, p=1.0, generator=g)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    blurred = random_gaussian_blur(x, p=1.0, generator=g)
    assert float(blurred.std()) < float(x.std())  # random noise images lose contrast under a blur
    flat = torch.full((2, 3, 8, 8), 0.25)
    torch.testing.assert_close(random_gaussian_blur(flat, p=1.0, generator=g), flat)
    ev = eval_view(_images(2), 64)
    assert ev.shape == (2, 3, 64, 64)


# ---------------------------------------------------------------------------------------------------- real images


def _train_cibhash(net: nn.Module, vi: torch.Tensor, vj: torch.Tensor, steps: int, lr: float = 1e-3) -> list[float]:
    task = HashingTask(bits=16)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = sum(task.loss((net(vi), net(vj))).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _real_batch(n: int = 32) -> torch.Tensor:
    from kdforge.data import _embedded_arrays

    return torch.from_numpy(np.ascontiguousarray(_embedded_arrays().train_images[:n]))


def test_unsupervised_objective_trains_a_hash_head_on_real_cifar_images():
    """CIBHash's setting (frozen backbone, MLP head): a few dozen Adam steps of the objective on a fixed pair of
    views of 32 real CIFAR-10 images (the embedded subset) lower the loss, and the codes do not collapse."""
    x = _real_batch()
    torch.manual_seed(0)
    net = HASHING_MODELS["hash_resnet8"](bits=16, hidden=64, freeze_backbone=True).eval()
    vi, vj = two_views(x, 32, torch.Generator().manual_seed(0))
    with torch.no_grad():  # the frozen backbone's features are fixed: compute them once, train the head on them
        fi, fj = net.backbone(vi), net.backbone(vj)
    losses = _train_cibhash(net.hash_head, fi, fj, steps=100, lr=5e-3)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    with torch.no_grad():
        codes = binary_codes(net(eval_view(x, 32)))
    assert codes.unique(dim=0).shape[0] > 8


@pytest.mark.slow
def test_unsupervised_objective_trains_the_whole_network_on_real_cifar_images():
    x = _real_batch()
    torch.manual_seed(0)
    net = HASHING_MODELS["hash_resnet8"](bits=16)
    vi, vj = two_views(x, 32, torch.Generator().manual_seed(0))
    losses = _train_cibhash(net, vi, vj, steps=25)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    net.eval()
    with torch.no_grad():
        codes = binary_codes(net(eval_view(x, 32)))
    assert codes.unique(dim=0).shape[0] > 8
