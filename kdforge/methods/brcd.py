"""BRCD: Bit-mask Robust Contrastive knowledge Distillation for unsupervised semantic hashing (WWW 2024)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdforge import collectives
from kdforge.data.batch import Batch
from kdforge.losses.hashing import (
    brcd_loss,
    choose_num_clusters,
    cluster_bit_mask,
    hash_codes_ste,
    kmeans,
    nearest_center,
)
from kdforge.methods.base import Method, Progress, StepOutput, total_loss
from kdforge.models.dense.hashing import binary_codes
from kdforge.registry import METHODS
from kdforge.tasks.base import Task

#: the candidate k of the silhouette rule (:func:`kdforge.losses.hashing.choose_num_clusters`)
K_CANDIDATES = tuple(range(2, 21))


@METHODS.register("brcd")
class BRCD(Method):
    """``L = L_CIBHash(s) + w·L_BRCD(z_i, t_i, t_j; clusters, mask)`` (hly1998/BRCD ``ours_distill_CIBHash.py``).

    The loss (:func:`kdforge.losses.hashing.brcd_loss`) is the reference's: a positive mixing the same-view anchor
    ``cos(z_i, t_i)`` and the masked cross-view pair ``cos(z̃_i, t̃_j)`` with weight α, the other codes of the batch as
    negatives, same-cluster negatives penalised (false negatives), α = 1 where the teacher's augmented code left the
    sample's cluster (false positives), bits masked per cluster. The clusters are k-means clusters of the teacher's
    ``±1`` training codes. The reference encodes the training set with its test transform before distilling; here the
    method records the teacher's codes of each image's first view during the first ``cluster_epochs`` epochs (they
    are computed for the loss anyway, and the method never sees the data outside its steps), then clusters them at
    the start of the next epoch, identically on every rank; until then the cluster pieces are off
    (docs/methods/brcd.md). Every piece can be switched off for ablation.

    Args:
        student: the student hasher (``hash_<model>``).
        teacher: the frozen teacher hasher with the same ``bits``.
        task: the run's hashing task (its ``bits`` sizes the code table).
        num_train: training-set size (``Batch.index`` range).
        epochs: the run's epochs (clustering must happen within them).
        alpha: α (reference 0.8; 1 drops the cross-view positive).
        temperature: τ (reference 0.3).
        brcd_weight: ``w`` (reference 1).
        task_loss: keep the student's own CIBHash loss (the reference does).
        num_clusters: k; ``None`` = the silhouette rule over k = 2..20 (the reference uses 10 on CIFAR-10).
        margin: bit-mask threshold on ``|mean code|`` (reference 0.5).
        n_init: k-means restarts (reference 30).
        cluster_seed: k-means and silhouette-subsample seed.
        cluster_epochs: epochs of teacher codes recorded before clustering.
        use_mask: the per-cluster bit mask (reference ``--revise_distance``).
        false_negatives: penalise same-cluster negatives (``--false_neg``).
        false_positives: drop the cross-view positive of samples whose augmented teacher code left their cluster
            (``--false_pos``).
        reference_all_zero_mask: build the released code's literal mask, all zeros for any margin ≤ 1
            (``get_matrix.py``'s two ``where``); for regression comparisons only — it silences the cross-view
            positive and every negative.
        aug_cluster_from_masked: assign the augmented teacher code to a cluster after masking (the reference's order
            of operations); default: the unmasked code.
    """

    family = "dense"
    paper = "He et al., Bit-mask Robust Contrastive Knowledge Distillation for Unsupervised Semantic Hashing (WWW 2024)"
    summary = (
        "contrastive student-teacher code alignment across views, cluster-aware false pos/neg, per-cluster bit mask"
    )
    exact = False  # the loss is exact; the teacher codes clustered and the mask are changed (docs/methods/brcd.md)
    needs_index = True
    tasks = ("hashing",)
    standard_pairs = False

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        task: Task,
        num_train: int,
        epochs: int,
        alpha: float = 0.8,
        temperature: float = 0.3,
        brcd_weight: float = 1.0,
        task_loss: bool = True,
        num_clusters: int | None = None,
        margin: float = 0.5,
        n_init: int = 30,
        cluster_seed: int = 0,
        cluster_epochs: int = 1,
        use_mask: bool = True,
        false_negatives: bool = True,
        false_positives: bool = True,
        reference_all_zero_mask: bool = False,
        aug_cluster_from_masked: bool = False,
    ) -> None:
        super().__init__(student, teacher)
        bits = int(getattr(task, "bits", 0))
        if not bits:
            raise ValueError("brcd distils the hashing task (task.name: hashing), whose bits size the code table")
        if not 0 <= alpha <= 1 or temperature <= 0 or brcd_weight < 0:
            raise ValueError(f"need 0 <= alpha <= 1, temperature > 0, brcd_weight >= 0; got {alpha}, {temperature}")
        if num_clusters is not None and not 1 <= num_clusters <= num_train:
            raise ValueError(f"num_clusters must lie in [1, {num_train}] (the training images), got {num_clusters}")
        if not 1 <= cluster_epochs < epochs:
            raise ValueError(
                f"cluster_epochs={cluster_epochs} must be at least 1 and below the run's {epochs} epochs: BRCD "
                "clusters the teacher codes it recorded in those epochs and distils with the clusters afterwards"
            )
        self.alpha, self.temperature, self.brcd_weight, self.task_loss = alpha, temperature, brcd_weight, task_loss
        self.num_clusters, self.margin, self.n_init, self.cluster_seed = num_clusters, margin, n_init, cluster_seed
        self.cluster_epochs, self.use_mask = cluster_epochs, use_mask
        self.false_negatives, self.false_positives = false_negatives, false_positives
        self.reference_all_zero_mask, self.aug_cluster_from_masked = reference_all_zero_mask, aug_cluster_from_masked
        max_k = num_clusters or max(K_CANDIDATES)
        # The cluster state lives in buffers of fixed shape, so checkpoints hold it and resumed runs reuse it.
        self.register_buffer("recorded_codes", torch.zeros(num_train, bits))  # 0 = not recorded yet
        self.register_buffer("assign", torch.full((num_train,), -1, dtype=torch.int64))  # -1 = no cluster
        self.register_buffer("centers", torch.zeros(max_k, bits))
        self.register_buffer("mask", torch.ones(max_k, bits))
        self.register_buffer("k", torch.zeros((), dtype=torch.int64))  # 0 = not clustered yet

    def ddp_ignored_state(self) -> list[str]:
        # Each rank records the codes of its own shard; cluster() sums the tables over ranks.
        return ["recorded_codes"]

    @property
    def clustered(self) -> bool:
        return bool(self.k > 0)

    def on_epoch_start(self, epoch: int) -> None:
        if epoch >= self.cluster_epochs and not self.clustered:
            self.cluster()

    @torch.no_grad()
    def cluster(self) -> None:
        """k-means on the recorded teacher codes (summed over ranks: every rank gets the same table and clusters),
        each recorded sample's cluster, and the bit mask. Samples never recorded keep cluster −1 and are assigned
        to their nearest centre at each step."""
        table = collectives.all_reduce_sum(self.recorded_codes.clone())
        seen = table.abs().sum(1) > 0
        codes = torch.sign(table[seen])
        if codes.shape[0] < 2:
            raise RuntimeError("BRCD recorded fewer than two teacher codes before clustering; train on more images")
        k = self.num_clusters
        if k is None:
            k = choose_num_clusters(codes, tuple(c for c in K_CANDIDATES if c < codes.shape[0]), seed=self.cluster_seed)
        k = min(k, codes.shape[0])
        res = kmeans(codes, k, seed=self.cluster_seed, n_init=self.n_init)
        mask = cluster_bit_mask(codes, res.assign, k, self.margin, reference_bug=self.reference_all_zero_mask)
        self.assign.fill_(-1)
        self.assign[seen] = res.assign
        self.centers.zero_()
        self.centers[:k] = res.centers
        self.mask.fill_(1.0)
        self.mask[:k] = mask
        self.k.fill_(k)

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        h_i, h_j = self.task.train_outputs(self.student, batch.input)
        with torch.no_grad():
            t_i, t_j = (binary_codes(t) for t in self.task.train_outputs(self.teacher, batch.input))
        parts = self.task.loss((h_i, h_j), batch.task_targets) if self.task_loss else {}
        _, z_i = hash_codes_ste(h_i)
        if not self.clustered:
            with torch.no_grad():
                self.recorded_codes[batch.index] = t_i
            loss = brcd_loss(
                z_i, t_i, t_j, alpha=self.alpha, temperature=self.temperature, false_negatives=False,
                false_positives=False,
            )  # fmt: skip
        else:
            loss = self._clustered_loss(z_i, t_i, t_j, batch.index)
        parts["brcd"] = self.brcd_weight * loss
        return StepOutput(loss=total_loss(parts), losses=parts, logits=None)

    def _clustered_loss(self, z_i: Tensor, t_i: Tensor, t_j: Tensor, index: Tensor) -> Tensor:
        k = int(self.k)
        centers = self.centers[:k]
        cluster = self.assign[index]
        # a sample not recorded before clustering (a dropped last batch) takes its current code's nearest centre
        cluster = torch.where(cluster >= 0, cluster, nearest_center(t_i, centers))
        mask_rows = self.mask[cluster] if self.use_mask else None
        aug_cluster = None
        if self.false_positives:
            t_for_assign = t_j * mask_rows if self.aug_cluster_from_masked and mask_rows is not None else t_j
            aug_cluster = nearest_center(t_for_assign, centers)
        return brcd_loss(
            z_i, t_i, t_j, cluster=cluster, aug_cluster=aug_cluster, mask_rows=mask_rows, alpha=self.alpha,
            temperature=self.temperature, false_negatives=self.false_negatives, false_positives=self.false_positives,
        )  # fmt: skip


__all__ = ["BRCD", "K_CANDIDATES"]
