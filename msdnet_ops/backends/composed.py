"""Convolutions for engines that take dense inputs only (oneDNN on the CPU, cuDNN on CUDA),
composed from a backend's own memory-bound kernels.

``elementwise`` is the module with the backend's ``affine_relu_into`` and
``affine_relu_backward_`` (:mod:`msdnet_ops.kernels.cpu`, :mod:`msdnet_ops.kernels.cuda`,
:mod:`msdnet_ops.triton`). The transform ``relu(scale*x+shift)`` is written into a dense
temporary, reused on the CPU (a fresh prefix-sized tensor per call costs more in page faults
than filling it) and fresh on CUDA (the caching allocator makes that free, and a reused
tensor there would need stream care); the convolution's gradient is added into the shared
gradient buffer afterwards.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import reference
from .. import validation as check
from ..kernels import cpu_conv
from ..layout import dense, empty_like_layout


def new_output(x, weight, stride: int, padding: int, pool: int) -> torch.Tensor:
    """An uninitialised convolution output, dense in ``x``'s layout."""
    return empty_like_layout(x, check.conv_output_shape(x, weight, stride, padding, pool))


def in_layout_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``y`` with exactly the strides a new tensor in ``x``'s layout gets (what the ops' fake
    implementations promise), copied only where they differ."""
    want = empty_like_layout(x, y.shape)
    return y if y.stride() == want.stride() else want.copy_(y)


def _scratch_like(x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":
        return cpu_conv.scratch.get("z", x.shape, x)
    return empty_like_layout(x)


def _pooled(z: torch.Tensor, pool: int) -> torch.Tensor:
    return F.avg_pool2d(z, pool) if pool != 1 else z


def transformed(elementwise, x, scale, shift, pool: int):
    """``relu(scale*x+shift)`` in a dense temporary, and its ``pool``-pooled values."""
    z = _scratch_like(x)
    elementwise.affine_relu_into(x, scale, shift, z)
    return z, _pooled(z, pool)


def transform_conv(elementwise, x, scale, shift, weight, stride, padding, pool, out=None):
    """The transform-conv written into ``out``, or returned as a new dense tensor in ``x``'s
    layout (the convolution's own output where it has that layout: no copy)."""
    y = cpu_conv.aten_conv(transformed(elementwise, x, scale, shift, pool)[1], weight, stride,
                           padding)
    return in_layout_of(x, y) if out is None else out.copy_(y)


def transform_conv_backward_(elementwise, grad_out, x, scale, shift, weight, stride, padding,
                             pool, grad_x, grad_scale, grad_shift, accumulate=True) -> torch.Tensor:
    """Accumulates into ``grad_x`` (or overwrites it: ``accumulate=False``), ``grad_scale``,
    ``grad_shift``; returns ``grad_weight``."""
    z, zp = transformed(elementwise, x, scale, shift, pool)
    grad_zp, grad_weight = cpu_conv.dense_conv_backward(grad_out, zp, weight, stride, padding)
    elementwise.affine_relu_backward_(x, scale, shift, cpu_conv.unpool_grad(grad_zp, z, pool),
                                      grad_x, grad_scale, grad_shift, accumulate)
    return grad_weight


def batchnorm_relu_conv_backward_(elementwise, grad_out, y, stats, rows, weight, conv_weight,
                                  stride, padding, grad_y, grad_params) -> torch.Tensor:
    """For a backend whose ``elementwise`` module runs the BatchNorm+ReLU backward as one call
    (the CPU's): the transform written into the scratch again, the engine's backward of the
    convolution, then that one call; returns the convolution weight's gradient."""
    z, _ = transformed(elementwise, y, rows[0], rows[1], 1)
    grad_z, grad_conv_weight = cpu_conv.dense_conv_backward(dense(grad_out), z, conv_weight,
                                                            stride, padding)
    elementwise.batchnorm_relu_backward_(y, grad_z, stats, rows, weight, grad_y, grad_params)
    return grad_conv_weight


def conv(x, weight, stride, padding, pool, out=None):
    """``conv2d(avg_pool(x, pool), weight)`` of activated channels on a dense copy of ``x``."""
    y = cpu_conv.aten_conv(_pooled(dense(x), pool), weight, stride, padding)
    return in_layout_of(x, y) if out is None else out.copy_(y)


def conv_backward_(grad_out, x, weight, stride, padding, pool, grad_x) -> torch.Tensor:
    z = dense(x)
    grad_zp, grad_weight = cpu_conv.dense_conv_backward(grad_out, _pooled(z, pool), weight,
                                                        stride, padding)
    grad_x.add_(cpu_conv.unpool_grad(grad_zp, z, pool))
    return grad_weight


def conv_bias_relu(x, weight, bias, stride, padding, out=None) -> torch.Tensor:
    """``relu(conv2d(x, weight, bias))`` on a dense copy of ``x`` (the ReLU apart: torch.relu
    keeps NaN), new or written into ``out``."""
    return cpu_conv.relu_into(cpu_conv.aten_conv_bias(dense(x), weight, bias, stride, padding),
                              out)


def bottleneck_conv_bias_relu(conv_bias_relu, x, w1, b1, weight, bias, stride, padding,
                              out=None) -> torch.Tensor:
    """A 1x1 unit then a k x k one, each ``conv_bias_relu`` (a backend's): the bottleneck's
    output is a dense temporary."""
    return conv_bias_relu(conv_bias_relu(x, w1, b1, 1, 0), weight, bias, stride, padding, out)


def transform_convs(elementwise):
    """``(transform_conv, transform_conv_into, transform_conv_backward_)`` of a backend whose
    memory-bound kernels are ``elementwise``, with the backends' common signatures."""
    def transform_conv_new(x, scale, shift, weight, stride, padding, pool):
        return transform_conv(elementwise, x, scale, shift, weight, stride, padding, pool)

    def transform_conv_into(x, scale, shift, weight, stride, padding, pool, out) -> None:
        transform_conv(elementwise, x, scale, shift, weight, stride, padding, pool, out)

    def transform_conv_backward(grad_out, x, scale, shift, weight, stride, padding, pool,
                                grad_x, grad_scale, grad_shift, accumulate=True):
        return transform_conv_backward_(elementwise, grad_out, x, scale, shift, weight, stride,
                                        padding, pool, grad_x, grad_scale, grad_shift, accumulate)
    return transform_conv_new, transform_conv_into, transform_conv_backward


def batchnorm_relus(backend):
    """``(batchnorm_relu_into, batchnorm_relu_backward_, batchnorm_relu_conv_backward_)`` of a
    backend without a fused kernel for them: the references' composition of the backend's own
    ops (``backend``: its module)."""
    def batchnorm_relu_into(y, eps, weight, bias, stats, rows, out) -> None:
        reference.composed_batchnorm_relu_into(backend, y, eps, weight, bias, stats, rows, out)

    def batchnorm_relu_backward_(y, grad_z, stats, rows, weight, grad_y, grad_params) -> None:
        reference.composed_batchnorm_relu_backward_(backend, y, grad_z, stats, rows, weight,
                                                    grad_y, grad_params)

    def batchnorm_relu_conv_backward_(grad_out, y, stats, rows, weight, conv_weight, stride,
                                      padding, grad_y, grad_params):
        return reference.composed_batchnorm_relu_conv_backward_(
            backend, grad_out, y, stats, rows, weight, conv_weight, stride, padding, grad_y,
            grad_params)
    return batchnorm_relu_into, batchnorm_relu_backward_, batchnorm_relu_conv_backward_
