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

from kdforge.data.batch import Batch
from kdforge.errors import ConfigError
from kdforge.losses.hashing import cibhash_loss
from kdforge.models.dense.hashing import HASHING_MODELS, BinaryHashExport, binary_codes, build_hashing_model
from kdforge.ops.retrieval import evaluate_retrieval, precision_recall_by_radius
from kdforge.registry import TASKS
from kdforge.tasks.base import EVALUATED_SPLIT, Evaluator, Reducer, Task

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
    The engine does all three through :meth:`update_batch`: the evaluated (test) split is the queries, the
    ``database`` split (:attr:`extra_splits`) is encoded by the same network and, in a distillation run, by the
    teacher (``teacher_database``). ``compute`` gathers everything to rank 0, orders each split by dataset index
    (the ranking's tie order), and reports ``map`` (student queries vs student database), ``precision@k`` and, with
    teacher codes, ``map_teacher_db`` (student queries vs teacher database: BRCD's second search paradigm); one sum
    then gives every rank the same numbers.

    Args:
        topk: the ``k`` of mAP@k (1,000 on CIFAR-10, 5,000 on NUS-WIDE/COCO); ``None`` = mAP@all.
        chunk_size: queries scored at a time.
        pr_curve: also report precision and recall at every Hamming radius (``pr_precision@r``, ``pr_recall@r``).
        teacher_database: ask the engine for the teacher's database codes when a teacher exists (``map_teacher_db``;
            costs one teacher pass over the database per evaluation).
        bits: the code length (names the precision–recall keys on every rank of a distributed evaluation; ``None``
            reads it from the codes).
    """

    primary: ClassVar[str] = "map"
    higher_is_better: ClassVar[bool] = True
    extra_splits: tuple[str, ...] = ("database",)

    def __init__(
        self,
        topk: int | None = 1000,
        chunk_size: int = 128,
        pr_curve: bool = False,
        teacher_database: bool = True,
        bits: int | None = None,
    ) -> None:
        self.topk = topk
        self.chunk_size = chunk_size
        self.pr_curve = pr_curve
        self.teacher_splits = ("database",) if teacher_database else ()
        self.bits = bits
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

    def update_batch(self, preds: Tensor, batch: Batch, split: str = EVALUATED_SPLIT) -> None:
        """The engine's entry: ``split`` is the queries (:data:`EVALUATED_SPLIT`), ``"database"`` or
        ``"teacher_database"``; labels are ``batch.task_targets`` and the order ``batch.index``."""
        store = {EVALUATED_SPLIT: self._query, "database": self._database, "teacher_database": self._teacher_db}
        if split not in store:
            raise ValueError(f"HashingEvaluator has no split {split!r}; it takes {sorted(store)}")
        store[split].add(preds, batch.task_targets, batch.index)

    def _keys(self, bits: int, teacher: bool) -> list[str]:
        tag = "all" if self.topk is None else str(self.topk)
        keys = ["map", f"map@{tag}", f"precision@{tag}"] + (["map_teacher_db"] if teacher else [])
        if self.pr_curve:
            keys += [f"pr_{m}@{r}" for r in range(bits + 1) for m in ("precision", "recall")]
        return keys

    def compute(self, reducer: Reducer | None = None) -> dict[str, float]:
        if reducer is None:
            return self._score([(self._query.state(), self._database.state(), self._teacher_db.state())])
        mine = (self._query.state(), self._database.state(), self._teacher_db.state())
        gathered = reducer.gather(mine)
        # Rank 0 scores the gathered codes; one sum of its values (zeros elsewhere) gives every rank the same numbers,
        # exactly, as the training loop reads the primary metric on every rank. The key set is known everywhere: the
        # code length from any stored codes, the teacher flag from whether this rank was fed teacher codes.
        metrics = self._score(gathered) if gathered is not None else {}
        bits = self.bits or max((c.shape[1] for c in self._codes()), default=0)
        keys = self._keys(bits, self._teacher_db.seen > 0)
        values = reducer.sum(torch.tensor([metrics.get(k, 0.0) for k in keys], dtype=torch.float64))
        return {k: float(v) for k, v in zip(keys, values.tolist(), strict=True)}

    def _codes(self) -> list[Tensor]:
        return [c for store in (self._query, self._database, self._teacher_db) for c in store.codes]

    def _score(self, gathered: list[Any]) -> dict[str, float]:
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


#: channels of one view; a training batch stacks the two views on the channel axis
VIEW_CHANNELS = 3


def split_views(x: Tensor) -> tuple[Tensor, Tensor]:
    """The two views of a training batch ``[B, 2·3, H, W]`` (stacked on channels) as two ``[B, 3, H, W]`` tensors.

    Stacking on channels keeps one row per sample, so ``Batch.index``/``target`` stay aligned with ``input``.
    """
    if x.ndim != 4 or x.shape[1] != 2 * VIEW_CHANNELS:
        raise ValueError(
            f"a hashing training batch holds two views stacked on channels, [B, 6, H, W]; got {tuple(x.shape)} "
            "(use a dataset registered for task 'hashing': kdforge datasets)"
        )
    return x[:, :VIEW_CHANNELS], x[:, VIEW_CHANNELS:]


@TASKS.register("hashing")
class HashingTask(Task):
    """Unsupervised hashing with CIBHash's objective.

    A training batch's ``input`` is the two augmented views of each image stacked on the channel axis
    (``[B, 6, H, W]``, :func:`split_views`); :meth:`train_outputs` encodes each view separately (as the reference
    does, so BatchNorm sees one view at a time) and returns ``(h_i, h_j)``. Evaluation inputs are single images.

    Args:
        bits: code length (16, 32 or 64).
        temperature: NT-Xent τ (CIBHash 0.3).
        kl_weight: weight of the symmetric Bernoulli KL (CIBHash 0.001).
        topk: mAP@k of the evaluator (CIFAR-10 protocol of BRCD: 1,000; NUS-WIDE/COCO 5,000; ``None`` = mAP@all).
        hidden: hash-head MLP width (``None`` = linear head).
        freeze_backbone: train only the hash head (CIBHash and BRCD freeze their pretrained backbones).
        teacher_database: in a distillation run, also report ``map_teacher_db`` (student queries against the
            teacher's database codes; one teacher pass over the database per evaluation).
        pr_curve: also record precision and recall at every Hamming radius in each evaluation
            (``test_pr_precision@r``, ``test_pr_recall@r`` in ``metrics.jsonl``; ``kdforge report`` plots them).
            Free: the ranking already counts the database items at each distance.
    """

    name: ClassVar[str] = "hashing"
    summary_metrics: ClassVar[tuple[str, ...]] = ("map",)
    optional_summary_metrics: ClassVar[tuple[str, ...]] = ("map_teacher_db",)
    takes_pretrained_backbone: ClassVar[bool] = True

    def __init__(
        self,
        bits: int = 64,
        temperature: float = 0.3,
        kl_weight: float = 0.001,
        topk: int | None = 1000,
        hidden: int | None = None,
        freeze_backbone: bool = False,
        teacher_database: bool = True,
        pr_curve: bool = False,
    ) -> None:
        if bits not in SUPPORTED_BITS:
            raise ConfigError(f"task.bits must be one of {SUPPORTED_BITS}, got {bits}")
        if temperature <= 0:
            raise ConfigError(f"task.temperature must be positive, got {temperature}")
        if topk is not None and topk < 1:
            raise ConfigError(f"task.topk must be a positive integer or null (mAP@all), got {topk}")
        if hidden is not None and hidden < 1:
            raise ConfigError(f"task.hidden must be a positive width or null (linear head), got {hidden}")
        self.bits = bits
        self.temperature = temperature
        self.kl_weight = kl_weight
        self.topk = topk
        self.hidden = hidden
        self.freeze_backbone = freeze_backbone
        self.teacher_database = teacher_database
        self.pr_curve = pr_curve

    @classmethod
    def model_names(cls) -> list[str]:
        return sorted(HASHING_MODELS)

    def build_model(self, arch: str, **kw: Any) -> nn.Module:
        """A hashing network: ``hash_<zoo name>`` (or a bare zoo name) with a ``bits``-bit head.

        ``kw`` passes ``pretrained`` (backbone weights), ``freeze_backbone`` and ``hidden`` (override the task's);
        ``num_classes`` (passed by the engine to every task's networks) is ignored: a hasher has no classes.
        """
        name = arch if arch.startswith("hash_") else f"hash_{arch}"
        if name not in HASHING_MODELS:
            raise ConfigError(f"unknown hashing model {arch!r}; use hash_<model> with a zoo model (kdforge models)")
        kw.pop("num_classes", None)
        hidden = kw.pop("hidden", self.hidden)
        freeze = kw.pop("freeze_backbone", self.freeze_backbone)
        return build_hashing_model(name[len("hash_") :], bits=self.bits, hidden=hidden, freeze_backbone=freeze, **kw)

    def train_outputs(self, model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(h_i, h_j)``: the continuous codes ``[B, bits]`` of the two views of ``x`` ``[B, 6, H, W]``."""
        x_i, x_j = split_views(x)
        return model(x_i), model(x_j)

    def loss(self, outputs: tuple[Tensor, Tensor], targets: Any = None) -> dict[str, Tensor]:
        """CIBHash's loss on the two views' continuous codes ``(h_i, h_j)``, each ``[B, bits]``; ``targets`` unused
        (unsupervised). Returns ``{"contrastive", "kl"}`` (weighted parts)."""
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 2:
            raise ValueError("the hashing loss needs the outputs of two views: (codes_view1, codes_view2)")
        return cibhash_loss(outputs[0], outputs[1], self.temperature, self.kl_weight)

    def predict(self, outputs: Tensor) -> Tensor:
        """``±1`` codes ``[B, bits]`` float32 from the continuous codes (one view)."""
        return binary_codes(outputs)

    def export_module(self, model: nn.Module) -> nn.Module:
        """The encoder emitting ``±1`` codes ``[B, bits]`` float32 (:class:`BinaryHashExport`): ``kdforge export``
        writes a graph whose output is the binary code, equal to :meth:`predict` of the network's output."""
        return BinaryHashExport(model)

    def evaluator(self) -> HashingEvaluator:
        return HashingEvaluator(
            topk=self.topk, pr_curve=self.pr_curve, teacher_database=self.teacher_database, bits=self.bits
        )


__all__ = ["SUPPORTED_BITS", "VIEW_CHANNELS", "HashingEvaluator", "HashingTask", "split_views"]
