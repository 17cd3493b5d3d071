"""CIFAR model zoo (32×32 inputs) with RepDistiller/mdistiller architectures and state-dict keys."""

from kdforge.models.cifar import mobilenetv2, resnet, resnet_big, shufflenetv1, shufflenetv2, vgg, wrn

__all__ = ["mobilenetv2", "resnet", "resnet_big", "shufflenetv1", "shufflenetv2", "vgg", "wrn"]
