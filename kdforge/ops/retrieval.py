"""Hamming-ranking retrieval metrics for binary hash codes: mAP@k, mAP@all, precision@k, precision–recall by radius.

Definitions follow the evaluation code of the unsupervised-hashing literature (CIBHash, zexuanqiu/CIBHash
``utils/evaluation.py`` ``calculate_top_map``; BRCD, hly1998/BRCD ``utils/evaluation.py``, the same function):

* Hamming distance between ``±1`` codes of ``b`` bits is ``(b − q·dᵀ)/2``.
* A database item is relevant to a query when their labels are equal (single-label ``[N]`` int labels) or when they
  share at least one label (multi-hot ``[N, K]`` labels: ``q_labels · d_labelsᵀ > 0``).
* AP@k of one query: rank the database by distance, keep the first ``k``; with ``R`` relevant items among them at
  positions ``p_1 < … < p_R`` (1-based), ``AP = (1/R)·Σ_r r/p_r``. A query with no relevant item in its top ``k`` has
  AP 0 and still counts in the mean: the reference code skips it in the sum (``if tsum == 0: continue``) but divides
  by the number of all queries. mAP@all is AP@k with ``k`` = the database size.

One deliberate difference: the reference ranks with ``np.argsort(hamm)`` (an unstable quicksort), so the order of
items at equal distance — and with it AP — depends on the sort implementation and on the order in which the database
happens to be stored. At 64 bits there are only 65 distinct distances for tens of thousands of items, so most of the
top-k is decided by tie order (docs/tasks/hashing.md shows the drift). Here ties are broken by database index: the
ranking is a stable sort on ``(distance, index)``, a property of the data alone.

Everything runs in query chunks, so a 50,000-item database needs ``chunk × 50,000`` distances at a time, and is
device-agnostic (the codes' device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def hamming_distance(query: Tensor, database: Tensor) -> Tensor:
    """Pairwise Hamming distances between ``±1`` codes through one matrix product.

    Args:
        query: ``[Q, b]`` codes in ``{−1, +1}`` (any real dtype; a 0 entry counts as half a bit, as in the reference).
        database: ``[N, b]`` codes in ``{−1, +1}``.

    Returns:
        ``[Q, N]`` int64 distances in ``0..b``.
    """
    bits = query.shape[1]
    # float64 keeps the inner products exact for any realistic code length; rounding removes nothing but noise.
    inner = query.to(torch.float64) @ database.to(torch.float64).T
    return torch.round((bits - inner) / 2).to(torch.int64)


def relevance(query_labels: Tensor, database_labels: Tensor) -> Tensor:
    """Ground-truth relevance: equal label (``[Q]`` int labels) or at least one shared label (``[Q, K]`` multi-hot).

    Args:
        query_labels: ``[Q]`` int64 class labels or ``[Q, K]`` multi-hot labels (0/1, any dtype).
        database_labels: ``[N]`` or ``[N, K]``, the same kind as ``query_labels``.

    Returns:
        ``[Q, N]`` bool.
    """
    if query_labels.ndim == 1:
        return query_labels[:, None] == database_labels[None, :]
    return (query_labels.to(torch.float64) @ database_labels.to(torch.float64).T) > 0


def rank_database(distances: Tensor, k: int | None = None) -> Tensor:
    """Database order of each query: ascending distance, ties broken by ascending database index.

    Args:
        distances: ``[Q, N]`` int64 Hamming distances.
        k: keep the first ``k`` ranks; ``None`` keeps all ``N``.

    Returns:
        ``[Q, k]`` int64 database indices.
    """
    n = distances.shape[1]
    k = n if k is None else min(k, n)
    # One unique integer key per (distance, index) pair: any sort of the keys is the stable sort on (distance, index),
    # whatever algorithm the backend uses.
    key = distances * n + torch.arange(n, device=distances.device)
    if k == n:
        return torch.sort(key, dim=1).values % n
    return torch.topk(key, k, dim=1, largest=False, sorted=True).values % n


@dataclass
class RetrievalResult:
    """Per-query scores of one retrieval evaluation.

    Attributes:
        ap: ``[Q]`` float64 AP@k of each query (0 for a query with no relevant item in its top ``k``).
        precision_at_k: ``[Q]`` float64 fraction of relevant items in each query's top ``k``.
        relevant_hist: ``[Q, b + 1]`` int64 number of relevant database items at each Hamming distance.
        total_hist: ``[Q, b + 1]`` int64 number of database items at each Hamming distance.
    """

    ap: Tensor
    precision_at_k: Tensor
    relevant_hist: Tensor
    total_hist: Tensor

    @property
    def map(self) -> float:
        """Mean AP over all queries (the reference's definition)."""
        return float(self.ap.mean())


def evaluate_retrieval(
    query_codes: Tensor,
    database_codes: Tensor,
    query_labels: Tensor,
    database_labels: Tensor,
    topk: int | None = None,
    chunk_size: int = 128,
) -> RetrievalResult:
    """Ranks the database for every query and scores it (mAP@k, precision@k, distance histograms for PR curves).

    Args:
        query_codes: ``[Q, b]`` ``±1`` codes.
        database_codes: ``[N, b]`` ``±1`` codes; row ``i`` is database index ``i`` (the tie-break order).
        query_labels: ``[Q]`` int labels or ``[Q, K]`` multi-hot.
        database_labels: ``[N]`` or ``[N, K]``.
        topk: the ``k`` of mAP@k and precision@k; ``None`` means the whole database (mAP@all).
        chunk_size: queries ranked at a time (memory ``chunk_size × N`` int64 keys).

    Returns:
        A :class:`RetrievalResult` on the codes' device.
    """
    if query_codes.shape[1] != database_codes.shape[1]:
        raise ValueError(f"query codes have {query_codes.shape[1]} bits, database codes {database_codes.shape[1]}")
    bits = query_codes.shape[1]
    n = database_codes.shape[0]
    k = n if topk is None else min(topk, n)
    aps, precs, rel_hists, tot_hists = [], [], [], []
    positions = torch.arange(1, k + 1, device=query_codes.device, dtype=torch.float64)
    for start in range(0, query_codes.shape[0], chunk_size):
        qc = query_codes[start : start + chunk_size]
        ql = query_labels[start : start + chunk_size]
        dist = hamming_distance(qc, database_codes)
        rel = relevance(ql, database_labels)
        order = rank_database(dist, k)
        rel_top = rel.gather(1, order).to(torch.float64)  # [c, k]
        hits = rel_top.sum(1)
        # precision at every relevant position, averaged over the relevant positions (0 when there are none)
        prec_at_pos = rel_top.cumsum(1) / positions
        aps.append((prec_at_pos * rel_top).sum(1) / hits.clamp(min=1))
        precs.append(hits / k)
        # distance histograms: all items and relevant items at each radius (for the precision–recall curve)
        tot = torch.zeros(qc.shape[0], bits + 1, dtype=torch.int64, device=dist.device)
        tot_hists.append(tot.scatter_add(1, dist, torch.ones_like(dist)))
        rel_hists.append(torch.zeros_like(tot).scatter_add(1, dist, rel.to(torch.int64)))
    return RetrievalResult(torch.cat(aps), torch.cat(precs), torch.cat(rel_hists), torch.cat(tot_hists))


def mean_average_precision(
    query_codes: Tensor,
    database_codes: Tensor,
    query_labels: Tensor,
    database_labels: Tensor,
    topk: int | None = None,
    chunk_size: int = 128,
) -> float:
    """mAP@k (``topk``) or mAP@all (``topk=None``) of Hamming ranking; see the module docstring for the definition.

    Args: as :func:`evaluate_retrieval`.

    Returns:
        The mean over all queries of AP@k.
    """
    return evaluate_retrieval(query_codes, database_codes, query_labels, database_labels, topk, chunk_size).map


def precision_recall_by_radius(result: RetrievalResult) -> tuple[Tensor, Tensor]:
    """Precision and recall of Hamming-ball retrieval at every radius ``r = 0..b``.

    Retrieving every database item within distance ``r`` of the query: precision = relevant retrieved / retrieved,
    averaged over the queries that retrieve at least one item at that radius; recall = relevant retrieved / all
    relevant, averaged over the queries that have at least one relevant item in the database.

    Args:
        result: the output of :func:`evaluate_retrieval`.

    Returns:
        ``(precision, recall)``, each ``[b + 1]`` float64 (precision is NaN at a radius where no query retrieves
        anything).
    """
    rel_cum = result.relevant_hist.cumsum(1).to(torch.float64)  # [Q, b+1]
    tot_cum = result.total_hist.cumsum(1).to(torch.float64)
    retrieved = tot_cum > 0
    per_query_prec = rel_cum / tot_cum.clamp(min=1)
    n_ret = retrieved.sum(0)
    precision = torch.where(
        n_ret > 0, (per_query_prec * retrieved).sum(0) / n_ret.clamp(min=1), torch.full_like(rel_cum[0], float("nan"))
    )
    total_rel = rel_cum[:, -1:]
    has_rel = total_rel[:, 0] > 0
    recall = (rel_cum[has_rel] / total_rel[has_rel]).mean(0)
    return precision, recall


__all__ = [
    "RetrievalResult",
    "evaluate_retrieval",
    "hamming_distance",
    "mean_average_precision",
    "precision_recall_by_radius",
    "rank_database",
    "relevance",
]
