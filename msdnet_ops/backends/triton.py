"""The ``triton`` backend: the Triton kernels (:mod:`msdnet_ops.triton`) for every op. A
transform-convolution runs fused (the transform in the convolution's prologue) or composed
(the transform materialised by the Triton kernel, then cuDNN's convolution: :mod:`.composed`),
as :func:`msdnet_ops.backends.transform_conv_policy` says, per shape when it is ``timed``
(:mod:`msdnet_ops.conv_choice`)."""
from __future__ import annotations

import functools

import torch

from .. import conv_choice
from ..dtypes import stats_dtype
from .. import triton as _kernels
from . import composed

channel_stats = _kernels.channel_stats
channel_stats_into = _kernels.channel_stats_into
channel_stats_backward_ = _kernels.channel_stats_backward_
affine_relu_into = _kernels.affine_relu_into
affine_relu_backward_ = _kernels.affine_relu_backward_
gather_batch_into = _kernels.gather_batch_into
bn_scale_shift_into = _kernels.bn_scale_shift_into
bn_scale_shift_backward_ = _kernels.bn_scale_shift_backward_
conv_into = _kernels.conv_into
conv_backward_ = _kernels.conv_backward_


def conv(x, weight, stride, padding, pool):
    out = composed.new_output(x, weight, stride, padding, pool)
    conv_into(x, weight, stride, padding, pool, out)
    return out


def _transform_conv(x, scale, shift, weight, stride, padding, pool, out=None):
    def run(path, out):
        if path == "unfused":
            return composed.transform_conv(_kernels, x, scale, shift, weight, stride, padding,
                                           pool, out)
        if out is None:
            out = composed.new_output(x, weight, stride, padding, pool)
        _kernels.transform_conv_into(x, scale, shift, weight, stride, padding, pool, out)
        return out

    key = lambda: conv_choice.shape_key("transform_conv_into_", x, weight, stride, padding, pool)  # noqa: E731
    fused = conv_choice.fused(key, lambda path: run(path, out), x.device)
    return run("fused" if fused else "unfused", out)


def transform_conv(x, scale, shift, weight, stride, padding, pool):
    return _transform_conv(x, scale, shift, weight, stride, padding, pool)


def transform_conv_into(x, scale, shift, weight, stride, padding, pool, out) -> None:
    _transform_conv(x, scale, shift, weight, stride, padding, pool, out)


def transform_conv_backward_(grad_out, x, scale, shift, weight, stride, padding, pool, grad_x,
                             grad_scale, grad_shift, accumulate=True):
    def run(path, grads):
        args = (grad_out, x, scale, shift, weight, stride, padding, pool, *grads, accumulate)
        if path == "fused":
            return _kernels.transform_conv_backward_(*args)
        return composed.transform_conv_backward_(_kernels, *args)

    def trial(path):  # on scratch gradients: the real ones must be updated exactly once
        run(path, [g.clone() for g in (grad_x, grad_scale, grad_shift)])

    key = lambda: conv_choice.shape_key("transform_conv_backward_", x, weight, stride, padding, pool)  # noqa: E731
    fused = conv_choice.fused(key, trial, x.device)
    return run("fused" if fused else "unfused", (grad_x, grad_scale, grad_shift))


def conv_bias_relu(x, weight, bias, stride, padding, out=None):
    """The 1x1 and 3x3 convolutions read the prefix in place (and write ``out`` where given),
    then bias and ReLU in one more pass over the (small) output; others (the 7x7 ImageNet
    stem) run on cuDNN."""
    if weight.shape[2] not in (1, 3):
        return composed.conv_bias_relu(x, weight, bias, stride, padding, out)
    if out is None:
        out = conv(x, weight, stride, padding, 1)
    else:
        conv_into(x, weight, stride, padding, 1, out)
    sdt = stats_dtype(x.dtype)
    _kernels.affine_relu_into(out, torch.ones_like(bias, dtype=sdt), bias.to(sdt), out)
    return out


bottleneck_conv_bias_relu = functools.partial(composed.bottleneck_conv_bias_relu, conv_bias_relu)

# a BatchNorm+ReLU written by a post-activation unit or read by a bottleneck's one consumer: a
# launch fewer than the steps each way (the vectors and their gradients computed in the kernels
# that use them), so the units and readers call these ops; a reader's convolution applies the
# transform in its prologue rather than reading a materialised copy
FUSED_BATCHNORM_RELU = True
TRANSFORM_IN_CONV_PROLOGUE = True
batchnorm_relu_into = _kernels.batchnorm_relu_into
batchnorm_relu_backward_ = _kernels.batchnorm_relu_backward_


def batchnorm_relu_conv_backward_(grad_out, y, stats, rows, weight, conv_weight, stride, padding,
                                  grad_y, grad_params):
    grads = torch.zeros_like(stats)  # (grad_scale, grad_shift), accumulated by the prologue's
    grad_conv_weight = transform_conv_backward_(grad_out, y, rows[0], rows[1], conv_weight, stride,
                                                padding, 1, grad_y, grads[0], grads[1], False)
    _kernels.batchnorm_backward_rest_(y, stats, weight, grads, grad_y, grad_params)
    return grad_conv_weight
