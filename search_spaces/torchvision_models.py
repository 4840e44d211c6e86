"""Any torchvision classification model as a search space, through ``convert_to_dgconv``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from nas_grouping.errors import ConfigError
from nas_grouping.ops.dgconv import DGConv2d

from ._registry import register_space

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

__all__ = ["torchvision_space"]


def _replace_input_conv(model: nn.Module, in_channels: int) -> None:
    for name, module in model.named_modules():
        if type(module) is nn.Conv2d and module.in_channels == 3 and module.groups == 1:
            new = nn.Conv2d(
                in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, 1, module.bias is not None, module.padding_mode,
            )
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            return
    raise ConfigError(f"torchvision_space: no 3-channel input convolution to replace for in_channels={in_channels}")


@register_space("torchvision", input_size=(3, 224, 224))
def torchvision_space(
    name: str,
    *,
    num_classes: int = 1000,
    in_channels: int = 3,
    weights: str | WeightsEnum | None = None,
    conv_layer: Callable[..., nn.Module] = DGConv2d,
    **convert_kwargs: Any,
) -> nn.Module:
    """``torchvision.models.get_model(name, weights=weights, num_classes=num_classes)`` with its
    convolutions converted by ``nas_grouping.convert.convert_to_dgconv(**convert_kwargs)``
    (the stem and depthwise convolutions stay ``nn.Conv2d`` by default).

    ``conv_layer=nn.Conv2d`` returns the model unconverted (``convert_kwargs`` are then
    unused). ``in_channels`` other than 3 replaces the first convolution by a freshly
    initialised one (not with pretrained ``weights``).

    Dense MACs at 3x224x224 for ``name="resnet18"``: 1,814,073,344.
    """
    import torchvision

    from nas_grouping.convert import convert_to_dgconv

    if conv_layer not in (DGConv2d, nn.Conv2d):
        raise ConfigError(f"torchvision_space: conv_layer must be DGConv2d or nn.Conv2d, got {conv_layer!r}")
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            f"torchvision_space: {name!r} is not a torchvision classification model; "
            "see torchvision.models.list_models(module=torchvision.models)"
        )
    if in_channels != 3 and weights is not None:
        raise ConfigError("torchvision_space: pretrained weights need in_channels=3")
    model = torchvision.models.get_model(name, weights=weights, num_classes=num_classes)
    if in_channels != 3:
        _replace_input_conv(model, in_channels)
    if conv_layer is nn.Conv2d:
        return model
    return convert_to_dgconv(model, **{"inplace": True, **convert_kwargs})
