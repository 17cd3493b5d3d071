"""Golden and property tests of the logit family: DKD, logit standardization, α-divergence, CCD, DML, ATF, bilateral.

Reference values are computed here with numpy from the papers' formulas, independently of kdforge's code.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from kdforge.data.batch import Batch
from kdforge.losses import (
    adaptive_alpha_divergence,
    alpha_divergence,
    ccd_soft_loss,
    dkd_loss,
    kd_loss,
    layer_norm_logits,
    standardize_logits,
)
from kdforge.methods import Progress, create_method

PROGRESS = Progress(epoch=0, step=0, epoch_float=0.0, fraction=0.0)


def _np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(axis=1)


def _logits(seed: int, b: int = 6, c: int = 10, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g, dtype=torch.float64).float() * scale


# ---------------------------------------------------------------- KD and DKD


def test_kd_zero_for_equal_logits_and_tau_squared_scaling():
    z = _logits(0)
    assert kd_loss(z, z, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    zs, zt = _logits(1), _logits(2)
    for tau in (1.0, 2.0, 4.0):
        ps, pt = _np_softmax(zs.double().numpy() / tau), _np_softmax(zt.double().numpy() / tau)
        assert kd_loss(zs, zt, tau).item() == pytest.approx(tau**2 * _np_kl(pt, ps).mean(), rel=1e-4)


def _np_dkd(zs, zt, y, alpha, beta, tau):
    """mdistiller's DKD written out with numpy: TCKD on [p_t, 1 - p_t], NCKD on the renormalized non-targets."""
    ps, pt = _np_softmax(zs / tau), _np_softmax(zt / tau)
    idx = np.arange(len(y))
    bs = np.stack([ps[idx, y], 1 - ps[idx, y]], axis=1)
    bt = np.stack([pt[idx, y], 1 - pt[idx, y]], axis=1)
    tckd = _np_kl(bt, bs).mean()
    mask = np.ones_like(zs, dtype=bool)
    mask[idx, y] = False
    nckd = []
    for i in range(len(y)):
        qs, qt = ps[i][mask[i]], pt[i][mask[i]]
        nckd.append(_np_kl((qt / qt.sum())[None], (qs / qs.sum())[None])[0])
    return (alpha * tckd + beta * np.mean(nckd)) * tau**2


def test_dkd_golden_value():
    zs, zt = _logits(3), _logits(4, scale=3.0)
    y = torch.tensor([0, 3, 9, 2, 2, 7])
    expected = _np_dkd(zs.double().numpy(), zt.double().numpy(), y.numpy(), 1.0, 8.0, 4.0)
    assert dkd_loss(zs, zt, y, 1.0, 8.0, 4.0).item() == pytest.approx(expected, rel=1e-4)


def test_dkd_decomposition_recovers_kd():
    # KD = TCKD + (1 − p_t^T)·NCKD per sample, so α = 1, β = 1 − p_t^T gives KD exactly (batch of one).
    for seed in range(5):
        zs, zt = _logits(10 + seed, b=1), _logits(20 + seed, b=1, scale=3.0)
        y = torch.tensor([seed % 10])
        p_t = torch.softmax(zt / 4.0, dim=1)[0, y].item()
        assert dkd_loss(zs, zt, y, 1.0, 1.0 - p_t, 4.0).item() == pytest.approx(kd_loss(zs, zt, 4.0).item(), rel=1e-4)


def test_dkd_zero_for_equal_logits_and_finite_for_certain_student():
    z = _logits(5)
    y = torch.arange(6)
    assert dkd_loss(z, z, y).item() == pytest.approx(0.0, abs=1e-5)
    certain = torch.full((2, 10), -50.0)
    certain[:, 0] = 50.0  # p_t rounds to exactly 1 in float32
    loss = dkd_loss(certain.requires_grad_(), _logits(6, b=2), torch.tensor([0, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(certain.grad).all()


# ---------------------------------------------------------------- normalized logits


def test_standardize_logits_golden():
    z = _logits(7)
    zn = z.double().numpy()
    expected = (zn - zn.mean(axis=1, keepdims=True)) / (zn.std(axis=1, ddof=1, keepdims=True) + 1e-7)
    np.testing.assert_allclose(standardize_logits(z).numpy(), expected, rtol=1e-5, atol=1e-5)
    # Invariant to a per-sample shift and positive scale: only the shape of the logits matters.
    np.testing.assert_allclose(standardize_logits(3 * z + 5).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_layer_norm_logits_is_scaled_zscore():
    z = _logits(8)
    c = z.shape[1]
    ratio = math.pi * math.sqrt(c / (c - 1))  # population vs unbiased std
    torch.testing.assert_close(layer_norm_logits(z), standardize_logits(z) * ratio, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- α-divergence


def _np_alpha(p, q, a):
    return (q * ((p / q) ** a - 1)).sum(axis=1) / (a * (a - 1))


@pytest.mark.parametrize("alpha", [-1.0, 0.5, 2.0, 0.3])
def test_alpha_divergence_golden_and_exact_gradient(alpha):
    zt, zs = _logits(9), _logits(10).requires_grad_()
    p, q = _np_softmax(zt.double().numpy()), _np_softmax(zs.detach().double().numpy())
    d = alpha_divergence(zt, zs, alpha)
    np.testing.assert_allclose(d.detach().numpy(), _np_alpha(p, q, alpha), rtol=1e-4, atol=1e-6)
    # Without clipping AlphaNet's surrogate has the exact gradient of D_α.
    (g,) = torch.autograd.grad(d.sum(), zs)
    zs64 = zs.detach().double().requires_grad_()
    q64 = zs64.softmax(dim=1)
    exact = (q64 * ((torch.from_numpy(p) / q64) ** alpha - 1)).sum(dim=1) / (alpha * (alpha - 1))
    (g_exact,) = torch.autograd.grad(exact.sum(), zs64)
    np.testing.assert_allclose(g.numpy(), g_exact.numpy(), rtol=1e-3, atol=1e-6)


def test_alpha_divergence_limits():
    zt, zs = _logits(11), _logits(12)
    p, q = _np_softmax(zt.double().numpy()), _np_softmax(zs.double().numpy())
    forward_kl, reverse_kl = _np_kl(p, q), _np_kl(q, p)
    # The closed form at α = 1 ± 1e-3 and 1e-3 approaches KL(p‖q) and KL(q‖p) (numpy, no kdforge special case) ...
    np.testing.assert_allclose(_np_alpha(p, q, 1 + 1e-3), forward_kl, rtol=1e-2)
    np.testing.assert_allclose(_np_alpha(p, q, 1 - 1e-3), forward_kl, rtol=1e-2)
    np.testing.assert_allclose(_np_alpha(p, q, 1e-3), reverse_kl, rtol=1e-2)
    # ... and kdforge's limits equal the KLs.
    np.testing.assert_allclose(alpha_divergence(zt, zs, 1.0).numpy(), forward_kl, rtol=1e-4)
    np.testing.assert_allclose(alpha_divergence(zt, zs, 0.0).numpy(), reverse_kl, rtol=1e-4)
    np.testing.assert_allclose(alpha_divergence(zt, zs, 1.0 + 1e-2).numpy(), forward_kl, rtol=5e-2)
    assert alpha_divergence(zs, zs, 0.5).abs().max().item() < 1e-6


def test_adaptive_alpha_picks_the_larger_side_per_sample():
    zt, zs = _logits(13, scale=3.0), _logits(14).requires_grad_()
    p, q = _np_softmax(zt.double().numpy()), _np_softmax(zs.detach().double().numpy())
    lo = np.minimum(q / p, 5.0)  # α = −1: importance weight (p/q)^−1 clamped at 5 as in AlphaNet
    d_lo = (q * (lo - 1)).sum(axis=1) / 2.0
    d_hi = _np_kl(p, q)  # α = +1 branch (unclipped)
    d = adaptive_alpha_divergence(zt, zs, -1.0, 1.0, 1.0, 5.0)
    np.testing.assert_allclose(d.detach().numpy(), np.maximum(d_lo, d_hi), rtol=1e-4, atol=1e-6)
    d.sum().backward()
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0


def test_alpha_divergence_with_extreme_logits_is_finite():
    zt = torch.tensor([[80.0, -80.0, 0.0]])
    zs = torch.tensor([[-80.0, 80.0, 0.0]], requires_grad=True)
    for a in (-1.0, 0.5, 2.0):
        d = alpha_divergence(zt, zs, a, iw_clip=5.0)
        d.sum().backward()
        assert torch.isfinite(d).all() and torch.isfinite(zs.grad).all()


# ---------------------------------------------------------------- CCD


def test_ccd_identical_views_weight_two():
    zt_o, zs_o = _logits(15), _logits(16)
    zt = torch.stack([zt_o, zt_o], dim=1).flatten(0, 1)  # identical original/augmented views
    zs = torch.stack([zs_o, zs_o], dim=1).flatten(0, 1)
    k = kd_loss(zs_o, zt_o, 4.0) / 16.0
    # L_orig = K, L_aug = mean(2·KL) = 2K → (K + 2K)/2.
    assert ccd_soft_loss(zs, zt, 4.0).item() == pytest.approx(1.5 * k.item(), rel=1e-5)


def test_ccd_golden_weights():
    zt, zs = _logits(17, b=8), _logits(18, b=8)
    t, s = zt.double().numpy(), zs.double().numpy()
    cos = (t[0::2] * t[1::2]).sum(1) / (np.linalg.norm(t[0::2], axis=1) * np.linalg.norm(t[1::2], axis=1))
    kl = _np_kl(_np_softmax(t / 4), _np_softmax(s / 4))
    expected = (kl[0::2].mean() + ((cos + 1) * kl[1::2]).mean()) / 2
    assert ccd_soft_loss(zs, zt, 4.0).item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- methods


def _batch(n: int = 8, views: int = 0) -> Batch:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, 8, 8, generator=g)
    extra = tuple(x.clone() for _ in range(views))
    return Batch(x, torch.randint(0, 4, (n,), generator=g), torch.arange(n), extra)


def test_ccd_method_on_identical_views(tiny_net):
    method = create_method("ccd", tiny_net(seed=0), tiny_net(seed=1), ce_ratio=0.5, kd_weight=2.0)
    method.eval()
    batch = _batch(views=1)
    out = method(batch, PROGRESS)
    zs, zt = method.student(batch.input), method.teacher(batch.input)
    # CE on duplicated labels equals CE on the originals; soft term = 1.5·KL with identical views.
    expected_kd = 2.0 * 0.5 * 1.5 * kd_loss(zs, zt, 4.0)
    torch.testing.assert_close(out.losses["kd"], expected_kd, rtol=1e-5, atol=1e-6)
    assert out.logits.shape == (16, 4)


def test_dual_view_method_without_views_fails(tiny_net):
    method = create_method("kd_jda", tiny_net(seed=0), tiny_net(seed=1))
    with pytest.raises(ValueError, match="data.views=jda"):
        method(_batch(), PROGRESS)


def test_dkd_warmup(tiny_net):
    method = create_method("dkd", tiny_net(seed=0), tiny_net(seed=1), warmup_epochs=4.0)
    method.eval()
    parts = [method(_batch(), Progress(e, 0, float(e), 0.0)).losses["dkd"].item() for e in (0, 1, 3, 9)]
    assert parts[1] == pytest.approx(2 * parts[0], rel=1e-5)
    assert parts[2] == pytest.approx(4 * parts[0], rel=1e-5)
    assert parts[3] == pytest.approx(parts[2], rel=1e-5)


def test_ls_kd_is_kd_on_standardized_logits(tiny_net):
    method = create_method("ls_kd", tiny_net(seed=0), tiny_net(seed=1))
    method.eval()
    batch = _batch()
    out = method(batch, PROGRESS)
    zs, zt = method.student(batch.input), method.teacher(batch.input)
    expected = 9.0 * kd_loss(standardize_logits(zs), standardize_logits(zt), 2.0)
    torch.testing.assert_close(out.losses["kd"], expected)


@pytest.mark.parametrize("norm", ["zscore", "layernorm"])
@pytest.mark.parametrize("divergence", ["adaptive", "fixed"])
def test_atf_with_frozen_teacher_and_no_reverse_equals_normalized_alpha_kd(tiny_net, norm, divergence):
    params = {"logit_norm": norm, "divergence": divergence, "temperature": 4.0, "alpha": 0.5}
    weights = {"ce_weight": 1.0, "kd_weight": 1.0}  # alpha_kd's defaults
    atf = create_method(
        "atf", tiny_net(seed=0), tiny_net(seed=1), teacher_stop=0.0, reverse_weight=0.0, **params, **weights
    )
    ref = create_method("alpha_kd", tiny_net(seed=0), tiny_net(seed=1), **params)
    atf.eval()
    ref.eval()
    batch = _batch()
    out, expected = atf(batch, PROGRESS), ref(batch, PROGRESS)
    torch.testing.assert_close(out.loss, expected.loss)
    assert set(out.losses) == {"ce", "kd"}


def _train(method, steps: int = 3, views: int = 0, fraction: float = 0.0):
    opt = torch.optim.SGD([{"params": g["params"]} for g in method.param_groups()], lr=0.2, momentum=0.9)
    method.train()
    for i in range(steps):
        out = method(_batch(views=views), Progress(0, i, 0.0, fraction))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()


@pytest.mark.parametrize("name", ["atf", "bilateral"])
def test_teacher_changes_only_in_modes_that_train_it(tiny_net, name):
    teacher = tiny_net(seed=1)
    pretrained = copy.deepcopy(teacher.state_dict())
    method = create_method(name, tiny_net(seed=0), teacher, teacher_bn="eval")
    _train(method)
    tuned = method.tuned_teacher.state_dict()
    assert any(not torch.equal(pretrained[k], tuned[k]) for k in pretrained), "the tuned teacher did not move"
    for k, v in method.teacher.state_dict().items():  # the frozen original stays bit-identical
        assert torch.equal(v, pretrained[k])
    # BN policy "eval": running statistics of the tuned teacher never move.
    for k in pretrained:
        if "running" in k:
            assert torch.equal(tuned[k], pretrained[k])
    assert set(method.exports()) == {"student", "teacher"}
    assert set(method.evaluators()) == {"teacher"}

    stopped = create_method(name, tiny_net(seed=0), tiny_net(seed=1), teacher_stop=0.5)
    _train(stopped, fraction=0.6)  # past teacher_stop: the teacher no longer learns
    for k, v in stopped.tuned_teacher.state_dict().items():
        assert torch.equal(v, pretrained[k])


def test_atf_teacher_param_group_and_bn_train_policy(tiny_net):
    method = create_method("atf", tiny_net(seed=0), tiny_net(seed=1), teacher_lr_scale=0.25, teacher_bn="train")
    groups = {g["name"]: g for g in method.param_groups()}
    assert groups["teacher"]["lr_scale"] == 0.25
    assert len(groups["teacher"]["params"]) == len(list(method.tuned_teacher.parameters()))
    student_ids = {id(p) for p in method.student.parameters()}
    assert student_ids == {id(p) for p in groups["student"]["params"]}
    before = copy.deepcopy(method.tuned_teacher.state_dict())
    _train(method, steps=1)
    after = method.tuned_teacher.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "running_mean" in k)


def test_atf_anchor_modes(tiny_net):
    for anchor in ("kl", "l2"):
        method = create_method("atf", tiny_net(seed=0), tiny_net(seed=1), anchor=anchor, teacher_bn="eval")
        method.train()
        out = method(_batch(), PROGRESS)
        # At the first step the tuned teacher equals the pretrained one (BN in eval mode for both): anchors ~0.
        assert out.losses["anchor"].item() == pytest.approx(0.0, abs=1e-5)
    method = create_method("atf", tiny_net(seed=0), tiny_net(seed=1), anchor="l2", anchor_weight=1.0)
    with torch.no_grad():
        for p in method.tuned_teacher.parameters():
            p.add_(0.1)
    n = sum(p.numel() for p in method.tuned_teacher.parameters())
    assert method.anchor_l2().item() == pytest.approx(0.01 * n, rel=1e-4)


def test_atf_confidence_weighted_reverse_term(tiny_net):
    method = create_method(
        "atf",
        tiny_net(seed=0),
        tiny_net(seed=1),
        divergence="fixed",
        alpha=1.0,
        reverse_mode="confidence",
        logit_norm="layernorm",
        temperature=4.0,
    )
    method.eval()
    batch = _batch()
    out = method(batch, PROGRESS)
    zs, zt = method.student(batch.input), method.tuned_teacher(batch.input)
    ns, nt = layer_norm_logits(zs).double().detach().numpy(), layer_norm_logits(zt).double().detach().numpy()
    ps, pt = _np_softmax(ns / 4.0), _np_softmax(nt / 4.0)
    conf = _np_softmax(zs.double().detach().numpy())[np.arange(8), batch.target.numpy()]
    expected = 16.0 * (conf * _np_kl(ps, pt)).mean()  # τ²·mean_b p_s(y_b)·KL(p̃_s ‖ p̃_t)
    assert out.losses["rev"].item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("update", ["simultaneous", "alternating"])
def test_dml_peers_learn_and_ensemble(tiny_net, update):
    method = create_method("dml", tiny_net(seed=0), None, context={"num_classes": 4}, update=update)
    assert method.substeps == (2 if update == "alternating" else 1)
    peer = method.peers[0]
    assert not torch.equal(peer.fc.weight, method.student.fc.weight)  # the copy is re-initialised
    batch = _batch()
    if update == "alternating":
        # Substep k back-propagates into peer k only.
        out = method(batch, Progress(0, 0, 0.0, 0.0, substep=1))
        out.loss.backward()
        assert all(p.grad is None for p in method.student.parameters())
        assert all(p.grad is not None for p in peer.parameters())
    before = copy.deepcopy(peer.state_dict())
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    method.train()
    for sub in range(method.substeps):
        out = method(batch, Progress(0, 0, 0.0, 0.0, substep=sub))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    assert any(not torch.equal(before[k], v) for k, v in peer.state_dict().items())
    evals = method.evaluators()
    assert set(evals) == {"peer1", "ensemble"}
    method.eval()
    with torch.no_grad():
        ens = evals["ensemble"](batch.input).exp()
        mean = (method.student(batch.input).softmax(1) + peer(batch.input).softmax(1)) / 2
    torch.testing.assert_close(ens, mean)
    assert set(method.exports()) == {"student", "peer1"}


def test_dml_simultaneous_loss_golden(tiny_net):
    method = create_method("dml", tiny_net(seed=0), None, context={"num_classes": 4}, temperature=1.0)
    method.eval()
    batch = _batch()
    out = method(batch, PROGRESS)
    z0 = method.student(batch.input).double().detach().numpy()
    z1 = method.peers[0](batch.input).double().detach().numpy()
    p0, p1 = _np_softmax(z0), _np_softmax(z1)
    y = batch.target.numpy()
    ce = -np.log(p0[np.arange(8), y]).mean() - np.log(p1[np.arange(8), y]).mean()
    kl = _np_kl(p1, p0).mean() + _np_kl(p0, p1).mean()
    assert out.losses["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out.losses["kl"].item() == pytest.approx(kl, rel=1e-4)


def test_dml_rejects_a_teacher(tiny_net):
    from kdforge.errors import ConfigError

    with pytest.raises(ConfigError, match="trains without a teacher"):
        create_method("dml", tiny_net(seed=0), tiny_net(seed=1))


def test_atf_shadow_variant_trains_head_and_student_only():
    from kdforge.models import create_model

    torch.manual_seed(0)
    teacher, student = create_model("resnet8", num_classes=10), create_model("resnet8", num_classes=10)
    pretrained = copy.deepcopy(teacher.state_dict())
    method = create_method("atf", student, teacher, variant="shadow")
    assert method.tuned_teacher is None and not method.trains_teacher
    g = torch.Generator().manual_seed(1)
    batch = Batch(torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3]), torch.arange(4))
    method.train()
    out = method(batch, PROGRESS)
    assert set(out.losses) == {"ce", "kd", "t_ce", "rev", "anchor"}
    out.loss.backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing and any(n.startswith("shadow.") for n, _ in method.named_parameters())
    opt = torch.optim.SGD(method.parameters(), lr=0.1)
    opt.step()
    for k, v in method.teacher.state_dict().items():
        assert torch.equal(v, pretrained[k])
    assert set(method.exports()) == {"student"}


def test_atf_shadow_needs_stage_features(tiny_net):
    from kdforge.errors import ConfigError

    with pytest.raises(ConfigError, match="variant=shadow needs a kdforge teacher"):
        create_method("atf", tiny_net(seed=0), tiny_net(seed=1), variant="shadow")
