"""Backward of transform-conv: the dgrad kernel (with the transform backward in its epilogue)
and the wgrad kernel (recomputing ``z`` in its prologue). See the two kernels' modules."""
from __future__ import annotations

import torch

from . import _runtime as rt
from .transform_conv import check_conv_args
from .transform_conv_dgrad import launch_dgrad
from .transform_conv_wgrad import launch_wgrad


def transform_conv_backward_(grad_out, x, scale, shift, weight, stride, padding, pool,
                             grad_x, grad_scale, grad_shift) -> torch.Tensor:
    """Backward of :func:`transform_conv_into`, as ``reference.transform_conv_backward_``.

    Accumulates (``+=``) into ``grad_x`` (shape of ``x``, any strides and floating dtype, or
    None to skip it), ``grad_scale`` and ``grad_shift`` (per-channel, float32; float64 for
    float64 ``x``). Returns ``grad_weight`` (shape of ``weight``, ``weight``'s dtype; accumulated
    in float32, float64 for float64)."""
    N, Cin, H, W, Cout, k, Ho, Wo = check_conv_args(x, scale, shift, weight, stride, padding, pool)
    dev = x.device
    rt.check_features("grad_out", grad_out)
    rt.check_same_shape("grad_out", grad_out, (N, Cout, Ho, Wo), "the convolution's output")
    if grad_out.dtype != x.dtype:
        raise TypeError(f"grad_out: expected dtype {x.dtype} (as x), got {grad_out.dtype}")
    rt.check_device("grad_out", grad_out, dev)
    if grad_x is not None:
        rt.check_writable_grad("grad_x", grad_x, x.shape, dev)
    sdt = rt.stats_dtype(x.dtype)
    rt.check_vector("grad_scale", grad_scale, Cin, dev, sdt)
    rt.check_vector("grad_shift", grad_shift, Cin, dev, sdt)

    grad_w = torch.zeros(weight.shape, dtype=sdt, device=dev)
    if x.numel() == 0 or grad_out.numel() == 0:
        return grad_w.to(weight.dtype)
    launch_dgrad(grad_out, x, scale, shift, weight, stride, padding, pool, grad_x, grad_scale, grad_shift,
                 k, Ho, Wo)
    launch_wgrad(grad_out, x, scale, shift, weight, stride, padding, pool, grad_w, k, Ho, Wo)
    return grad_w if grad_w.dtype == weight.dtype else grad_w.to(weight.dtype)
