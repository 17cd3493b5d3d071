"""The model zoo: CIFAR networks of RepDistiller/mdistiller and torchvision's ImageNet ResNets.

Every model registers in :data:`kdforge.registry.MODELS` and implements the feature API of
:mod:`kdforge.models.features` (``forward_features``, ``feature_info``, ``num_features``, ``get_classifier``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from kdforge.models import attention_sampled, cifar, imagenet
from kdforge.models.base import KDModel
from kdforge.models.features import FeatureInfo, Features
from kdforge.models.loading import load_weights
from kdforge.models.taps import FeatureTap
from kdforge.registry import MODELS

DEFAULT_NUM_CLASSES = {"cifar": 100, "imagenet": 1000}


def create_model(name: str, num_classes: int | None = None, pretrained: str | Path | None = None) -> nn.Module:
    """Builds a registered model.

    Args:
        name: registry name (``kdforge models`` lists them).
        num_classes: classifier width; ``None`` takes the family default (100 for cifar, 1000 for imagenet).
        pretrained: path of a weight file loaded with :func:`load_weights`.

    Raises:
        UnknownNameError: ``name`` is not registered (the message suggests close names).
        CheckpointError: ``pretrained`` cannot be read or does not fit.
    """
    factory = MODELS.get(name)
    if num_classes is None:
        num_classes = DEFAULT_NUM_CLASSES.get(MODELS.meta(name).get("family", "cifar"), 100)
    model = factory(num_classes=num_classes)
    if pretrained is not None:
        load_weights(model, pretrained)
    return model


def list_models(family: str | None = None) -> list[str]:
    """Sorted registered names, optionally only those of ``family`` (``"cifar"`` or ``"imagenet"``)."""
    return sorted(n for n in MODELS.names() if family is None or MODELS.meta(n).get("family") == family)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, each shared parameter counted once (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "DEFAULT_NUM_CLASSES",
    "FeatureInfo",
    "FeatureTap",
    "Features",
    "KDModel",
    "attention_sampled",
    "cifar",
    "count_parameters",
    "create_model",
    "imagenet",
    "list_models",
    "load_weights",
]
