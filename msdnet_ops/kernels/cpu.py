"""CPU kernels (``msdnet_ops._cpu_kernels``, C++ / OpenMP) for CPU tensors of float32 or
float64. Thread count follows ``torch.get_num_threads()``. Semantics: :mod:`msdnet_ops.reference`;
argument validation is the caller's (:mod:`msdnet_ops.ops`)."""
from __future__ import annotations

import torch

from ._common import DTYPE_CODES, LazyModule, stats_dtype, vec, view

_MODULE = LazyModule("msdnet_ops._cpu_kernels", "CPU kernels",
                     "pip install --no-build-isolation .")
_CPU_DTYPES = (torch.float32, torch.float64)


def available() -> bool:
    """Whether the compiled CPU module is importable."""
    return _MODULE.get() is not None


def load_error() -> str | None:
    """Why the compiled CPU module is not importable (``None`` when it is)."""
    return _MODULE.error


def _module():
    return _MODULE.require()


def _code(t: torch.Tensor) -> int:
    if t.dtype not in _CPU_DTYPES:
        raise TypeError(f"msdnet_ops CPU kernels run float32 and float64 tensors, got {t.dtype}")
    return DTYPE_CODES[t.dtype]


def channel_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.empty(x.shape[1], dtype=stats_dtype(x.dtype))
    invstd = torch.empty_like(mean)
    channel_stats_into(x, eps, mean, invstd)
    return mean, invstd


def channel_stats_into(x, eps: float, mean, invstd) -> None:
    _module().channel_stats(_code(x), view(x), float(eps), vec(mean), vec(invstd),
                            torch.get_num_threads())


def channel_stats_backward_(x, mean, invstd, grad_mean, grad_invstd, grad_x) -> None:
    _module().channel_stats_backward(_code(x), view(x), vec(mean), vec(invstd), vec(grad_mean),
                                     vec(grad_invstd), view(grad_x), torch.get_num_threads())


def affine_relu_into(x, scale, shift, out) -> None:
    _module().affine_relu(_code(x), view(x), vec(scale), vec(shift), view(out),
                          torch.get_num_threads())


def affine_relu_backward_(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift,
                          accumulate: bool = True) -> None:
    _module().affine_relu_backward(_code(x), view(x), vec(scale), vec(shift), view(grad_z),
                                   view(grad_x), vec(grad_scale), vec(grad_shift),
                                   bool(accumulate), torch.get_num_threads())


def _vector_ptr(v, like) -> tuple:
    """``v`` (a BatchNorm weight or bias, or None) in ``like``'s dtype, dense, and its data
    pointer (0 for None); keep the tensor alive for the call."""
    if v is None:
        return None, 0
    if v.dtype != like.dtype or not v.is_contiguous():  # (the checks cost less than the calls)
        v = v.detach().to(like.dtype).contiguous()
    return v, v.data_ptr()


def batchnorm_relu_into(y, eps: float, weight, bias, stats, rows, out) -> None:
    weight, weight_ptr = _vector_ptr(weight, stats)
    bias, bias_ptr = _vector_ptr(bias, stats)
    _module().batchnorm_relu(_code(y), view(y), float(eps), weight_ptr, bias_ptr,
                             stats.data_ptr(), rows.data_ptr(), view(out),
                             torch.get_num_threads())


def batchnorm_relu_backward_(y, grad_z, stats, rows, weight, grad_y, grad_params) -> None:
    weight, weight_ptr = _vector_ptr(weight, stats)
    _module().batchnorm_relu_backward(_code(y), view(y), stats.data_ptr(), rows.data_ptr(),
                                      weight_ptr, view(grad_z), view(grad_y),
                                      grad_params.data_ptr(), torch.get_num_threads())


def gather_batch_into(src, index, out) -> None:
    m = _module()
    index = index.contiguous()
    m.gather_batch(src.element_size(), view(src), index.data_ptr(), view(out),
                   torch.get_num_threads())


POINTWISE_CONV_MAX_OUTPUTS = 64  # csrc/cpu/pointwise_conv.cpp: kMaxOutputs
POINTWISE_WGRAD_MAX_OUTPUTS = 32  # kMaxWgradOutputs


def _rows(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), t.shape[0], t.shape[1], t.stride(0))


def pointwise_conv_rows(x, weight, bias, relu: bool, out) -> None:
    """``out = act(x @ weight.T + bias)`` on row matrices (unit column stride, any row stride):
    a 1x1 convolution of NHWC pixels with 1 to :data:`POINTWISE_CONV_MAX_OUTPUTS` outputs;
    ``weight`` ``[N, K]`` dense, ``bias`` ``[N]`` dense or None, ``act`` ReLU (NaN kept) when
    ``relu``."""
    prepared_pointwise_conv_rows(weight, bias, relu)(x, out)


def prepared_pointwise_conv_rows(weight, bias, relu: bool):
    """:func:`pointwise_conv_rows` with these weights as ``run(x, out)`` (which returns
    ``out``), their layout made once (an inference unit runs on every forward pass)."""
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    module, outputs, relu = _module(), weight.shape[0], bool(relu)

    def run(x, out) -> torch.Tensor:
        module.pointwise_conv(_code(x), _rows(x), weight.data_ptr(), outputs,
                              0 if bias is None else bias.data_ptr(), relu, _rows(out),
                              torch.get_num_threads())
        return out
    return run


def pointwise_conv_wgrad_rows(x, grad_out) -> torch.Tensor:
    """``grad_out.T @ x`` (``[N, K]``, new) on row matrices: the weight gradient of a 1x1
    convolution with 1 to :data:`POINTWISE_WGRAD_MAX_OUTPUTS` outputs; summed in a fixed order
    (the same for any thread count)."""
    grad_weight = torch.empty(grad_out.shape[1], x.shape[1], dtype=x.dtype)
    _module().pointwise_conv_wgrad(_code(x), _rows(x), _rows(grad_out), grad_weight.data_ptr(),
                                   torch.get_num_threads())
    return grad_weight


DIRECT_CONV_MAX_OUTPUTS = 64  # csrc/cpu/direct_conv.cpp: kMaxOutputs


def direct_conv_into(x, weight, bias, stride: int, padding: int, relu: bool, out) -> None:
    """``out = act(conv2d(x, weight, bias, stride, padding))`` for a square kernel and 1 to
    :data:`DIRECT_CONV_MAX_OUTPUTS` outputs; ``x`` and ``out`` NHWC-strided views (channel
    stride 1: a buffer prefix, a buffer slice), ``act`` ReLU (NaN kept) when ``relu``."""
    prepared_direct_conv(weight, bias, stride, padding, relu)(x, out)


def prepared_direct_conv(weight, bias, stride: int, padding: int, relu: bool):
    """:func:`direct_conv_into` with these weights as ``run(x, out)`` (which returns ``out``),
    their layout made once."""
    weight = weight.permute(0, 2, 3, 1).contiguous()  # [O, k, k, C]: free for channels_last
    bias = None if bias is None else bias.contiguous()
    module, k, stride, padding, relu = _module(), weight.shape[1], int(stride), int(padding), \
        bool(relu)

    def run(x, out) -> torch.Tensor:
        module.direct_conv(_code(x), view(x), weight.data_ptr(), k, stride, padding,
                           0 if bias is None else bias.data_ptr(), relu, view(out),
                           torch.get_num_threads())
        return out
    return run


DIRECT_WGRAD_MAX_OUTPUTS = 64  # csrc/cpu/direct_wgrad.cpp: kMaxOutputs


def direct_conv_wgrad(x, grad_out, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """The weight gradient of :func:`direct_conv_into`'s convolution of ``x`` (a square
    ``kernel``) for 1 to :data:`DIRECT_WGRAD_MAX_OUTPUTS` outputs: ``[O, C, k, k]``, new, in
    channels_last strides; ``x`` and ``grad_out`` NHWC-strided views. Summed in a fixed order
    (the same for any thread count)."""
    grad_weight = torch.empty(grad_out.shape[1], kernel, kernel, x.shape[1], dtype=x.dtype)
    _module().direct_wgrad(_code(x), view(x), view(grad_out), int(kernel), int(stride),
                           int(padding), grad_weight.data_ptr(), torch.get_num_threads())
    return grad_weight.permute(0, 3, 1, 2)


DIRECT_DGRAD_MAX_CHANNELS = 64  # csrc/cpu/direct_dgrad.cpp: kMaxChannels


def direct_conv_dgrad_into(grad_out, weight, stride: int, padding: int, out) -> None:
    """``out =`` the input gradient of ``conv2d(x, weight, None, stride, padding)`` for
    ``grad_out`` (a square kernel, ``padding`` below its size, 1 to
    :data:`DIRECT_DGRAD_MAX_CHANNELS` input channels); ``grad_out`` and ``out`` (shaped like
    ``x``) NHWC-strided views. Each input pixel gathers only the taps that reach it."""
    weight = weight.contiguous()
    _module().direct_dgrad(_code(grad_out), view(grad_out), weight.data_ptr(),
                           int(weight.shape[2]), int(stride), int(padding), view(out),
                           torch.get_num_threads())


BOTTLENECK_MAX_MID = 32  # csrc/cpu/direct_conv.cpp: kMaxMid


def bottleneck_direct_conv_into(x, w1, b1, weight, bias, stride: int, padding: int, relu: bool,
                                out) -> None:
    """``out = act(conv2d(relu(conv2d(x, w1, b1)), weight, bias, stride, padding))``: a 1x1
    unit with 1 to :data:`BOTTLENECK_MAX_MID` outputs fused in front of
    :func:`direct_conv_into`'s convolution (its output is computed row by row into the
    kernel's scratch, never stored); ``x`` and ``out`` NHWC-strided views."""
    prepared_bottleneck_direct_conv(w1, b1, weight, bias, stride, padding, relu)(x, out)


def prepared_bottleneck_direct_conv(w1, b1, weight, bias, stride: int, padding: int,
                                    relu: bool):
    """:func:`bottleneck_direct_conv_into` with these weights as ``run(x, out)`` (which returns
    ``out``), their layout made once."""
    w1 = w1.reshape(w1.shape[0], -1).contiguous()
    weight = weight.permute(0, 2, 3, 1).contiguous()
    bias = None if bias is None else bias.contiguous()
    b1 = b1.contiguous()
    module, mid, k, stride, padding, relu = _module(), w1.shape[0], weight.shape[1], \
        int(stride), int(padding), bool(relu)

    def run(x, out) -> torch.Tensor:
        module.bottleneck_direct_conv(_code(x), view(x), w1.data_ptr(), mid, b1.data_ptr(),
                                      weight.data_ptr(), k, stride, padding,
                                      0 if bias is None else bias.data_ptr(), relu, view(out),
                                      torch.get_num_threads())
        return out
    return run


def isa() -> str | None:
    """The instruction-set variant in use (``baseline``, ``avx2``, ``avx512``), if built."""
    m = _MODULE.get()
    return None if m is None else m.current_isa()
