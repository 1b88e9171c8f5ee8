"""DenseLayer: drop-in for torchvision's ``_DenseLayer`` running on feature buffers."""
from __future__ import annotations

import torch
from torch import nn

from .. import ops
from ..layout import conv_weights_channels_last_
from .bn_affine import AffineParams, bn_vectors, update_running_stats, uses_batch_stats
from .feature_buffer import FeatureBuffer
from .batchnorm_relu import BatchNormReLURead
from .functions import ConvBNReLUWrite, ReadFeatures, TransformConvWrite, WriteFeatures


def transform_conv_write(src: FeatureBuffer, in_channels: int, bn: nn.BatchNorm2d, conv: nn.Conv2d,
                         dst: FeatureBuffer, dropout_p: float = 0.0, pool: int = 1) -> int:
    """Appends ``conv(pool(relu(bn(src[:, :in_channels]))))`` to ``dst``; returns where it starts.

    ``bn`` normalizes the *read* channels (pre-activation: the consumer's own BatchNorm). Its
    running statistics are updated from the buffer's shared batch statistics."""
    if bn.eps != src.state.eps:
        raise ValueError(f"{bn}: eps {bn.eps} differs from the feature buffer's eps "
                         f"{src.state.eps}; every BatchNorm reading a buffer must use the same eps")
    if conv.bias is not None or conv.groups != 1 or conv.dilation != (1, 1):
        raise ValueError(f"{conv}: expected a bias-free, ungrouped, undilated convolution")
    if (not src.state.track_stats and in_channels == src.capacity and pool == 1
            and BatchNormReLURead.applies(bn, src.values, src.state.sync_group)):
        # a bottleneck output made without statistics (bottleneck_tracks_stats): read whole
        # through bn, which computes them
        return append_transform_conv(src, in_channels, dst, conv, bn, dropout_p, pool)
    batch_stats, mean, invstd = bn_vectors(bn, src.state, 0, in_channels)
    if batch_stats:
        update_running_stats(bn, src.state, 0, in_channels)
    return append_transform_conv(src, in_channels, dst, conv,
                                 (batch_stats, bn.weight, bn.bias, mean, invstd), dropout_p, pool)


def bottleneck_tracks_stats(bn: nn.BatchNorm2d, like: torch.Tensor, sync_group=None) -> bool:
    """Whether a bottleneck output read whole by one consumer through ``bn`` keeps batch
    statistics of its own, computed as it is written: when ``bn`` uses batch statistics, except
    where the consumer computes them as it reads (:class:`BatchNormReLURead`, the CPU: one
    call each way instead of the steps)."""
    return uses_batch_stats(bn) and not BatchNormReLURead.applies(bn, like, sync_group)


def _read_arguments(read, src: FeatureBuffer, in_channels: int, pool: int = 1) -> tuple:
    """``(batch_stats, weight, bias, mean, invstd, read_bn)`` of the fused autograd nodes for a
    read given as the vectors ``(batch_stats, weight, bias, mean, invstd)`` of a BatchNorm+ReLU,
    or as the BatchNorm module itself (``src`` is a bottleneck output without statistics, read
    whole, its batch statistics computed as it is read: :class:`BatchNormReLURead`), or None
    (activated channels, read as they are)."""
    if isinstance(read, nn.BatchNorm2d):
        if in_channels != src.capacity or src.state.track_stats or pool != 1:
            raise ValueError("read: a BatchNorm module reads a whole buffer without statistics, "
                             "unpooled")
        return (True, read.weight, read.bias, None, None, read)
    return tuple(read or (False, None, None, None, None)) + (None,)


def append_transform_conv(src: FeatureBuffer, in_channels: int, dst: FeatureBuffer,
                          conv: nn.Conv2d, read, dropout_p: float = 0.0, pool: int = 1) -> int:
    """Appends ``conv(pool(relu(bn(src[:, :in_channels]))))`` to ``dst``, the BatchNorm+ReLU
    ``read`` as :func:`_read_arguments` takes it; returns where the new channels start."""
    start = dst.reserve(conv.out_channels)
    batch_stats, *vectors = _read_arguments(read, src, in_channels, pool)
    dst.token = TransformConvWrite.apply(
        src.state, in_channels, dst.state, start, batch_stats, conv.stride[0], conv.padding[0],
        pool, dropout_p, *vectors, conv.weight, src.token, dst.token)
    return start


def append_conv(src: FeatureBuffer, in_channels: int, dst: FeatureBuffer, conv: nn.Conv2d) -> int:
    """Appends ``conv(src[:, :in_channels])`` to ``dst``, reading *activated* channels as they
    are (no transform); returns where the new channels start."""
    start = dst.reserve(conv.out_channels)
    dst.token = TransformConvWrite.apply(
        src.state, in_channels, dst.state, start, False, conv.stride[0], conv.padding[0], 1,
        0.0, None, None, None, None, None, conv.weight, src.token, dst.token)
    return start


def append_conv_bn_relu(src: FeatureBuffer, in_channels: int, dst: FeatureBuffer,
                        conv: nn.Conv2d, bn: nn.BatchNorm2d, read=None,
                        recompute: bool = False) -> int:
    """Appends ``relu(bn(conv(read(src[:, :in_channels]))))`` to ``dst``, activated (a
    post-activation unit); ``read`` is the BatchNorm+ReLU the source channels go through first,
    as :func:`_read_arguments` takes it (None: activated channels).
    ``recompute``: the convolution's output is not kept for backward but computed again there.
    Returns where the new channels start."""
    if conv.bias is not None or conv.groups != 1 or conv.dilation != (1, 1):
        raise ValueError(f"{conv}: expected a bias-free, ungrouped, undilated convolution")
    start = dst.reserve(conv.out_channels)
    batch_stats, *vectors = _read_arguments(read, src, in_channels)
    dst.token = ConvBNReLUWrite.apply(
        src.state, in_channels, dst.state, start, batch_stats, conv.stride[0], conv.padding[0],
        *vectors, conv.weight, bn, bn.weight, bn.bias, recompute, src.token, dst.token)
    return start


def recompute_in_backward(dst: FeatureBuffer, src: FeatureBuffer, in_channels: int,
                          conv: nn.Conv2d, vectors=None) -> None:
    """Frees ``dst``'s values after the forward pass; backward recomputes them when it first
    needs them (``memory_efficient``: one more convolution, exact, since the prefix, its
    statistics and the parameters are unchanged by then). They were written by ``conv`` of
    ``src[:, :in_channels]``: transformed with ``vectors`` ``(batch_stats, weight, bias, mean,
    invstd)`` as :func:`append_transform_conv` does, or, without, as :func:`append_conv`."""
    affine = None if vectors is None else AffineParams(*vectors[1:], vectors[0])
    state = src.state
    conv_weight = conv.weight.detach().to(state.values.dtype)  # as in forward (autocast)
    geometry = (conv.stride[0], conv.padding[0], 1)

    def recompute() -> torch.Tensor:  # as TransformConvWrite computed the whole buffer
        state.restore_values()  # a source freed until backward comes back first
        x = state.values[:, :in_channels]
        if affine is None:
            return ops.eager.conv(x, conv_weight, *geometry)
        return ops.eager.transform_conv(x, affine.scale, affine.shift, conv_weight, *geometry)

    dst.state.forget_values(recompute)


def write_tensor(dst: FeatureBuffer, x: torch.Tensor, with_stats: bool = True) -> int:
    """Appends an ordinary tensor's channels to ``dst`` (with their batch statistics when the
    buffer tracks them and ``with_stats``)."""
    if x.dim() != 4 or tuple(x.shape[2:]) != dst.spatial or x.shape[0] != dst.values.shape[0]:
        raise ValueError(f"x: expected shape ({dst.values.shape[0]}, C, {dst.spatial[0]}, "
                         f"{dst.spatial[1]}) to fill the feature buffer, got {tuple(x.shape)}")
    if x.dtype != dst.values.dtype and torch.is_autocast_enabled(x.device.type):
        x = x.to(dst.values.dtype)  # autocast: the buffer holds the autocast dtype
    if x.dtype != dst.values.dtype or x.device != dst.values.device:
        raise TypeError(f"x: expected {dst.values.dtype} on {dst.values.device}, got {x.dtype} on {x.device}")
    start = dst.reserve(x.shape[1])
    dst.token = WriteFeatures.apply(dst.state, start, x, with_stats, dst.token)
    return start


def read_channels(src: FeatureBuffer, start: int, stop: int) -> torch.Tensor:
    return ReadFeatures.apply(src.state, start, stop, src.token)


def new_buffer_for(x: torch.Tensor, capacity: int, track_stats: bool, eps: float = 1e-5,
                   sync_group=None) -> FeatureBuffer:
    n, _, h, w = x.shape
    return FeatureBuffer(n, capacity, h, w, dtype=x.dtype, device=x.device,
                         track_stats=track_stats, eps=eps, sync_group=sync_group)


def check_like_parameters(x: torch.Tensor, name: str, module: nn.Module) -> None:
    """``x`` is on ``module``'s device with its parameters' dtype (any floating dtype under
    autocast)."""
    param = next(module.parameters())
    if x.device != param.device:
        raise ValueError(f"{name}: expected a tensor on {param.device} (the module's device), "
                         f"got {x.device}")
    if x.dtype != param.dtype and not (x.is_floating_point()
                                        and torch.is_autocast_enabled(x.device.type)):
        raise TypeError(f"{name}: expected {param.dtype} (the module's parameters' dtype), got "
                        f"{x.dtype}")


def check_input_tensor(x, name: str, channels: int, module: nn.Module | None = None) -> None:
    """``x`` is a non-empty ``[N, channels, H, W]`` tensor with ``module``'s parameters' dtype
    (any floating dtype under autocast) and device; in training mode (batch statistics) with
    more than one value per channel, as ``nn.BatchNorm2d`` requires."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D NCHW tensor, got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels, got {x.shape[1]}")
    if x.shape[0] < 1:
        raise ValueError(f"{name}: expected at least one sample, got shape {tuple(x.shape)}")
    if module is None or next(module.parameters(), None) is None:
        return
    check_like_parameters(x, name, module)
    batch_stats = any(uses_batch_stats(m) for m in module.modules()
                      if isinstance(m, nn.BatchNorm2d))
    if batch_stats and x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"{name}: expected more than one value per channel in training mode "
                         f"(batch statistics, as nn.BatchNorm2d), got shape {tuple(x.shape)}")


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3 (torchvision ``_DenseLayer``), fused.

    Same constructor, parameter and buffer names as torchvision's ``_DenseLayer``.
    ``bn_size=0`` gives the layer without bottleneck of the original DenseNet (BN-ReLU-Conv3x3:
    ``norm1``, ``relu1``, ``conv1``). The fused layer never keeps a prefix-sized tensor; with
    ``memory_efficient=True`` it does not keep its bottleneck output either (``bn_size *
    growth_rate`` channels, the largest tensor a layer holds for backward) but recomputes it in
    backward, one extra 1x1 convolution per layer.

    ``forward(x)`` takes a tensor or a list of tensors (like torchvision) and returns the new
    features; :meth:`append_to` is the concat-free path used by :class:`DenseBlock`.
    """

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int,
                 drop_rate: float, memory_efficient: bool = False) -> None:
        super().__init__()
        if num_input_features <= 0 or growth_rate <= 0 or bn_size < 0:
            raise ValueError(f"DenseLayer: expected positive num_input_features and growth_rate "
                             f"and bn_size >= 0, got {num_input_features}, {growth_rate}, {bn_size}")
        if not 0 <= drop_rate < 1:
            raise ValueError(f"drop_rate: expected a value in [0, 1), got {drop_rate}")
        self.num_input_features = num_input_features
        self.growth_rate = growth_rate
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        if bn_size > 0:
            self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, 1, bias=False)
            self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(num_input_features, growth_rate, 3, 1, 1, bias=False)
        conv_weights_channels_last_(self)  # the buffers are NHWC (msdnet_ops.layout)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    @property
    def has_bottleneck(self) -> bool:
        return hasattr(self, "conv2")

    def append_to(self, buffer: FeatureBuffer) -> None:
        """Reads the first ``num_input_features`` channels of ``buffer`` and appends
        ``growth_rate`` new ones."""
        if buffer.filled != self.num_input_features:
            raise ValueError(f"{type(self).__name__}: expected a buffer holding "
                             f"{self.num_input_features} channels, it holds {buffer.filled}")
        p = self.drop_rate if self.training else 0.0
        if not self.has_bottleneck:
            transform_conv_write(buffer, self.num_input_features, self.norm1, self.conv1, buffer, p)
            return
        # the bottleneck output is a buffer of its own (constant width): kept for backward, or
        # with memory_efficient freed now and recomputed when backward needs it
        sync_group = buffer.state.sync_group
        inner = new_buffer_for(buffer.values, self.conv1.out_channels,
                               track_stats=bottleneck_tracks_stats(self.norm2, buffer.values,
                                                                   sync_group),
                               eps=self.norm2.eps, sync_group=sync_group)
        transform_conv_write(buffer, self.num_input_features, self.norm1, self.conv1, inner)
        transform_conv_write(inner, inner.filled, self.norm2, self.conv2, buffer, p)
        if self.memory_efficient:
            self._forget_bottleneck(buffer, inner)

    def _forget_bottleneck(self, buffer: FeatureBuffer, inner: FeatureBuffer) -> None:
        """Frees the bottleneck output; backward recomputes it with one 1x1 convolution of the
        buffer prefix (which, like its statistics and the parameters, is unchanged by then)."""
        c = self.num_input_features
        batch_stats, mean, invstd = bn_vectors(self.norm1, buffer.state, 0, c)
        recompute_in_backward(inner, buffer, c, self.conv1,
                              (batch_stats, self.norm1.weight, self.norm1.bias, mean, invstd))

    def forward(self, input) -> torch.Tensor:
        x = torch.cat(list(input), 1) if isinstance(input, (list, tuple)) else input
        check_input_tensor(x, "input", self.num_input_features, self)
        buffer = new_buffer_for(x, self.num_input_features + self.growth_rate,
                                track_stats=uses_batch_stats(self.norm1), eps=self.norm1.eps)
        write_tensor(buffer, x)
        self.append_to(buffer)
        return read_channels(buffer, self.num_input_features, buffer.filled)
