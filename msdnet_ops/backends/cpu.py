"""The ``cpu`` backend: the C++ CPU kernels (:mod:`msdnet_ops.kernels.cpu`); convolutions by
oneDNN, or for 1x1 convolutions MKL GEMMs on the strided buffer rows where the per-shape timing
finds them faster (:mod:`msdnet_ops.kernels.cpu_conv`); the transform-convolutions compose the
transform kernel with them (:mod:`.composed`)."""
from __future__ import annotations

from ..kernels import cpu as _kernels
from ..kernels import cpu_conv
from .. import reference as _ref
from . import composed

channel_stats = _kernels.channel_stats
channel_stats_into = _kernels.channel_stats_into
channel_stats_backward_ = _kernels.channel_stats_backward_
affine_relu_into = _kernels.affine_relu_into
affine_relu_backward_ = _kernels.affine_relu_backward_
# a training-mode BatchNorm + ReLU and its backward: one C++ call each
FUSED_BATCHNORM_RELU = True
batchnorm_relu_into = _kernels.batchnorm_relu_into
batchnorm_relu_backward_ = _kernels.batchnorm_relu_backward_
gather_batch_into = _kernels.gather_batch_into
# a BatchNorm's per-channel vectors (C values): PyTorch's own ops
bn_scale_shift_into = _ref.bn_scale_shift_into
bn_scale_shift_backward_ = _ref.bn_scale_shift_backward_
conv_backward_ = cpu_conv.conv_backward_
conv_bias_relu = cpu_conv.conv_bias_relu
bottleneck_conv_bias_relu = cpu_conv.bottleneck_conv_bias_relu
# optional (ops.prepared_conv_bias_relu): the per-shape choice made once for an inference unit
prepared_conv_bias_relu = cpu_conv.prepared_conv_bias_relu
prepared_bottleneck_conv_bias_relu = cpu_conv.prepared_bottleneck_conv_bias_relu
prepared_key = cpu_conv.prepared_key


def conv(x, weight, stride, padding, pool):
    return composed.in_layout_of(x, cpu_conv.conv(x, weight, stride, padding, pool))


def conv_into(x, weight, stride, padding, pool, out) -> None:
    cpu_conv.conv(x, weight, stride, padding, pool, out)


transform_conv, transform_conv_into, transform_conv_backward_ = \
    composed.transform_convs(_kernels)


def batchnorm_relu_conv_backward_(grad_out, y, stats, rows, weight, conv_weight, stride, padding,
                                  grad_y, grad_params):
    return composed.batchnorm_relu_conv_backward_(_kernels, grad_out, y, stats, rows, weight,
                                                  conv_weight, stride, padding, grad_y,
                                                  grad_params)
