"""DenseBlock (torchvision ``_DenseBlock``) and Transition (``_Transition``) on feature buffers."""
from __future__ import annotations

import torch
from torch import nn

from ..layout import conv_weights_channels_last_
from .bn_affine import uses_batch_stats
from .dense_layer import (DenseLayer, check_input_tensor, new_buffer_for, read_channels,
                          transform_conv_write, write_tensor)
from .feature_buffer import FeatureBuffer


class DenseBlock(nn.ModuleDict):
    """``num_layers`` DenseLayers sharing one feature buffer (keys ``denselayer{i}``)."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float, memory_efficient: bool = False) -> None:
        super().__init__()
        if num_layers <= 0:
            raise ValueError(f"num_layers: expected a positive count, got {num_layers}")
        self.num_input_features = num_input_features
        self.num_output_features = num_input_features + num_layers * growth_rate
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(
                num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate,
                memory_efficient))

    def append_to(self, buffer: FeatureBuffer) -> None:
        for layer in self.values():
            layer.append_to(buffer)

    def new_buffer(self, like: torch.Tensor, sync_group=None) -> FeatureBuffer:
        first = next(iter(self.values()))
        return new_buffer_for(like, self.num_output_features,
                              track_stats=uses_batch_stats(first.norm1), eps=first.norm1.eps,
                              sync_group=sync_group)

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        """Returns the concatenation of the input and every layer's output (as torchvision),
        which is the feature buffer itself: no copy."""
        check_input_tensor(init_features, "init_features", self.num_input_features, self)
        buffer = self.new_buffer(init_features)
        write_tensor(buffer, init_features)
        self.append_to(buffer)
        return read_channels(buffer, 0, buffer.filled)


class Transition(nn.Module):
    """BN-ReLU-Conv1x1-AvgPool2x2 (torchvision ``_Transition``: keys ``norm``, ``conv``).

    Pooling is moved before the 1x1 convolution (both are linear, so the result is the same)
    and fused into the convolution's prologue: 4x fewer GEMM rows. The output is written
    straight into the next block's buffer (:meth:`write_into`)."""

    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        for value, name in ((num_input_features, "num_input_features"),
                            (num_output_features, "num_output_features")):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive number of channels, got {value!r}")
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, 1, bias=False)
        conv_weights_channels_last_(self)  # the buffers are NHWC (msdnet_ops.layout)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return height // 2, width // 2

    def write_into(self, src: FeatureBuffer, dst: FeatureBuffer) -> None:
        transform_conv_write(src, src.filled, self.norm, self.conv, dst, pool=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_tensor(x, "x", self.conv.in_channels, self)
        src = new_buffer_for(x, x.shape[1], track_stats=uses_batch_stats(self.norm), eps=self.norm.eps)
        write_tensor(src, x)
        h, w = self.output_size(*x.shape[2:])
        if h == 0 or w == 0:
            raise ValueError(f"x: spatial size {tuple(x.shape[2:])} is too small for 2x2 pooling")
        dst = FeatureBuffer(x.shape[0], self.conv.out_channels, h, w, dtype=x.dtype,
                            device=x.device, track_stats=False)
        self.write_into(src, dst)
        return read_channels(dst, 0, dst.filled)
