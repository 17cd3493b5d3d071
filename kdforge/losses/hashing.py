"""Losses of unsupervised deep hashing and of hash-code distillation (CIBHash, code KD, BRCD).

* CIBHash (Qiu, Su, Chen, Wang, "Unsupervised Hashing with Contrastive Information Bottleneck", IJCAI 2021; code
  zexuanqiu/CIBHash ``model/CIBHash.py``): codes ``z = sign(σ(h) − ½)`` with a straight-through gradient, NT-Xent at
  τ = 0.3 between the two views' codes, plus 0.001 × a symmetric Bernoulli KL between the two views' bit
  probabilities.
* BRCD (He et al., "Bit-mask Robust Contrastive Knowledge Distillation for Unsupervised Semantic Hashing", WWW 2024;
  code hly1998/BRCD ``model/ours_distill_CIBHash.py`` ``BRCDLoss`` and ``forward``, ``get_mask/centroid_get.py``,
  ``get_mask/get_matrix.py``): contrastive alignment of student and teacher codes, k-means clusters of the teacher's
  training codes to drop false positives and false negatives, and a per-cluster bit mask. docs/methods/brcd.md lists
  what is exact, what is reconstructed and the mask-generation bug of the reference.
* Code-matching KD and in-batch contrastive KD on codes (docs/methods/code_kd.md).

Every loss computes in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: what BRCD adds to the logit of a negative that falls in the anchor's cluster (reference: ``fn_matrix * -1000``)
FALSE_NEGATIVE_PENALTY = 1000.0


class _SignSTE(torch.autograd.Function):
    """``sign`` forward, identity backward (CIBHash's ``hash`` Function: ``backward`` returns ``grad_output``)."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return torch.sign(x)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad


def hash_codes_ste(logits: Tensor) -> tuple[Tensor, Tensor]:
    """CIBHash's binarisation: bit probabilities ``p = σ(h)`` and codes ``z = sign(p − ½)``, ``∂z/∂(p − ½) = 1``.

    The straight-through estimator of zexuanqiu/CIBHash ``model/CIBHash.py`` (``hash_layer(prob - 0.5)``): the
    gradient reaching ``h`` is the upstream gradient times ``σ'(h)``.

    Args:
        logits: ``[B, b]`` continuous codes ``h`` (the hash head's output).

    Returns:
        ``(prob, codes)``: ``[B, b]`` float32 probabilities and ``[B, b]`` float32 codes in ``{−1, 0, +1}`` (0 only
        where ``p`` is exactly ½, as in the reference).
    """
    prob = torch.sigmoid(logits.float())
    return prob, _SignSTE.apply(prob - 0.5)


def _cosine_matrix(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """``[Na, Nb]`` cosine similarities; a zero row has similarity 0 to everything (``nn.CosineSimilarity``'s
    behaviour, which the reference relies on when a bit mask zeroes a whole code)."""
    return F.normalize(a, dim=1, eps=eps) @ F.normalize(b, dim=1, eps=eps).T


def nt_xent(z_i: Tensor, z_j: Tensor, temperature: float = 0.3) -> Tensor:
    """NT-Xent between two views, CIBHash's ``NtXentLoss`` (SimCLR's loss on codes).

    With ``u = [z_i; z_j]`` (``2B`` rows) and ``s_kl = cos(u_k, u_l)/τ``, each row ``k`` has the positive ``s_{k,k±B}``
    and the ``2B − 2`` negatives ``s_kl`` (``l ≠ k, k±B``); the loss is the cross-entropy of the positive, summed over
    the ``2B`` rows and divided by ``2B``.

    Args:
        z_i: ``[B, b]`` codes (or any embeddings) of view 1.
        z_j: ``[B, b]`` of view 2.
        temperature: τ (CIBHash: 0.3).

    Returns:
        Scalar float32.
    """
    b = z_i.shape[0]
    u = torch.cat([z_i.float(), z_j.float()], dim=0)
    sim = _cosine_matrix(u, u) / temperature
    eye = torch.eye(2 * b, dtype=torch.bool, device=u.device)
    # The reference concatenates [positive, negatives] and targets column 0; dropping only the self-similarity and
    # targeting the positive's own column is the same cross-entropy.
    sim = sim.masked_fill(eye, float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(u.device)
    return F.cross_entropy(sim, target, reduction="sum") / (2 * b)


def bernoulli_kl(prob: Tensor, prob_ref: Tensor, eps: float = 1e-8) -> Tensor:
    """``mean_batch Σ_bits KL(Bern(p) ‖ Bern(sg(q)))`` with CIBHash's ``+1e-8`` inside the logs (``compute_kl``).

    Args:
        prob: ``[B, b]`` bit probabilities (gradient flows).
        prob_ref: ``[B, b]`` reference probabilities (detached, as in the reference).
        eps: added inside each log.

    Returns:
        Scalar float32.
    """
    p, q = prob.float(), prob_ref.detach().float()
    kl = p * (torch.log(p + eps) - torch.log(q + eps)) + (1 - p) * (torch.log(1 - p + eps) - torch.log(1 - q + eps))
    return kl.sum(1).mean()


def symmetric_bernoulli_kl(prob_i: Tensor, prob_j: Tensor, eps: float = 1e-8) -> Tensor:
    """CIBHash's ``(KL(p_i ‖ sg p_j) + KL(p_j ‖ sg p_i)) / 2`` (:func:`bernoulli_kl` both ways). Args ``[B, b]``."""
    return (bernoulli_kl(prob_i, prob_j, eps) + bernoulli_kl(prob_j, prob_i, eps)) / 2


def cibhash_loss(
    logits_i: Tensor, logits_j: Tensor, temperature: float = 0.3, kl_weight: float = 0.001
) -> dict[str, Tensor]:
    """The unsupervised CIBHash objective on the two views' continuous codes.

    ``L = NT-Xent(z_i, z_j; τ) + w·(KL(p_i ‖ sg p_j) + KL(p_j ‖ sg p_i))/2`` with ``p = σ(h)``, ``z = sign(p − ½)``
    (straight-through). Defaults τ = 0.3, w = 0.001 are zexuanqiu/CIBHash's ``--temperature`` and ``--weight``.

    Args:
        logits_i: ``[B, b]`` hash-head outputs of view 1.
        logits_j: ``[B, b]`` of view 2.
        temperature: τ.
        kl_weight: w.

    Returns:
        ``{"contrastive": NT-Xent, "kl": w·KL}`` (named weighted parts; their sum is the loss).
    """
    prob_i, z_i = hash_codes_ste(logits_i)
    prob_j, z_j = hash_codes_ste(logits_j)
    return {
        "contrastive": nt_xent(z_i, z_j, temperature),
        "kl": kl_weight * symmetric_bernoulli_kl(prob_i, prob_j),
    }


def relaxed_codes(logits: Tensor, relaxation: Literal["ste", "tanh"] = "ste") -> Tensor:
    """What a code-KD student emits for a batch: its straight-through ``±1`` codes (``"ste"``, CIBHash's
    ``sign(σ(h) − ½)``, :func:`hash_codes_ste`) or the continuous relaxation ``tanh(h/2) = 2σ(h) − 1`` (``"tanh"``).

    Args:
        logits: ``[B, b]`` continuous codes ``h``.
        relaxation: ``"ste"`` or ``"tanh"``.

    Returns:
        ``[B, b]`` float32.
    """
    if relaxation == "ste":
        return hash_codes_ste(logits)[1]
    if relaxation == "tanh":
        return torch.tanh(logits.float() / 2)
    raise ValueError(f"relaxation must be 'ste' or 'tanh', got {relaxation!r}")


def code_matching_loss(student: Tensor, teacher: Tensor, kind: Literal["mse", "cosine"] = "mse") -> Tensor:
    """Code-matching KD: the student's codes regress the teacher's codes of the same images.

    Args:
        student: ``[B, b]`` student codes (straight-through ``±1`` codes or continuous ``tanh`` codes).
        teacher: ``[B, b]`` teacher codes (a constant; ``±1``).
        kind: ``"mse"`` = ``mean((s − t)²)`` over all entries; ``"cosine"`` = ``mean_batch(1 − cos(s, t))``.

    Returns:
        Scalar float32.
    """
    s, t = student.float(), teacher.detach().float()
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()
    raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")


def contrastive_code_kd(student: Tensor, teacher: Tensor, temperature: float = 0.3, symmetric: bool = True) -> Tensor:
    """CRD-style contrastive KD on codes with in-batch negatives (InfoNCE).

    Row ``k`` scores the student code ``s_k`` against every teacher code ``t_l`` of the batch, ``cos(s_k, t_l)/τ``;
    the positive is ``t_k``, the other ``B − 1`` teacher codes are the negatives. CRD (Tian et al., ICLR 2020) draws
    16,384 negatives from a memory bank with an NCE objective; here the batch is the negative set and the objective
    the softmax cross-entropy (docs/methods/code_kd.md). With ``symmetric`` the teacher-anchored direction (teacher
    row against student columns) is added and the two are averaged.

    Args:
        student: ``[B, b]`` student codes.
        teacher: ``[B, b]`` teacher codes (a constant).
        temperature: τ.
        symmetric: average both directions.

    Returns:
        Scalar float32 (mean over rows).
    """
    s, t = student.float(), teacher.detach().float()
    logits = _cosine_matrix(s, t) / temperature
    target = torch.arange(s.shape[0], device=s.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, target)) / 2
    return loss


# ----------------------------------------------------------------------------------------------------------------
# BRCD: clusters of the teacher's codes, the bit mask, the loss.


def nearest_center(x: Tensor, centers: Tensor) -> Tensor:
    """Index of the nearest centre by squared Euclidean distance; ties go to the lowest centre index.

    Binary codes are often equidistant from two centres; ``argmin`` does not promise which one it returns on every
    device, so the tie rule is explicit.

    Args:
        x: ``[N, d]``.
        centers: ``[k, d]``.

    Returns:
        ``[N]`` int64.
    """
    x, c = x.double(), centers.double()
    d = (x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None, :]
    k = c.shape[0]
    idx = torch.arange(k, device=x.device).expand_as(d)
    at_min = d <= d.min(1, keepdim=True).values + 1e-9
    return torch.where(at_min, idx, k).min(1).values


@dataclass
class KMeansResult:
    """Output of :func:`kmeans`: ``centers [k, d]`` float32, ``assign [N]`` int64, ``inertia`` (sum of squared
    distances to the assigned centres)."""

    centers: Tensor
    assign: Tensor
    inertia: float


def _kmeans_pp_init(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn ∝ squared distance to the nearest
    chosen centre. One candidate per step (scikit-learn's greedy variant draws 2 + log k and keeps the best; we
    compensate with ``n_init`` restarts)."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator, device=generator.device))
    centers = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        if float(total) <= 0:  # fewer distinct points than k: repeat a point (its cluster stays empty)
            nxt = int(torch.randint(n, (1,), generator=generator, device=generator.device))
        else:
            nxt = int(torch.multinomial((d2 / total).to(generator.device), 1, generator=generator))
        centers.append(x[nxt])
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    return torch.stack(centers)


def kmeans(x: Tensor, k: int, seed: int = 0, n_init: int = 10, max_iter: int = 100, tol: float = 1e-6) -> KMeansResult:
    """Lloyd's k-means with k-means++ seeding, in torch, deterministic per seed; the best of ``n_init`` runs.

    The reference (hly1998/BRCD ``get_mask/centroid_get.py``) runs scikit-learn ``KMeans(n_clusters, n_init=30,
    init='k-means++')`` on the teacher's training codes. An empty cluster keeps its previous centre.

    Args:
        x: ``[N, d]`` points (teacher codes).
        k: number of clusters, ``1 ≤ k ≤ N``.
        seed: seeds the k-means++ draws (a CPU generator, so the result does not depend on the device).
        n_init: restarts; the run with the lowest inertia wins (ties: the earliest).
        max_iter: Lloyd iterations per run.
        tol: stop when the centres move less than this in squared distance (sum over centres).

    Returns:
        :class:`KMeansResult` on ``x``'s device.
    """
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k must be in [1, {x.shape[0]}] (the number of points), got {k}")
    xd = x.detach().double()
    gen = torch.Generator().manual_seed(seed)
    best: KMeansResult | None = None
    for _ in range(n_init):
        centers = _kmeans_pp_init(xd.cpu(), k, gen).to(xd.device)
        for _ in range(max_iter):
            assign = nearest_center(xd, centers)
            onehot = F.one_hot(assign, k).double()  # [N, k]
            counts = onehot.sum(0)
            sums = onehot.T @ xd
            new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centers)
            shift = float(((new - centers) ** 2).sum())
            centers = new
            if shift <= tol:
                break
        assign = nearest_center(xd, centers)
        inertia = float(((xd - centers[assign]) ** 2).sum())
        if best is None or inertia < best.inertia - 1e-9:
            best = KMeansResult(centers.float(), assign, inertia)
    assert best is not None
    return best


def silhouette_score(x: Tensor, assign: Tensor) -> float:
    """Mean silhouette ``(b − a)/max(a, b)`` with Euclidean distances (Rousseeuw 1987; scikit-learn's definition:
    a point alone in its cluster scores 0).

    Args:
        x: ``[N, d]``.
        assign: ``[N]`` int64 cluster ids (at least two distinct).

    Returns:
        The mean over points.
    """
    xd = x.double()
    d = torch.cdist(xd, xd)
    k = int(assign.max()) + 1
    onehot = F.one_hot(assign, k).double()  # [N, k]
    counts = onehot.sum(0)  # [k]
    sums = d @ onehot  # [N, k] summed distance to each cluster
    own = counts[assign]
    a = sums.gather(1, assign[:, None]).squeeze(1) / (own - 1).clamp(min=1)
    mean_other = sums / counts.clamp(min=1)[None, :]
    invalid = F.one_hot(assign, k).bool() | (counts == 0)[None, :]
    b = mean_other.masked_fill(invalid, float("inf")).min(1).values
    s = (b - a) / torch.maximum(a, b).clamp(min=1e-12)
    s = torch.where(own > 1, s, torch.zeros_like(s))
    return float(s.mean())


def choose_num_clusters(
    codes: Tensor, candidates: tuple[int, ...] = tuple(range(2, 21)), sample: int = 2000, seed: int = 0
) -> int:
    """The number of clusters by the best silhouette on a seeded subsample (our rule for BRCD's k).

    The BRCD authors pick k by eye from elbow and silhouette plots over k = 2..14 on CIFAR-10 (``centroid_phase.py``)
    and use 10. This rule makes the choice reproducible: k-means (``n_init=3``) on ``sample`` codes drawn with
    ``seed``, the candidate with the highest silhouette wins (ties: the smallest k).

    Args:
        codes: ``[N, b]`` teacher codes.
        candidates: values of k to try (each below the subsample size).
        sample: subsample size (the silhouette costs ``sample²`` distances).
        seed: subsample and k-means seed.

    Returns:
        The chosen k.
    """
    gen = torch.Generator().manual_seed(seed)
    n = codes.shape[0]
    pick = torch.randperm(n, generator=gen)[: min(sample, n)].to(codes.device)
    x = codes[pick].float()
    best_k, best_s = candidates[0], -float("inf")
    for k in candidates:
        if k >= x.shape[0]:
            break
        res = kmeans(x, k, seed=seed, n_init=3)
        if int(res.assign.unique().numel()) < 2:
            continue
        s = silhouette_score(x, res.assign)
        if s > best_s + 1e-12:
            best_k, best_s = k, s
    return best_k


def cluster_bit_mask(
    codes: Tensor, assign: Tensor, num_clusters: int, margin: float = 0.5, reference_bug: bool = False
) -> Tensor:
    """BRCD's per-cluster bit mask from the mean teacher code of each cluster.

    Intended meaning (the default): keep bit ``b`` for cluster ``c`` when it is stable inside the cluster,
    ``m_cb = 1[|mean_{x ∈ c} code_b(x)| > margin]``. ``reference_bug=True`` reproduces hly1998/BRCD
    ``get_mask/get_matrix.py`` literally: ``m = where(|mean| > margin, |mean|, 1)`` then ``m = where(m < margin, m,
    0)``, which is all zeros for any ``margin ≤ 1`` (the shipped ``mask_matrix_0.5_10_cifar10_64.pkl`` is a 10×64
    zero array); with it BRCD's masked codes are zero and the cross-view positive and all negatives collapse to 0.

    Args:
        codes: ``[N, b]`` ``±1`` teacher codes of the training set.
        assign: ``[N]`` int64 cluster of each code.
        num_clusters: k.
        margin: threshold on the absolute mean bit (reference default 0.5).
        reference_bug: reproduce the released code's mask (regression switch only).

    Returns:
        ``[k, b]`` float32 mask (an empty cluster gets an all-zero row).
    """
    onehot = F.one_hot(assign, num_clusters).double()
    counts = onehot.sum(0)
    mean = (onehot.T @ codes.double()) / counts.clamp(min=1)[:, None]
    absmean = mean.abs()
    if reference_bug:
        m = torch.where(absmean > margin, absmean, torch.ones_like(absmean))
        m = torch.where(m < margin, m, torch.zeros_like(m))
        return m.float()
    return (absmean > margin).float()


def brcd_loss(
    student_i: Tensor,
    teacher_i: Tensor,
    teacher_j: Tensor,
    cluster: Tensor | None = None,
    aug_cluster: Tensor | None = None,
    mask_rows: Tensor | None = None,
    alpha: float = 0.8,
    temperature: float = 0.3,
    false_negatives: bool = True,
    false_positives: bool = True,
    penalty: float = FALSE_NEGATIVE_PENALTY,
) -> Tensor:
    """BRCD's contrastive distillation loss (hly1998/BRCD ``BRCDLoss.forward`` with the cluster logic of ``forward``).

    With ``z̃ = z_i ⊙ m``, ``t̃ = t_j ⊙ m`` (``m`` = the mask row of each sample's cluster, or 1 without a mask),
    ``u = [z̃; t̃]`` (``2B`` rows) and ``s_kl = cos(u_k, u_l)/τ``:

    * positive of row ``k`` (and of row ``k + B``): ``α_k·cos(z_i,k, t_i,k)/τ + (1 − α_k)·s_{k,k+B}`` — the unmasked
      same-view anchor mixed with the masked cross-view pair;
    * negatives: every ``s_kl`` with ``l ∉ {k, k ± B}``; a negative in the anchor's cluster gets ``−penalty``;
    * ``L = (1/2B)·Σ_k CE([pos_k, negs_k], 0)``.

    Cluster handling, exactly as the reference: with ``false_positives``, ``α_k = 1`` (cross-view positive dropped)
    where the teacher's augmented code falls in another cluster than the sample (``aug_cluster ≠ cluster``), and the
    same-cluster test of a negative compares the row sample's cluster with the column's cluster — the sample's
    cluster for student columns, the augmented code's cluster for teacher columns (the reference's
    ``[[ii, ij], [ii, ij]]`` layout). With only ``false_negatives``, both column blocks use the sample's cluster.

    Args:
        student_i: ``[B, b]`` student codes of view i (straight-through ``±1`` codes; gradient flows).
        teacher_i: ``[B, b]`` teacher codes of view i (constants).
        teacher_j: ``[B, b]`` teacher codes of view j.
        cluster: ``[B]`` int64 cluster of each sample (its teacher training code's k-means cluster); needed by
            ``false_negatives``/``false_positives``.
        aug_cluster: ``[B]`` int64 nearest cluster of ``teacher_j``; needed by ``false_positives``.
        mask_rows: ``[B, b]`` bit mask of each sample's cluster, or ``None`` for no bit mask.
        alpha: α, weight of the same-view anchor in the positive (reference default 0.8).
        temperature: τ (reference 0.3).
        false_negatives: penalise same-cluster negatives.
        false_positives: drop the cross-view positive of samples whose augmented view left their cluster (and
            penalise same-cluster negatives, as the reference does whenever this flag is on).
        penalty: the value subtracted from a same-cluster negative's logit (reference 1000).

    Returns:
        Scalar float32.
    """
    z, ti, tj = student_i.float(), teacher_i.detach().float(), teacher_j.detach().float()
    b = z.shape[0]
    n = 2 * b
    if mask_rows is not None:
        m = mask_rows.float()
        z_m, tj_m = z * m, tj * m
    else:
        z_m, tj_m = z, tj
    u = torch.cat([z_m, tj_m], dim=0)
    sim = _cosine_matrix(u, u) / temperature  # [2B, 2B]
    anchor = F.cosine_similarity(z, ti, dim=1, eps=1e-8) / temperature  # [B], unmasked, as the reference
    rows = torch.arange(n, device=z.device)
    partner = (rows + b) % n
    cross = sim[rows, partner]  # s_{k,k+B} and s_{k+B,k}
    alpha_vec = torch.full((n,), float(alpha), device=z.device)
    need_clusters = false_negatives or false_positives
    if need_clusters and cluster is None:
        raise ValueError("false_negatives/false_positives need the samples' clusters")
    if false_positives:
        if aug_cluster is None:
            raise ValueError("false_positives needs the clusters of the teacher's augmented codes")
        moved = (aug_cluster != cluster).repeat(2)
        alpha_vec = torch.where(moved, torch.ones_like(alpha_vec), alpha_vec)
    positive = alpha_vec * anchor.repeat(2) + (1 - alpha_vec) * cross
    logits = sim.clone()
    if need_clusters:
        assert cluster is not None
        col_student = cluster
        col_teacher = aug_cluster if false_positives else cluster
        assert col_teacher is not None
        cols = torch.cat([col_student, col_teacher])  # [2B]
        row_c = cluster.repeat(2)  # [2B]: rows of both blocks use the sample's own cluster
        same = row_c[:, None] == cols[None, :]
        logits = logits - penalty * same.float()
    # the row's positive replaces its self-similarity column; the partner column is excluded from the negatives
    eye = rows[:, None] == rows[None, :]
    excluded = eye | (partner[:, None] == rows[None, :])
    negatives = logits.masked_fill(excluded, float("-inf"))
    full = torch.cat([positive[:, None], negatives], dim=1)
    target = torch.zeros(n, dtype=torch.long, device=z.device)
    return F.cross_entropy(full, target, reduction="sum") / n


class BRCDCriterion(nn.Module):
    """BRCD's distillation term with its cluster state: k-means centres of the teacher's training codes, each
    training sample's cluster and the per-cluster bit mask, kept as buffers (saved with the method's state).

    Build it once from the teacher's codes of the training set in dataset order (:meth:`from_teacher_codes`); then
    ``forward(student_logits_i, teacher_codes_i, teacher_codes_j, index)`` returns the loss of a batch.

    Args:
        centers: ``[k, b]`` k-means centres.
        assign: ``[N]`` int64 cluster of every training sample (indexed by ``Batch.index``).
        mask: ``[k, b]`` bit mask (:func:`cluster_bit_mask`).
        alpha, temperature, false_negatives, false_positives: as :func:`brcd_loss`.
        use_mask: apply the bit mask (reference ``--revise_distance``).
        aug_cluster_from_masked: assign the augmented teacher code to a cluster after masking it, as the reference's
            order of operations does under ``--revise_distance``; the default assigns the unmasked code (what
            "the augmented view left its cluster" means).
    """

    def __init__(
        self,
        centers: Tensor,
        assign: Tensor,
        mask: Tensor,
        alpha: float = 0.8,
        temperature: float = 0.3,
        false_negatives: bool = True,
        false_positives: bool = True,
        use_mask: bool = True,
        aug_cluster_from_masked: bool = False,
    ) -> None:
        super().__init__()
        self.register_buffer("centers", centers.float().clone())
        self.register_buffer("assign", assign.long().clone())
        self.register_buffer("mask", mask.float().clone())
        self.alpha = alpha
        self.temperature = temperature
        self.false_negatives = false_negatives
        self.false_positives = false_positives
        self.use_mask = use_mask
        self.aug_cluster_from_masked = aug_cluster_from_masked

    @classmethod
    def from_teacher_codes(
        cls,
        codes: Tensor,
        num_clusters: int | None = None,
        margin: float = 0.5,
        seed: int = 0,
        n_init: int = 30,
        reference_mask_bug: bool = False,
        **kwargs: float | bool,
    ) -> BRCDCriterion:
        """Clusters the teacher's training codes and builds the mask.

        Args:
            codes: ``[N, b]`` ``±1`` teacher codes of the training set, row ``i`` = dataset index ``i``.
            num_clusters: k; ``None`` applies :func:`choose_num_clusters`.
            margin: mask threshold (reference 0.5).
            seed: k-means seed.
            n_init: k-means restarts (reference 30).
            reference_mask_bug: build the released code's all-zero mask instead of the intended one.
            **kwargs: the loss switches of the constructor.
        """
        k = choose_num_clusters(codes, seed=seed) if num_clusters is None else num_clusters
        res = kmeans(codes.float(), k, seed=seed, n_init=n_init)
        mask = cluster_bit_mask(codes, res.assign, k, margin, reference_bug=reference_mask_bug)
        return cls(res.centers, res.assign, mask, **kwargs)  # type: ignore[arg-type]

    def forward(
        self, student_logits_i: Tensor, teacher_codes_i: Tensor, teacher_codes_j: Tensor, index: Tensor
    ) -> Tensor:
        """Args: ``student_logits_i`` ``[B, b]`` hash-head outputs of view i; ``teacher_codes_i``/``_j`` ``[B, b]``
        ``±1`` teacher codes of views i and j; ``index`` ``[B]`` dataset indices. Returns the scalar loss."""
        _, z_i = hash_codes_ste(student_logits_i)
        cluster = self.assign[index]
        mask_rows = self.mask[cluster] if self.use_mask else None
        tj_for_assign = teacher_codes_j.float()
        if self.aug_cluster_from_masked and mask_rows is not None:
            tj_for_assign = tj_for_assign * mask_rows
        aug = nearest_center(tj_for_assign, self.centers) if self.false_positives else None
        return brcd_loss(
            z_i,
            teacher_codes_i,
            teacher_codes_j,
            cluster=cluster,
            aug_cluster=aug,
            mask_rows=mask_rows,
            alpha=self.alpha,
            temperature=self.temperature,
            false_negatives=self.false_negatives,
            false_positives=self.false_positives,
        )


__all__ = [
    "FALSE_NEGATIVE_PENALTY",
    "BRCDCriterion",
    "KMeansResult",
    "bernoulli_kl",
    "brcd_loss",
    "choose_num_clusters",
    "cibhash_loss",
    "cluster_bit_mask",
    "code_matching_loss",
    "contrastive_code_kd",
    "hash_codes_ste",
    "kmeans",
    "nearest_center",
    "nt_xent",
    "relaxed_codes",
    "silhouette_score",
    "symmetric_bernoulli_kl",
]
