"""Ready search spaces whose searchable operator is DGConv2d, and a registry to build them by name.

    >>> model = get_space("resnet20", num_classes=10)
    >>> baseline = get_space("resnet20", num_classes=10, dense=True)
"""

from ._registry import default_input_size, get_space, get_space_builder, list_spaces, register_space
from .digits_net import DigitsConvNet, digits_convnet
from .g_resnext import GResNeXt, g_resnext50, g_resnext_cifar
from .mobilenet_v2 import MobileNetV2, mobilenet_v2, mobilenet_v2_cifar
from .resnet_cifar import CifarResNet, cifar_resnet, resnet20, resnet56
from .torchvision_models import torchvision_space

__all__ = [
    "register_space", "get_space", "get_space_builder", "list_spaces", "default_input_size",
    "CifarResNet", "cifar_resnet", "resnet20", "resnet56",
    "GResNeXt", "g_resnext50", "g_resnext_cifar",
    "MobileNetV2", "mobilenet_v2", "mobilenet_v2_cifar",
    "DigitsConvNet", "digits_convnet",
    "torchvision_space",
]
