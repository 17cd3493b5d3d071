"""AFT-KD (reconstructed): attentional-and-feature blocks per stage, block alignment, and loss weights adapted to
each loss's rate of decrease."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.data.batch import Batch
from kdforge.losses.feature import attention_map
from kdforge.losses.logit import cross_entropy, kd_loss
from kdforge.methods.base import Method, Progress, StepOutput
from kdforge.models.features import StageReader
from kdforge.registry import METHODS

AFBForm = Literal["gate", "concat", "none"]
LOSS_NAMES = ("att", "feat", "kd")


def attention_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """``mean((A(F_s) − A(F_t))²)`` over batch and positions (the AT benchmark form; weight 1000 is the caller's)."""
    return (attention_map(f_s) - attention_map(f_t)).pow(2).mean()


def attention_feature_block(feat: Tensor, source: Tensor, form: AFBForm = "gate") -> Tensor:
    """The attentional-and-feature block (AFB) of one stage.

    ``gate``: ``φ(F) ⊙ σ(√(HW)·A(F))``: the (projected) feature modulated by its own spatial attention; the
    ``√(HW)`` rescales the unit-norm map to unit RMS, so the gate spans the same range at every resolution (at
    ``A(F)`` itself, entries ~``1/√(HW)`` would leave ``σ`` ≈ 0.5 everywhere). ``concat``: ``[φ(F); √(HW)·A(F)]``
    as an extra channel. ``none``: ``φ(F)`` alone (the ablation without attention).

    Args:
        feat: ``[B, C*, H, W]`` the feature in the common width (``φ(F)`` for the student, ``F`` for the teacher).
        source: ``[B, C, H, W]`` the stage map the attention is computed from (``F``).
        form: ``gate``, ``concat`` or ``none``.

    Returns:
        ``[B, C*, H, W]`` (gate, none) or ``[B, C* + 1, H, W]`` (concat), float32.
    """
    feat = feat.float()
    if form == "none":
        return feat
    b, _, h, w = source.shape
    att = attention_map(source).view(b, 1, h, w) * math.sqrt(h * w)
    if form == "gate":
        return feat * torch.sigmoid(att)
    if form == "concat":
        return torch.cat([feat, att], dim=1)
    raise ValueError(f"afb_form must be gate, concat or none, got {form!r}")


def dwa_weights(last: Tensor, before: Tensor, temperature: float = 2.0) -> Tensor:
    """Dynamic Weight Average: ``w_k = K·softmax_k((L_k(t−1)/L_k(t−2))/T)``.

    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019 (MTAN's DWA): a loss that
    decreased more slowly over the last epoch gets a larger weight; the weights sum to K.

    Args:
        last, before: ``[K]`` epoch-mean losses of the last two epochs.
        temperature: ``T``; larger is more uniform.
    """
    rate = last.float() / before.float().clamp_min(1e-12)
    return len(rate) * torch.softmax(rate / temperature, dim=0)


def block_ends(num_stages: int, num_blocks: int) -> list[int]:
    """The stage index (0-based) that ends each of ``num_blocks`` contiguous, near-equal groups of stages: the
    block partition that lets two networks with different stage counts be aligned block by block."""
    return [math.ceil((j + 1) * num_stages / num_blocks) - 1 for j in range(num_blocks)]


def _match_spatial(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger map to the smaller one's size (mdistiller's AT alignment)."""
    hs, ht = f_s.shape[-2:], f_t.shape[-2:]
    if hs == ht:
        return f_s, f_t
    size = (min(hs[0], ht[0]), min(hs[1], ht[1]))
    return F.adaptive_avg_pool2d(f_s, size), F.adaptive_avg_pool2d(f_t, size)


@METHODS.register("aft_kd")
class AFTKD(Method):
    """``L = γ·CE + Σ_k w_k·λ_k·L_k`` over ``L_att``, ``L_feat`` and ``L_kd`` (reconstructed).

    Yang, Yu, Sheng & Yang, "Attention and feature transfer based knowledge distillation", Sci. Rep. 13:18369
    (2023). Only the abstract was available; the idea is from it and the equations are a reconstruction
    (METHODS.md 3.2) from verified works:

    - **blocks and alignment**: both networks' stages are cut into the same number of contiguous blocks (default:
      one per stage, the smaller stage count when they differ; :func:`block_ends`); block ``j`` of the student is
      matched with block ``j`` of the teacher, pooled to the smaller resolution. One transform per block pair;
    - **AFB**: :func:`attention_feature_block`, with ``φ`` a 1×1 conv + BN from the student's width to the teacher's
      (the teacher side needs none, and a trainable teacher-side map could shrink both sides to zero);
    - ``L_att = Σ_j mean((A(F_s^j) − A(F_t^j))²)`` (AT, λ 1000), ``L_feat = Σ_j MSE(AFB_s^j, AFB_t^j)`` (λ 1),
      ``L_kd = τ²·KL`` (Hinton, τ 4, λ 1);
    - **adaptive weights**: Dynamic Weight Average (Liu et al., CVPR 2019) over the enabled losses' epoch means,
      :func:`dwa_weights`, ``w = 1`` for the first two epochs; the epoch sums and weights are buffers, so they are
      checkpointed with the method and a resumed run continues with the same weights. Under DDP the buffers follow
      rank 0 (DDP broadcasts buffers), so every rank uses the same weights.

    Every part can be switched off: a weight of 0 drops its loss (and, for ``feat_weight``, the adapters),
    ``afb_form=none`` removes the attention from the block, ``adaptive=false`` keeps ``w = 1``.

    Networks without the kdforge feature API are read through forward hooks: ``student_layers``/``teacher_layers``
    name the stage modules, or, when unset, the last module at each spatial resolution of a ``probe_size`` px probe
    input is used.

    Args:
        student: the network being trained.
        teacher: the frozen pretrained teacher.
        temperature: τ of the KD term.
        ce_weight: γ.
        att_weight: λ_att.
        feat_weight: λ_feat.
        kd_weight: λ_kd.
        afb_form: ``gate`` (feature ⊙ σ(attention)), ``concat`` (attention as an extra channel) or ``none``.
        blocks: number of aligned blocks (default: the smaller number of stages).
        adaptive: Dynamic Weight Average of the enabled losses (else fixed weights 1).
        dwa_temperature: T of the weight softmax.
        student_layers, teacher_layers: stage module paths for networks without ``forward_features``.
        probe_size: side of the probe input used to plan hooks for such networks.
    """

    family = "feature"
    paper = "Yang et al., Attention and feature transfer based knowledge distillation (Sci. Rep. 2023)"
    exact = False
    summary = "attention maps + attention-gated features per aligned block, losses weighted by their rate of decrease"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        ce_weight: float = 1.0,
        att_weight: float = 1000.0,
        feat_weight: float = 1.0,
        kd_weight: float = 1.0,
        afb_form: AFBForm = "gate",
        blocks: int | None = None,
        adaptive: bool = True,
        dwa_temperature: float = 2.0,
        student_layers: list[str] | None = None,
        teacher_layers: list[str] | None = None,
        probe_size: int = 32,
    ) -> None:
        super().__init__(student, teacher)
        if temperature <= 0 or dwa_temperature <= 0:
            raise ValueError(f"temperature and dwa_temperature must be positive, got {temperature}, {dwa_temperature}")
        if min(ce_weight, att_weight, feat_weight, kd_weight) < 0:
            raise ValueError("ce_weight, att_weight, feat_weight and kd_weight must be >= 0")
        if afb_form not in ("gate", "concat", "none"):
            raise ValueError(f"afb_form must be gate, concat or none, got {afb_form!r}")
        if probe_size < 1:
            raise ValueError(f"probe_size must be positive, got {probe_size}")
        self.temperature, self.ce_weight, self.afb_form = temperature, ce_weight, afb_form
        self.lambdas = {"att": att_weight, "feat": feat_weight, "kd": kd_weight}
        self.adaptive, self.dwa_temperature = adaptive, dwa_temperature
        self.enabled = [n for n in LOSS_NAMES if self.lambdas[n] > 0]
        self.read_student = StageReader(student, student_layers, probe_size)
        self.read_teacher = StageReader(teacher, teacher_layers, probe_size)
        n_s, n_t = len(self.read_student.channels), len(self.read_teacher.channels)
        k = blocks if blocks is not None else min(n_s, n_t)
        if not 1 <= k <= min(n_s, n_t):
            raise ValueError(f"blocks must be in [1, {min(n_s, n_t)}] (the networks have {n_s} and {n_t} stages)")
        self.pairs = list(zip(block_ends(n_s, k), block_ends(n_t, k), strict=True))
        # φ per block pair: student width → teacher width. Only built when the feature loss is on, so a switched-off
        # term leaves no parameters without gradients.
        self.adapters = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(self.read_student.channels[i], self.read_teacher.channels[j], 1, bias=False),
                nn.BatchNorm2d(self.read_teacher.channels[j]),
            )
            for i, j in (self.pairs if feat_weight > 0 else [])
        )
        n = len(self.enabled)
        # Rate-of-decrease state: running sums of this epoch, epoch means of the last two epochs, finished epochs,
        # and the weights in use. Buffers, so checkpoints and DDP carry them.
        self.register_buffer("dwa_sum", torch.zeros(n))
        self.register_buffer("dwa_count", torch.zeros(()))
        self.register_buffer("dwa_history", torch.zeros(2, n))
        self.register_buffer("dwa_epochs", torch.zeros((), dtype=torch.int64))
        self.register_buffer("loss_weights", torch.ones(n))

    def on_epoch_start(self, epoch: int) -> None:
        if float(self.dwa_count) > 0:
            self.dwa_history[1] = self.dwa_history[0]
            self.dwa_history[0] = self.dwa_sum / self.dwa_count
            self.dwa_epochs += 1
            self.dwa_sum.zero_()
            self.dwa_count.zero_()
        if self.adaptive and int(self.dwa_epochs) >= 2 and len(self.enabled) > 0:
            self.loss_weights.copy_(dwa_weights(self.dwa_history[0], self.dwa_history[1], self.dwa_temperature))

    def raw_losses(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Unweighted ``{att, feat, kd}`` (the enabled ones) plus student and teacher logits ``[B, C]``."""
        assert self.teacher is not None
        logits_s, feats_s = self.read_student(self.student, x)
        with torch.no_grad():
            logits_t, feats_t = self.read_teacher(self.teacher, x)
        att = feat = logits_s.new_zeros((), dtype=torch.float32)
        for b, (i, j) in enumerate(self.pairs):
            # Pool first, then project: the 1×1 conv commutes with pooling, and the adapter runs on fewer pixels.
            f_s, f_t = _match_spatial(feats_s[i], feats_t[j])
            if self.lambdas["att"] > 0:
                att = att + attention_loss(f_s, f_t)
            if self.lambdas["feat"] > 0:
                afb_s = attention_feature_block(self.adapters[b](f_s), f_s, self.afb_form)
                afb_t = attention_feature_block(f_t, f_t, self.afb_form)
                feat = feat + F.mse_loss(afb_s, afb_t)
        out = {"att": att, "feat": feat, "kd": kd_loss(logits_s, logits_t, self.temperature)}
        return {n: out[n] for n in self.enabled}, logits_s, logits_t

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        raw, logits_s, _ = self.raw_losses(batch.input)
        if self.training and raw:
            with torch.no_grad():
                self.dwa_sum += torch.stack([raw[n].detach().float() for n in self.enabled])
                self.dwa_count += 1
        ce = self.ce_weight * cross_entropy(logits_s, batch.target)
        losses = {"ce": ce}
        total = ce
        for k, name in enumerate(self.enabled):
            losses[name] = self.loss_weights[k] * self.lambdas[name] * raw[name]
            total = total + losses[name]
        return StepOutput(loss=total, losses=losses, logits=logits_s)
