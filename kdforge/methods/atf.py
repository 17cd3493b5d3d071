"""ATF: Adaptive Teacher Finetune (reconstructed).

"Towards high-performance knowledge distillation through adaptive fine-tuning": the abstract states that the
difference between offline and online KD is teacher–student mutual adaptation, that ATF therefore fine-tunes the
pretrained teacher during offline KD with information from the student, and that distributions are compared as
normalized logit distributions under an α-divergence. The paper body and code could not be found, so the loss is
a reconstruction (kdforge METHODS.md §3.1) from verified work: SHAKE's reversed distillation and shadow head
(lilujunai/SHAKE ``helper/loops.py``), the α-divergence (AlphaNet, facebookresearch/AlphaNet), logit
standardization (sunshangquan/logit-standardization-KD), DML's mutual term and ATSC's weight anchor
(random2314235/ATSC).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from kdforge.adapters import ShadowHead
from kdforge.data.batch import Batch
from kdforge.losses.logit import AlphaMode, LogitNorm, alpha_kd_loss, cross_entropy, kd_loss, normalize_logits
from kdforge.methods.base import Progress, StepOutput
from kdforge.methods.teacher_tuning import BNPolicy, TeacherScope, TunedTeacherMethod
from kdforge.registry import METHODS

Anchor = Literal["kl", "l2", "none"]
ReverseMode = Literal["gap", "confidence", "fixed"]


@METHODS.register("atf")
class ATF(TunedTeacherMethod):
    """Adaptive Teacher Finetune: the teacher adapts to the student while the student distills from it.

    Full variant (default), with ``Norm`` the selected logit normalization, ``p̃ = softmax(Norm(z)/τ)`` and ``D``
    the selected α-divergence::

        student:  L_S = λ_ce·CE(z_s, y) + λ_kd·τ²·D(sg p̃_t ‖ p̃_s)
        teacher:  L_T = λ_tce·CE(z_t, y) + λ_rev·w·τ²·D(sg p̃_s ‖ p̃_t) + λ_anc·anchor
        anchor:   Σ‖θ_t − θ_t0‖²  (l2, default)   or   τ²·KL(sg p̃_t0 ‖ p̃_t)  (kl)

    Both parts are summed into one loss: every cross term carries a stop-gradient, so the student's parameters
    receive only ``L_S`` gradients and the teacher's only ``L_T`` gradients, in one backward pass and one optimizer
    (the teacher in its own parameter group at ``teacher_lr_scale`` × the student's learning rate, with no weight
    decay toward zero: the ``l2`` anchor is decay toward the pretrained weights θ_t0). With the teacher frozen the
    student term is LS-KD's loss at its published CIFAR weights (z-score, τ 2, CE 0.1, KD 9) with D = KL (α = 1).

    ``kl`` anchor: ``t0`` runs in the tuned copy's BatchNorm modes (:meth:`pretrained_logits_like_tuned`), so the
    anchor is exactly 0 before the first update in every ``teacher_bn`` policy; it costs a second teacher forward.

    Reversed-distillation weight ``w`` (``reverse_mode``): ``gap`` (default) is the share of the teacher–student
    gap still open, ``w = clip(Ḡ / G_0, 0, 1)`` with ``Ḡ`` the moving average (``gap_momentum``) of the per-batch
    divergence ``D(sg p̃_t ‖ p̃_s)`` and ``G_0`` its value at the first teacher update: the teacher adapts fully
    while the student is as far away as when tuning began, and less as the student catches up (it stays low when
    the gap stops shrinking). ``confidence`` weights each sample by the student's probability of the true label
    (``w_b = sg p_s(y_b)``); ``fixed`` uses ``w = 1``.

    Shadow variant (``variant=shadow``, SHAKE, lilujunai/SHAKE ``helper/loops.py`` with ``-a 0 -b 1``): the
    teacher stays frozen; a shadow head on its last three stages, read out through the frozen teacher classifier,
    plays the tuned teacher. As in SHAKE's code, every logit is normalized first (``n = Norm(z)``), the CE terms
    included, and the ``l2`` anchor is SHAKE's MSE between the normalized head and teacher logits::

        L = λ_ce·CE(n_s, y) + λ_kd·τ²·D(sg p̃_h ‖ p̃_s) + λ_tce·CE(n_h, y) + λ_rev·w·τ²·D(sg p̃_s ‖ p̃_h)
            + λ_anc·MSE(n_h, sg n_t)

    With ``logit_norm=layernorm``, ``ln_scale=3.1415``, τ 4, α = 1, ``reverse_mode=fixed`` and every λ 1 this is
    SHAKE's loss exactly (a golden test checks it).

    Args:
        student: the network being trained.
        teacher: the pretrained teacher (same classes as the student).
        variant: ``full`` (fine-tune the teacher) or ``shadow`` (SHAKE's shadow head).
        temperature: τ applied after normalization.
        logit_norm: ``zscore`` (logit standardization), ``layernorm`` (SHAKE's ``LN(z)·κ``) or ``none``.
        ln_scale: κ of ``layernorm``.
        divergence: ``fixed`` (α = ``alpha``) or ``adaptive`` (AlphaNet: per-sample max over α− and α+).
        alpha, alpha_min, alpha_max, iw_clip: the α-divergence's parameters (iw_clip ``None`` = no clamp).
        ce_weight: λ_ce.
        kd_weight: λ_kd.
        teacher_ce_weight: λ_tce.
        reverse_weight: λ_rev.
        reverse_mode: ``gap``, ``confidence`` or ``fixed`` (see above).
        gap_momentum: EMA momentum of ``Ḡ``.
        anchor: ``l2``, ``kl`` or ``none``.
        anchor_weight: λ_anc.
        teacher_lr_scale, teacher_bn, teacher_scope, teacher_start, teacher_stop, teacher_start_epoch,
            teacher_every: the teacher fine-tuning mode (:class:`TunedTeacherMethod`).
    """

    family = "logit"
    paper = "Adaptive Teacher Finetune: Towards high-performance KD through adaptive fine-tuning"
    exact = False
    summary = "fine-tunes the teacher with reversed distillation; α-divergence on normalized logits"

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        variant: Literal["full", "shadow"] = "full",
        temperature: float = 2.0,
        logit_norm: LogitNorm = "zscore",
        ln_scale: float = math.pi,
        divergence: AlphaMode = "fixed",
        alpha: float = 1.0,
        alpha_min: float = -1.0,
        alpha_max: float = 1.0,
        iw_clip: float | None = 5.0,
        ce_weight: float = 0.1,
        kd_weight: float = 9.0,
        teacher_ce_weight: float = 1.0,
        reverse_weight: float = 1.0,
        reverse_mode: ReverseMode = "gap",
        gap_momentum: float = 0.9,
        anchor: Anchor = "l2",
        anchor_weight: float = 1.0,
        teacher_lr_scale: float = 0.1,
        teacher_bn: BNPolicy = "train",
        teacher_scope: TeacherScope = "last_stage",
        teacher_start: float = 0.0,
        teacher_stop: float = 1.0,
        teacher_start_epoch: float = 0.0,
        teacher_every: int = 1,
    ) -> None:
        if variant not in ("full", "shadow"):
            raise ValueError(f"variant must be full or shadow, got {variant!r}")
        super().__init__(
            student,
            teacher,
            tune_teacher=variant == "full",
            teacher_lr_scale=teacher_lr_scale,
            teacher_bn=teacher_bn,
            teacher_scope=teacher_scope,
            teacher_start=teacher_start,
            teacher_stop=teacher_stop,
            teacher_start_epoch=teacher_start_epoch,
            teacher_every=teacher_every,
            teacher_weight_decay=0.0,
        )
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        weights = [ce_weight, kd_weight, teacher_ce_weight, reverse_weight, anchor_weight]
        if min(weights) < 0:
            raise ValueError("loss weights must be >= 0")
        if not 0.0 <= gap_momentum < 1.0:
            raise ValueError(f"gap_momentum must be in [0, 1), got {gap_momentum}")
        if iw_clip is not None and iw_clip <= 0:
            raise ValueError(f"iw_clip must be positive or null, got {iw_clip}")
        if anchor not in ("kl", "l2", "none"):
            raise ValueError(f"anchor must be l2, kl or none, got {anchor!r}")
        if reverse_mode not in ("gap", "confidence", "fixed"):
            raise ValueError(f"reverse_mode must be gap, confidence or fixed, got {reverse_mode!r}")
        self.variant = variant
        self.temperature = temperature
        self.logit_norm = logit_norm
        self.ln_scale = ln_scale
        self.divergence = divergence
        self.alpha, self.alpha_min, self.alpha_max, self.iw_clip = alpha, alpha_min, alpha_max, iw_clip
        self.ce_weight, self.kd_weight = ce_weight, kd_weight
        self.teacher_ce_weight = teacher_ce_weight
        self.reverse_weight, self.anchor_weight = reverse_weight, anchor_weight
        self.reverse_mode = reverse_mode
        self.gap_momentum = gap_momentum
        self.anchor = anchor
        # Buffers, so the gap statistics are saved in checkpoints and a resumed run continues bit-identically.
        self.register_buffer("gap_ema", torch.zeros(()))
        self.register_buffer("gap_start", torch.zeros(()))
        self.register_buffer("gap_seen", torch.zeros((), dtype=torch.bool))
        self.register_buffer("gap_started", torch.zeros((), dtype=torch.bool))
        self.shadow: ShadowHead | None = None
        if variant == "shadow":
            self.shadow = self._build_shadow(teacher)

    @staticmethod
    def _build_shadow(teacher: nn.Module) -> ShadowHead:
        info = getattr(teacher, "feature_info", None)
        if not hasattr(teacher, "forward_features") or info is None or len(info) < 4:
            raise ValueError(
                "variant=shadow needs a kdforge teacher with forward_features and at least 3 stages; use variant=full"
            )
        fc = teacher.get_classifier()
        stages = info[-3:]
        return ShadowHead([s.channels for s in stages], [s.stride for s in stages], fc.in_features)

    def _norm(self, z: Tensor) -> Tensor:
        return normalize_logits(z, self.logit_norm, self.ln_scale)

    def _div(self, target: Tensor, model: Tensor, weights: Tensor | None = None) -> Tensor:
        """``τ²·mean_b w_b·D(softmax(target/τ) ‖ softmax(model/τ))`` on normalized logits; ``target`` is detached."""
        return alpha_kd_loss(
            model,
            target.detach(),
            self.temperature,
            self.divergence,
            self.alpha,
            self.alpha_min,
            self.alpha_max,
            self.iw_clip,
            weights,
        )

    def _reverse(self, factor: Tensor, logits_s: Tensor, y: Tensor, n_s: Tensor, n_t: Tensor) -> Tensor:
        """The reversed-distillation term ``τ²·mean_b w_b·D(sg p̃_s ‖ p̃_t)`` under ``reverse_mode``."""
        if self.reverse_mode == "confidence":
            # The student's own probability of the true label: the teacher adapts toward the student where the
            # student is right, and hardly at all while it is still guessing (p ≈ 1/K at the start).
            conf = logits_s.detach().float().softmax(dim=1).gather(1, y[:, None]).squeeze(1)
            return self._div(n_s, n_t, conf)
        return factor * self._div(n_s, n_t)

    @torch.no_grad()
    def _track_gap(self, gap: Tensor, active: bool) -> Tensor:
        """Update ``Ḡ`` with this batch's gap and return ``w = clip(Ḡ / G_0, 0, 1)`` (``gap`` mode; else 1).

        ``G_0`` is ``Ḡ`` at the first step on which the teacher is updated, so ``w`` is the share of the gap at the
        start of tuning that is still open; ``Ḡ`` is tracked on every step, before tuning starts too.
        """
        gap = gap.detach().float()
        ema = torch.where(self.gap_seen, self.gap_momentum * self.gap_ema + (1.0 - self.gap_momentum) * gap, gap)
        self.gap_ema.copy_(ema)
        self.gap_seen.fill_(True)
        if self.reverse_mode != "gap":
            return torch.ones_like(gap)
        if active:
            self.gap_start.copy_(torch.where(self.gap_started, self.gap_start, ema))
            self.gap_started.fill_(True)
        return (ema / self.gap_start.clamp(min=1e-12)).clamp(0.0, 1.0)

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        x, y = batch.input, batch.target
        logits_s = self.student(x)
        if self.variant == "shadow":
            return self._shadow_step(x, y, logits_s)

        active = self.teacher_active(progress)
        logits_t = self.tuned_teacher_logits(x, active)
        n_s, n_t = self._norm(logits_s), self._norm(logits_t)
        ce = self.ce_weight * cross_entropy(logits_s, y)
        gap = self._div(n_t, n_s)
        factor = self._track_gap(gap, active)
        kd = self.kd_weight * gap
        losses = {"ce": ce, "kd": kd}
        loss = ce + kd
        if active:
            t_ce = self.teacher_ce_weight * cross_entropy(logits_t, y)
            rev = self.reverse_weight * self._reverse(factor, logits_s, y, n_s, n_t)
            losses.update({"t_ce": t_ce, "rev": rev})
            loss = loss + t_ce + rev
            if self.anchor != "none":
                anc = self.anchor_weight * self._anchor(x, n_t)
                losses["anchor"] = anc
                loss = loss + anc
        return StepOutput(loss=loss, losses=losses, logits=logits_s)

    def _anchor(self, x: Tensor, n_t: Tensor) -> Tensor:
        if self.anchor == "l2":
            return self.anchor_l2()
        return kd_loss(n_t, self._norm(self.pretrained_logits_like_tuned(x)), self.temperature)

    def _shadow_step(self, x: Tensor, y: Tensor, logits_s: Tensor) -> StepOutput:
        assert self.teacher is not None and self.shadow is not None
        with torch.no_grad():
            feats_t = self.teacher.forward_features(x)
        fc = self.teacher.get_classifier()
        logits_h = self.shadow(feats_t.feats[-3:], fc.weight, fc.bias)
        # SHAKE normalizes every logit before any loss, the cross-entropies and the MSE included.
        n_s, n_h, n_t = self._norm(logits_s), self._norm(logits_h), self._norm(feats_t.logits)
        ce = self.ce_weight * cross_entropy(n_s, y)
        gap = self._div(n_h, n_s)
        factor = self._track_gap(gap, True)
        kd = self.kd_weight * gap
        h_ce = self.teacher_ce_weight * cross_entropy(n_h, y)
        rev = self.reverse_weight * self._reverse(factor, logits_s, y, n_s, n_h)
        if self.anchor == "kl":
            anc = kd_loss(n_h, n_t, self.temperature)
        elif self.anchor == "l2":
            anc = nn.functional.mse_loss(n_h, n_t.detach())
        else:
            anc = torch.zeros((), device=x.device)
        anc = self.anchor_weight * anc
        losses = {"ce": ce, "kd": kd, "t_ce": h_ce, "rev": rev, "anchor": anc}
        return StepOutput(loss=ce + kd + h_ce + rev + anc, losses=losses, logits=logits_s)


__all__ = ["ATF"]
