"""Golden and property tests of the feature, relation and contrastive baselines: FitNets, AT, RKD, CRD.

Reference values are computed here with numpy from the papers' formulas as the reference code (RepDistiller,
mdistiller) writes them, independently of kdforge's code.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from kdforge.adapters import ConvReg
from kdforge.data.batch import Batch
from kdforge.errors import ConfigError
from kdforge.losses.feature import (
    at_loss,
    attention_map,
    crd_nce_loss,
    hint_loss,
    info_nce_loss,
    pairwise_distances,
    rkd_angle_loss,
    rkd_distance_loss,
)
from kdforge.methods import Progress, create_method
from kdforge.models import create_model
from kdforge.models.features import feature_layout, read_features

PROGRESS = Progress(epoch=0, step=0, epoch_float=0.0, fraction=0.0)


def _t(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float() * scale


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _huber(a: np.ndarray, b: np.ndarray) -> float:
    d = np.abs(a - b)
    return float(np.where(d < 1.0, 0.5 * d**2, d - 0.5).mean())


def _cifar_batch(n: int = 4, classes: int = 10, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    return Batch(x, torch.randint(0, classes, (n,), generator=g), torch.arange(n) * 3)


def _zoo(name: str, seed: int, classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=classes)


# ---------------------------------------------------------------------------------------------------- FitNets


def test_hint_loss_golden_and_zero_for_identical_maps():
    a, b = _t(0, 2, 3, 4, 4), _t(1, 2, 3, 4, 4)
    assert hint_loss(a, b).item() == pytest.approx(((_np(a) - _np(b)) ** 2).mean(), rel=1e-5)
    assert hint_loss(a, a.clone()).item() == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        hint_loss(a, _t(2, 2, 3, 2, 2))


@pytest.mark.parametrize(
    ("s_stride", "t_stride", "s_size", "t_size", "kind"),
    [(2, 2, 8, 8, "Conv2d"), (1, 2, 8, 4, "Conv2d"), (4, 2, 4, 8, "ConvTranspose2d")],
)
def test_convreg_maps_student_shape_onto_teacher_shape(s_stride, t_stride, s_size, t_size, kind):
    reg = ConvReg(6, 10, s_stride, t_stride)
    assert type(reg.conv).__name__ == kind
    assert reg.conv.kernel_size == {(2, 2): (1, 1), (1, 2): (3, 3), (4, 2): (4, 4)}[(s_stride, t_stride)]
    out = reg(_t(0, 3, 6, s_size, s_size), (t_size, t_size))
    assert out.shape == (3, 10, t_size, t_size) and (out >= 0).all()  # ends with ReLU
    with pytest.raises(ValueError, match="differ by more than a factor 2"):
        ConvReg(6, 10, 1, 4)


def test_fitnet_regressor_planned_from_feature_info_across_channels_and_strides():
    # resnet32x4 -> ShuffleV1, hint layer 2: teacher 128 ch at stride 2 (16×16), student 480 ch at stride 4 (8×8).
    method = create_method("fitnet", _zoo("ShuffleV1", 0), _zoo("resnet32x4", 1))
    assert (method.layer_s, method.layer_t) == (2, 2)
    conv = method.regressor.conv
    assert isinstance(conv, torch.nn.ConvTranspose2d) and (conv.in_channels, conv.out_channels) == (480, 128)
    method = create_method("fitnet", _zoo("resnet8", 0), _zoo("resnet8x4", 1), hint_layer=3)
    assert (method.regressor.conv.in_channels, method.regressor.conv.out_channels) == (64, 256)
    with pytest.raises(ConfigError, match="hint_layer 7 is out of range"):
        create_method("fitnet", _zoo("resnet8", 0), _zoo("resnet8", 1), hint_layer=7)


def test_fitnet_step_equals_ce_plus_weighted_mse_of_the_regressed_hint():
    method = create_method("fitnet", _zoo("resnet8", 0), _zoo("resnet8x4", 1), hint_weight=7.0, ce_weight=0.5)
    method.eval()  # deterministic BN for the reference computation
    batch = _cifar_batch()
    out = method(batch, PROGRESS)
    fs = method.student.forward_features(batch.input)
    ft = method.teacher.forward_features(batch.input)
    guided = method.regressor(fs.feats[2])
    assert guided.shape == ft.feats[2].shape == (4, 128, 16, 16)
    expected = 7.0 * ((_np(guided) - _np(ft.feats[2])) ** 2).mean()
    assert out.losses["hint"].item() == pytest.approx(expected, rel=1e-5)
    ce = torch.nn.functional.cross_entropy(fs.logits, batch.target)
    torch.testing.assert_close(out.losses["ce"], 0.5 * ce)
    torch.testing.assert_close(out.loss, out.losses["ce"] + out.losses["hint"])


def test_fitnet_hint_is_zero_when_the_regressed_student_equals_the_teacher():
    student = _zoo("resnet8", 0)
    method = create_method("fitnet", student, copy.deepcopy(student), use_relu=False)
    with torch.no_grad():  # make r the identity: 1×1 conv = I, BN in eval with unit statistics
        conv = method.regressor.conv
        conv.weight.copy_(torch.eye(conv.out_channels)[:, :, None, None])
        conv.bias.zero_()
    method.eval()
    assert method(_cifar_batch(), PROGRESS).losses["hint"].item() == pytest.approx(0.0, abs=1e-5)


# ----------------------------------------------------------------------------------------- attention transfer


def _np_at(f: np.ndarray, p: float = 2.0) -> np.ndarray:
    a = (f**p).mean(axis=1).reshape(f.shape[0], -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _np_pool(f: np.ndarray, size: int) -> np.ndarray:
    b, c, h, _ = f.shape
    k = h // size
    return f.reshape(b, c, size, k, size, k).mean(axis=(3, 5))


def test_attention_map_golden():
    f = _t(0, 2, 3, 4, 4)
    a = attention_map(f)
    np.testing.assert_allclose(_np(a), _np_at(_np(f)), rtol=1e-5)
    np.testing.assert_allclose(a.norm(dim=1).numpy(), 1.0, rtol=1e-6)


def test_at_loss_golden_across_channels_and_spatial_sizes():
    fs, ft = _t(1, 2, 3, 8, 8), _t(2, 2, 5, 4, 4)  # student larger and with fewer channels
    expected = ((_np_at(_np_pool(_np(fs), 4)) - _np_at(_np(ft))) ** 2).mean()
    assert at_loss(fs, ft).item() == pytest.approx(expected, rel=1e-5)
    # The other way round: the teacher map is the larger one and is pooled.
    expected = ((_np_at(_np(ft)) - _np_at(_np_pool(_np(fs), 4))) ** 2).mean()
    assert at_loss(ft, fs).item() == pytest.approx(expected, rel=1e-5)
    # p = 3 keeps the sign of the activations.
    expected = ((_np_at(_np(fs), 3.0) - _np_at(_np(fs + 0.5), 3.0)) ** 2).mean()
    assert at_loss(fs, fs + 0.5, p=3.0).item() == pytest.approx(expected, rel=1e-5)


def test_at_is_zero_for_identical_or_rescaled_maps():
    f = _t(3, 2, 4, 6, 6)
    assert at_loss(f, f.clone()).item() == 0.0
    # Normalization removes the scale of the map and the number of channels averaged.
    assert at_loss(f, 3.0 * f).item() == pytest.approx(0.0, abs=1e-12)
    assert at_loss(f, torch.cat([f, f], dim=1)).item() == pytest.approx(0.0, abs=1e-12)


def test_at_method_sums_stage_pairs_with_pooling_across_mismatched_networks():
    # MobileNetV2 stages are at strides 2/4/8/16, resnet8's at 1/2/4: every pair is pooled to the student's size,
    # and the student's fourth stage has no partner (pairs stop at the shorter network, as the reference's zip).
    method = create_method("at", _zoo("MobileNetV2", 0), _zoo("resnet8", 1), at_weight=10.0)
    method.eval()
    batch = _cifar_batch(n=2)
    out = method(batch, PROGRESS)
    fs = method.student.forward_features(batch.input).feats
    ft = method.teacher.forward_features(batch.input).feats
    assert (len(fs), len(ft)) == (5, 4)
    expected = 0.0
    for s, t in zip(fs[1:4], ft[1:], strict=True):
        s_np, t_np = _np(s), _np(t)
        assert s_np.shape[-1] * 2 == t_np.shape[-1]
        expected += ((_np_at(s_np) - _np_at(_np_pool(t_np, s_np.shape[-1]))) ** 2).mean()
    assert out.losses["at"].item() == pytest.approx(10.0 * expected, rel=1e-5)


def test_at_stage_selection_and_identical_networks_give_zero():
    student = _zoo("resnet8", 0)
    method = create_method("at", student, copy.deepcopy(student), stages=[-1])
    method.eval()
    assert method(_cifar_batch(), PROGRESS).losses["at"].item() == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ConfigError, match="p must be positive"):
        create_method("at", _zoo("resnet8", 0), _zoo("resnet8", 1), p=0.0)
    bad = create_method("at", _zoo("resnet8", 0), _zoo("resnet8", 1), stages=[9])
    with pytest.raises(ValueError, match="AT stage 9 is out of range"):
        bad(_cifar_batch(), PROGRESS)


# ------------------------------------------------------------------------------------------------------ RKD


def _np_pdist(e: np.ndarray) -> np.ndarray:
    n = len(e)
    return np.array([[np.linalg.norm(e[i] - e[j]) if i != j else 0.0 for j in range(n)] for i in range(n)])


def _np_rkd_distance(s: np.ndarray, t: np.ndarray) -> float:
    ds, dt = _np_pdist(s), _np_pdist(t)
    return _huber(ds / ds[ds > 0].mean(), dt / dt[dt > 0].mean())


def _np_angles(e: np.ndarray) -> np.ndarray:
    n = len(e)
    out = np.zeros((n, n, n))
    for i in range(n):
        for j in range(n):
            for k in range(n):
                a, b = e[j] - e[i], e[k] - e[i]
                na, nb = np.linalg.norm(a), np.linalg.norm(b)
                if na > 0 and nb > 0:
                    out[i, j, k] = a @ b / (na * nb)
    return out


def test_pairwise_distances_golden():
    e = _t(0, 5, 3)
    np.testing.assert_allclose(_np(pairwise_distances(e)), _np_pdist(_np(e)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_np(pairwise_distances(e, squared=True)), _np_pdist(_np(e)) ** 2, rtol=1e-5, atol=1e-5)


def test_rkd_distance_and_angle_golden():
    s, t = _t(1, 6, 4), _t(2, 6, 7, scale=3.0)  # different widths, as student and teacher embeddings have
    assert rkd_distance_loss(s, t).item() == pytest.approx(_np_rkd_distance(_np(s), _np(t)), rel=1e-5)
    assert rkd_angle_loss(s, t).item() == pytest.approx(_huber(_np_angles(_np(s)), _np_angles(_np(t))), rel=1e-5)


def test_rkd_is_zero_for_identical_and_similar_embeddings():
    s = _t(3, 6, 5)
    assert rkd_distance_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-7)
    assert rkd_angle_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-7)
    # Both terms are invariant to scale and translation of the teacher's embedding space.
    assert rkd_distance_loss(s, 4.0 * s + 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert rkd_angle_loss(s, 4.0 * s + 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_rkd_method_weights_and_teacher_without_gradient():
    method = create_method("rkd", _zoo("resnet8", 0), _zoo("resnet8x4", 1), distance_weight=2.0, angle_weight=3.0)
    method.eval()
    batch = _cifar_batch(n=5)
    out = method(batch, PROGRESS)
    s = _np(method.student.forward_features(batch.input).pooled)
    t = _np(method.teacher.forward_features(batch.input).pooled)
    assert s.shape == (5, 64) and t.shape == (5, 256)
    assert out.losses["rkd_dist"].item() == pytest.approx(2.0 * _np_rkd_distance(s, t), rel=1e-4)
    assert out.losses["rkd_angle"].item() == pytest.approx(3.0 * _huber(_np_angles(s), _np_angles(t)), rel=1e-4)
    torch.testing.assert_close(out.loss, out.losses["ce"] + out.losses["rkd_dist"] + out.losses["rkd_angle"])


# ------------------------------------------------------------------------------------------------------ CRD


def _np_nce(h: np.ndarray, n_data: int, eps: float = 1e-7) -> float:
    k_pn = (h.shape[1] - 1) / n_data
    pos = np.log(h[:, 0] / (h[:, 0] + k_pn + eps))
    neg = np.log(k_pn / (h[:, 1:] + k_pn + eps))
    return float(-(pos.sum() + neg.sum()) / h.shape[0])


def test_crd_nce_and_info_nce_golden():
    scores = _t(0, 3, 6).abs() * 1e-3
    assert crd_nce_loss(scores, 50).item() == pytest.approx(_np_nce(_np(scores), 50), rel=1e-5)
    logits = _t(1, 3, 6, scale=4.0)
    z = _np(logits)
    expected = -(z[:, 0] - np.log(np.exp(z).sum(axis=1))).mean()
    assert info_nce_loss(logits).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="K >= 1"):
        crd_nce_loss(scores[:, :1], 50)


def _crd(tiny_net, n: int = 40, **params):
    return create_method("crd", tiny_net(seed=0), tiny_net(seed=1), context={"num_train": n}, **params)


def _small_batch(n: int = 8, n_data: int = 40, classes: int = 4, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return Batch(x, torch.randint(0, classes, (n,), generator=g), torch.randperm(n_data, generator=g)[:n])


def test_crd_step_golden_with_z_from_the_first_batch(tiny_net, monkeypatch):
    method = _crd(tiny_net, nce_k=5, temperature=0.5, crd_weight=0.8)
    method.eval()
    batch = _small_batch()
    contrast = torch.randint(0, 40, (8, 6), generator=torch.Generator().manual_seed(9))
    contrast[:, 0] = batch.index
    monkeypatch.setattr(method, "sample_contrast", lambda index, target: contrast)
    bank_s, bank_t = _np(method.bank_s.clone()), _np(method.bank_t.clone())
    out = method(batch, PROGRESS)

    with torch.no_grad():
        v_s = _np(method.embed_s(read_features(method.student, batch.input).pooled))
        v_t = _np(method.embed_t(read_features(method.teacher, batch.input).pooled))
    c = contrast.numpy()
    exp_s = np.exp(np.einsum("bkd,bd->bk", bank_t[c], v_s) / 0.5)  # student anchors against the teacher bank
    exp_t = np.exp(np.einsum("bkd,bd->bk", bank_s[c], v_t) / 0.5)  # teacher anchors against the student bank
    z_s, z_t = exp_s.mean() * 40, exp_t.mean() * 40
    expected = 0.8 * (_np_nce(exp_s / z_s, 40) + _np_nce(exp_t / z_t, 40))
    assert out.losses["crd"].item() == pytest.approx(expected, rel=1e-4)
    np.testing.assert_allclose(_np(method.nce_z), [z_s, z_t], rtol=1e-4)

    # Z stays fixed after the first batch, as in the reference.
    method(_small_batch(seed=1), PROGRESS)
    np.testing.assert_allclose(_np(method.nce_z), [z_s, z_t], rtol=1e-4)


def test_crd_softmax_objective_golden(tiny_net, monkeypatch):
    method = _crd(tiny_net, nce_k=3, temperature=0.2, crd_weight=1.0, objective="softmax")
    method.eval()
    batch = _small_batch()
    contrast = torch.stack([batch.index, (batch.index + 1) % 40, (batch.index + 2) % 40, (batch.index + 5) % 40], 1)
    monkeypatch.setattr(method, "sample_contrast", lambda index, target: contrast)
    bank_s, bank_t = _np(method.bank_s.clone()), _np(method.bank_t.clone())
    out = method(batch, PROGRESS)
    with torch.no_grad():
        v_s = _np(method.embed_s(read_features(method.student, batch.input).pooled))
        v_t = _np(method.embed_t(read_features(method.teacher, batch.input).pooled))

    def ce0(z):
        return -(z[:, 0] - np.log(np.exp(z).sum(axis=1))).mean()

    c = contrast.numpy()
    expected = ce0(np.einsum("bkd,bd->bk", bank_t[c], v_s) / 0.2) + ce0(np.einsum("bkd,bd->bk", bank_s[c], v_t) / 0.2)
    assert out.losses["crd"].item() == pytest.approx(expected, rel=1e-4)


def test_crd_bank_update_is_momentum_then_l2_normalized(tiny_net):
    method = _crd(tiny_net, nce_k=4, momentum=0.5)
    method.eval()
    batch = _small_batch()
    before_s, before_t = method.bank_s.clone(), method.bank_t.clone()
    # Reference init: uniform in ±1/sqrt(D/3).
    assert before_s.abs().max() <= 1 / np.sqrt(128 / 3) and before_s.shape == (40, 128)
    method(batch, PROGRESS)
    with torch.no_grad():
        v_s = method.embed_s(read_features(method.student, batch.input).pooled)
        v_t = method.embed_t(read_features(method.teacher, batch.input).pooled)
    for bank, before, v in ((method.bank_s, before_s, v_s), (method.bank_t, before_t, v_t)):
        row = 0.5 * _np(before[batch.index]) + 0.5 * _np(v)
        np.testing.assert_allclose(_np(bank[batch.index]), row / np.linalg.norm(row, axis=1, keepdims=True), rtol=1e-5)
        np.testing.assert_allclose(bank[batch.index].norm(dim=1).numpy(), 1.0, rtol=1e-6)
        untouched = torch.ones(40, dtype=torch.bool)
        untouched[batch.index] = False
        assert torch.equal(bank[untouched], before[untouched])
    assert torch.equal(method.bank_label[batch.index], batch.target)


def test_crd_uniform_negatives_never_hit_the_positive_and_cover_the_rest(tiny_net):
    method = _crd(tiny_net, n=10, nce_k=400, negatives="uniform")
    index, target = torch.tensor([0, 3, 9]), torch.tensor([1, 1, 2])
    contrast = method.sample_contrast(index, target)
    assert contrast.shape == (3, 401) and torch.equal(contrast[:, 0], index)
    for row, pos in zip(contrast, index, strict=True):
        negs = row[1:]
        assert not (negs == pos).any()
        assert set(negs.tolist()) == set(range(10)) - {pos.item()}  # 400 draws over 9 values hit each


def test_crd_other_class_negatives_and_relax_positives(tiny_net):
    method = _crd(tiny_net, n=12, nce_k=300, mode="relax")
    labels = torch.arange(12) % 3
    method.sample_contrast(torch.arange(12), labels)  # an epoch's worth: every label is known now
    index = torch.tensor([0, 4, 8, 1])
    contrast = method.sample_contrast(index, labels[index])
    for row, y, own in zip(contrast, labels[index], index, strict=True):
        assert labels[row[0]] == y  # relax: a random sample of the same class
        assert (labels[row[1:]] != y).all()  # negatives: other classes only
        assert set(row[1:].tolist()) == {i for i in range(12) if labels[i] != y}
        assert own not in row[1:]
    positives = {method.sample_contrast(index[:1], labels[:1])[0, 0].item() for _ in range(40)}
    assert positives == {0, 3, 6, 9}


def test_crd_sampling_is_seeded(tiny_net):
    torch.manual_seed(5)
    a = _crd(tiny_net, nce_k=16)
    torch.manual_seed(5)
    b = _crd(tiny_net, nce_k=16)
    batch = _small_batch()
    assert torch.equal(a.bank_s, b.bank_s)
    assert torch.equal(a.sample_contrast(batch.index, batch.target), b.sample_contrast(batch.index, batch.target))


def test_crd_state_round_trip_restores_banks_z_and_sampler(tiny_net):
    method = _crd(tiny_net, nce_k=8)
    method.train()
    for seed in range(2):
        method(_small_batch(seed=seed), PROGRESS)
    state = copy.deepcopy(method.state_dict())
    extra = copy.deepcopy(method.extra_state())
    assert {"bank_s", "bank_t", "bank_label", "nce_z"} <= set(state)
    assert not any(k.startswith(("student.regressor", "student.embed")) for k in state)
    assert not any("embed" in k or "bank" in k for k in method.exports()["student"].state_dict())

    restored = _crd(tiny_net, nce_k=8)  # a fresh method: other banks, other sampler seed
    assert not torch.equal(restored.bank_s, method.bank_s)
    restored.load_state_dict(state)
    restored.load_extra_state(extra)
    for key in ("bank_s", "bank_t", "bank_label", "nce_z"):
        assert torch.equal(getattr(restored, key), getattr(method, key)), key
    batch = _small_batch(seed=7)
    assert torch.equal(
        restored.sample_contrast(batch.index, batch.target), method.sample_contrast(batch.index, batch.target)
    )


def test_crd_bad_hyper_parameters(tiny_net):
    for params, message in (
        ({"momentum": 1.0}, "momentum must be in"),
        ({"temperature": 0.0}, "temperature must be positive"),
        ({"nce_k": 0}, "nce_k must be >= 1"),
    ):
        with pytest.raises(ConfigError, match=message):
            _crd(tiny_net, **params)
    with pytest.raises(ConfigError, match="method.mode must be one of"):
        _crd(tiny_net, mode="approx")


# ---------------------------------------------------------------------------------- all four, on zoo models


@pytest.mark.parametrize("name", ["fitnet", "at", "rkd", "crd"])
def test_step_reaches_student_and_adapters_and_keeps_the_teacher_frozen(name):
    params = {"nce_k": 16} if name == "crd" else {}
    method = create_method(
        name, _zoo("resnet8", 0), _zoo("resnet8x4", 1), context={"num_train": 32, "num_classes": 10}, **params
    )
    teacher_before = copy.deepcopy(method.teacher.state_dict())
    opt = torch.optim.SGD(method.trainable_parameters(), lr=0.1, momentum=0.9)
    method.train()
    batch = _cifar_batch(n=6)
    out = method(batch, PROGRESS)
    assert set(out.losses) == {"fitnet": {"ce", "hint"}, "at": {"ce", "at"}, "rkd": {"ce", "rkd_dist", "rkd_angle"},
                               "crd": {"ce", "crd"}}[name]  # fmt: skip
    opt.zero_grad()
    out.loss.backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient reaches {missing}"
    owned = {n.split(".")[0] for n, _ in method.named_parameters()} - {"student"}
    assert owned == {"fitnet": {"regressor"}, "crd": {"embed_s", "embed_t"}}.get(name, set())
    opt.step()
    assert not method.teacher.training
    for key, value in method.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), f"teacher {key} changed"


def test_feature_layout_of_a_network_without_the_feature_api(tiny_net):
    net = tiny_net()
    layout = feature_layout(net)
    assert [(f.channels, f.stride) for f in layout] == [(8, 1), (16, 2)]
    assert net.training  # the probe ran in eval mode and restored the mode
    feats = read_features(net, torch.randn(2, 3, 8, 8))
    assert [tuple(f.shape) for f in feats.feats] == [(2, 8, 8, 8), (2, 16, 4, 4)] and feats.pooled.shape == (2, 16)
    assert not net._forward_hooks and not net.fc._forward_pre_hooks  # hooks removed


def test_crd_gets_every_training_label_from_the_engine(tmp_path):
    """``build_run`` hands CRD the labels of all training samples, so other-class negatives are exact at step 1."""
    from kdforge.api import build_run
    from kdforge.config import config_from_dict
    from kdforge.engine.checkpoint import save_checkpoint
    from kdforge.models import create_model

    save_checkpoint(create_model("resnet8", num_classes=10).state_dict(), tmp_path / "t.pt")
    cfg = config_from_dict(
        {
            "model": {"name": "resnet8"},
            "teacher": {"name": "resnet8", "checkpoint": str(tmp_path / "t.pt")},
            "method": {"name": "crd", "nce_k": 16},
            "data": {"name": "embedded", "train_subset": 100, "test_subset": 20, "batch_size": 10},
        }
    )
    method, data = build_run(cfg, "distill", torch.device("cpu"))
    assert torch.equal(method.bank_label, data.train_targets)
    assert sorted(torch.bincount(data.train_targets).tolist()) == [10] * 10  # a balanced subset, every label known
    batch = next(iter(data.train))
    assert torch.equal(data.train_targets[batch.index], batch.target.cpu())  # indexed like Batch.index
    contrast = method.sample_contrast(batch.index, batch.target)
    assert (method.bank_label[contrast[:, 1:]] != batch.target[:, None]).all()
