"""The ``reference`` backend: the pure-PyTorch references (:mod:`msdnet_ops.reference`), any
device."""
from __future__ import annotations

import functools

from .. import reference as _ref
from . import composed

channel_stats = _ref.channel_stats
channel_stats_into = _ref.channel_stats_into
channel_stats_backward_ = _ref.channel_stats_backward_
affine_relu_into = _ref.affine_relu_into
affine_relu_backward_ = _ref.affine_relu_backward_
batchnorm_relu_into = _ref.batchnorm_relu_into
batchnorm_relu_backward_ = _ref.batchnorm_relu_backward_
batchnorm_relu_conv_backward_ = _ref.batchnorm_relu_conv_backward_
gather_batch_into = _ref.gather_batch_into
bn_scale_shift_into = _ref.bn_scale_shift_into
bn_scale_shift_backward_ = _ref.bn_scale_shift_backward_
transform_conv_into = _ref.transform_conv_into
transform_conv_backward_ = _ref.transform_conv_backward_
conv_into = _ref.conv_into
conv_backward_ = _ref.conv_backward_
conv_bias_relu = composed.conv_bias_relu
bottleneck_conv_bias_relu = functools.partial(composed.bottleneck_conv_bias_relu,
                                              conv_bias_relu)


def transform_conv(x, scale, shift, weight, stride, padding, pool):
    out = composed.new_output(x, weight, stride, padding, pool)
    transform_conv_into(x, scale, shift, weight, stride, padding, pool, out)
    return out


def conv(x, weight, stride, padding, pool):
    out = composed.new_output(x, weight, stride, padding, pool)
    conv_into(x, weight, stride, padding, pool, out)
    return out
