"""Unsupervised deep hashing: learn ``bits``-bit binary codes whose Hamming ranking retrieves same-class images.

The task's own loss is CIBHash's (zexuanqiu/CIBHash, IJCAI 2021) on two augmented views of every image
(:func:`kdforge.losses.hashing.cibhash_loss`); predictions are ``±1`` codes; the metric is Hamming-ranking mAP
(:mod:`kdforge.ops.retrieval`, docs/tasks/hashing.md). Distillation terms (code matching, contrastive code KD,
BRCD) live in :mod:`kdforge.losses.hashing`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdforge.errors import ConfigError
from kdforge.losses.hashing import cibhash_loss
from kdforge.models.dense.hashing import HASHING_MODELS, binary_codes, build_hashing_model
from kdforge.ops.retrieval import evaluate_retrieval, precision_recall_by_radius
from kdforge.tasks.base import Evaluator, LocalReducer, Reducer

SUPPORTED_BITS = (16, 32, 64)


class _CodeStore:
    """Codes, labels and dataset indices of one split, accumulated batch by batch."""

    def __init__(self) -> None:
        self.codes: list[Tensor] = []
        self.labels: list[Tensor] = []
        self.index: list[Tensor] = []
        self.seen = 0

    def add(self, codes: Tensor, labels: Tensor, index: Tensor | None) -> None:
        if codes.shape[0] != labels.shape[0]:
            raise ValueError(f"{codes.shape[0]} codes but {labels.shape[0]} labels in one batch")
        if index is None:
            # no dataset indices: arrival order (exact in one process; give indices under DDP)
            index = torch.arange(self.seen, self.seen + codes.shape[0], device=codes.device)
        self.seen += codes.shape[0]
        # sign, not a cast: continuous codes passed by mistake still become their binary codes
        self.codes.append(torch.sign(codes.detach()).to(torch.int8).cpu())
        self.labels.append(labels.detach().cpu())
        self.index.append(index.detach().long().cpu())

    def state(self) -> tuple[Tensor, Tensor, Tensor] | None:
        if not self.codes:
            return None
        return torch.cat(self.codes), torch.cat(self.labels), torch.cat(self.index)


def _merge(states: list[tuple[Tensor, Tensor, Tensor] | None]) -> tuple[Tensor, Tensor] | None:
    """Concatenates every rank's (codes, labels, index), orders by dataset index and drops repeated indices (a
    distributed sampler pads the last shard with samples it already gave)."""
    present = [s for s in states if s is not None]
    if not present:
        return None
    codes = torch.cat([s[0] for s in present])
    labels = torch.cat([s[1] for s in present])
    index = torch.cat([s[2] for s in present])
    order = torch.sort(index, stable=True).indices
    index, codes, labels = index[order], codes[order], labels[order]
    keep = torch.ones_like(index, dtype=torch.bool)
    keep[1:] = index[1:] != index[:-1]
    return codes[keep].float(), labels[keep]


class HashingEvaluator(Evaluator):
    """Hamming-ranking retrieval of the query codes against the database codes.

    Feed the queries with :meth:`update` (the loop's ``update(preds, targets)``), the database with
    :meth:`update_database` and, for distillation, the teacher's database codes with :meth:`update_teacher_database`.
    ``compute`` gathers everything to rank 0, orders each split by dataset index (the ranking's tie order), and
    reports ``map`` (student queries vs student database), ``precision@k`` and, with teacher codes,
    ``map_teacher_db`` (student queries vs teacher database: BRCD's second search paradigm).

    Args:
        topk: the ``k`` of mAP@k (1,000 on CIFAR-10, 5,000 on NUS-WIDE/COCO); ``None`` = mAP@all.
        chunk_size: queries scored at a time.
        pr_curve: also report precision and recall at every Hamming radius (``pr_precision@r``, ``pr_recall@r``).
    """

    primary: ClassVar[str] = "map"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, topk: int | None = 1000, chunk_size: int = 128, pr_curve: bool = False) -> None:
        self.topk = topk
        self.chunk_size = chunk_size
        self.pr_curve = pr_curve
        self.reset()

    def reset(self) -> None:
        self._query = _CodeStore()
        self._database = _CodeStore()
        self._teacher_db = _CodeStore()

    def update(self, preds: Tensor, targets: Tensor, index: Tensor | None = None) -> None:
        """Adds query codes ``[B, b]`` (``±1``), their labels (``[B]`` int or ``[B, K]`` multi-hot), dataset indices."""
        self._query.add(preds, targets, index)

    def update_database(self, codes: Tensor, labels: Tensor, index: Tensor | None = None) -> None:
        """Adds database codes ``[B, b]`` with their labels and dataset indices."""
        self._database.add(codes, labels, index)

    def update_teacher_database(self, codes: Tensor, labels: Tensor, index: Tensor | None = None) -> None:
        """Adds the teacher's database codes ``[B, b]`` (same images and indices as :meth:`update_database`)."""
        self._teacher_db.add(codes, labels, index)

    def compute(self, reducer: Reducer | None = None) -> dict[str, float]:
        reducer = reducer or LocalReducer()
        gathered = reducer.gather((self._query.state(), self._database.state(), self._teacher_db.state()))
        if gathered is None:
            return {}
        query = _merge([g[0] for g in gathered])
        database = _merge([g[1] for g in gathered])
        teacher = _merge([g[2] for g in gathered])
        if query is None or database is None:
            raise ValueError("HashingEvaluator needs query codes (update) and database codes (update_database)")
        k = self.topk
        res = evaluate_retrieval(query[0], database[0], query[1], database[1], k, self.chunk_size)
        tag = "all" if k is None else str(k)
        out = {"map": res.map, f"map@{tag}": res.map, f"precision@{tag}": float(res.precision_at_k.mean())}
        if teacher is not None:
            out["map_teacher_db"] = evaluate_retrieval(
                query[0], teacher[0], query[1], teacher[1], k, self.chunk_size
            ).map
        if self.pr_curve:
            prec, rec = precision_recall_by_radius(res)
            for r in range(prec.shape[0]):
                out[f"pr_precision@{r}"] = float(prec[r])
                out[f"pr_recall@{r}"] = float(rec[r])
        return out


class HashingTask:
    """Unsupervised hashing with CIBHash's objective.

    Args:
        bits: code length (16, 32 or 64).
        temperature: NT-Xent τ (CIBHash 0.3).
        kl_weight: weight of the symmetric Bernoulli KL (CIBHash 0.001).
        topk: mAP@k of the evaluator (CIFAR-10 protocol of BRCD: 1,000; NUS-WIDE/COCO 5,000; ``None`` = mAP@all).
        hidden: hash-head MLP width (``None`` = linear head).
    """

    name: ClassVar[str] = "hashing"

    def __init__(
        self,
        bits: int = 64,
        temperature: float = 0.3,
        kl_weight: float = 0.001,
        topk: int | None = 1000,
        hidden: int | None = None,
    ) -> None:
        if bits not in SUPPORTED_BITS:
            raise ConfigError(f"task.bits must be one of {SUPPORTED_BITS}, got {bits}")
        if temperature <= 0:
            raise ConfigError(f"task.temperature must be positive, got {temperature}")
        if topk is not None and topk < 1:
            raise ConfigError(f"task.topk must be a positive integer or null (mAP@all), got {topk}")
        self.bits = bits
        self.temperature = temperature
        self.kl_weight = kl_weight
        self.topk = topk
        self.hidden = hidden

    def build_model(self, arch: str, **kw: Any) -> nn.Module:
        """A hashing network: ``hash_<zoo name>`` (or a bare zoo name) with a ``bits``-bit head.

        ``kw`` passes ``pretrained`` (backbone weights), ``freeze_backbone`` and ``hidden`` (overrides the task's).
        """
        name = arch if arch.startswith("hash_") else f"hash_{arch}"
        if name not in HASHING_MODELS:
            raise ConfigError(f"unknown hashing model {arch!r}; use hash_<model> with a zoo model (kdforge models)")
        hidden = kw.pop("hidden", self.hidden)
        return build_hashing_model(name[len("hash_") :], bits=self.bits, hidden=hidden, **kw)

    def loss(self, outputs: tuple[Tensor, Tensor], targets: Any = None) -> dict[str, Tensor]:
        """CIBHash's loss on the two views' continuous codes ``(h_i, h_j)``, each ``[B, bits]``; ``targets`` unused
        (unsupervised). Returns ``{"contrastive", "kl"}`` (weighted parts)."""
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 2:
            raise ValueError("the hashing loss needs the outputs of two views: (codes_view1, codes_view2)")
        return cibhash_loss(outputs[0], outputs[1], self.temperature, self.kl_weight)

    def predict(self, outputs: Tensor) -> Tensor:
        """``±1`` codes ``[B, bits]`` float32 from the continuous codes (one view)."""
        return binary_codes(outputs)

    def evaluator(self) -> HashingEvaluator:
        return HashingEvaluator(topk=self.topk)


__all__ = ["SUPPORTED_BITS", "HashingEvaluator", "HashingTask"]
