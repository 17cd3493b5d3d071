"""Deep hashing networks: a hash head on any zoo backbone, and the binary-code wrapper used for export.

The head follows CIBHash (zexuanqiu/CIBHash ``model/CIBHash.py``: ``Linear(4096, 1024) – ReLU – Linear(1024, bits)``
on frozen VGG-16 features) and BRCD's students (hly1998/BRCD ``model/ours_distill_CIBHash.py``: ``Linear(1000, 1000)
– ReLU – Linear(1000, bits)`` on a frozen EfficientNet/MobileNet, or a single ``Linear(512·e, bits)`` replacing a
ResNet's ``fc``). Here the head reads the backbone's pooled feature vector (the zoo backbone's classifier is replaced
by an identity): ``hidden=None`` gives the single linear layer, ``hidden=H`` the two-layer MLP.

``forward`` returns the continuous codes ``h`` ``[B, bits]`` (pre-sigmoid). Training binarises them with CIBHash's
straight-through ``sign(σ(h) − ½)`` (:func:`kdforge.losses.hashing.hash_codes_ste`); retrieval uses
``sign(h)`` with ``h = 0`` mapped to ``+1`` (:func:`binary_codes`), which is what :class:`BinaryHashExport` bakes into
an exported graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.models import create_model, list_models, load_weights
from kdforge.models.features import FeatureInfo, Features


def binary_codes(logits: Tensor) -> Tensor:
    """``±1`` codes from continuous codes: ``+1`` where ``h ≥ 0``, else ``−1``. ``[B, b]`` → ``[B, b]`` float32.

    Equal to CIBHash's ``sign(σ(h) − ½)`` except where ``σ(h)`` rounds to exactly ½ (there the reference emits a 0
    bit; a retrieval code should not have a third value).
    """
    return torch.where(logits >= 0, 1.0, -1.0).to(torch.float32)


class HashingNet(nn.Module):
    """A zoo backbone with its classifier replaced by a hash head.

    Args:
        backbone: a kdforge zoo model (``forward_features``, ``feature_info``, ``num_features``,
            ``classifier_name``); its classifier is replaced by ``nn.Identity`` so that ``backbone(x)`` is the pooled
            ``[B, D]`` vector.
        bits: code length.
        hidden: width of the MLP's hidden layer (CIBHash 1024, BRCD 1000); ``None`` for a single linear layer.
        freeze_backbone: stop gradients into the backbone (CIBHash and BRCD train only the head); its BatchNorm
            layers are kept in eval mode by :meth:`train`.
    """

    def __init__(
        self, backbone: nn.Module, bits: int, hidden: int | None = None, freeze_backbone: bool = False
    ) -> None:
        super().__init__()
        if bits < 1:
            raise ValueError(f"bits must be positive, got {bits}")
        dim = int(getattr(backbone, "num_features", 0))
        if not dim or not hasattr(backbone, "classifier_name"):
            raise ValueError(f"{type(backbone).__name__} is not a kdforge zoo model (needs num_features/classifier)")
        setattr(backbone, backbone.classifier_name, nn.Identity())
        self.backbone = backbone
        self.bits = bits
        self.num_features = dim
        self.feature_info: list[FeatureInfo] = list(backbone.feature_info)
        if hidden is None:
            self.hash_head: nn.Module = nn.Linear(dim, bits)
        else:
            self.hash_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, bits))
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> HashingNet:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # a frozen backbone's BatchNorm statistics stay fixed as well
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Args: ``x`` ``[B, 3, H, W]``. Returns continuous codes ``[B, bits]``."""
        return self.hash_head(self.backbone(x))

    def forward_features(self, x: Tensor) -> Features:
        """Stage maps of the backbone plus the codes: ``logits`` holds the continuous codes ``[B, bits]``, ``pooled``
        the backbone's pooled vector ``[B, D]``, ``feats``/``preact_feats`` its stage maps (``feature_info``)."""
        f = self.backbone.forward_features(x)
        return Features(logits=self.hash_head(f.pooled), feats=f.feats, preact_feats=f.preact_feats, pooled=f.pooled)


class BinaryHashExport(nn.Module):
    """Export wrapper: ``forward(x) = binary_codes(model(x))``, ``±1`` codes ``[B, bits]`` float32.

    The binarisation is one ``where`` with no data-dependent control flow, so it traces and scripts.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        h = self.model(x)
        return torch.where(h >= 0, torch.ones_like(h), -torch.ones_like(h)).to(torch.float32)


def build_hashing_model(
    backbone: str,
    bits: int = 64,
    hidden: int | None = None,
    pretrained: Mapping[str, Any] | str | Path | None = None,
    freeze_backbone: bool = False,
) -> HashingNet:
    """A :class:`HashingNet` on the zoo model ``backbone``.

    Args:
        backbone: a zoo name (``kdforge models``), e.g. ``resnet8``, ``resnet32x4``, ``mobilenetv2``.
        bits: code length.
        hidden: MLP hidden width, ``None`` for a linear head.
        pretrained: weights of the backbone as a zoo classifier, a state dict or file (``model.pretrained``); its
            classifier, of any class count, is left out and every other weight must fit.
        freeze_backbone: train only the head.
    """
    net = create_model(backbone)
    classifier = net.classifier_name
    model = HashingNet(net, bits=bits, hidden=hidden, freeze_backbone=freeze_backbone)
    if pretrained is not None:
        load_weights(net, pretrained, drop=(f"{classifier}.",))
    return model


#: ``hash_<zoo name>`` → builder ``(bits=64, hidden=None, pretrained=None, freeze_backbone=False) -> HashingNet``
HASHING_MODELS: dict[str, Callable[..., HashingNet]] = {
    f"hash_{name}": partial(build_hashing_model, name) for name in list_models()
}


__all__ = ["HASHING_MODELS", "BinaryHashExport", "HashingNet", "binary_codes", "build_hashing_model"]
