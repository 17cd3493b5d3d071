"""ImageNet model zoo (224×224 inputs) with torchvision's architectures and state-dict keys."""

from kdforge.models.imagenet import resnet

__all__ = ["resnet"]
