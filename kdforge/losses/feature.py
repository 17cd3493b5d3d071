"""Feature, relation and contrastive distillation losses: FitNets, attention transfer, RKD and CRD.

Pure functions: no state, no modules. They compute in float32 with autocast switched off where a matrix product
feeds an exponential or a square root (a bf16 ``bmm`` of unit vectors divided by τ = 0.07 would put ~5 % noise
into ``exp``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


@contextlib.contextmanager
def _fp32(t: Tensor) -> Iterator[None]:
    # autocast would recast matmuls to half precision even for float32 inputs, so it is disabled explicitly.
    with torch.autocast(device_type=t.device.type, enabled=False):
        yield


# ---------------------------------------------------------------------------------------------------- FitNets


def hint_loss(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """FitNets hint loss: mean squared error between the regressed student map and the teacher's hint map.

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015. Checked against RepDistiller
    ``distiller_zoo/FitNet.py`` (``HintLoss = nn.MSELoss()``) and mdistiller ``distillers/FitNet.py``
    (``F.mse_loss``): the mean over every element, not the paper's sum.

    Args:
        student_map: ``[B, C, H, W]``, the output of the regressor ``r(F_s)``.
        teacher_map: ``[B, C, H, W]``, a constant target.

    Returns:
        Scalar float32.
    """
    if student_map.shape != teacher_map.shape:
        raise ValueError(
            f"hint maps differ in shape: student {tuple(student_map.shape)}, teacher {tuple(teacher_map.shape)}"
        )
    return F.mse_loss(student_map.float(), teacher_map.detach().float())


# ----------------------------------------------------------------------------------------- attention transfer


def attention_map(feat: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention ``normalize(mean_c F_c^p)`` flattened per sample.

    Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017; as in RepDistiller
    ``distiller_zoo/AT.py`` (``at``) and mdistiller ``distillers/AT.py``: the channel *mean* (not the paper's sum;
    the L2 normalization removes the difference) of ``F^p``, then L2-normalized over the ``H·W`` positions.

    Args:
        feat: ``[B, C, H, W]``.
        p: the power ``p`` (2 in every benchmark).

    Returns:
        ``[B, H·W]`` float32, unit L2 norm per row (a zero map stays zero).
    """
    return F.normalize(feat.float().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(student_feat: Tensor, teacher_feat: Tensor, p: float = 2.0) -> Tensor:
    """Attention-transfer loss of one stage pair: ``mean((Q_s − Q_t)²)`` over batch and positions.

    When the two maps differ in spatial size the larger one is adaptive-average-pooled to the smaller size
    *before* the attention map is formed (RepDistiller/mdistiller ``at_loss``); channel counts may differ freely.

    Args:
        student_feat: ``[B, C_s, H_s, W_s]``.
        teacher_feat: ``[B, C_t, H_t, W_t]``, a constant target.
        p: the power of :func:`attention_map`.

    Returns:
        Scalar float32.
    """
    fs, ft = student_feat, teacher_feat.detach()
    size = (min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1]))
    if tuple(fs.shape[-2:]) != size:
        fs = F.adaptive_avg_pool2d(fs, size)
    if tuple(ft.shape[-2:]) != size:
        ft = F.adaptive_avg_pool2d(ft, size)
    return (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()


# ------------------------------------------------------------------------------------------------------ RKD


def pairwise_distances(emb: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """Euclidean distance matrix with an exact-zero diagonal, as RKD's ``pdist``.

    Args:
        emb: ``[B, D]``.
        squared: return squared distances.
        eps: lower clamp of the squared distance before the square root (keeps the gradient finite).

    Returns:
        ``[B, B]`` float32.
    """
    with _fp32(emb):
        e = emb.float()
        sq = e.pow(2).sum(dim=1)
        d2 = (sq[:, None] + sq[None, :] - 2.0 * e @ e.t()).clamp(min=eps)
        d = d2 if squared else d2.sqrt()
        # Zeroing the diagonal by a mask, not in place, so autograd sees a plain product.
        return d * (1.0 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def rkd_distance_loss(student: Tensor, teacher: Tensor, squared: bool = False, eps: float = 1e-12) -> Tensor:
    """RKD distance term ``mean_{i,j} smoothL1(ψ_D(s_i, s_j), ψ_D(t_i, t_j))``, ``ψ_D = ‖a − b‖ / μ``.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019. Checked against RepDistiller
    ``distiller_zoo/RKD.py`` and mdistiller ``distillers/RKD.py``: ``μ`` is the mean of the *non-zero* distances of
    the batch (each network its own), the Huber loss has δ = 1 and the mean runs over all ``B²`` entries, diagonal
    included.

    Args:
        student: ``[B, D_s]`` embeddings (flattened if more dims).
        teacher: ``[B, D_t]``, a constant target.
        squared: use squared distances (the reference default is ``False``).
        eps: see :func:`pairwise_distances`.

    Returns:
        Scalar float32.
    """
    s, t = student.flatten(1), teacher.detach().flatten(1)
    with torch.no_grad():
        t_d = pairwise_distances(t, squared, eps)
        t_d = t_d / t_d[t_d > 0].mean()
    d = pairwise_distances(s, squared, eps)
    d = d / d[d > 0].mean()
    return F.smooth_l1_loss(d, t_d)


def _angles(emb: Tensor) -> Tensor:
    """``[B³]`` cosines ``⟨e_ji, e_ki⟩`` with ``e_ji = normalize(x_j − x_i)`` (vertex ``i``); zero when ``j = i``."""
    diff = emb[None, :, :] - emb[:, None, :]  # diff[i, j] = x_j − x_i
    unit = F.normalize(diff, p=2, dim=2)
    return torch.bmm(unit, unit.transpose(1, 2)).flatten()


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD angle term ``mean_{i,j,k} smoothL1(ψ_A^s, ψ_A^t)`` with ``ψ_A = ⟨e_ji, e_ki⟩``, over all ``B³`` triplets.

    Same sources as :func:`rkd_distance_loss`. Memory grows as ``B²·D`` (the unit difference vectors).

    Args:
        student: ``[B, D_s]``.
        teacher: ``[B, D_t]``, a constant target.

    Returns:
        Scalar float32.
    """
    s, t = student.flatten(1).float(), teacher.detach().flatten(1).float()
    with _fp32(s):
        with torch.no_grad():
            t_angle = _angles(t)
        return F.smooth_l1_loss(_angles(s), t_angle)


# ------------------------------------------------------------------------------------------------------ CRD


def contrast_logits(anchor: Tensor, rows: Tensor, temperature: float) -> Tensor:
    """``⟨v, m_k⟩ / τ`` between each anchor and its ``K + 1`` memory rows (the positive first).

    Args:
        anchor: ``[B, D]`` L2-normalized embeddings.
        rows: ``[B, K + 1, D]`` memory-bank rows (constants).
        temperature: τ > 0.

    Returns:
        ``[B, K + 1]`` float32.
    """
    with _fp32(anchor):
        return torch.bmm(rows.detach().float(), anchor.float()[:, :, None]).squeeze(2) / temperature


def crd_nce_loss(scores: Tensor, num_data: int, eps: float = 1e-7) -> Tensor:
    """CRD's NCE loss (Eq. 18 of Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020).

    With ``h = exp(⟨v, m⟩/τ)/Z`` (``scores``), ``K`` negatives and noise ``P_n = 1/N``::

        L = −(1/B)·Σ_b [ log(h⁺/(h⁺ + K·P_n + ε)) + Σ_k log(K·P_n/(h_k⁻ + K·P_n + ε)) ]

    Checked against RepDistiller ``crd/criterion.py`` (``ContrastLoss``, ε = 1e-7 in both denominators only).

    Args:
        scores: ``[B, K + 1]`` positive ``h⁺`` in column 0, negatives after it.
        num_data: ``N``, the number of training samples (the size of the memory bank).
        eps: ε.

    Returns:
        Scalar float32.
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [B, K + 1] with K >= 1, got {tuple(scores.shape)}")
    h = scores.float()
    k_pn = (h.shape[1] - 1) / float(num_data)
    log_pos = torch.log(h[:, 0] / (h[:, 0] + k_pn + eps))
    log_neg = torch.log(k_pn / (h[:, 1:] + k_pn + eps))
    return -(log_pos.sum() + log_neg.sum()) / h.shape[0]


def info_nce_loss(logits: Tensor) -> Tensor:
    """Softmax (InfoNCE) contrastive loss ``mean_b −log softmax(logits_b)[0]``: the positive against its ``K``
    negatives, normalized exactly instead of through NCE's constant ``Z``.

    Args:
        logits: ``[B, K + 1]`` ``⟨v, m⟩/τ``, the positive in column 0.

    Returns:
        Scalar float32.
    """
    z = logits.float()
    return F.cross_entropy(z, torch.zeros(z.shape[0], dtype=torch.long, device=z.device))


__all__ = [
    "at_loss",
    "attention_map",
    "contrast_logits",
    "crd_nce_loss",
    "hint_loss",
    "info_nce_loss",
    "pairwise_distances",
    "rkd_angle_loss",
    "rkd_distance_loss",
]
