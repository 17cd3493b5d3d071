"""The feature API every kdforge model implements, and a scoped hook tap for models that do not.

Methods read stage features through :class:`Features` (returned by ``model.forward_features(x)``) and plan their
adapters from the static ``model.feature_info`` list, so a method never needs model-specific code.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class FeatureInfo:
    """Static description of one feature map: its name, channel count and stride relative to the input."""

    name: str
    channels: int
    stride: int


@dataclass
class Features:
    """Everything a distillation method may read from one forward pass.

    Attributes:
        logits: ``[B, num_classes]``.
        feats: post-activation maps ``[stem, stage1, ..., stageL]``, each ``[B, C_l, H_l, W_l]``; matches
            ``model.feature_info`` one to one.
        preact_feats: the same maps before their final ReLU (equal to ``feats`` where a stage ends without one).
        pooled: the pooled penultimate vector ``[B, D]`` that the classifier consumes.
    """

    logits: Tensor
    feats: list[Tensor]
    preact_feats: list[Tensor]
    pooled: Tensor
