"""Detection distillation losses: LD (main and valuable-region terms), PKD, FGD — golden values and references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdforge.losses.detection import ld_kl, ld_loss, ld_vlr_loss, pkd_loss
from kdforge.tasks.detection import DetectionTask
from kdforge.tasks.ops.assign import grid_points, vlr_region

# ---------------------------------------------------------------- LD


def test_ld_kl_hand_computed() -> None:
    # T = 2, teacher logits (0, 2 ln 3) -> softmax of (0, ln 3) = (1/4, 3/4); student uniform (1/2, 1/2)
    t = torch.tensor([[0.0, 2 * math.log(3)]])
    s = torch.zeros(1, 2)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert ld_kl(s, t, temperature=2.0).item() == pytest.approx(4 * kl / 2, rel=1e-6)  # T^2 * mean over 2 bins
    assert ld_kl(t, t, temperature=10.0).item() == pytest.approx(0.0, abs=1e-5)


def test_ld_loss_weights_and_normalisation() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 4, 5, generator=g, requires_grad=True)
    t = torch.randn(3, 4, 5, generator=g, requires_grad=True)
    w = torch.tensor([0.2, 0.5, 0.9])
    got = ld_loss(s, t, w, temperature=10.0)
    # reference: mmdet LDHead -> KnowledgeDistillationKLDivLoss(loss_weight=0.25, T=10), per-edge weights, avg 4
    ps = torch.log_softmax(s.detach() / 10, -1)
    pt = torch.softmax(t.detach() / 10, -1)
    per_edge = (pt * (pt.log() - ps)).mean(-1) * 100
    expected = 0.25 * (per_edge * w[:, None]).sum() / 4
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got.backward()
    assert s.grad is not None and t.grad is None  # the teacher is a fixed target


def test_ld_vlr_loss_only_in_region() -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 6, 4, 3, generator=g)
    t = torch.randn(2, 6, 4, 3, generator=g)
    region = torch.zeros(2, 6)
    region[0, 2], region[1, 5] = 0.4, 0.7
    got = ld_vlr_loss(s, t, region)
    kl = lambda a, b: ld_kl(a.reshape(-1, 3), b.reshape(-1, 3)).sum()  # noqa: E731
    expected = 0.0625 * (0.4 * kl(s[0, 2], t[0, 2]) + 0.7 * kl(s[1, 5], t[1, 5])) / 4
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert ld_vlr_loss(s, t, torch.zeros(2, 6)).item() == 0.0


def _np_vlr(points, strides, counts, gts, topk, scale, alpha):
    """Independent loop version of LD's get_vlr_region (one image)."""
    anchors = np.concatenate([points - strides[:, None] * scale / 2, points + strides[:, None] * scale / 2], 1)

    def iou_diou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
        iou = iw * ih / u
        rho2 = ((a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2) @ ((a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2)
        c2 = (max(a[2], b[2]) - min(a[0], b[0])) ** 2 + (max(a[3], b[3]) - min(a[1], b[1])) ** 2
        return iou, iou - rho2 / c2

    out = np.zeros(len(points))
    for gt in gts:
        d = np.sqrt(((points - (gt[:2] + gt[2:]) / 2) ** 2).sum(1))
        cands, start = [], 0
        for cnt in counts:
            cands += list(start + np.argsort(d[start : start + cnt], kind="stable")[:topk])
            start += cnt
        cious = np.array([iou_diou(anchors[i], gt)[0] for i in cands])
        thr = cious.mean() + cious.std(ddof=1)
        for i in range(len(points)):
            iou, diou = iou_diou(anchors[i], gt)
            if alpha * thr <= diou < thr:
                out[i] = max(out[i], iou)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_vlr_region_matches_reference_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    points, strides, counts = grid_points([(12, 12), (6, 6), (3, 3)], (4, 8, 16))
    xy = rng.uniform(0, 30, size=(2, 3, 2))
    gts = np.concatenate([xy, xy + rng.uniform(8, 30, size=(2, 3, 2))], -1).astype(np.float32)
    valid = np.array([[True, True, False], [True, False, False]])
    got = vlr_region(points, strides, counts, torch.tensor(gts), torch.tensor(valid), topk=9, anchor_scale=4.0)
    for i in range(2):
        ref = _np_vlr(points.double().numpy(), strides.double().numpy(), counts, gts[i][valid[i]].astype(float), 9,
                      4.0, 0.25)  # fmt: skip
        np.testing.assert_allclose(got[i].numpy(), ref, atol=1e-5)
        assert (ref > 0).sum() > 0


def test_task_valuable_region_shape() -> None:
    task = DetectionTask(num_classes=3, reg_max=4)
    cls = [torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 2, 2)]
    reg = [torch.zeros(1, 20, 8, 8), torch.zeros(1, 20, 4, 4), torch.zeros(1, 20, 2, 2)]
    targets = {"boxes": torch.tensor([[[4.0, 4.0, 20.0, 28.0]]]), "labels": torch.tensor([[1]])}
    region = task.valuable_region((cls, reg), targets)
    assert region.shape == (1, 84) and (region > 0).any() and (region <= 1).all()
    none = {"boxes": targets["boxes"], "labels": torch.tensor([[-1]])}
    assert (task.valuable_region((cls, reg), none) == 0).all()


# ---------------------------------------------------------------- PKD


def test_pkd_equals_pearson_form() -> None:
    g = torch.Generator().manual_seed(2)
    s = [torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 2, 2, generator=g)]
    t = [torch.randn(2, 3, 4, 4, generator=g) + 0.5 * s[0], torch.randn(2, 3, 2, 2, generator=g) - s[1]]
    got = pkd_loss(s, t, loss_weight=6.0)
    expected = 0.0
    for a, b in zip(s, t, strict=True):
        n = a.numel() // a.shape[1]
        xa = a.transpose(0, 1).reshape(3, -1).numpy()
        xb = b.transpose(0, 1).reshape(3, -1).numpy()
        r = np.array([np.corrcoef(xa[c], xb[c])[0, 1] for c in range(3)])
        expected += (n - 1) / n * (1 - r).mean()
    assert got.item() == pytest.approx(6.0 * expected, rel=1e-4)
    same = pkd_loss([s[0]], [s[0] * 3 + 1])  # correlation 1 after per-channel standardisation
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_pkd_resizes_and_checks_channels() -> None:
    s = torch.randn(1, 2, 4, 4, requires_grad=True)
    t = torch.randn(1, 2, 8, 8)
    loss = pkd_loss([s], [t])
    loss.backward()
    assert torch.isfinite(loss) and s.grad is not None
    with pytest.raises(ValueError, match="equal channel counts"):
        pkd_loss([torch.randn(1, 2, 4, 4)], [torch.randn(1, 3, 4, 4)])
