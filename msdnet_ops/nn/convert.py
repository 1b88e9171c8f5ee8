"""``convert(model)``: swap torchvision's dense blocks for the fused ones, weights kept."""
from __future__ import annotations

from torch import nn

from .dense_block import DenseBlock, Transition
from .dense_layer import DenseLayer
from .densenet import DenseNet


def _dense_layer_config(layer) -> dict:
    growth = layer.conv2.out_channels
    return dict(num_input_features=layer.norm1.num_features, growth_rate=growth,
                bn_size=layer.conv1.out_channels // growth, drop_rate=layer.drop_rate,
                memory_efficient=getattr(layer, "memory_efficient", False))


def _fused_like(module: nn.Module) -> nn.Module | None:
    """The fused twin of a torchvision DenseNet piece (or None if it is not one)."""
    from torchvision.models import densenet as tv

    if isinstance(module, tv.DenseNet):
        blocks = [m for n, m in module.features.named_children() if n.startswith("denseblock")]
        layer = next(iter(blocks[0].values()))
        cfg = _dense_layer_config(layer)
        return DenseNet(growth_rate=cfg["growth_rate"], block_config=tuple(len(b) for b in blocks),
                        num_init_features=module.features.conv0.out_channels,
                        bn_size=cfg["bn_size"], drop_rate=cfg["drop_rate"],
                        num_classes=module.classifier.out_features,
                        memory_efficient=cfg["memory_efficient"],
                        in_channels=module.features.conv0.in_channels)
    if isinstance(module, tv._DenseBlock):
        layers = list(module.values())
        cfg = _dense_layer_config(layers[0])
        return DenseBlock(len(layers), cfg["num_input_features"], cfg["bn_size"],
                          cfg["growth_rate"], cfg["drop_rate"], cfg["memory_efficient"])
    if isinstance(module, tv._DenseLayer):
        return DenseLayer(**_dense_layer_config(module))
    if isinstance(module, tv._Transition):
        return Transition(module.conv.in_channels, module.conv.out_channels)
    return None


def convert(model: nn.Module) -> nn.Module:
    """Returns ``model`` with every torchvision DenseNet, dense block, dense layer and transition
    replaced by its fused twin (parameters, running statistics, device, dtype and train/eval
    mode preserved). A torchvision ``DenseNet`` becomes a :class:`DenseNet` whose forward keeps
    one feature buffer per block end to end. Other modules are left as they are."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    fused = _fused_like(model)
    if fused is not None:
        param = next(model.parameters(), None)
        if param is not None:
            fused = fused.to(device=param.device, dtype=param.dtype)
        fused.load_state_dict(model.state_dict())
        return fused.train(model.training)
    for name, child in list(model.named_children()):
        setattr(model, name, convert(child))
    return model
