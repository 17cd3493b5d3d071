"""Classification reports against independent numpy computations of scikit-learn's definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdforge.ops.classification_metrics import (
    confusion_matrix,
    per_class_scores,
    roc_curve,
    topk_correct,
)


def _np_prf(y: np.ndarray, p: np.ndarray, k: int):
    prec, rec, f1, sup = [], [], [], []
    for c in range(k):
        tp = np.sum((y == c) & (p == c))
        fp = np.sum((y != c) & (p == c))
        fn = np.sum((y == c) & (p != c))
        pr = tp / (tp + fp) if tp + fp else 0.0
        rc = tp / (tp + fn) if tp + fn else 0.0
        prec.append(pr)
        rec.append(rc)
        f1.append(2 * pr * rc / (pr + rc) if pr + rc else 0.0)
        sup.append(int(np.sum(y == c)))
    return np.array(prec), np.array(rec), np.array(f1), np.array(sup)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_and_per_class_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 5
    y = rng.integers(0, k, 300)
    p = np.where(rng.random(300) < 0.6, y, rng.integers(0, k, 300))
    p[p == 3] = 0  # class 3 never predicted: precision 0 by convention
    cm = confusion_matrix(torch.from_numpy(p), torch.from_numpy(y), k)
    expected = np.zeros((k, k), dtype=np.int64)
    for t, q in zip(y, p, strict=True):
        expected[t, q] += 1
    np.testing.assert_array_equal(cm.numpy(), expected)
    scores = per_class_scores(cm)
    pr, rc, f1, sup = _np_prf(y, p, k)
    np.testing.assert_allclose(scores.precision.numpy(), pr)
    np.testing.assert_allclose(scores.recall.numpy(), rc)
    np.testing.assert_allclose(scores.f1.numpy(), f1)
    np.testing.assert_array_equal(scores.support.numpy(), sup)
    assert scores.precision[3] == 0 and scores.f1[3] == 0
    assert scores.macro_f1 == pytest.approx(f1.mean())
    assert scores.weighted_f1 == pytest.approx((f1 * sup).sum() / sup.sum())


def test_confusion_matrices_of_two_shards_add_up() -> None:
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 4, (101,), generator=g)
    p = torch.randint(0, 4, (101,), generator=g)
    whole = confusion_matrix(p, y, 4)
    assert torch.equal(confusion_matrix(p[:50], y[:50], 4) + confusion_matrix(p[50:], y[50:], 4), whole)


def test_topk_correct() -> None:
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.04, 0.06], [0.2, 0.3, 0.5]])
    target = torch.tensor([2, 1, 0])
    got = topk_correct(logits, target, ks=(1, 2, 5))
    assert got[1].item() == 0  # argmaxes 1, 0, 2
    assert got[2].item() == 1  # only sample 0 has its class in the top two
    assert got[5].item() == 3  # k beyond C counts everything


def _np_auc(scores: np.ndarray, y: np.ndarray) -> float:
    pos, neg = scores[y], scores[~y]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_roc_curve_and_auc_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.random(200) < 0.4
    scores = np.round(rng.random(200) + 0.3 * y, 1)  # rounding makes many ties
    curve = roc_curve(torch.from_numpy(scores), torch.from_numpy(y))
    distinct = np.sort(np.unique(scores))[::-1]
    np.testing.assert_allclose(curve.thresholds.numpy()[1:], distinct)
    assert curve.thresholds[0] == float("inf")
    for i, t in enumerate(distinct, start=1):
        pred = scores >= t
        assert curve.tpr[i].item() == pytest.approx((pred & y).sum() / y.sum())
        assert curve.fpr[i].item() == pytest.approx((pred & ~y).sum() / (~y).sum())
    assert curve.auc == pytest.approx(_np_auc(scores, y), abs=1e-12)


def test_roc_limits() -> None:
    perfect = roc_curve(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([True, True, False, False]))
    assert perfect.auc == pytest.approx(1.0)
    inverted = roc_curve(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([True, True, False, False]))
    assert inverted.auc == pytest.approx(0.0)
    constant = roc_curve(torch.full((6,), 0.5), torch.tensor([True, False] * 3))
    assert constant.auc == pytest.approx(0.5)
