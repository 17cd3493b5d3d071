"""Triplet KD, AMKD and AFT-KD, and the data layer's other-class negatives.

Golden values are computed here from the papers' formulas (numpy, or torch's own reference modules such as
``nn.TripletMarginLoss`` and ``F.kl_div``), independently of kdforge's loss code.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from kdforge.api import fit
from kdforge.data import build_data
from kdforge.data.batch import Batch
from kdforge.data.loader import NegativeSampler, TensorLoader
from kdforge.losses.feature import attention_map
from kdforge.losses.metric import triplet_margin_loss
from kdforge.methods import Progress, create_method
from kdforge.methods.aft_kd import block_ends, dwa_weights
from kdforge.methods.amkd import boundary_attack, sample_attack_targets, select_base_samples
from kdforge.models import create_model

PROGRESS = Progress(epoch=0, step=0, epoch_float=0.0, fraction=0.0)


def _progress(epoch: int) -> Progress:
    return Progress(epoch=epoch, step=0, epoch_float=float(epoch), fraction=0.0)


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _np_kl(z_s: np.ndarray, z_t: np.ndarray, tau: float) -> float:
    """``KL(softmax(z_t/τ) ‖ softmax(z_s/τ))``, batch mean."""
    lt, ls = _np_log_softmax(z_t / tau), _np_log_softmax(z_s / tau)
    return float((np.exp(lt) * (lt - ls)).sum(axis=1).mean())


def _np_ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(-_np_log_softmax(z)[np.arange(len(y)), y].mean())


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# ---------------------------------------------------------------------------------------------- negatives: data


def test_negative_sampler_draws_only_other_classes_uniformly():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 15 + [4] * 5)  # imbalanced, with an empty class 3
    sampler = NegativeSampler(labels)
    g = torch.Generator().manual_seed(0)
    target = labels[torch.randint(0, len(labels), (20000,), generator=g)]
    neg = sampler(target, g)
    assert (labels[neg] != target).all()
    # Uniform over the *samples* of the other classes (the reference's np.random.choice(where(labels != y))):
    # for anchors of class 0, each of the 50 other-class samples should come up about equally often.
    counts = torch.bincount(neg[target == 0], minlength=len(labels))[50:].double()
    assert (counts > 0).all()
    expected = counts.mean()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 100  # 49 degrees of freedom: mean 49, sd ~10
    with pytest.raises(ValueError, match="at least two classes"):
        NegativeSampler(torch.zeros(10, dtype=torch.int64))


def _tensor_loader(negatives: bool = True, augment: bool = False, seed: int = 0, n: int = 40) -> TensorLoader:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    labels = torch.arange(n) % 5
    return TensorLoader(
        images, labels, 8, train=True, augment=augment, seed=seed, negatives=negatives,
        mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255), padding=1,
    )  # fmt: skip


def test_tensor_loader_negatives_are_other_class_deterministic_and_per_epoch():
    loader = _tensor_loader()
    loader.set_epoch(0)
    first = list(loader)
    for b in first:
        assert b.negative is not None and b.negative.shape == b.input.shape
        assert (b.negative_index % 5 != b.target).all()  # label = index % 5
        assert torch.equal(b.negative[:, 0, 0, 0].round().long(), b.negative_index)  # the image of that index
    again = _tensor_loader()
    again.set_epoch(0)
    assert all(torch.equal(a.negative_index, b.negative_index) for a, b in zip(first, again, strict=True))
    loader.set_epoch(1)
    second = list(loader)
    assert not torch.equal(torch.cat([b.negative_index for b in first]), torch.cat([b.negative_index for b in second]))
    loader.set_epoch(0, start_batch=2)  # resume mid-epoch: the same negatives
    tail = list(loader)
    assert all(torch.equal(a.negative_index, b.negative_index) for a, b in zip(first[2:], tail, strict=True))


def test_negatives_leave_the_anchors_unchanged_and_are_augmented():
    on, off = _tensor_loader(negatives=True, augment=True), _tensor_loader(negatives=False, augment=True)
    for loader in (on, off):
        loader.set_epoch(3)
    for a, b in zip(on, off, strict=True):
        assert torch.equal(a.input, b.input) and torch.equal(a.index, b.index)
        assert b.negative is None and b.negative_index is None
    # Augmented negatives: random crops with padding 1 put zero pixels into some borders of the 4×4 images.
    negs = torch.cat([b.negative for b in on])
    assert (negs[:, 0].flatten(1) == 0).any(dim=1).float().mean() > 0.2
    on.negatives = False
    assert next(iter(on)).negative is None
    evaluation = TensorLoader(
        torch.zeros(8, 3, 4, 4, dtype=torch.uint8), torch.arange(8) % 2, 4, train=False, negatives=True,
        mean=(0, 0, 0), std=(1, 1, 1),
    )  # fmt: skip
    assert next(iter(evaluation)).negative is None


def test_build_data_negatives_and_batch_to():
    bundle = build_data("embedded", batch_size=16, train_subset=60, test_subset=20, negatives=True)
    batch = next(iter(bundle.train))
    labels = bundle.train.labels
    assert (labels[batch.negative_index] != batch.target).all()
    assert batch.negative.shape == batch.input.shape
    moved = batch.to("cpu")
    assert moved.negative is not None and torch.equal(moved.negative_index, batch.negative_index)
    assert next(iter(bundle.test)).negative is None


def _write_folder(root: Path, classes=("cat", "dog", "eel"), per_class=4) -> None:
    for split in ("train", "val"):
        for k, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((12 + i, 14, 3), 80 * k, dtype=np.uint8)).save(d / f"{i}.png")


def test_folder_loader_negatives(tmp_path):
    _write_folder(tmp_path)
    kw = {"root": str(tmp_path), "image_size": 8, "batch_size": 4, "num_workers": 0, "negatives": True}
    bundle = build_data("folder", **kw)
    bundle.train.set_epoch(0)
    first = list(bundle.train)
    assert len(first) == 3
    mean, std = torch.tensor(bundle.mean).view(1, 3, 1, 1), torch.tensor(bundle.std).view(1, 3, 1, 1)
    for b in first:
        assert (b.negative_index // 4 != b.target).all()  # 4 images per class, in class order
        # Every pixel of a class-k image is 80·k: the decoded negative is the image of its index.
        pixels = (b.negative * std + mean) * 255
        assert torch.allclose(pixels.mean(dim=(1, 2, 3)), 80.0 * (b.negative_index // 4).float(), atol=1.0)
    again = build_data("folder", **kw)
    again.train.set_epoch(0)
    assert [b.negative_index.tolist() for b in again.train] == [b.negative_index.tolist() for b in first]
    bundle.train.set_epoch(0, start_batch=1)
    assert [b.negative_index.tolist() for b in bundle.train] == [b.negative_index.tolist() for b in first[1:]]
    bundle.train.set_epoch(1)
    assert [b.negative_index.tolist() for b in bundle.train] != [b.negative_index.tolist() for b in first]
    assert next(iter(bundle.test)).negative is None
    plain = build_data("folder", **{**kw, "negatives": False})
    plain.train.set_epoch(0)
    assert next(iter(plain.train)).negative is None


def test_engine_switches_negatives_on_for_a_method_that_needs_them(tiny_net):
    n = 32
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 4
    common = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}

    class Data:
        train = TensorLoader(images, labels, 8, train=True, **common)
        test = TensorLoader(images, labels, 16, train=False, **common)

    method = create_method("triplet_kd", tiny_net(), tiny_net(seed=1))
    fit(method, Data(), train={"epochs": 1, "progress": False, "device": "cpu"})
    assert Data.train.negatives


# ---------------------------------------------------------------------------------------------- triplet KD


def test_triplet_margin_loss_matches_torch_and_a_hand_value():
    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(6, 5, generator=g) * 3 for _ in range(3))
    for margin in (0.5, 1.0, 5.0):
        ref = nn.TripletMarginLoss(margin=margin)(a, p, n)
        torch.testing.assert_close(triplet_margin_loss(a, p, n, margin), ref)
    # ‖(0,0) − (3,4)‖ = 5, ‖(0,0) − (0,1)‖ = 1 (ε = 0): max(0, 5 − 1 + 0.5) = 4.5; the other row is hinged to 0.
    a2 = torch.zeros(2, 2)
    p2 = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    n2 = torch.tensor([[0.0, 1.0], [6.0, 8.0]])
    assert triplet_margin_loss(a2, p2, n2, margin=0.5, eps=0.0).item() == pytest.approx(4.5 / 2)


def _negative_batch(n: int = 8, classes: int = 4, size: int = 8) -> Batch:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.arange(n) % classes
    batch = Batch(x, y, torch.arange(n))
    batch.negative, batch.negative_index = torch.randn(n, 3, size, size, generator=g), (torch.arange(n) + 1) % n
    return batch


def test_triplet_kd_golden(tiny_net):
    method = create_method(
        "triplet_kd", tiny_net(), tiny_net(seed=1), kd_weight=0.7, ce_weight=1.3, triplet_weight=2.0, margin=5.0
    )
    method.eval()  # deterministic BN for the reference computation
    batch = _negative_batch()
    out = method(batch, PROGRESS)
    zs, zt, zn = method.student(batch.input), method.teacher(batch.input), method.student(batch.negative)
    # The reference: KLDivLoss(batchmean)(log_softmax(z_s), softmax(z_t)), CrossEntropyLoss, TripletMarginLoss(5).
    kd = F.kl_div(F.log_softmax(zs, 1), F.softmax(zt, 1), reduction="batchmean")
    tri = nn.TripletMarginLoss(margin=5.0)(zt, zs, zn)
    assert out.losses["kd"].item() == pytest.approx(0.7 * _np_kl(_np(zs), _np(zt), 1.0), rel=1e-5)
    assert out.losses["kd"].item() == pytest.approx(0.7 * kd.item(), rel=1e-5)
    assert out.losses["ce"].item() == pytest.approx(1.3 * _np_ce(_np(zs), batch.target.numpy()), rel=1e-5)
    assert out.losses["triplet"].item() == pytest.approx(2.0 * tri.item(), rel=1e-5)
    torch.testing.assert_close(out.loss, sum(out.losses.values()))


def test_triplet_kd_needs_negatives_and_pushes_the_negative_away(tiny_net):
    method = create_method("triplet_kd", tiny_net(), tiny_net(seed=1), kd_weight=0.0, ce_weight=0.0)
    batch = _negative_batch()
    with pytest.raises(ValueError, match="needs an other-class negative"):
        method(Batch(batch.input, batch.target, batch.index), PROGRESS)
    method.eval()
    zs0, zn0, zt = (method.student(batch.input), method.student(batch.negative), method.teacher(batch.input))
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.05)
    for _ in range(5):
        out = method(batch, PROGRESS)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    zs1, zn1 = method.student(batch.input), method.student(batch.negative)
    gap0 = ((zt - zn0).norm(dim=1) - (zt - zs0).norm(dim=1)).mean()
    gap1 = ((zt - zn1).norm(dim=1) - (zt - zs1).norm(dim=1)).mean()
    assert gap1 > gap0  # the positive moves toward the teacher's anchor relative to the negative


# ---------------------------------------------------------------------------------------------- AMKD


def test_select_base_samples_follows_the_bss_rule():
    zt = torch.tensor([[5.0, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0], [0, 5, 0]])
    zs = torch.tensor([[5.0, 0, 0], [0, 0, 5], [0, 5, 0], [0, 0, 0], [0, 5, 0]])
    y = torch.tensor([0, 1, 0, 0, 1])  # sample 2: the teacher is wrong
    assert sorted(select_base_samples(zt, zs, y, 10).tolist()) == [0, 1, 3, 4]
    pt, ps = _np(zt.softmax(1)), _np(zs.softmax(1))
    score = {i: sum((pt[i, c] - ps[i, c]) ** 2 for c in range(3) if c != y[i]) for i in (0, 1, 3, 4)}
    top2 = sorted(score, key=lambda i: -score[i])[:2]
    assert sorted(select_base_samples(zt, zs, y, 2).tolist()) == sorted(top2)


def test_attack_targets_exclude_top1_and_follow_teacher_probabilities():
    zt = torch.log(torch.tensor([[0.6, 0.3, 0.1, 0.0001]])).repeat(20000, 1)
    t = sample_attack_targets(zt, torch.Generator().manual_seed(0))
    assert (t != 0).all()
    freq = torch.bincount(t, minlength=4).double() / len(t)
    assert freq[1].item() == pytest.approx(0.3 / 0.4001, abs=0.02)  # proportional among the non-top-1 classes
    assert freq[2].item() == pytest.approx(0.1 / 0.4001, abs=0.02)


class _Linear(nn.Module):
    def __init__(self, classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_boundary_attack_one_step_golden():
    model = _Linear().requires_grad_(False).eval()
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    src = model(x).argmax(1)
    tgt = (src + 1) % 3
    out = boundary_attack(model, x, src, tgt, steps=1, step_size=0.3, clamp=100.0)
    w, b = _np(model.fc.weight), _np(model.fc.bias)
    xf = _np(x).reshape(4, -1)
    for i in range(4):
        s = w @ xf[i] + b
        grad = w[tgt[i]] - w[src[i]]  # ∇_x(s_tgt − s_src) of a linear model
        expected = xf[i] + 0.3 * (s[src[i]] - s[tgt[i]] + 1e-4) * grad / np.linalg.norm(grad)
        np.testing.assert_allclose(_np(out[i]).ravel(), expected, rtol=1e-5, atol=1e-6)


class _Scaled(nn.Module):
    """A network with ×``k`` logits: the confident, large-gradient regime of a trained teacher, where BSS's step
    (length ``α·gap`` along the normalized gradient) crosses the boundary within its 10 steps."""

    def __init__(self, net: nn.Module, k: float) -> None:
        super().__init__()
        self.net, self.k = net, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.k


def _margin(logits: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    z = logits.float()
    return (z.gather(1, tgt[:, None]) - z.gather(1, src[:, None])).squeeze(1)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_boundary_attack_moves_the_teacher_toward_the_target(tiny_net, dtype):
    teacher = _Scaled(tiny_net(seed=1), 100.0).requires_grad_(False).eval()
    before = copy.deepcopy(teacher.state_dict())
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 4 - 2  # inside the clamp
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        logits = teacher(x)
        src = logits.argmax(1)
        tgt = sample_attack_targets(logits, torch.Generator().manual_seed(0))
        x_adv = boundary_attack(teacher, x, src, tgt, steps=10, step_size=0.3, clamp=2.5)
        adv = teacher(x_adv)
    assert x_adv.dtype == x.dtype and x_adv.abs().max() <= 2.5
    m0, m1 = _margin(logits, src, tgt), _margin(adv, src, tgt)
    assert (m1 > m0).all()  # every sample moved toward its target class
    if dtype is None:
        assert (adv.argmax(1) == tgt).all()  # and across the teacher's boundary into it
    else:
        # In bf16 the logits' resolution (a few 0.1 at this scale) stalls the step near the boundary: the samples end
        # much closer to it than they started, as the fp32 teacher confirms.
        m_fp32 = _margin(teacher(x_adv), src, tgt)
        assert (m_fp32.abs() < 0.25 * _margin(teacher(x), src, tgt).abs()).float().mean() >= 0.75
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in teacher.parameters())


def test_boundary_attack_stops_each_sample_once_flipped():
    model = _Scaled(_Linear(), 10.0).requires_grad_(False).eval()
    x = torch.randn(8, 3, 2, 2, generator=torch.Generator().manual_seed(4))
    src = model(x).argmax(1)
    tgt = (src + 1) % 3
    steps = [boundary_attack(model, x, src, tgt, steps=k, step_size=0.3, clamp=100.0) for k in range(1, 12)]
    for k in range(len(steps) - 1):
        flipped = model(steps[k]).argmax(1) != src
        assert torch.equal(steps[k + 1][flipped], steps[k][flipped])  # a flipped sample never moves again
        assert not torch.equal(steps[k + 1][~flipped], steps[k][~flipped]) or flipped.all()
    assert (model(steps[-1]).argmax(1) != src).all()


def test_amkd_weights_follow_bss():
    method = create_method("amkd", nn.Linear(2, 2), nn.Linear(2, 2), context={"epochs": 80})
    for epoch in (0, 19, 39, 59, 79):
        e = epoch + 1  # BSS counts epochs from 1
        r, r_adv = method.weights(_progress(epoch))
        assert r == pytest.approx(max(3 * (1 - e / 80), 0) + 1)
        assert r_adv == pytest.approx(max(2 * (1 - 4 / 3 * e / 80), 0))


def test_amkd_golden(tiny_net):
    method = create_method(
        "amkd", tiny_net(), tiny_net(seed=1), context={"epochs": 10}, attack_size=3, attack_steps=4, triplet_weight=2.0
    )
    method.eval()
    batch = _negative_batch(n=16)
    zt = method.teacher(batch.input)
    batch.target = zt.argmax(1).detach()  # every sample teacher-correct, so the attack is certain to run
    torch.manual_seed(7)
    out = method(batch, _progress(2))
    r, r_adv = 1 + 3 * (1 - 3 / 10), 2 * (1 - 4 / 3 * 3 / 10)
    zs = method.student(batch.input)
    chosen = select_base_samples(zt, zs, batch.target, 3)
    torch.manual_seed(7)
    targets = sample_attack_targets(zt[chosen])
    x_adv = boundary_attack(method.teacher, batch.input[chosen], batch.target[chosen], targets, 4, 0.3, 2.5)
    zt_a, zs_a, zn = method.teacher(x_adv), method.student(x_adv), method.student(batch.negative[chosen])
    y = batch.target.numpy()
    assert out.losses["ce"].item() == pytest.approx(_np_ce(_np(zs), y), rel=1e-5)
    assert out.losses["kd"].item() == pytest.approx(r * _np_kl(_np(zs), _np(zt), 3.0), rel=1e-4)
    assert out.losses["adv_kd"].item() == pytest.approx(r_adv * _np_kl(_np(zs_a), _np(zt_a), 3.0), rel=1e-4)
    tri = nn.TripletMarginLoss(margin=5.0)(zt_a, zs_a, zn).item()
    assert out.losses["triplet"].item() == pytest.approx(r_adv * 2.0 * tri, rel=1e-5)
    torch.testing.assert_close(out.loss, sum(out.losses.values()))
    late = method(batch, _progress(9))  # r_adv = 0 in the last quarter: no attack, no adversarial terms
    assert late.losses["adv_kd"].item() == 0.0 and late.losses["triplet"].item() == 0.0


# ---------------------------------------------------------------------------------------------- AFT-KD


def test_attention_map_and_block_ends_by_hand():
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])  # [1, 2, 1, 2]: mean_c F² = (5, 2)
    np.testing.assert_allclose(_np(attention_map(f)), [[5 / math.sqrt(29), 2 / math.sqrt(29)]], rtol=1e-6)
    assert block_ends(3, 3) == [0, 1, 2]
    assert block_ends(4, 3) == [1, 2, 3]
    assert block_ends(4, 2) == [1, 3]
    assert block_ends(3, 1) == [2]


def test_dwa_weights_golden():
    last, before = torch.tensor([0.9, 0.5, 2.0]), torch.tensor([1.0, 1.0, 2.5])
    rates = [0.9, 0.5, 0.8]
    e = [math.exp(r / 2.0) for r in rates]
    expected = [3 * v / sum(e) for v in e]
    np.testing.assert_allclose(_np(dwa_weights(last, before, 2.0)), expected, rtol=1e-6)
    assert dwa_weights(last, before, 2.0).sum().item() == pytest.approx(3.0)


def _np_att(f: np.ndarray) -> np.ndarray:
    a = (f**2).mean(axis=1).reshape(len(f), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _np_pool(f: np.ndarray, size: int) -> np.ndarray:
    b, c, h, _ = f.shape
    k = h // size
    return f.reshape(b, c, size, k, size, k).mean(axis=(3, 5))


def _aft_pair():
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", num_classes=5), create_model("resnet14", num_classes=5)
    return student, teacher


@pytest.mark.parametrize("form", ["gate", "concat", "none"])
def test_aft_kd_golden(form):
    student, teacher = _aft_pair()
    method = create_method("aft_kd", student, teacher, afb_form=form, att_weight=1000.0, temperature=4.0)
    method.eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    batch = Batch(x, torch.tensor([0, 2, 4]), torch.arange(3))
    out = method(batch, PROGRESS)
    fs, ft = student.forward_features(x), teacher.forward_features(x)
    att = feat = 0.0
    for j in range(3):
        s, t = _np(fs.feats[j + 1]), _np(ft.feats[j + 1])
        att += float(((_np_att(s) - _np_att(t)) ** 2).mean())
        conv, bn = method.adapters[j]
        proj = _np(bn(conv(fs.feats[j + 1])))
        b, _, h, w = s.shape

        def block(feature: np.ndarray, source: np.ndarray, b=b, h=h, w=w) -> np.ndarray:
            a = _np_att(source).reshape(b, 1, h, w) * math.sqrt(h * w)
            if form == "gate":
                return feature / (1 + np.exp(-a))
            if form == "concat":
                return np.concatenate([feature, a], axis=1)
            return feature

        feat += float(((block(proj, s) - block(t, t)) ** 2).mean())
    kd = 16 * _np_kl(_np(fs.logits), _np(ft.logits), 4.0)
    assert out.losses["att"].item() == pytest.approx(1000 * att, rel=1e-4)
    assert out.losses["feat"].item() == pytest.approx(feat, rel=1e-4)
    assert out.losses["kd"].item() == pytest.approx(kd, rel=1e-4)
    assert out.losses["ce"].item() == pytest.approx(_np_ce(_np(fs.logits), batch.target.numpy()), rel=1e-5)


def test_aft_kd_aligns_blocks_of_different_resolution():
    student, teacher = _aft_pair()
    method = create_method("aft_kd", student, teacher, blocks=1, feat_weight=0.0, kd_weight=0.0)
    assert method.pairs == [(2, 2)] and len(method.adapters) == 0 and method.enabled == ["att"]
    # A block pair at different resolutions is pooled to the smaller one.
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    method.eval()
    method.pairs = [(2, 0)]  # student stage 3 (4×4) against teacher stage 1 (16×16)
    out = method(Batch(x, torch.tensor([0, 1]), torch.arange(2)), PROGRESS)
    s, t = _np(student.forward_features(x).feats[3]), _np_pool(_np(teacher.forward_features(x).feats[1]), 4)
    assert out.losses["att"].item() == pytest.approx(1000 * float(((_np_att(s) - _np_att(t)) ** 2).mean()), rel=1e-4)


def test_aft_kd_adaptive_weights_follow_epoch_means_and_survive_a_checkpoint(tiny_net):
    method = create_method("aft_kd", tiny_net(), tiny_net(seed=1))
    g = torch.Generator().manual_seed(5)
    batches = [Batch(torch.randn(4, 3, 8, 8, generator=g), torch.arange(4), torch.arange(4)) for _ in range(2)]
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.05, momentum=0.9)
    means = []
    for epoch in range(3):
        method.train()
        method.on_epoch_start(epoch)
        if epoch < 2:
            assert torch.equal(method.loss_weights, torch.ones(3))  # w = 1 for the first two epochs
        parts = []
        for batch in batches:
            out = method(batch, _progress(epoch))
            w = method.loss_weights
            parts.append(torch.stack([out.losses[n].detach() / (w[k] * lam) for k, (n, lam) in enumerate(
                [("att", 1000.0), ("feat", 1.0), ("kd", 1.0)])]))  # fmt: skip
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        means.append(torch.stack(parts).mean(0))
        torch.testing.assert_close(method.dwa_sum / method.dwa_count, means[-1])  # the epoch mean of the raw losses
    method.on_epoch_start(3)
    r = (means[2] / means[1]).tolist()
    e = [math.exp(v / 2.0) for v in r]
    np.testing.assert_allclose(_np(method.loss_weights), [3 * v / sum(e) for v in e], rtol=1e-5)
    assert not torch.allclose(method.loss_weights, torch.ones(3))
    # The rate-of-decrease state lives in the method's state dict (the checkpoint), not in the student's.
    state = method.state_dict()
    assert {"dwa_sum", "dwa_count", "dwa_history", "dwa_epochs", "loss_weights"} <= set(state)
    assert any(k.startswith("adapters.") for k in state)
    assert set(method.exports()) == {"student"}
    assert set(method.exports()["student"].state_dict()) == set(tiny_net().state_dict())
    fresh = create_method("aft_kd", tiny_net(), tiny_net(seed=1))
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.loss_weights, method.loss_weights)
    torch.testing.assert_close(fresh.dwa_history, method.dwa_history)


def test_aft_kd_switches(tiny_net):
    student, teacher = _aft_pair()
    fixed = create_method("aft_kd", student, teacher, adaptive=False)
    fixed.dwa_history.copy_(torch.tensor([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]]))
    fixed.dwa_epochs.fill_(2)
    fixed.on_epoch_start(2)
    assert torch.equal(fixed.loss_weights, torch.ones(3))
    kd_only = create_method("aft_kd", *_aft_pair(), att_weight=0.0, feat_weight=0.0)
    out = kd_only(Batch(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), torch.arange(2)), PROGRESS)
    assert set(out.losses) == {"ce", "kd"} and len(kd_only.adapters) == 0
    with pytest.raises(Exception, match="blocks must be in"):
        create_method("aft_kd", *_aft_pair(), blocks=4)


def test_aft_kd_reads_networks_without_feature_api_through_hooks(tiny_net):
    student, teacher = tiny_net(), tiny_net(seed=1)
    method = create_method("aft_kd", student, teacher)
    assert method.read_student.paths == ["body.2", "body.5"] and method.read_student.channels == [8, 16]
    x = torch.randn(2, 3, 8, 8)
    method.eval()
    _, feats = method.read_student(student, x)
    torch.testing.assert_close(feats[0], student.body[:3](x))
    torch.testing.assert_close(feats[1], student.body[:6](x))
    explicit = create_method(
        "aft_kd", tiny_net(), tiny_net(seed=1), student_layers=["body.5"], teacher_layers=["body.5"]
    )
    assert explicit.pairs == [(0, 0)] and explicit.read_teacher.channels == [16]


def test_aft_kd_resume_restores_the_adaptive_weights_exactly(tmp_path, toy_data, tiny_net, monkeypatch):
    import kdforge.engine.loop as loop
    from kdforge.engine.checkpoint import load_checkpoint

    def run(out: str, resume: bool = False) -> None:
        method = create_method("aft_kd", tiny_net(), tiny_net(seed=1))
        fit(method, toy_data, train={"epochs": 3, "progress": False}, optim={"lr": 0.05}, out_dir=tmp_path / out,
            schedule={"name": "constant"}, resume=resume)  # fmt: skip

    run("full")
    real, calls = loop.evaluate, {"n": 0}

    def stop_after_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        run("part")
    monkeypatch.setattr(loop, "evaluate", real)
    assert load_checkpoint(tmp_path / "part" / "last.pt")["epoch"] == 2
    torch.manual_seed(1234)
    run("part", resume=True)  # epoch 3 uses DWA weights from the checkpointed epoch means
    a = load_checkpoint(tmp_path / "full" / "last.pt")["method"]
    b = load_checkpoint(tmp_path / "part" / "last.pt")["method"]
    assert not torch.equal(a["loss_weights"], torch.ones(3))
    for key in a:
        assert torch.equal(a[key], b[key]), key
