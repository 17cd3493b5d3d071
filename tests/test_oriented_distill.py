"""Distillation on the oriented task: Rotated-LD's and oriented DKD's losses against independent numpy computations,
Rotated-LD's regions against a numpy transcription of the reference's loops, and the methods' limit cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdforge.errors import ConfigError
from kdforge.losses.logit import dkd_loss
from kdforge.losses.oriented import decoupled_kd_rows, imitation_loss, rotated_kd_loss, rotated_ld_loss
from kdforge.methods import create_method
from kdforge.methods.base import Progress
from kdforge.registry import TASKS
from kdforge.tasks.oriented import unrotated_boxes

NUM_CLASSES = 3


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl_mean_bins(s: np.ndarray, t: np.ndarray, temp: float) -> np.ndarray:
    """mmdet ``knowledge_distillation_kl_div_loss``: ``T² · mean_bins p_t (log p_t − log p_s)``."""
    pt, ps = _softmax(t / temp), _softmax(s / temp)
    return (pt * (np.log(pt) - np.log(ps))).mean(-1) * temp * temp


# ---------------------------------------------------------------------------------------------- DKD rows


def test_decoupled_kd_rows_match_dkd_and_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g) * 2
    y = torch.tensor([0, 4, 2, 2, 1, 3])
    rows = decoupled_kd_rows(s, t, y, alpha=0.7, beta=3.0, temperature=2.0)
    # the batch mean is kdforge's mdistiller-exact dkd_loss
    assert rows.mean().item() == pytest.approx(dkd_loss(s, t, y, 0.7, 3.0, 2.0).item(), rel=1e-5)
    ps, pt = _softmax(s.double().numpy() / 2), _softmax(t.double().numpy() / 2)
    for i, k in enumerate(y.tolist()):
        bs, bt = np.array([ps[i, k], 1 - ps[i, k]]), np.array([pt[i, k], 1 - pt[i, k]])
        tckd = (bt * np.log(bt / bs)).sum()
        rest = [j for j in range(5) if j != k]
        qs, qt = ps[i, rest] / ps[i, rest].sum(), pt[i, rest] / pt[i, rest].sum()
        nckd = (qt * np.log(qt / qs)).sum()
        assert rows[i].item() == pytest.approx((0.7 * tckd + 3.0 * nckd) * 4, rel=1e-4)
    assert torch.allclose(decoupled_kd_rows(s, s, y), torch.zeros(6), atol=1e-6)


# ---------------------------------------------------------------------------------------------- Rotated-LD losses


def test_rotated_ld_and_kd_losses_normalise_per_level_like_the_reference():
    g = torch.Generator().manual_seed(1)
    b, npl = 2, [6, 3]
    n = sum(npl)
    edges_s, edges_t = torch.randn(b, n, 4, 9, generator=g), torch.randn(b, n, 4, 9, generator=g)
    ang_s, ang_t = torch.randn(b, n, 1, 7, generator=g), torch.randn(b, n, 1, 7, generator=g)
    cls_s, cls_t = torch.randn(b, n, NUM_CLASSES, generator=g), torch.randn(b, n, NUM_CLASSES, generator=g)
    region = torch.rand(b, n, generator=g) * (torch.rand(b, n, generator=g) > 0.5)
    region[:, 6:] = 0.0  # a level without any region point: its count is clamped to 1, its loss is 0
    region[0, 7] = 0.4
    ld = rotated_ld_loss([edges_s, ang_s], [edges_t, ang_t], region, npl, temperature=5.0, loss_weight=10.0)
    kd = rotated_kd_loss(cls_s, cls_t, region, npl, temperature=5.0, loss_weight=20.0)

    r = region.double().numpy()
    kl = _kl_mean_bins(edges_s.double().numpy(), edges_t.double().numpy(), 5.0).sum(-1)
    kl = kl + _kl_mean_bins(ang_s.double().numpy(), ang_t.double().numpy(), 5.0).sum(-1)
    kl_cls = _kl_mean_bins(cls_s.double().numpy(), cls_t.double().numpy(), 5.0)
    want_ld = want_kd = 0.0
    for lo, hi in ((0, 6), (6, 9)):
        count = max(1, int((r[:, lo:hi] > 0).sum()))
        want_ld += (kl[:, lo:hi] * r[:, lo:hi]).sum() / count
        want_kd += (kl_cls[:, lo:hi] * r[:, lo:hi]).sum() / count
    assert ld.item() == pytest.approx(10.0 * want_ld, rel=1e-5)
    assert kd.item() == pytest.approx(20.0 * want_kd, rel=1e-5)


def test_imitation_loss_is_the_mean_squared_error_of_the_selected_vectors():
    g = torch.Generator().manual_seed(2)
    s = [torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 2, 2, generator=g)]
    t = [torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 2, 2, generator=g)]
    masks = [torch.rand(2, 9, generator=g) > 0.5, torch.zeros(2, 4, dtype=torch.bool)]
    got = imitation_loss(s, t, masks, loss_weight=2.0)
    sv = s[0].permute(0, 2, 3, 1).reshape(-1, 4).double().numpy()
    tv = t[0].permute(0, 2, 3, 1).reshape(-1, 4).double().numpy()
    keep = masks[0].reshape(-1).numpy()
    assert got.item() == pytest.approx(2.0 * ((sv[keep] - tv[keep]) ** 2).mean(), rel=1e-5)
    with pytest.raises(ValueError, match="one shape"):
        imitation_loss([s[0]], [t[1]], [masks[0]])


# ---------------------------------------------------------------------------------------------- Rotated-LD regions


def _task():
    return TASKS.get("oriented_detection")(num_classes=NUM_CLASSES, reg_max=8, angle_bins=8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _reference_regions(points, strides, npl, rboxes, valid, anchor_scale, topk=9, alpha=0.25):
    """``get_ld_region`` and ``get_im_region(mode='finegrained')`` of Zzh-tju/Rotated-LD, one image, as loops."""
    n = len(points)
    anchors = np.concatenate(
        [points - strides[:, None] * anchor_scale / 2, points + strides[:, None] * anchor_scale / 2], 1
    )
    gts = [g for g, v in zip(rboxes, valid, strict=True) if v]
    ld = np.zeros(n)
    im = np.zeros(n, dtype=bool)
    if not gts:
        return ld, im
    unrot = [np.array([g[0] - g[2] / 2, g[1] - g[3] / 2, g[0] + g[2] / 2, g[1] + g[3] / 2]) for g in gts]
    ious = np.array([[_iou(a, u) for u in unrot] for a in anchors])  # [N, G]
    best = np.full(n, -np.inf)
    for j, g in enumerate(gts):
        dist = np.sqrt(((points - g[:2]) ** 2).sum(1))
        cand, start = [], 0
        for count in npl:
            order = np.argsort(dist[start : start + count], kind="stable")[: min(topk, count)]
            cand += list(order + start)
            start += count
        c = ious[cand, j]
        thr = c.mean() + c.std(ddof=1)
        pos = ious[:, j] >= alpha * thr
        best = np.where(pos, np.maximum(best, ious[:, j]), best)
        im |= ious[:, j] > 0.5 * ious[:, j].max()
    ld = np.where(np.isfinite(best), best, 0.0)
    return ld, im


def test_ld_and_imitation_regions_match_the_reference_loops():
    task = _task()
    torch.manual_seed(0)
    model = task.build_model("ogfl_resnet8")
    flat = task.flatten(model(torch.randn(2, 3, 64, 64)))
    targets = {
        "rboxes": torch.tensor(
            [
                [[20.0, 22.0, 30.0, 10.0, 0.3], [44.0, 40.0, 40.0, 14.0, -1.2], [0.0, 0.0, 0.0, 0.0, 0.0]],
                [[30.0, 30.0, 50.0, 16.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]],
            ]
        ),
        "labels": torch.tensor([[1, 2, -1], [0, -1, -1]]),
    }
    ld = task.ld_region(flat, targets)
    im = task.imitation_region(flat, targets)
    pts, strides = flat.points.double().numpy(), flat.strides.double().numpy()
    for i in range(2):
        want_ld, want_im = _reference_regions(
            pts, strides, flat.num_per_level, targets["rboxes"][i].double().numpy(),
            (targets["labels"][i] >= 0).numpy(), task.anchor_scale,
        )  # fmt: skip
        assert np.allclose(ld[i].double().numpy(), want_ld, atol=1e-5)
        assert np.array_equal(im[i].numpy(), want_im)
        assert (want_ld > 0).sum() > 10 and want_im.sum() > 0
    # the angle is dropped, as the reference's region functions do
    assert torch.equal(
        unrotated_boxes(torch.tensor([10.0, 20.0, 8.0, 4.0, 1.0])), torch.tensor([6.0, 18.0, 14.0, 22.0])
    )


# ---------------------------------------------------------------------------------------------- methods


def _pair(name: str, same: bool, **params):
    task = _task()
    torch.manual_seed(0)
    student = task.build_model("ogfl_resnet8")
    if same:
        teacher = task.build_model("ogfl_resnet8")
        teacher.load_state_dict(student.state_dict())
    else:
        teacher = task.build_model("ogfl_resnet20")
    context = {"num_classes": NUM_CLASSES, "num_train": 8, "epochs": 2, "steps_per_epoch": 1}
    return create_method(name, student, teacher, context=context, task=task, **params)


def _batch():
    from kdforge.data.batch import Batch

    g = torch.Generator().manual_seed(5)
    rboxes = torch.tensor([[[20.0, 22.0, 30.0, 10.0, 0.3], [44.0, 40.0, 48.0, 20.0, -1.2]]]).repeat(2, 1, 1)
    targets = {"rboxes": rboxes, "labels": torch.tensor([[1, 2], [0, 1]]), "image_id": torch.arange(2)}
    return Batch(
        torch.randn(2, 3, 64, 64, generator=g), torch.zeros(2, dtype=torch.long), torch.arange(2), targets=targets
    )


@pytest.mark.parametrize("name", ["rotated_ld", "oriented_dkd"])
def test_a_teacher_equal_to_the_student_adds_nothing(name):
    method = _pair(name, same=True, **({"warmup_epochs": 0.0} if name == "oriented_dkd" else {}))
    method.student.eval()  # the frozen teacher runs in eval mode: the same BatchNorm statistics for both
    out = method(_batch(), Progress(epoch=3, step=0, epoch_float=3.0, fraction=0.5))
    kd_parts = {k: v for k, v in out.losses.items() if not k.startswith("loss_")}
    assert set(kd_parts) == ({"ld", "ld_kd", "ld_im"} if name == "rotated_ld" else {"dkd_cls", "dkd_loc"})
    assert all(abs(v.item()) < 1e-5 for v in kd_parts.values()), kd_parts


def test_distillation_terms_are_positive_with_another_teacher_and_dkd_warms_up():
    method = _pair("oriented_dkd", same=False, warmup_epochs=4.0)
    batch = _batch()
    early = method(batch, Progress(epoch=0, step=0, epoch_float=0.0, fraction=0.0)).losses
    late = method(batch, Progress(epoch=5, step=0, epoch_float=5.0, fraction=0.5)).losses
    for key in ("dkd_cls", "dkd_loc"):
        assert late[key].item() > 0 and early[key].item() == pytest.approx(late[key].item() / 4, rel=1e-5)
    ld = _pair("rotated_ld", same=False)
    assert len(ld.adapters) == 3  # resnet8's 32-wide FPN mapped to resnet20's 48
    parts = ld(batch, Progress(epoch=0, step=0, epoch_float=0.0, fraction=0.0)).losses
    assert all(parts[k].item() > 0 for k in ("ld", "ld_kd", "ld_im"))
    assert len(_pair("rotated_ld", same=False, im_weight=0.0).adapters) == 0


def test_bad_parameters_fail_with_one_line():
    with pytest.raises(ConfigError, match="method 'rotated_ld': need temperature > 0"):
        _pair("rotated_ld", same=False, temperature=0.0)
    with pytest.raises(ConfigError, match="must be >= 0"):
        _pair("oriented_dkd", same=False, loc_beta=-1.0)
