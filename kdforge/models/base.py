"""The feature-API base class shared by every kdforge model, and the stage runner that yields pre-activations.

A model subclasses :class:`KDModel`, builds its layers with the reference attribute names (so published
checkpoints load), sets ``feature_info``/``num_features`` in ``__init__`` and implements ``forward_features``.
``forward`` defaults to ``forward_features(x).logits``; models whose ``forward_features`` runs stages block by block
override it with the same operations through module calls, so forward hooks on every submodule fire and the logits
stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn
from torch.nn import functional as F

from kdforge.models.features import FeatureInfo, Features


class KDModel(nn.Module):
    """Base class of the zoo: ``forward(x)`` equals ``forward_features(x).logits``.

    Attributes:
        num_classes: width of the classifier output.
        num_features: width ``D`` of the pooled vector the classifier consumes.
        feature_info: one :class:`FeatureInfo` per entry of ``Features.feats`` (stem first), for the family's
            default input size.
    """

    #: attribute holding the final ``nn.Linear`` (the reference name, so checkpoints keep their keys).
    classifier_name = "fc"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 0
        self.feature_info: list[FeatureInfo] = []

    def forward(self, x: Tensor) -> Tensor:
        """Args: ``x`` ``[B, 3, H, W]``. Returns logits ``[B, num_classes]``."""
        return self.forward_features(x).logits

    def forward_features(self, x: Tensor) -> Features:
        """Logits plus stage maps, pre-activations and the pooled vector for input ``x`` ``[B, 3, H, W]``."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_features")

    def get_classifier(self) -> nn.Linear:
        """The final linear layer (``[num_classes, num_features]`` weight)."""
        head = getattr(self, self.classifier_name)
        if isinstance(head, nn.Sequential):  # MobileNetV2 keeps its Linear inside a Sequential
            head = head[-1]
        assert isinstance(head, nn.Linear)
        return head


def run_stage(stage: Iterable[nn.Module], x: Tensor) -> tuple[Tensor, Tensor]:
    """Runs a stage of blocks and returns ``(out, preact)`` of its last block.

    Every block but the last is called normally; the last one must expose ``preact(x)``, the tensor its
    ``forward`` passes through a final ReLU, so the stage output is ``relu(preact)`` computed once.

    Args:
        stage: the blocks (an ``nn.Sequential``).
        x: stage input ``[B, C_in, H, W]``.

    Returns:
        ``(out, preact)``, both ``[B, C_out, H', W']``.
    """
    blocks = list(stage)
    for block in blocks[:-1]:
        x = block(x)
    pre = blocks[-1].preact(x)
    return F.relu(pre), pre


def run_stem_and_stages(
    stem_pre: Tensor, stages: Iterable[Iterable[nn.Module]], after_stem: nn.Module | None = None
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Runs the post-stem ReLU and the stages, recording every stage map and its pre-activation.

    Args:
        stem_pre: the stem's pre-activation (conv + BN output) ``[B, C, H, W]``.
        stages: the stages in order, each run by :func:`run_stage`.
        after_stem: applied to the stem map before the first stage without being recorded (the ImageNet max-pool).

    Returns:
        ``(out, feats, preacts)``: the last stage's output and the lists ``[stem, stage 1, ...]`` of maps and
        pre-activations.
    """
    out = F.relu(stem_pre)
    feats, preacts = [out], [stem_pre]
    if after_stem is not None:
        out = after_stem(out)
    for stage in stages:
        out, pre = run_stage(stage, out)
        feats.append(out)
        preacts.append(pre)
    return out, feats, preacts


def init_conv_bn(model: nn.Module) -> None:
    """Reference init: Kaiming-normal (fan-out) convolutions, BatchNorm/GroupNorm weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
