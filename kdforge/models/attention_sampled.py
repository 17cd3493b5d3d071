"""Attention-sampled classifiers: the main (student) network of DATS, deployable as one module.

A backbone first looks at the whole image; its last feature map gives trilinear attention (TASN), whose channel sum
is the *structure* map; the input is resampled through that map (regions with attention magnified, the layout kept)
and the same backbone classifies the resampled image, after a light *detail refiner* on its last map. At deployment
the network is exactly this: two backbone passes and a resampling, no teacher. The distillation that trains it is
:mod:`kdforge.methods.dats`; docs/methods/dats.md names every reconstructed choice.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from kdforge.models.base import KDModel
from kdforge.models.cifar.resnet import CifarResNet
from kdforge.models.dense.attention_sampling import attention_sample, structure_and_detail_maps, trilinear_attention
from kdforge.models.features import Features
from kdforge.registry import MODELS


class DetailRefiner(nn.Module):
    """A residual depthwise-separable block on the last feature map: ``relu(x + BN(1×1(relu(BN(dw3×3(x))))))``.

    The depthwise 3×3 is a learnable local (sharpening) filter per channel and the 1×1 mixes channels, added to the
    map through a residual connection. It costs ``C·9 + C² + 4C`` parameters (4,928 for 64 channels).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.pw = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        nn.init.kaiming_normal_(self.dw.weight, mode="fan_out", nonlinearity="relu")
        nn.init.kaiming_normal_(self.pw.weight, mode="fan_out", nonlinearity="relu")

    def preact(self, x: Tensor) -> Tensor:
        return x + self.bn2(self.pw(F.relu(self.bn1(self.dw(x)))))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.preact(x))


class AttentionSampledNet(KDModel):
    """Structure-preserving attention sampling around a backbone whose classifier reads its pooled last map.

    Args:
        backbone: a CIFAR ResNet (its ``fc`` consumes the global average of its last stage map).
        dense: the sampler's largest magnification.
        iters: the sampler's clip-and-redistribute rounds.
    """

    def __init__(self, backbone: CifarResNet, dense: float = 4.0, iters: int = 5) -> None:
        super().__init__(backbone.num_classes)
        self.backbone = backbone
        self.refiner = DetailRefiner(backbone.feature_info[-1].channels)
        self.dense, self.iters = dense, iters
        self.num_features = backbone.num_features
        self.feature_info = list(backbone.feature_info)

    def get_classifier(self) -> nn.Linear:
        return self.backbone.get_classifier()

    def glance(self, x: Tensor) -> Features:
        """The backbone's pass over the whole image (whose last map steers the sampling)."""
        return self.backbone.forward_features(x)

    def sampling_maps(self, glance: Features, generator=None) -> tuple[Tensor, Tensor]:
        """``(structure, detail)`` maps, each ``[B, 1, h, w]``, from a glance's last map (detached)."""
        return structure_and_detail_maps(trilinear_attention(glance.feats[-1]), generator)

    def resample(self, x: Tensor, attention: Tensor) -> Tensor:
        """``x`` resampled through ``attention`` at its own size."""
        return attention_sample(x, attention, x.shape[-1], self.dense, self.iters)

    def classify(self, x: Tensor) -> Features:
        """Features and logits of an (already resampled) image: backbone, refiner, pooled, classifier."""
        out = self.backbone.forward_features(x)
        pre = self.refiner.preact(out.feats[-1])
        last = F.relu(pre)
        pooled = F.adaptive_avg_pool2d(last, 1).flatten(1)
        return Features(
            logits=self.get_classifier()(pooled),
            feats=[*out.feats[:-1], last],
            preact_feats=[*out.preact_feats[:-1], pre],
            pooled=pooled,
        )

    def forward_features(self, x: Tensor) -> Features:
        structure = trilinear_attention(self.glance(x).feats[-1]).sum(dim=1, keepdim=True)
        return self.classify(self.resample(x, structure))


def _register(name: str, backbone: str) -> None:
    def factory(num_classes: int = 100) -> AttentionSampledNet:
        return AttentionSampledNet(MODELS.get(backbone)(num_classes=num_classes))

    factory.__name__ = name
    MODELS.register(name, family="cifar", input_size=32, kind="attention_sampled")(factory)


for _backbone in ("resnet8", "resnet20", "resnet8x4"):
    _register(f"dats_{_backbone}", _backbone)
