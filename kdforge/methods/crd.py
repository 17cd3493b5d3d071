"""Contrastive representation distillation."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdforge import collectives
from kdforge.data.batch import Batch
from kdforge.losses.feature import contrast_logits, crd_nce_loss, info_nce_loss
from kdforge.losses.logit import cross_entropy
from kdforge.methods.base import Method, Progress, StepOutput
from kdforge.models.features import pooled_dim, read_features
from kdforge.registry import METHODS
from kdforge.seeding import mix_seed

PositiveMode = Literal["exact", "relax"]
NegativeMode = Literal["other_class", "uniform"]
Objective = Literal["nce", "softmax"]


class Embed(nn.Module):
    """CRD's embedding head: ``l2normalize(Linear(x))`` (RepDistiller ``crd/criterion.py:Embed``).

    Args:
        in_features: width of the pooled features.
        out_features: embedding width (128 in the reference).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, ...]`` (flattened) → ``[B, out_features]`` with unit L2 rows."""
        return F.normalize(self.linear(x.flatten(1)), dim=1)


_ONE_CLASS = "CRD negatives=other_class: every training sample has the anchor's class"


@METHODS.register("crd")
class CRD(Method):
    """``L = γ·CE(z_s, y) + β·(L_NCE(student anchors, teacher bank) + L_NCE(teacher anchors, student bank))``.

    Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020. Checked against RepDistiller
    ``crd/criterion.py``, ``crd/memory.py`` and ``dataset/cifar100.py`` (``CIFAR100InstanceSample``), and mdistiller
    ``distillers/CRD.py``:

    - embeddings ``v = l2norm(Linear(f))`` of the pooled features of both networks (trainable, owned here);
    - two memory banks ``[N, D]`` (student and teacher embeddings), initialised uniform in ``±1/√(D/3)``; after the
      scores are computed, the rows of the batch become ``normalize(m·row + (1 − m)·v)``;
    - for each sample, one positive row and ``K`` negative rows; ``h = exp(⟨v, row⟩/τ)/Z``, with ``Z`` fixed on
      the first batch to ``mean(exp(⟨v, row⟩/τ))·N`` per direction (kept as a buffer);
    - the NCE loss of :func:`~kdforge.losses.feature.crd_nce_loss`, both directions summed.

    Positives (``mode``, RepDistiller's ``--mode``): ``exact`` uses the sample's own bank row; ``relax`` a random
    sample of the same class. Negatives (``negatives``): ``other_class`` draws them uniformly from samples of other
    classes, as the reference datasets do; ``uniform`` draws them uniformly from all samples but the positive (the
    reference ``ContrastMemory``'s own sampler when no contrast index is given). Both draw with replacement (the
    reference draws without replacement when ``K`` is below the class-negative count; the expected loss is the
    same). The engine passes every training label (``train_targets``), so other-class sampling is exact from the
    first step; with a custom loader that gives none, labels are learned from the batches as they come and a
    sample not yet seen counts as another class during the first epoch. ``objective=softmax`` replaces NCE by the
    InfoNCE cross-entropy over the ``K + 1`` scores (no ``Z``).

    The banks, their labels and ``Z`` are buffers (saved and restored with the method's state dict); the sampler's
    generator lives on the banks' device, is seeded from the global RNG at construction and is saved through
    :meth:`extra_state`. Banks are per process: under DDP each rank updates its own copy (no all-gather).

    Args:
        student: the network being trained.
        teacher: the frozen pretrained teacher.
        num_train: ``N``, the size of the training set (the range of ``batch.index``); set by the engine.
        ce_weight: γ.
        crd_weight: β (0.8 in RepDistiller and mdistiller).
        feat_dim: embedding width ``D``.
        nce_k: negatives per sample ``K``.
        temperature: τ.
        momentum: bank momentum ``m``.
        mode: positives, ``exact`` or ``relax``.
        negatives: ``other_class`` or ``uniform``.
        objective: ``nce`` (the paper's) or ``softmax``.
        train_targets: ``[N]`` labels of the training samples by ``batch.index``; set by the engine.
    """

    family = "contrastive"
    paper = "Tian et al., Contrastive Representation Distillation (ICLR 2020)"
    summary = "NCE between student and teacher embeddings against K negatives from momentum memory banks"
    needs_index = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        num_train: int,
        ce_weight: float = 1.0,
        crd_weight: float = 0.8,
        feat_dim: int = 128,
        nce_k: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        mode: PositiveMode = "exact",
        negatives: NegativeMode = "other_class",
        objective: Objective = "nce",
        train_targets: Tensor | None = None,
    ) -> None:
        super().__init__(student, teacher)
        if num_train < 2:
            raise ValueError(f"CRD needs a training set of at least 2 samples, got num_train={num_train}")
        if ce_weight < 0 or crd_weight < 0:
            raise ValueError(f"ce_weight and crd_weight must be >= 0, got {ce_weight}, {crd_weight}")
        if feat_dim < 1 or nce_k < 1:
            raise ValueError(f"feat_dim and nce_k must be >= 1, got {feat_dim}, {nce_k}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        for key, value, choices in (
            ("mode", mode, ("exact", "relax")),
            ("negatives", negatives, ("other_class", "uniform")),
            ("objective", objective, ("nce", "softmax")),
        ):
            if value not in choices:
                raise ValueError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
        self.num_train, self.ce_weight, self.crd_weight = num_train, ce_weight, crd_weight
        self.feat_dim, self.nce_k, self.temperature, self.momentum = feat_dim, nce_k, temperature, momentum
        self.mode, self.negatives, self.objective = mode, negatives, objective
        self.embed_s = Embed(pooled_dim(student), feat_dim)
        self.embed_t = Embed(pooled_dim(teacher), feat_dim)
        # Reference init: uniform in ±1/√(D/3), i.e. rows of expected squared norm 1.
        bound = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("bank_s", torch.rand(num_train, feat_dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("bank_t", torch.rand(num_train, feat_dim).mul_(2 * bound).sub_(bound))
        # -1: not seen yet. The engine passes every training label (train_targets), so other-class negatives are
        # exact from the first step; without them (a custom loader) the labels are learned as batches come.
        self.register_buffer("bank_label", torch.full((num_train,), -1, dtype=torch.long))
        if train_targets is not None:
            if train_targets.shape != (num_train,):
                raise ValueError(f"train_targets must have shape [{num_train}], got {list(train_targets.shape)}")
            self.bank_label.copy_(train_targets.to(torch.long))
        self.register_buffer("nce_z", torch.full((2,), -1.0))  # Z of (student, teacher) anchors; < 0: unset
        # Drawn from the global RNG, which the engine seeds with train.seed before building the method.
        self._seed = int(torch.randint(0, 2**62, ()).item())
        self._gen: torch.Generator | None = None
        self._pending_state: Tensor | None = None
        # With every label known up front the class blocks never change: computed once (per device), so the
        # step does no argsort over N labels and no host check.
        self._labels_known = train_targets is not None
        self._blocks: tuple[Tensor, Tensor, Tensor] | None = None

    # ------------------------------------------------------------------------------------------- sampling

    def _generator(self) -> torch.Generator:
        device = self.bank_label.device
        if self._gen is None or self._gen.device != device:
            gen = torch.Generator(device=device)
            rank = collectives.current().rank  # every rank draws its own negatives
            gen.manual_seed(self._seed if rank == 0 else mix_seed(self._seed, rank))
            if self._pending_state is not None:
                # A state saved on another device type does not fit this generator; the seed then stands.
                with contextlib.suppress(RuntimeError, TypeError, ValueError):
                    gen.set_state(self._pending_state)
                self._pending_state = None
            self._gen = gen
        return self._gen

    def _below(self, high: Tensor, cols: int) -> Tensor:
        """``[B, cols]`` integers, row ``b`` uniform in ``[0, high_b)``; ``high [B]`` int64 ≥ 1."""
        u = torch.rand(len(high), cols, generator=self._generator(), device=high.device, dtype=torch.float64)
        r = (u * high[:, None].double()).long()
        return torch.minimum(r, high[:, None] - 1)  # u·high rounds up to high only at u → 1

    def _class_blocks(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(order, counts, starts)``: indices grouped by label (unseen, -1, first), so class ``y`` occupies
        ``order[starts[y + 1] : starts[y + 1] + counts[y + 1]]``."""
        labels = self.bank_label
        if self._blocks is not None and self._blocks[0].device == labels.device:
            return self._blocks
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels + 1)
        blocks = order, counts, counts.cumsum(0) - counts
        if self._labels_known:
            if self.negatives == "other_class" and bool((counts == self.num_train).any()):
                raise ValueError(_ONE_CLASS)
            self._blocks = blocks
        return blocks

    @torch.no_grad()
    def sample_contrast(self, index: Tensor, target: Tensor) -> Tensor:
        """Bank rows to score for each sample: the positive in column 0, then ``K`` negatives.

        Args:
            index: ``[B]`` dataset indices.
            target: ``[B]`` labels (recorded into ``bank_label`` unless every label was given up front).

        Returns:
            ``[B, K + 1]`` int64 indices into the banks.
        """
        n, k = self.num_train, self.nce_k
        index, target = index.to(self.bank_label.device), target.to(self.bank_label.device)
        if not self._labels_known:
            self.bank_label[index] = target
        if self.mode == "exact" and self.negatives == "uniform":
            r = self._below(torch.full_like(index, n - 1), k)
            neg = r + (r >= index[:, None]).long()  # skips the positive: uniform over the other N − 1 rows
            return torch.cat([index[:, None], neg], dim=1)
        order, counts, starts = self._class_blocks()
        start, count = starts[target + 1], counts[target + 1]
        pos = index if self.mode == "exact" else order[start + self._below(count, 1).squeeze(1)]
        if self.negatives == "uniform":
            r = self._below(torch.full_like(index, n - 1), k)
            neg = r + (r >= pos[:, None]).long()
        else:
            rest = n - count
            if not self._labels_known and bool((rest < 1).any()):
                raise ValueError(_ONE_CLASS)
            r = self._below(rest, k)
            neg = order[r + (r >= start[:, None]).long() * count[:, None]]  # jumps over the class block
        return torch.cat([pos[:, None], neg], dim=1)

    @torch.no_grad()
    def _update_banks(self, index: Tensor, target: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """Momentum update of both banks' rows ``index`` with this batch's embeddings.

        Under DDP every rank applies the rows of all ranks (all-gathered; the shards of one step are disjoint), so
        the banks stay identical everywhere and equal those of one process training on the union of the batches.
        """
        if collectives.current().enabled:
            index = collectives.all_gather_cat(index)
            v_s, v_t = collectives.all_gather_cat(torch.cat([v_s, v_t], dim=1).float()).split([v_s.shape[1]] * 2, 1)
            if not self._labels_known:
                self.bank_label[index] = collectives.all_gather_cat(target.to(self.bank_label.device))
        for bank, emb in ((self.bank_s, v_s), (self.bank_t, v_t)):
            rows = bank[index] * self.momentum + emb.detach().to(bank.dtype) * (1.0 - self.momentum)
            bank.index_copy_(0, index, rows / rows.norm(dim=1, keepdim=True))

    def ddp_ignored_state(self) -> list[str]:
        return ["bank_s", "bank_t", "bank_label", "nce_z"]  # kept in step on every rank by _update_banks

    # -------------------------------------------------------------------------------------------- training

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        with torch.no_grad():
            pooled_t = read_features(self.teacher, batch.input).pooled
        out_s = read_features(self.student, batch.input)
        v_s, v_t = self.embed_s(out_s.pooled), self.embed_t(pooled_t)
        index = batch.index.to(self.bank_s.device)
        contrast = self.sample_contrast(index, batch.target)
        # Student anchors score against the teacher bank and teacher anchors against the student bank (the
        # reference's out_v1 and out_v2); the banks are read before this batch updates them.
        logits_s = contrast_logits(v_s, self.bank_t[contrast], self.temperature)
        logits_t = contrast_logits(v_t, self.bank_s[contrast], self.temperature)
        if self.objective == "nce":
            exp_s, exp_t = logits_s.exp(), logits_t.exp()
            with torch.no_grad():
                # Under DDP Z is the mean over every rank's first batch, as one process with their union would get.
                first = collectives.all_reduce_sum(torch.stack([exp_s.mean(), exp_t.mean()]))
                first = first * (self.num_train / collectives.current().world_size)
                self.nce_z.copy_(torch.where(self.nce_z > 0, self.nce_z, first))
            z = self.nce_z.clone()
            contrastive = crd_nce_loss(exp_s / z[0], self.num_train) + crd_nce_loss(exp_t / z[1], self.num_train)
        else:
            contrastive = info_nce_loss(logits_s) + info_nce_loss(logits_t)
        self._update_banks(index, batch.target, v_s, v_t)
        ce = self.ce_weight * cross_entropy(out_s.logits, batch.target)
        crd = self.crd_weight * contrastive
        return StepOutput(loss=ce + crd, losses={"ce": ce, "crd": crd}, logits=out_s.logits)

    def extra_state(self) -> dict[str, Any]:
        state = self._gen.get_state() if self._gen is not None else self._pending_state
        return {"crd_seed": self._seed, "crd_rng": state}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._seed = int(state.get("crd_seed", self._seed))
        self._pending_state = state.get("crd_rng")
        self._gen = None  # rebuilt on the banks' device at the next draw, from the restored state
