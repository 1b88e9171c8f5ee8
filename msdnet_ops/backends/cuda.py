"""The ``cuda`` backend: the CUDA C++ kernels (:mod:`msdnet_ops.kernels.cuda`); convolutions by
cuDNN on dense inputs, the transform-convolutions composed with the transform kernel
(:mod:`.composed`)."""
from __future__ import annotations

import functools
import sys

from ..kernels import cuda as _kernels
from .. import reference as _ref
from . import composed

channel_stats = _kernels.channel_stats
channel_stats_into = _kernels.channel_stats_into
channel_stats_backward_ = _kernels.channel_stats_backward_
affine_relu_into = _kernels.affine_relu_into
affine_relu_backward_ = _kernels.affine_relu_backward_
gather_batch_into = _kernels.gather_batch_into
# a BatchNorm's per-channel vectors (C values): PyTorch's own ops
bn_scale_shift_into = _ref.bn_scale_shift_into
bn_scale_shift_backward_ = _ref.bn_scale_shift_backward_
conv_backward_ = composed.conv_backward_
conv_bias_relu = composed.conv_bias_relu
bottleneck_conv_bias_relu = functools.partial(composed.bottleneck_conv_bias_relu,
                                              conv_bias_relu)


def conv(x, weight, stride, padding, pool):
    return composed.conv(x, weight, stride, padding, pool)


def conv_into(x, weight, stride, padding, pool, out) -> None:
    composed.conv(x, weight, stride, padding, pool, out)


transform_conv, transform_conv_into, transform_conv_backward_ = \
    composed.transform_convs(_kernels)


batchnorm_relu_into, batchnorm_relu_backward_, batchnorm_relu_conv_backward_ = \
    composed.batchnorm_relus(sys.modules[__name__])
