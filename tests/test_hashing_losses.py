"""Hashing losses (CIBHash, code KD, BRCD) against independent numpy computations, limit cases and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdforge.losses.hashing import (
    BRCDCriterion,
    bernoulli_kl,
    brcd_loss,
    choose_num_clusters,
    cibhash_loss,
    cluster_bit_mask,
    code_matching_loss,
    contrastive_code_kd,
    hash_codes_ste,
    kmeans,
    nearest_center,
    nt_xent,
    silhouette_score,
    symmetric_bernoulli_kl,
)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-8)
    nb = np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-8)
    return (a / na) @ (b / nb).T


def _ce_first(logits: np.ndarray) -> np.ndarray:
    m = logits.max(1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(1))
    return lse - logits[:, 0]


def _np_pair_mask(b: int) -> np.ndarray:
    """The reference's ``mask_correlated_samples``: everything but the diagonal and the (k, k±B) pairs."""
    n = 2 * b
    mask = np.ones((n, n), dtype=bool)
    np.fill_diagonal(mask, False)
    for i in range(b):
        mask[i, b + i] = mask[b + i, i] = False
    return mask


def _np_nt_xent(zi: np.ndarray, zj: np.ndarray, tau: float) -> float:
    b = zi.shape[0]
    n = 2 * b
    z = np.concatenate([zi, zj])
    sim = _cos(z, z) / tau
    pos = np.concatenate([np.diag(sim, b), np.diag(sim, -b)])[:, None]
    neg = sim[_np_pair_mask(b)].reshape(n, -1)
    return float(_ce_first(np.concatenate([pos, neg], 1)).sum() / n)


def _np_brcd(zi, ti, tj, alpha, tau, cluster=None, aug=None, mask_rows=None, false_neg=False, false_pos=False):
    """hly1998/BRCD ``forward`` + ``BRCDLoss.forward`` transcribed step by step in numpy."""
    b = zi.shape[0]
    n = 2 * b
    alpha_vec = np.full(n, alpha)
    fn = None
    z_re = None
    if false_neg:
        t = (np.abs(cluster[:, None] - cluster[None, :]) == 0).astype(float)
        fn = np.tile(t, (2, 2)) * -1000
    if mask_rows is not None:
        z_re = zi * mask_rows
        tj = tj * mask_rows
    if false_pos:
        ii = np.abs(cluster[:, None] - cluster[None, :])
        ij = np.abs(cluster[:, None] - aug[None, :])
        t = np.concatenate([np.concatenate([ii, ij], 1), np.concatenate([ii, ij], 1)], 0)
        fn = (1 - np.where(t > 0, 1, t)) * -1000.0
        for k, c in enumerate(np.diag(ij)):
            if c != 0:
                alpha_vec[k] = alpha_vec[k + b] = 1
    z = np.concatenate([z_re if z_re is not None else zi, tj])
    sim = _cos(z, z) / tau
    anchor = np.diag(_cos(zi, ti)) / tau
    anchor = np.concatenate([anchor, anchor])
    pos = np.concatenate([np.diag(sim, b), np.diag(sim, -b)])
    pos = (alpha_vec * anchor + (1 - alpha_vec) * pos)[:, None]
    mask = _np_pair_mask(b)
    neg = sim[mask].reshape(n, -1)
    if fn is not None:
        neg = neg + fn[mask].reshape(n, -1)
    return float(_ce_first(np.concatenate([pos, neg], 1)).sum() / n)


def _signs(rng, shape):
    return rng.choice([-1.0, 1.0], size=shape)


def test_ste_forward_is_sign_and_backward_is_identity_through_sigmoid():
    h = torch.tensor([[-2.0, -0.1, 0.3, 4.0]], requires_grad=True)
    prob, z = hash_codes_ste(h)
    assert z.tolist() == [[-1.0, -1.0, 1.0, 1.0]]
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    (z * w).sum().backward()
    s = torch.sigmoid(h.detach())
    torch.testing.assert_close(h.grad, w * s * (1 - s))
    assert torch.equal(prob, torch.sigmoid(h.detach()))


@pytest.mark.parametrize("tau", [0.3, 1.0])
def test_nt_xent_matches_reference_construction(tau):
    rng = np.random.default_rng(0)
    zi, zj = rng.normal(size=(6, 16)), rng.normal(size=(6, 16))
    got = nt_xent(torch.from_numpy(zi), torch.from_numpy(zj), tau)
    assert float(got) == pytest.approx(_np_nt_xent(zi, zj, tau), rel=1e-5)


def test_symmetric_bernoulli_kl_matches_numpy_and_detaches_the_reference():
    rng = np.random.default_rng(1)
    p, q = rng.uniform(0.01, 0.99, (4, 8)), rng.uniform(0.01, 0.99, (4, 8))

    def kl(a, c):
        e = 1e-8
        return np.mean(
            np.sum(a * (np.log(a + e) - np.log(c + e)) + (1 - a) * (np.log(1 - a + e) - np.log(1 - c + e)), 1)
        )

    pt = torch.tensor(p, requires_grad=True)
    qt = torch.tensor(q, requires_grad=True)
    got = symmetric_bernoulli_kl(pt.detach(), qt.detach())
    assert float(got) == pytest.approx((kl(p, q) + kl(q, p)) / 2, rel=1e-5)
    # only the first argument of each KL carries gradient: d/dp of KL(q || sg p) is zero
    bernoulli_kl(qt, pt).backward()
    assert pt.grad is None and float(qt.grad.abs().sum()) > 0
    assert float(symmetric_bernoulli_kl(qt.detach(), qt.detach())) == pytest.approx(0.0, abs=1e-6)


def test_cibhash_loss_parts_and_gradient():
    g = torch.Generator().manual_seed(0)
    hi = torch.randn(8, 16, generator=g, requires_grad=True)
    hj = torch.randn(8, 16, generator=g, requires_grad=True)
    parts = cibhash_loss(hi, hj, temperature=0.3, kl_weight=0.001)
    zi, zj = torch.sign(torch.sigmoid(hi) - 0.5), torch.sign(torch.sigmoid(hj) - 0.5)
    assert float(parts["contrastive"].detach()) == pytest.approx(
        _np_nt_xent(zi.detach().numpy(), zj.detach().numpy(), 0.3), rel=1e-5
    )
    pi, pj = torch.sigmoid(hi), torch.sigmoid(hj)
    assert float(parts["kl"].detach()) == pytest.approx(
        0.001 * float(symmetric_bernoulli_kl(pi, pj).detach()), rel=1e-6
    )
    sum(parts.values()).backward()
    assert hi.grad is not None and float(hi.grad.abs().sum()) > 0
    assert hj.grad is not None and float(hj.grad.abs().sum()) > 0


def test_code_matching_losses():
    s = torch.tensor([[1.0, -1.0, 1.0], [0.5, 0.5, -1.0]])
    t = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, -1.0]])
    assert float(code_matching_loss(s, t, "mse")) == pytest.approx((4 + 2.25 + 0.25) / 6)
    cos = np.array([1 / 3, (-0.5 + 0.5 + 1) / (np.sqrt(1.5) * np.sqrt(3))])
    assert float(code_matching_loss(s, t, "cosine")) == pytest.approx(float(np.mean(1 - cos)), rel=1e-6)
    assert float(code_matching_loss(t, t, "mse")) == 0.0
    with pytest.raises(ValueError):
        code_matching_loss(s, t, "l1")  # type: ignore[arg-type]


def test_contrastive_code_kd_matches_numpy():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(5, 8)), _signs(rng, (5, 8))
    logits = _cos(s, t) / 0.3
    row = np.mean([-(logits[k, k] - np.log(np.exp(logits[k]).sum())) for k in range(5)])
    col = np.mean([-(logits[k, k] - np.log(np.exp(logits[:, k]).sum())) for k in range(5)])
    st, tt = torch.from_numpy(s), torch.from_numpy(t)
    assert float(contrastive_code_kd(st, tt, 0.3, symmetric=False)) == pytest.approx(row, rel=1e-5)
    assert float(contrastive_code_kd(st, tt, 0.3, symmetric=True)) == pytest.approx((row + col) / 2, rel=1e-5)


# -------------------------------------------------------------------------------------------------- clustering


def _blobs(seed=0, k=4, per=30, bits=32, flip=0.05):
    rng = np.random.default_rng(seed)
    protos = _signs(rng, (k, bits))
    x = np.repeat(protos, per, 0)
    flips = rng.random(x.shape) < flip
    x = np.where(flips, -x, x)
    return torch.from_numpy(x).float(), np.repeat(np.arange(k), per)


def test_kmeans_recovers_blobs_and_is_deterministic_per_seed():
    x, truth = _blobs()
    a = kmeans(x, 4, seed=3, n_init=4)
    b = kmeans(x, 4, seed=3, n_init=4)
    assert torch.equal(a.centers, b.centers) and torch.equal(a.assign, b.assign)
    # the partition equals the truth up to renaming
    pairs = {(int(c), int(t)) for c, t in zip(a.assign, truth, strict=True)}
    assert len(pairs) == 4 and len({c for c, _ in pairs}) == 4
    inertia = float(((x.double() - a.centers.double()[a.assign]) ** 2).sum())
    assert a.inertia == pytest.approx(inertia, rel=1e-5)


def test_kmeans_with_one_cluster_is_the_mean():
    x, _ = _blobs(1)
    res = kmeans(x, 1, seed=0, n_init=2)
    torch.testing.assert_close(res.centers[0], x.mean(0))
    assert bool((res.assign == 0).all())
    with pytest.raises(ValueError):
        kmeans(x, 0)


def test_nearest_center_breaks_ties_by_lowest_index():
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    x = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 2.0]])
    assert nearest_center(x, centers).tolist() == [0, 0, 1]


def test_silhouette_matches_bruteforce():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 3))
    lab = rng.integers(0, 3, 40)
    lab[0] = 3  # a singleton cluster scores 0
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    s = []
    for i in range(40):
        own = lab == lab[i]
        if own.sum() == 1:
            s.append(0.0)
            continue
        a = d[i, own].sum() / (own.sum() - 1)
        b = min(d[i, lab == c].mean() for c in np.unique(lab) if c != lab[i])
        s.append((b - a) / max(a, b))
    got = silhouette_score(torch.from_numpy(x), torch.from_numpy(lab))
    assert got == pytest.approx(float(np.mean(s)), rel=1e-6)


def test_choose_num_clusters_finds_the_blob_count():
    x, _ = _blobs(2, k=5, per=20)
    assert choose_num_clusters(x, candidates=(2, 3, 4, 5, 6, 7), sample=100) == 5


def test_bit_mask_intended_and_reference_bug():
    codes = torch.tensor([[1.0, 1.0, -1.0], [1.0, -1.0, -1.0], [-1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]])
    assign = torch.tensor([0, 0, 1, 1])
    # cluster 0: mean (1, 0, -1) → bits 0 and 2 stable; cluster 1: mean (-1, 1, 1) → all stable
    mask = cluster_bit_mask(codes, assign, 2, margin=0.5)
    assert mask.tolist() == [[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    # the released get_matrix.py: where(|m| > margin, |m|, 1) then where(m < margin, m, 0) → all zeros for margin ≤ 1
    for margin in (0.1, 0.5, 1.0):
        assert float(cluster_bit_mask(codes, assign, 2, margin, reference_bug=True).abs().sum()) == 0.0
    m = np.abs(np.array([[1.0, 0.0, -1.0], [-1.0, 1.0, 1.0]]))
    lit = np.where(m > 1.5, m, 1)
    lit = np.where(lit < 1.5, lit, 0)
    np.testing.assert_array_equal(cluster_bit_mask(codes, assign, 2, 1.5, reference_bug=True).numpy(), lit)


# -------------------------------------------------------------------------------------------------- BRCD


@pytest.mark.parametrize(
    "false_neg,false_pos,use_mask",
    [(False, False, False), (True, False, False), (True, True, False), (True, True, True), (False, True, True)],
)
def test_brcd_loss_matches_reference_transcription(false_neg, false_pos, use_mask):
    rng = np.random.default_rng(10)
    b, bits, k = 8, 16, 3
    zi, ti, tj = _signs(rng, (b, bits)), _signs(rng, (b, bits)), _signs(rng, (b, bits))
    cluster = rng.integers(0, k, b)
    aug = cluster.copy()
    aug[[1, 4]] = (aug[[1, 4]] + 1) % k  # two augmented views left their cluster
    mask_tab = (rng.random((k, bits)) < 0.7).astype(float)
    mask_rows = mask_tab[cluster] if use_mask else None
    expected = _np_brcd(zi, ti, tj, 0.8, 0.3, cluster, aug, mask_rows, false_neg, false_pos)
    got = brcd_loss(
        torch.from_numpy(zi),
        torch.from_numpy(ti),
        torch.from_numpy(tj),
        cluster=torch.from_numpy(cluster),
        aug_cluster=torch.from_numpy(aug),
        mask_rows=None if mask_rows is None else torch.from_numpy(mask_rows),
        alpha=0.8,
        temperature=0.3,
        false_negatives=false_neg,
        false_positives=false_pos,
    )
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_brcd_identical_orthogonal_codes_closed_form():
    # student = teacher (both views) and the samples' codes orthogonal: positive 1/τ, every negative 0
    h = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float32)
    got = brcd_loss(h, h, h, alpha=0.8, temperature=0.3, false_negatives=False, false_positives=False)
    pos, n = 1 / 0.3, 8
    assert float(got) == pytest.approx(-np.log(np.exp(pos) / (np.exp(pos) + n - 2)), rel=1e-6)


def test_brcd_all_bits_masked_keeps_only_the_anchor():
    rng = np.random.default_rng(11)
    zi, ti, tj = (torch.from_numpy(_signs(rng, (5, 8))) for _ in range(3))
    zero = torch.zeros(5, 8, dtype=torch.float64)
    got = brcd_loss(zi, ti, tj, mask_rows=zero, alpha=0.8, false_negatives=False, false_positives=False)
    a = 0.8 * (torch.nn.functional.cosine_similarity(zi, ti) / 0.3).repeat(2).numpy()
    expected = np.mean(-(a - np.log(np.exp(a) + 10 - 2)))
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_brcd_single_cluster_masks_every_negative():
    rng = np.random.default_rng(12)
    zi, ti, tj = (torch.from_numpy(_signs(rng, (6, 8))) for _ in range(3))
    one = torch.zeros(6, dtype=torch.long)
    got = brcd_loss(zi, ti, tj, cluster=one, aug_cluster=one, false_negatives=True, false_positives=True)
    assert float(got) < 1e-6
    with pytest.raises(ValueError):
        brcd_loss(zi, ti, tj, false_negatives=True, false_positives=False)


def test_brcd_criterion_uses_clusters_of_the_indices_and_trains_the_student():
    x, _ = _blobs(5, k=3, per=10, bits=16)
    crit = BRCDCriterion.from_teacher_codes(x, num_clusters=3, seed=0, n_init=3)
    again = BRCDCriterion.from_teacher_codes(x, num_clusters=3, seed=0, n_init=3)
    assert torch.equal(crit.assign, again.assign) and torch.equal(crit.mask, again.mask)
    assert set(crit.state_dict()) == {"centers", "assign", "mask"}
    index = torch.tensor([0, 7, 12, 25, 29, 3])
    ti = x[index]
    tj = ti.clone()
    tj[1] = x[15]  # sample 7's second view looks like another cluster's code
    logits = torch.randn(6, 16, requires_grad=True)
    loss = crit(logits, ti, tj, index)
    _, z = hash_codes_ste(logits)
    cluster = crit.assign[index]
    aug = nearest_center(tj, crit.centers)
    assert int(aug[1]) != int(cluster[1])
    expected = brcd_loss(z, ti, tj, cluster, aug, crit.mask[cluster], 0.8, 0.3, True, True)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    # the reference's literal mask (regression switch): all zero
    bug = BRCDCriterion.from_teacher_codes(x, num_clusters=3, n_init=2, reference_mask_bug=True)
    assert float(bug.mask.abs().sum()) == 0.0
    # every piece can be switched off: plain contrastive alignment
    plain = BRCDCriterion(
        crit.centers, crit.assign, crit.mask, false_negatives=False, false_positives=False, use_mask=False
    )
    assert float(plain(logits, ti, tj, index).detach()) == pytest.approx(
        float(brcd_loss(z, ti, tj, alpha=0.8, false_negatives=False, false_positives=False).detach()), rel=1e-6
    )


def test_brcd_reference_literal_mode_assigns_the_masked_augmented_code():
    """The released code's behaviour end to end: all-zero mask and the augmented code assigned after masking, so
    every augmented view falls in the cluster nearest the origin."""
    x, _ = _blobs(6, k=3, per=10, bits=16)
    lit = BRCDCriterion.from_teacher_codes(
        x, num_clusters=3, n_init=2, reference_mask_bug=True, aug_cluster_from_masked=True
    )
    index = torch.tensor([0, 11, 22, 5])
    ti = x[index]
    tj = x[index.flip(0)]
    logits = torch.randn(4, 16)
    _, z = hash_codes_ste(logits)
    cluster = lit.assign[index]
    aug = nearest_center(torch.zeros(4, 16), lit.centers)
    expected = brcd_loss(z, ti, tj, cluster, aug, torch.zeros(4, 16), 0.8, 0.3, True, True)
    assert float(lit(logits, ti, tj, index)) == pytest.approx(float(expected), rel=1e-6)
