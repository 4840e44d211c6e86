"""NNI model spaces of the plain search spaces, built by the same builders (needs ``nas-grouping[nni]``).

Each function builds the registered plain space with ``get_space`` (its
searchable layers are ``conv_layer=DGConv2d``, the builders' default) and wraps
it in ``nas_grouping.integrations.nni.DGConvModelSpace``, which makes every
DGConv2d an NNI choice labelled by its module path. The network code is the
plain space's, so the exported model of an NNI search has the plain network's
class, layer names and recipe (``save_model`` / ``load_model`` work as for the
plain search).

    >>> space = nni_resnet20(num_classes=10)                        # DGConv choices only
    >>> space = nni_resnet20(candidates=("dgconv", "dense", "depthwise"))   # a LayerChoice per layer

NNI is imported when a space is built, not when this module is imported; a
missing NNI raises ``MissingDependencyError`` with the install command.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ._registry import get_space, list_spaces

if TYPE_CHECKING:
    from nas_grouping.integrations.nni.space import DGConvModelSpace

__all__ = [
    "nni_space", "list_nni_spaces",
    "nni_resnet20", "nni_resnet56", "nni_g_resnext_cifar", "nni_g_resnext50",
    "nni_mobilenet_v2_cifar", "nni_mobilenet_v2", "nni_digits_convnet",
]


def list_nni_spaces() -> list[str]:
    """Names ``nni_space`` accepts: every registered plain space."""
    return list_spaces()


def nni_space(name: str, /, *, candidates: Sequence[str | int] = ("dgconv",), sampling: str = "groups",
              **kwargs: Any) -> DGConvModelSpace:
    """The NNI model space of the registered plain space ``name`` (builder arguments in ``kwargs``).

    Args:
        candidates: per searchable layer, ``("dgconv",)`` or a LayerChoice over
            "dgconv", "dense", "depthwise" and fixed group counts (ints).
        sampling: how sampling strategies draw DGConv patterns: "groups" or "patterns".

    Raises:
        MissingDependencyError: NNI is not installed.
        ConfigError: unknown space or arguments (as ``get_space``), or a dense network.
    """
    from nas_grouping.integrations.nni import DGConvModelSpace

    return DGConvModelSpace(get_space(name, **kwargs), candidates=candidates, sampling=sampling)


def nni_resnet20(*, candidates: Sequence[str | int] = ("dgconv",), sampling: str = "groups",
                 **kwargs: Any) -> DGConvModelSpace:
    """ResNet-20 for CIFAR (``search_spaces.resnet20``) as an NNI space: 18 searchable 3x3 convolutions."""
    return nni_space("resnet20", candidates=candidates, sampling=sampling, **kwargs)


def nni_resnet56(*, candidates: Sequence[str | int] = ("dgconv",), sampling: str = "groups",
                 **kwargs: Any) -> DGConvModelSpace:
    """ResNet-56 for CIFAR (``search_spaces.resnet56``) as an NNI space: 54 searchable 3x3 convolutions."""
    return nni_space("resnet56", candidates=candidates, sampling=sampling, **kwargs)


def nni_g_resnext_cifar(*, candidates: Sequence[str | int] = ("dgconv",), sampling: str = "groups",
                        **kwargs: Any) -> DGConvModelSpace:
    """The small G-ResNeXt (``search_spaces.g_resnext_cifar``) as an NNI space: one searchable 3x3 per block."""
    return nni_space("g_resnext_cifar", candidates=candidates, sampling=sampling, **kwargs)


def nni_g_resnext50(*, candidates: Sequence[str | int] = ("dgconv",), sampling: str = "groups",
                    **kwargs: Any) -> DGConvModelSpace:
    """G-ResNeXt-50 for ImageNet (``search_spaces.g_resnext50``) as an NNI space."""
    return nni_space("g_resnext50", candidates=candidates, sampling=sampling, **kwargs)


def nni_mobilenet_v2_cifar(*, candidates: Sequence[str | int] = ("dgconv",), sampling: str = "groups",
                           **kwargs: Any) -> DGConvModelSpace:
    """MobileNetV2 for small images (``search_spaces.mobilenet_v2_cifar``) as an NNI space (pointwise convs)."""
    return nni_space("mobilenet_v2_cifar", candidates=candidates, sampling=sampling, **kwargs)


def nni_mobilenet_v2(*, candidates: Sequence[str | int] = ("dgconv",), sampling: str = "groups",
                     **kwargs: Any) -> DGConvModelSpace:
    """MobileNetV2 for ImageNet (``search_spaces.mobilenet_v2``) as an NNI space."""
    return nni_space("mobilenet_v2", candidates=candidates, sampling=sampling, **kwargs)


def nni_digits_convnet(*, candidates: Sequence[str | int] = ("dgconv",), sampling: str = "groups",
                       **kwargs: Any) -> DGConvModelSpace:
    """The digits network (``search_spaces.digits_convnet``, 1x8x8 inputs) as an NNI space: five searchable convs."""
    return nni_space("digits_convnet", candidates=candidates, sampling=sampling, **kwargs)
