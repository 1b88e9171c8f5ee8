"""A post-activation unit's BatchNorm+ReLU (MSDNet's conv -> BN -> ReLU), forward and backward.

Forward, ``out = relu(bn(y))`` with ``y``'s batch statistics (``reference.batchnorm_relu_into``):
the statistics (:mod:`.channel_stats`), then one kernel that computes the BatchNorm's
``(scale, shift)`` in its prologue, applies them and writes them for the backward
(``pixel_rows._batchnorm_relu_rows_kernel``). Backward (``reference.batchnorm_relu_backward_``):
the transform's backward (:mod:`.affine_relu`), then one kernel that derives the statistics'
gradients from ``(grad_scale, grad_shift)`` in its prologue, adds their part to ``grad_y``
and writes the parameters' gradients (``pixel_rows._batchnorm_backward_rows_kernel``).

The rest of the backward is also that of a bottleneck read by one convolution that applies its
BatchNorm+ReLU in its prologue (the Triton backend's ``batchnorm_relu_conv_backward_``).

The ops' composition launches a kernel of its own for the vectors each way: a launch per unit
more each way, and on a GPU an eager step is bound by the host's time per launch (Triton's
launcher: tens of microseconds; ``benches/RESULTS-gpu.md``). Tensors that are not pixel rows
(NCHW) take the composition.
"""
from __future__ import annotations

import torch

from . import _runtime as rt
from . import pixel_rows
from .affine_relu import affine_relu_backward_, affine_relu_into, check_output
from .bn_vectors import bn_scale_shift_backward_, bn_scale_shift_into, check_scale_shift_args
from .channel_stats import channel_stats_backward_, channel_stats_into


def batchnorm_relu_into(y, eps: float, weight, bias, stats, rows, out) -> None:
    """Writes ``stats`` rows ``(mean, invstd)`` of ``y``, ``rows`` ``(scale, shift)`` and
    ``out = relu(scale * y + shift)`` (``out``: ``y``'s shape, any strides)."""
    rt.check_features("y", y)
    check_output(y, out)
    check_scale_shift_args(stats[0], stats[1], weight, bias, rows, "rows")
    channel_stats_into(y, eps, stats[0], stats[1])
    sxp, sop = pixel_rows.row_stride(y), pixel_rows.row_stride(out)
    if sxp is None or sop is None:
        bn_scale_shift_into(stats[0], stats[1], weight, bias, rows)
        affine_relu_into(y, rows[0], rows[1], out)
        return
    pixel_rows.batchnorm_relu_into(y, stats[0], stats[1], weight, bias, rows, out, sxp, sop)


def batchnorm_relu_backward_(y, grad_z, stats, rows, weight, grad_y, grad_params) -> None:
    """Writes ``grad_y`` (the whole gradient w.r.t. ``y``, never read) and ``grad_params``
    rows ``(grad_weight, grad_bias)`` for ``grad_z``, the gradient w.r.t. ``out``."""
    rt.check_features("y", y)
    check_scale_shift_args(stats[0], stats[1], weight, None, rows, "rows")
    check_scale_shift_args(stats[0], stats[1], weight, None, grad_params, "grad_params")
    grads = torch.zeros_like(stats)  # (grad_scale, grad_shift), accumulated by the transform's
    affine_relu_backward_(y, rows[0], rows[1], grad_z, grad_y, grads[0], grads[1], False)
    batchnorm_backward_rest_(y, stats, weight, grads, grad_y, grad_params)


def batchnorm_backward_rest_(y, stats, weight, grads, grad_y, grad_params) -> None:
    """What a BatchNorm's backward leaves once the backward of its transform's one consumer
    (the ReLU's, or a convolution's prologue) has written ``grad_y`` and accumulated ``grads``
    rows ``(grad_scale, grad_shift)``: adds the batch statistics' part to ``grad_y`` and writes
    ``grad_params`` rows ``(grad_weight, grad_bias)`` (another tensor than ``grads``)."""
    sxp, sdp = pixel_rows.row_stride(y), pixel_rows.row_stride(grad_y)
    if sxp is not None and sdp is not None:
        pixel_rows.batchnorm_backward_(y, stats[0], stats[1], weight, grads, grad_y, grad_params,
                                       sxp, sdp)
        return
    grad_stats = torch.empty_like(stats)  # (grad_mean, grad_invstd), written
    grad_params[0] = bn_scale_shift_backward_(grads, stats[0], stats[1], weight, grad_stats[0],
                                              grad_stats[1], False)
    grad_params[1] = grads[1]
    channel_stats_backward_(y, stats[0], stats[1], grad_stats[0], grad_stats[1], grad_y)
