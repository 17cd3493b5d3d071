"""Low-light image enhancement: input the dark image, target the clean image ``[B, 3, H, W]`` in [0, 1].

Task loss ``w1·L1 + ws·(1 − SSIM) + wg·L_grad`` (:func:`kdforge.losses.image.enhancement_loss`), networks from
:data:`kdforge.models.dense.enhancer.ENHANCEMENT_MODELS`, prediction = the output clamped to [0, 1], metric = mean
per-image PSNR (primary) and SSIM (:class:`EnhancementEvaluator` over :mod:`kdforge.ops.image_metrics`).
docs/tasks/enhancement.md has the definitions, data and model numbers.

Inputs are **raw [0, 1]** images, not mean/std-normalised: the networks are residual (``x + head(·)``), so the
input and the output live in one space, and an untrained enhancer starts near the identity. The datasets of this
task (``cifar10_lowlight``, ``lol`` in :mod:`kdforge.data.lowlight`) deliver their inputs that way
(``DataBundle.mean = (0, 0, 0)``, ``std = (1, 1, 1)``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdforge.errors import ConfigError
from kdforge.losses.image import Padding, enhancement_loss
from kdforge.models.dense.enhancer import ENHANCEMENT_MODELS, EnhancerFeatures
from kdforge.ops.image_metrics import psnr, ssim
from kdforge.registry import TASKS
from kdforge.tasks.base import Evaluator, Reducer, Task


class EnhancementEvaluator(Evaluator):
    """Mean per-image PSNR and SSIM over a split (each image weighs the same whatever its size).

    State: the float64 sums of per-image PSNR and SSIM and the image count, all-reduced by ``compute``; a split cut
    over several processes therefore gives the one-process numbers up to float64 summation order.

    Args:
        data_range: ``L`` of the predictions and targets (1.0 for [0, 1] images).
    """

    primary: ClassVar[str] = "psnr"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, data_range: float = 1.0) -> None:
        self.data_range = float(data_range)
        self.reset()

    def reset(self) -> None:
        self._sums: Tensor | None = None  # [psnr_sum, ssim_sum, count] float64 on the data's device

    def update(self, preds: Any, targets: Any) -> None:
        """Add a batch of predictions ``[B, 3, H, W]`` (clamped to [0, 1] by the task) and clean images."""
        pred, target = preds, targets
        dtype = torch.float32 if pred.device.type == "mps" else torch.float64  # MPS has no float64
        p = psnr(pred.to(dtype), target.to(dtype), self.data_range)
        s = ssim(pred.to(dtype), target.to(dtype), self.data_range)
        count = torch.tensor(float(p.numel()), dtype=dtype, device=p.device)
        batch = torch.stack([p.sum(), s.sum(), count]).to(dtype)
        self._sums = batch if self._sums is None else self._sums + batch.to(self._sums.device)

    def compute(self, reducer: Reducer | None = None) -> dict[str, float]:
        sums = self._sums if self._sums is not None else torch.zeros(3, dtype=torch.float64)
        if reducer is not None:
            sums = reducer.sum(sums)
        psnr_sum, ssim_sum, count = (float(v) for v in sums.tolist())
        if count == 0:
            return {"psnr": float("nan"), "ssim": float("nan"), "num_images": 0.0}
        return {"psnr": psnr_sum / count, "ssim": ssim_sum / count, "num_images": count}


def _image(outputs: Tensor | EnhancerFeatures) -> Tensor:
    return outputs.out if isinstance(outputs, EnhancerFeatures) else outputs


@TASKS.register("enhancement")
class EnhancementTask(Task):
    """Low-light enhancement: low-light input in [0, 1] (raw, not normalised), clean target ``[B, 3, H, W]`` in [0, 1].

    Args:
        l1_weight: weight of the L1 to the clean image.
        ssim_weight: weight of ``1 − SSIM`` (reflect-padded; see :func:`kdforge.losses.image.ssim_loss`).
        gradient_weight: weight of the L1 between finite-difference gradients (0: off).
        ssim_padding: ``"reflect"`` or ``"valid"`` for the SSIM loss (the metric is always valid).
    """

    name: ClassVar[str] = "enhancement"
    summary_metrics: ClassVar[tuple[str, ...]] = ("psnr", "ssim")

    def __init__(
        self,
        l1_weight: float = 1.0,
        ssim_weight: float = 1.0,
        gradient_weight: float = 0.0,
        ssim_padding: Padding = "reflect",
    ) -> None:
        for key, value in (
            ("l1_weight", l1_weight),
            ("ssim_weight", ssim_weight),
            ("gradient_weight", gradient_weight),
        ):
            if not value >= 0:
                raise ConfigError(f"enhancement {key} must be >= 0, got {value}")
        if l1_weight == ssim_weight == gradient_weight == 0:
            raise ConfigError("enhancement loss weights are all zero; set l1_weight, ssim_weight or gradient_weight")
        if ssim_padding not in ("reflect", "valid"):
            raise ConfigError(f"ssim_padding must be 'reflect' or 'valid', got {ssim_padding!r}")
        self.l1_weight, self.ssim_weight, self.gradient_weight = (
            float(l1_weight),
            float(ssim_weight),
            float(gradient_weight),
        )
        self.ssim_padding: Padding = ssim_padding

    @classmethod
    def model_names(cls) -> list[str]:
        return sorted(ENHANCEMENT_MODELS)

    def build_model(self, arch: str, **kw: Any) -> nn.Module:
        """A teacher or student enhancer by name (``unet_enhancer_w32`` teacher, ``_w12`` / ``_w8`` students).

        ``num_classes`` (passed by the engine to every task's networks) is ignored: an enhancer has no classes.
        """
        if arch not in ENHANCEMENT_MODELS:
            raise ConfigError(f"unknown enhancement model {arch!r}; choose one of {sorted(ENHANCEMENT_MODELS)}")
        kw.pop("num_classes", None)
        if kw:
            raise ConfigError(f"enhancement model {arch!r} takes no options, got {sorted(kw)}")
        return ENHANCEMENT_MODELS[arch]()

    def train_outputs(self, model: nn.Module, x: Tensor) -> Tensor | EnhancerFeatures:
        # The stage maps come with the output of the one forward pass, for the feature and attention distillation
        # methods; the task loss reads only ``.out``.
        return model.forward_features(x) if hasattr(model, "forward_features") else model(x)

    def loss(self, outputs: Tensor | EnhancerFeatures, targets: Tensor) -> dict[str, Tensor]:
        """Named weighted parts ``{"l1", "ssim", "gradient"}`` (weight-0 parts left out) of the raw output."""
        return enhancement_loss(
            _image(outputs),
            targets,
            l1_weight=self.l1_weight,
            ssim_weight=self.ssim_weight,
            gradient_weight=self.gradient_weight,
            ssim_padding=self.ssim_padding,
        )

    def predict(self, outputs: Tensor | EnhancerFeatures) -> Tensor:
        """The enhanced image clamped to [0, 1], ``[B, 3, H, W]``."""
        return _image(outputs).clamp(0.0, 1.0)

    def evaluator(self) -> EnhancementEvaluator:
        """Mean PSNR (primary) and SSIM, data range 1.0."""
        return EnhancementEvaluator(data_range=1.0)


__all__ = ["EnhancementEvaluator", "EnhancementTask"]
