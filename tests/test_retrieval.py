"""Hamming-ranking retrieval metrics and the hashing evaluator, against brute-force numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdforge.ops.retrieval import (
    evaluate_retrieval,
    hamming_distance,
    mean_average_precision,
    precision_recall_by_radius,
    rank_database,
    relevance,
)
from kdforge.tasks.hashing import HashingEvaluator


def _codes(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    return rng.choice([-1.0, 1.0], size=(n, bits))


def _np_relevance(ql: np.ndarray, dl: np.ndarray) -> np.ndarray:
    if ql.ndim == 1:
        return ql[:, None] == dl[None, :]
    return (ql @ dl.T) > 0


def _np_map(qb, db, ql, dl, topk, argsort_kind="stable"):
    """The reference's ``calculate_top_map`` loop (CIBHash/BRCD ``utils/evaluation.py``), with the sort as given:
    ``stable`` = ties in database order (our rule), ``quicksort`` = the reference's ``np.argsort`` default."""
    rel = _np_relevance(ql, dl)
    total = 0.0
    for i in range(qb.shape[0]):
        dist = 0.5 * (qb.shape[1] - qb[i] @ db.T)
        gnd = rel[i][np.argsort(dist, kind=argsort_kind)].astype(np.float64)
        tgnd = gnd[: (db.shape[0] if topk is None else topk)]
        tsum = int(tgnd.sum())
        if tsum == 0:
            continue
        count = np.arange(1, tsum + 1)
        where = np.flatnonzero(tgnd == 1) + 1.0
        total += np.mean(count / where)
    return total / qb.shape[0]


def test_hamming_distance_matches_bit_counting():
    rng = np.random.default_rng(0)
    q, d = _codes(rng, 7, 24), _codes(rng, 11, 24)
    expected = (q[:, None, :] != d[None, :, :]).sum(-1)
    got = hamming_distance(torch.from_numpy(q), torch.from_numpy(d).float())
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), expected)


def test_rank_breaks_ties_by_database_index():
    dist = torch.tensor([[2, 1, 2, 1, 0, 2]])
    assert rank_database(dist).tolist() == [[4, 1, 3, 0, 2, 5]]
    assert rank_database(dist, k=3).tolist() == [[4, 1, 3]]


@pytest.mark.parametrize("topk", [1, 5, 37, None])
@pytest.mark.parametrize("multilabel", [False, True])
def test_map_matches_bruteforce_with_ties(topk, multilabel):
    # 6 bits over 300 items: only 7 distinct distances, so almost every rank is a tie broken by index
    rng = np.random.default_rng(1 + (topk or 0))
    qb, db = _codes(rng, 40, 6), _codes(rng, 300, 6)
    if multilabel:
        ql = (rng.random((40, 5)) < 0.25).astype(np.float32)
        dl = (rng.random((300, 5)) < 0.25).astype(np.float32)
    else:
        ql, dl = rng.integers(0, 6, 40), rng.integers(0, 6, 300)
    expected = _np_map(qb, db, ql, dl, topk)
    got = mean_average_precision(
        torch.from_numpy(qb), torch.from_numpy(db), torch.from_numpy(ql), torch.from_numpy(dl), topk, chunk_size=7
    )
    assert got == pytest.approx(expected, abs=1e-12)


def test_query_without_relevant_items_counts_as_zero():
    # query 1 has a label no database item has: AP 0, and the mean still divides by both queries (reference)
    qb = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    db = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    res = evaluate_retrieval(qb, db, torch.tensor([0, 7]), torch.tensor([0, 1]), topk=2)
    assert res.ap.tolist() == [1.0, 0.0]
    assert res.map == 0.5


def test_precision_at_k_and_pr_curve_match_bruteforce():
    rng = np.random.default_rng(3)
    bits = 8
    qb, db = _codes(rng, 25, bits), _codes(rng, 120, bits)
    ql, dl = rng.integers(0, 4, 25), rng.integers(0, 4, 120)
    res = evaluate_retrieval(torch.from_numpy(qb), torch.from_numpy(db), torch.from_numpy(ql), torch.from_numpy(dl), 10)
    dist = (qb[:, None, :] != db[None, :, :]).sum(-1)
    rel = ql[:, None] == dl[None, :]
    p_at_k = [rel[i][np.lexsort((np.arange(120), dist[i]))[:10]].mean() for i in range(25)]
    np.testing.assert_allclose(res.precision_at_k.numpy(), p_at_k)
    prec, rec = precision_recall_by_radius(res)
    for r in range(bits + 1):
        ret = dist <= r
        n_ret = ret.sum(1)
        tp = (ret & rel).sum(1)
        has = n_ret > 0
        exp_p = (tp[has] / n_ret[has]).mean() if has.any() else np.nan
        has_rel = rel.sum(1) > 0
        exp_r = (tp[has_rel] / rel.sum(1)[has_rel]).mean()
        if np.isnan(exp_p):
            assert torch.isnan(prec[r])
        else:
            assert float(prec[r]) == pytest.approx(exp_p)
        assert float(rec[r]) == pytest.approx(exp_r)
    assert float(rec[-1]) == 1.0


def test_unstable_argsort_makes_map_depend_on_storage_order():
    """Why ties are broken by index: with the reference's ``np.argsort`` (quicksort, unstable) the same codes stored
    in another order score differently, because equal distances are ranked by the sort's internals."""
    rng = np.random.default_rng(4)
    bits = 16
    qb, db = _codes(rng, 60, bits), _codes(rng, 4000, bits)
    ql, dl = rng.integers(0, 10, 60), rng.integers(0, 10, 4000)
    perm = rng.permutation(4000)
    ref_a = _np_map(qb, db, ql, dl, 100, argsort_kind="quicksort")
    ref_b = _np_map(qb, db[perm], ql, dl[perm], 100, argsort_kind="quicksort")
    assert ref_a != ref_b  # the reference: same data, different mAP
    # ours: the ranking is a function of (codes, index); permuting the storage and restoring index order is a no-op
    ours = mean_average_precision(
        torch.from_numpy(qb), torch.from_numpy(db), torch.from_numpy(ql), torch.from_numpy(dl), 100
    )
    inv = np.argsort(perm)
    again = mean_average_precision(
        torch.from_numpy(qb),
        torch.from_numpy(db[perm][inv]),
        torch.from_numpy(ql),
        torch.from_numpy(dl[perm][inv]),
        100,
    )
    assert ours == again == pytest.approx(_np_map(qb, db, ql, dl, 100), abs=1e-12)


def test_relevance_multi_hot_shares_a_label():
    ql = torch.tensor([[1, 0, 1], [0, 0, 0]])
    dl = torch.tensor([[0, 0, 1], [0, 1, 0]])
    assert relevance(ql, dl).tolist() == [[True, False], [False, False]]


def test_fifty_thousand_item_database_in_chunks():
    g = torch.Generator().manual_seed(0)
    db = torch.randint(0, 2, (50_000, 64), generator=g).float() * 2 - 1
    dl = torch.randint(0, 10, (50_000,), generator=g)
    q, ql = db[:20].clone(), dl[:20].clone()
    res = evaluate_retrieval(q, db, ql, dl, topk=1000, chunk_size=8)
    # each query finds itself first (distance 0, the only exact match almost surely) and is relevant to itself
    assert res.ap.shape == (20,)
    assert bool((res.ap > 0).all())
    assert res.total_hist.sum(1).tolist() == [50_000] * 20


class _Capture:
    """Rank 1 of a fake two-process group: hands its state over and gets nothing back."""

    def __init__(self) -> None:
        self.obj = None

    def sum(self, tensor):
        return tensor

    def gather(self, obj):
        self.obj = obj
        return None


class _TwoRank:
    """Rank 0 of a fake two-process group: sees its own state and rank 1's."""

    def __init__(self, other) -> None:
        self.other = other

    def sum(self, tensor):
        return tensor

    def gather(self, obj):
        return [obj, self.other]


def _split_data(seed: int = 5):
    rng = np.random.default_rng(seed)
    q = torch.from_numpy(_codes(rng, 30, 8)).float()
    d = torch.from_numpy(_codes(rng, 200, 8)).float()
    t = torch.from_numpy(_codes(rng, 200, 8)).float()
    ql = torch.from_numpy(rng.integers(0, 5, 30))
    dl = torch.from_numpy(rng.integers(0, 5, 200))
    return q, d, t, ql, dl


def test_evaluator_two_ranks_equal_one_rank():
    q, d, t, ql, dl = _split_data()
    one = HashingEvaluator(topk=50, pr_curve=True)
    for s in range(0, 30, 8):
        one.update(q[s : s + 8], ql[s : s + 8], torch.arange(s, min(s + 8, 30)))
    for s in range(0, 200, 32):
        idx = torch.arange(s, min(s + 32, 200))
        one.update_database(d[idx], dl[idx], idx)
        one.update_teacher_database(t[idx], dl[idx], idx)
    expected = one.compute()
    assert expected["map"] == pytest.approx(_np_map(q.numpy(), d.numpy(), ql.numpy(), dl.numpy(), 50), abs=1e-12)
    assert expected["map_teacher_db"] == pytest.approx(
        _np_map(q.numpy(), t.numpy(), ql.numpy(), dl.numpy(), 50), abs=1e-12
    )

    # a distributed sampler: interleaved shards, the last shard padded with an index already seen
    ranks = [HashingEvaluator(topk=50, pr_curve=True), HashingEvaluator(topk=50, pr_curve=True)]
    for r, ev in enumerate(ranks):
        qi = torch.cat([torch.arange(r, 30, 2), torch.tensor([0])])
        ev.update(q[qi], ql[qi], qi)
        di = torch.arange(r, 200, 2).flip(0)  # any arrival order
        for chunk in di.split(17):
            ev.update_database(d[chunk], dl[chunk], chunk)
            ev.update_teacher_database(t[chunk], dl[chunk], chunk)
    cap = _Capture()
    zeros = ranks[1].compute(cap)  # rank 1's share of the closing sum: the same keys, all zero
    assert set(zeros) == set(expected) and not any(zeros.values())
    got = ranks[0].compute(_TwoRank(cap.obj))
    assert got == expected


def test_evaluator_without_indices_uses_arrival_order_and_needs_a_database():
    q, d, _, ql, dl = _split_data(6)
    ev = HashingEvaluator(topk=None)
    ev.update(q, ql)
    with pytest.raises(ValueError, match="database"):
        ev.compute()
    ev.update_database(d[:100], dl[:100])
    ev.update_database(d[100:], dl[100:])
    out = ev.compute()
    assert out["map"] == pytest.approx(_np_map(q.numpy(), d.numpy(), ql.numpy(), dl.numpy(), None), abs=1e-12)
    assert "map@all" in out and "map_teacher_db" not in out
    ev.reset()
    with pytest.raises(ValueError):
        ev.compute()


def test_evaluator_stores_the_binary_codes_of_continuous_inputs():
    q, d, _, ql, dl = _split_data(7)
    scale = torch.rand(q.shape, generator=torch.Generator().manual_seed(0)) + 0.1
    a, b = HashingEvaluator(topk=20), HashingEvaluator(topk=20)
    a.update(q, ql)
    b.update(q * scale, ql)  # continuous codes with the same signs
    for ev in (a, b):
        ev.update_database(d, dl)
    assert a.compute() == b.compute()
