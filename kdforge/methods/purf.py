"""PURF: teacher smoothing before distillation (reconstructed).

"PURF: improving teacher representations via smoothness constraints for KD" (Applied Soft Computing 2024). Neither
the paper nor code could be found, so this stage is a reconstruction (kdforge METHODS.md §3.8) from SoTeacher (Dong,
Liu & Shang, "Toward Student-Oriented Teacher Network Training for Knowledge Distillation", ICLR 2024; code
shwinshaker/SoTeacher ``helper/lip_util.py``, ``helper/consist_util.py``, ``helper/loss.py``): a teacher whose
feature extractor is Lipschitz and consistent across augmentations approximates the true label distribution better,
so it is a better teacher. PURF is stage A, run without a teacher; its exported ``student.pt`` is then the teacher of
any distillation method (stage B).

The Lipschitz term uses spectral norms by power iteration (Miyato et al., "Spectral Normalization for GANs",
ICLR 2018; the same iteration as ``torch.nn.utils.spectral_norm``), per layer, on the convolution *operator* by default
(Sedghi, Gupta & Long, "The Singular Values of Convolutional Layers", ICLR 2019; Gouk et al., "Regularisation of
Neural Networks by Enforcing Lipschitz Continuity", Mach. Learn. 2021), with BatchNorm's scale folded in.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdforge.data.augment import random_crop, random_hflip
from kdforge.data.batch import Batch
from kdforge.losses.logit import cross_entropy
from kdforge.losses.smoothness import (
    INIT_POWER_ITERATIONS,
    ConsistencyLoss,
    ConvGeometry,
    LipLayer,
    LipPenalty,
    SpectralMode,
    bn_scale,
    consistency_loss,
    conv_operator,
    conv_power_iteration,
    feature_smoothness,
    matrix_power_iteration,
    matrix_sigma,
    matrix_view,
    plan_lipschitz_layers,
    spectral_penalty,
    unit_normalize,
)
from kdforge.methods.base import Method, Progress, StepOutput
from kdforge.registry import METHODS

SmoothOn = Literal["auto", "pooled", "feats", "logits"]

# ---------------------------------------------------------------------------------------------------------- method


@METHODS.register("purf")
class PURF(Method):
    """Teacher smoothing: ``L = CE + λ_lip·P(σ_1..σ_L) + r(t)·λ_cons·C(x, x') + λ_smooth·S(x, x+δ)``.

    Trains a network (no teacher) to be used as a teacher afterwards. Each term is off when its weight is 0, and then
    costs nothing.

    * ``P``, Lipschitz: :func:`spectral_penalty` of per-layer spectral norms, each estimated by power iteration on a
      persistent per-layer vector (a buffer, checkpointed) that ``n_power_iterations`` iterations per training step
      update without gradient; ``σ = ‖A v‖`` then carries the gradient ``u vᵀ`` to the weights. ``operator`` (default)
      iterates on the convolution itself, ``conv2d``/``conv_transpose2d`` on a ``[1, C_in, H, W]`` vector of the
      layer's input shape, so ``σ`` is the layer's true Lipschitz constant (its l2 operator norm). ``matrix`` uses the
      weight reshaped to ``C_out × C_in·k·k`` (the cheaper choice of Miyato et al. and METHODS.md), which is neither
      an upper nor a lower bound of the conv's norm (for a stride-1 conv it can be off by up to a factor ``k``).
      Linear layers are matrices; a grouped conv's groups are separate blocks. With ``lip_fold_bn`` the BatchNorm
      after a conv is folded in (``diag(γ/√(var+ε))·A`` with running statistics): a conv followed by BN is
      scale-invariant, so penalising the bare conv would only shrink weights that BN scales back up, while the folded
      operator is what the teacher computes in eval mode. Any BN not folded counts ``max |γ|/√(var+ε)`` (SoTeacher's
      BN term). Vectors of ``operator`` layers take their shape from the first training batch.
    * ``C``, consistency: :func:`consistency_loss` between predictions on the batch and on a second view made here
      (random crop with ``view_padding`` zero padding and a horizontal flip with probability ``view_flip``, applied to
      the already augmented, normalized batch), ramped in linearly over the first ``cons_rampup`` of training.
    * ``S``, feature smoothness: :func:`feature_smoothness` between features of ``x`` and ``x + δ``, ``δ ~ N(0,
      noise_std²)`` in normalized pixel space, on the pooled vector, the stage maps or the logits.

    The views run through the network in one concatenated batch, so BatchNorm normalises them with the same
    statistics (the terms then measure the function, not a change of batch statistics) and its running statistics
    move once per step.

    Args:
        student: the network being smoothed (the future teacher).
        ce_weight: weight of the cross-entropy on the batch.
        lip_weight: λ_lip (0 disables the spectral term and its power iterations).
        lip_penalty: ``sum``, ``square``, ``hinge`` or ``log`` (:func:`spectral_penalty`).
        lip_target: σ below which ``hinge`` does not penalise.
        spectral_mode: ``operator`` or ``matrix`` (see above).
        lip_fold_bn: fold each conv's following BatchNorm into its operator.
        n_power_iterations: power iterations per training step (≥ 1).
        cons_weight: λ_cons (0 disables the second view).
        consistency: ``mse`` (softmax MSE) or ``kl`` (``τ²·KL(sg p(x) ‖ p(x'))``).
        cons_temperature: τ of the consistency softmax.
        cons_rampup: fraction of training over which λ_cons ramps linearly from 0 (0 = constant).
        view_padding: zero padding of the second view's random crop (0 = no crop).
        view_flip: probability of flipping the second view left-right.
        smooth_weight: λ_smooth (0 disables the noisy pass).
        noise_std: standard deviation of δ, in normalized pixel units.
        smooth_on: ``pooled``, ``feats`` (every map of ``forward_features``), ``logits``, or ``auto`` (``pooled``
            for models with ``forward_features``, ``logits`` otherwise).
        log_sigma: report the largest current σ estimate as the detached part ``sigma_max`` (not part of the loss).
    """

    family = "smoothing"
    paper = "PURF: improving teacher representations via smoothness constraints for KD (Appl. Soft Comput. 2024)"
    exact = False
    summary = "teacher smoothing: spectral-norm Lipschitz penalty, two-view consistency, feature smoothness under noise"
    needs_teacher = False

    def __init__(
        self,
        student: nn.Module,
        ce_weight: float = 1.0,
        lip_weight: float = 1.0e-4,
        lip_penalty: LipPenalty = "sum",
        lip_target: float = 1.0,
        spectral_mode: SpectralMode = "operator",
        lip_fold_bn: bool = True,
        n_power_iterations: int = 1,
        cons_weight: float = 1.0,
        consistency: ConsistencyLoss = "mse",
        cons_temperature: float = 1.0,
        cons_rampup: float = 0.3,
        view_padding: int = 4,
        view_flip: float = 0.5,
        smooth_weight: float = 0.1,
        noise_std: float = 0.05,
        smooth_on: SmoothOn = "auto",
        log_sigma: bool = True,
    ) -> None:
        super().__init__(student)
        weights = {
            "ce_weight": ce_weight,
            "lip_weight": lip_weight,
            "cons_weight": cons_weight,
            "smooth_weight": smooth_weight,
        }
        for key, value in weights.items():
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        if lip_penalty not in ("sum", "square", "hinge", "log"):
            raise ValueError(f"lip_penalty must be sum, square, hinge or log, got {lip_penalty!r}")
        if spectral_mode not in ("operator", "matrix"):
            raise ValueError(f"spectral_mode must be operator or matrix, got {spectral_mode!r}")
        if consistency not in ("mse", "kl"):
            raise ValueError(f"consistency must be mse or kl, got {consistency!r}")
        if smooth_on not in ("auto", "pooled", "feats", "logits"):
            raise ValueError(f"smooth_on must be auto, pooled, feats or logits, got {smooth_on!r}")
        if lip_target < 0:
            raise ValueError(f"lip_target must be >= 0, got {lip_target}")
        if n_power_iterations < 1:
            raise ValueError(
                f"n_power_iterations must be >= 1 (the estimate must track the weights), got {n_power_iterations}"
            )
        if cons_temperature <= 0:
            raise ValueError(f"cons_temperature must be positive, got {cons_temperature}")
        if not 0.0 <= cons_rampup <= 1.0:
            raise ValueError(f"cons_rampup must be in [0, 1], got {cons_rampup}")
        if view_padding < 0:
            raise ValueError(f"view_padding must be >= 0, got {view_padding}")
        if not 0.0 <= view_flip <= 1.0:
            raise ValueError(f"view_flip must be in [0, 1], got {view_flip}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        has_features = callable(getattr(student, "forward_features", None))
        if smooth_on == "auto":
            smooth_on = "pooled" if has_features else "logits"
        if smooth_weight > 0 and smooth_on in ("pooled", "feats") and not has_features:
            raise ValueError(
                f"smooth_on={smooth_on} needs a model with forward_features (the kdforge zoo); use smooth_on=logits"
            )
        self.ce_weight, self.lip_weight = ce_weight, lip_weight
        self.cons_weight, self.smooth_weight = cons_weight, smooth_weight
        self.lip_penalty, self.lip_target = lip_penalty, lip_target
        self.spectral_mode, self.lip_fold_bn = spectral_mode, lip_fold_bn
        self.n_power_iterations = n_power_iterations
        self.consistency, self.cons_temperature, self.cons_rampup = consistency, cons_temperature, cons_rampup
        self.view_padding, self.view_flip = view_padding, view_flip
        self.noise_std, self.smooth_on, self.log_sigma = noise_std, smooth_on, log_sigma

        self.lip_layers: list[LipLayer] = (
            plan_lipschitz_layers(student, spectral_mode, lip_fold_bn) if lip_weight > 0 else []
        )
        for i, layer in enumerate(self.lip_layers):
            if layer.kind == "matrix":
                w = matrix_view(layer).detach()
                self.register_buffer(layer.buffer, self._initial_vector((w.shape[0], w.shape[2]), w, i))
                self._set_vector(layer, matrix_power_iteration(w, self._vector(layer).float(), INIT_POWER_ITERATIONS))
            elif layer.kind == "operator":
                # The input's spatial size is not known before the first batch: an empty buffer marks it pending.
                self.register_buffer(layer.buffer, torch.empty(0, device=layer.module.weight.device))

    # ---------------------------------------------------------------- spectral norms

    @staticmethod
    def _initial_vector(shape: tuple[int, ...], like: Tensor, index: int) -> Tensor:
        # A fixed seed per layer: every DDP rank starts from the same vector, and the iteration is deterministic
        # given the (synchronised) weights, so the estimates agree across ranks without being broadcast.
        g = torch.Generator().manual_seed(1234 + index)
        v = torch.randn(shape, generator=g, dtype=torch.float32)
        return unit_normalize(v, tuple(range(1, len(shape)))).to(like.device)

    def _vector(self, layer: LipLayer) -> Tensor:
        return getattr(self, layer.buffer)

    def _set_vector(self, layer: LipLayer, v: Tensor) -> None:
        # In place, so references held elsewhere (a DDP wrapper's buffer list) stay valid.
        self._vector(layer).copy_(v)

    def _pending_layers(self) -> list[LipLayer]:
        return [x for x in self.lip_layers if x.kind == "operator" and self._vector(x).numel() == 0]

    def _init_operator_vectors(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for i, layer in enumerate(self.lip_layers):
            if layer.kind != "operator" or self._vector(layer).numel() > 0:
                continue
            conv = layer.module
            v = self._initial_vector((1, *shapes[layer.name]), conv.weight, i)
            scale = bn_scale(layer.bn) if layer.bn is not None else None
            v = conv_power_iteration(conv.weight.float(), v, ConvGeometry.of(conv), INIT_POWER_ITERATIONS, scale)
            self.register_buffer(layer.buffer, v)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Operator-mode vectors get their shape from the first batch; a fresh method (resume, evaluation) takes the
        # checkpoint's shape instead of failing with a size mismatch.
        for layer in self.lip_layers:
            key = prefix + layer.buffer
            if layer.kind == "operator" and key in state_dict:
                current = self._vector(layer)
                if current.shape != state_dict[key].shape:
                    self.register_buffer(layer.buffer, torch.empty_like(state_dict[key], device=current.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def layer_sigmas(self, update: bool = True) -> Tensor:
        """Spectral-norm estimates ``[L]``, one per entry of ``lip_layers``, differentiable in the weights.

        Args:
            update: first run ``n_power_iterations`` iterations on each stored vector (training steps do).
        """
        sigmas = []
        # Power iteration in bf16/fp16 would lose the small differences it converges on: always float32.
        device_type = next(self.student.parameters()).device.type
        with torch.autocast(device_type, enabled=False):
            for layer in self.lip_layers:
                if layer.kind == "bn":
                    sigmas.append(bn_scale(layer.module).max())
                    continue
                # clone: the stored vector is updated in place next step, after this step's graph holds it (as in
                # torch's spectral_norm).
                v = self._vector(layer).float().clone()
                if layer.kind == "matrix":
                    w = matrix_view(layer)
                    if update:
                        v = matrix_power_iteration(w, v, self.n_power_iterations)
                        self._set_vector(layer, v)
                    sigmas.append(matrix_sigma(w, v))
                    continue
                conv = layer.module
                geo, w = ConvGeometry.of(conv), conv.weight.float()
                scale = bn_scale(layer.bn) if layer.bn is not None else None
                if update:
                    v = conv_power_iteration(w, v, geo, self.n_power_iterations, scale)
                    self._set_vector(layer, v)
                sigmas.append(conv_operator(v, w, geo, scale).norm())
        return torch.stack(sigmas)

    # ---------------------------------------------------------------- training step

    def second_view(self, x: Tensor) -> Tensor:
        """The consistency view of a batch ``[B, C, H, W]``: random crop (zero padding) and horizontal flip."""
        x = random_crop(x, self.view_padding)
        return random_hflip(x, p=self.view_flip) if self.view_flip > 0 else x

    def _forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits ``[N, C]`` and the features the smoothness term reads (empty when it is off)."""
        if self.smooth_weight > 0 and self.smooth_on in ("pooled", "feats"):
            out = self.student.forward_features(x)
            return out.logits, ([out.pooled] if self.smooth_on == "pooled" else list(out.feats))
        logits = self.student(x)
        return logits, ([logits] if self.smooth_weight > 0 else [])

    def _forward_recording_shapes(self, x: Tensor) -> tuple[tuple[Tensor, list[Tensor]], dict[str, tuple[int, ...]]]:
        pending = {layer.name: layer.module for layer in self._pending_layers()}
        shapes: dict[str, tuple[int, ...]] = {}

        def record(name: str) -> Any:
            def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
                shapes.setdefault(name, tuple(args[0].shape[1:]))  # [C_in, H, W] of the layer's input

            return hook

        handles = [m.register_forward_pre_hook(record(name)) for name, m in pending.items()]
        try:
            out = self._forward(x)
        finally:
            for h in handles:
                h.remove()
        missing = sorted(set(pending) - set(shapes))
        if missing:
            raise RuntimeError(f"purf: conv layers {missing} did not run in the forward pass; use spectral_mode=matrix")
        return out, shapes

    def forward_train(self, batch: Batch, progress: Progress) -> StepOutput:
        x = batch.input
        b = x.shape[0]
        inputs = [x]
        if self.cons_weight > 0:
            inputs.append(self.second_view(x))
        if self.smooth_weight > 0:
            inputs.append(x + self.noise_std * torch.randn_like(x))
        joint = torch.cat(inputs) if len(inputs) > 1 else x
        if self.lip_weight > 0 and self._pending_layers():
            (logits_all, feats_all), shapes = self._forward_recording_shapes(joint)
            self._init_operator_vectors(shapes)
        else:
            logits_all, feats_all = self._forward(joint)
        logits_chunks = logits_all.split(b)
        logits = logits_chunks[0]

        ce = self.ce_weight * cross_entropy(logits, batch.target)
        losses: dict[str, Tensor] = {"ce": ce}
        total = ce
        if self.lip_weight > 0:
            sigmas = self.layer_sigmas(update=self.training)
            lip = self.lip_weight * spectral_penalty(sigmas, self.lip_penalty, self.lip_target)
            losses["lip"] = lip
            total = total + lip
        if self.cons_weight > 0:
            ramp = min(1.0, progress.fraction / self.cons_rampup) if self.cons_rampup > 0 else 1.0
            cons_raw = consistency_loss(logits, logits_chunks[1], self.consistency, self.cons_temperature)
            cons = self.cons_weight * ramp * cons_raw
            losses["cons"] = cons
            total = total + cons
        if self.smooth_weight > 0:
            clean = [f.split(b)[0] for f in feats_all]
            noisy = [f.split(b)[-1] for f in feats_all]
            smooth = self.smooth_weight * feature_smoothness(clean, noisy)
            losses["smooth"] = smooth
            total = total + smooth
        if self.lip_weight > 0 and self.log_sigma:
            # A diagnostic beside the parts, not one of them: the largest layer norm shows the smoothing at work.
            losses["sigma_max"] = sigmas.detach().max()
        return StepOutput(loss=total, losses=losses, logits=logits)


__all__ = ["PURF"]
