"""Detection distillation losses: LD (main and valuable-region terms), PKD, FGD — golden values and references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdforge.losses.detection import ld_kl, ld_loss, ld_vlr_loss, pkd_loss
from kdforge.ops.assign import grid_points, vlr_region
from kdforge.tasks.detection import DetectionTask

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


# ---------------------------------------------------------------- FGD


def _ref_masks(gt_boxes, image_size, h, w):
    """mmrazor FGDLoss.forward's mask loop: python slicing per box, max of 1 / (rows * cols)."""
    n = len(gt_boxes)
    fg = torch.zeros(n, h, w)
    bg = torch.ones(n, h, w)
    for i in range(n):
        b = gt_boxes[i]
        wmin = torch.floor(b[:, 0] / image_size[1] * w).int()
        wmax = torch.ceil(b[:, 2] / image_size[1] * w).int()
        hmin = torch.floor(b[:, 1] / image_size[0] * h).int()
        hmax = torch.ceil(b[:, 3] / image_size[0] * h).int()
        area = 1.0 / (hmax + 1 - hmin) / (wmax + 1 - wmin)
        for j in range(len(b)):
            sl = fg[i][hmin[j] : hmax[j] + 1, wmin[j] : wmax[j] + 1]
            fg[i][hmin[j] : hmax[j] + 1, wmin[j] : wmax[j] + 1] = torch.maximum(sl, area[j])
        bg[i] = torch.where(fg[i] > 0, 0.0, 1.0)
        if bg[i].sum():
            bg[i] /= bg[i].sum()
    return fg, bg


def test_fgd_masks_match_reference_loop_and_hand_case() -> None:
    from kdforge.losses.detection import fgd_masks

    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0], [40.0, 8.0, 64.0, 30.0]]), torch.tensor([[10.0, 50.0, 63.0, 64.0]])]
    padded = torch.zeros(2, 2, 4)
    padded[0], padded[1, :1] = boxes[0], boxes[1]
    valid = torch.tensor([[True, True], [True, False]])
    fg, bg = fgd_masks(padded, valid, (64, 64), (8, 8))
    rfg, rbg = _ref_masks(boxes, (64, 64), 8, 8)
    torch.testing.assert_close(fg, rfg)
    torch.testing.assert_close(bg, rbg)
    # by hand: box (0, 0, 16, 16) on an 8x8 map of a 64x64 image covers rows/cols 0..2 -> 9 cells of 1/9
    assert fg[0, :3, :3].eq(1 / 9).all() and fg[0, 3, 0] == 0
    e_fg, e_bg = fgd_masks(torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.bool), (64, 64), (4, 4))
    assert (e_fg == 0).all() and e_bg.sum().item() == pytest.approx(1.0)


def _ref_fgd(mod, s, t, fg, bg):
    """mmrazor FGDLoss.get_fea_loss / get_mask_loss / get_rela_loss written out with its sqrt-weighted products."""
    mse = torch.nn.MSELoss(reduction="sum")
    n, c, h, w = t.shape

    def att(x):
        v = x.abs()
        sp = (h * w * torch.softmax((v.mean(1, keepdim=True) / 0.5).view(n, -1), dim=1)).view(n, h, w)
        ch = c * torch.softmax(v.mean(2).mean(2) / 0.5, dim=1)
        return sp, ch

    sp_t, ch_t = att(t)
    sp_s, ch_s = att(s)
    ft = t * torch.sqrt(sp_t[:, None]) * torch.sqrt(ch_t[:, :, None, None])
    fs = s * torch.sqrt(sp_t[:, None]) * torch.sqrt(ch_t[:, :, None, None])
    l_fg = mse(fs * torch.sqrt(fg[:, None]), ft * torch.sqrt(fg[:, None])) / n
    l_bg = mse(fs * torch.sqrt(bg[:, None]), ft * torch.sqrt(bg[:, None])) / n
    l_mask = torch.sum(torch.abs(ch_s - ch_t)) / n + torch.sum(torch.abs(sp_s - sp_t)) / n

    def pool(x, conv):
        m = torch.softmax(conv(x).view(n, 1, h * w), dim=2).unsqueeze(-1)
        return torch.matmul(x.view(n, c, h * w).unsqueeze(1), m).view(n, c, 1, 1)

    out_s = s + mod.channel_add_conv_s(pool(s, mod.conv_mask_s))
    out_t = t + mod.channel_add_conv_t(pool(t, mod.conv_mask_t))
    l_rela = mse(out_s, out_t) / n
    return 0.001 * l_fg + 0.0005 * l_bg + 0.001 * l_mask + 0.000005 * l_rela


def test_fgd_loss_matches_reference_structure() -> None:
    from kdforge.losses.detection import FGDLoss

    torch.manual_seed(0)
    mod = FGDLoss(8)
    for seq in (mod.channel_add_conv_s, mod.channel_add_conv_t):  # non-zero last convs so L_rela sees the context
        torch.nn.init.normal_(seq[-1].weight)
    s, t = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    boxes = torch.tensor([[[0.0, 0.0, 20.0, 30.0]], [[30.0, 10.0, 47.0, 47.0]]])
    valid = torch.ones(2, 1, dtype=torch.bool)
    got = mod(s, t, boxes, valid, (48, 48))
    fg, bg = _ref_masks([boxes[0], boxes[1]], (48, 48), 6, 6)
    expected = _ref_fgd(mod, s, t, fg, bg)
    assert sum(got.values()).item() == pytest.approx(expected.item(), rel=1e-5)
    assert all(v.item() > 0 for v in got.values())


def test_fgd_aligns_student_channels_and_trains_its_modules() -> None:
    from kdforge.losses.detection import FGDLoss

    mod = FGDLoss(16, student_channels=8)
    s = torch.randn(2, 8, 4, 4, requires_grad=True)
    out = mod(
        s,
        torch.randn(2, 16, 4, 4),
        torch.tensor([[[0.0, 0.0, 8.0, 8.0]]] * 2),
        torch.ones(2, 1, dtype=torch.bool),
        (16, 16),
    )
    sum(out.values()).backward()
    assert s.grad is not None and mod.align is not None and mod.align.weight.grad is not None
    assert mod.conv_mask_t.weight.grad is None or torch.isfinite(mod.conv_mask_t.weight.grad).all()
    assert mod.channel_add_conv_t[-1].weight.grad is not None  # the teacher-side context is trained too
