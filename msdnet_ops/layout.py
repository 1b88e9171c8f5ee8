"""Memory layout of feature maps: NHWC ("channels_last") throughout.

Feature buffers are ``[N, H, W, C_cap]`` in memory, seen as NCHW tensors with channels_last
strides: a channel prefix or slice is then a matrix of ``N*H*W`` rows with row stride
``C_cap``. Measured on the 2-core development CPU (benches/RESULTS.md): oneDNN's convolutions
run up to 2x faster on channels_last inputs than on NCHW ones at the DenseNet and MSDNet
shapes (NCHW picks slow kernels for narrow outputs, e.g. 10 ms instead of 0.7 ms for a
52 -> 6 1x1 convolution backward at 32x32), and GPU GEMMs want the reduction (channel) axis
contiguous too. Every temporary a kernel hands to a convolution follows the same layout, so
no convolution reorders its input.
"""
from __future__ import annotations

import torch

CHANNELS_LAST = torch.channels_last


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The dense layout matching ``t``'s: channels_last for NHWC-like views, else contiguous."""
    if t.dim() == 4 and t.stride(1) == 1 and t.shape[1] > 1:
        return CHANNELS_LAST
    return torch.contiguous_format


def empty_nhwc(shape, *, dtype, device) -> torch.Tensor:
    """A new ``[N, C, H, W]`` tensor stored as ``[N, H, W, C]``."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=CHANNELS_LAST)


def empty_like_layout(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """A new dense tensor of ``shape`` (default ``t``'s) in ``t``'s layout family."""
    shape = tuple(t.shape) if shape is None else tuple(shape)
    return torch.empty(shape, dtype=dtype or t.dtype, device=t.device,
                       memory_format=memory_format_of(t))


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is dense in its layout, else a dense copy in that layout (what
    oneDNN/cuDNN convolutions take without reordering)."""
    fmt = memory_format_of(t)
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def conv_weights_channels_last_(module: torch.nn.Module) -> None:
    """Stores the weight of every ``nn.Conv2d`` in ``module`` channels_last, in place (the same
    Parameter objects, so optimizers and state_dict keys are unaffected). oneDNN convolving an
    NHWC input with an NCHW weight reorders the weight at every call and returns the weight
    gradient channels_last, which then has to be copied back: measured on the 2-core
    development CPU, 3 % of an MSDNet training step (cifar100-anytime) and 2 % at ImageNet
    sizes. Values are unchanged; ``.to()`` and ``load_state_dict`` keep the layout."""
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d) and m.weight.dim() == 4:
            with torch.no_grad():
                m.weight.data = m.weight.data.contiguous(memory_format=CHANNELS_LAST)
