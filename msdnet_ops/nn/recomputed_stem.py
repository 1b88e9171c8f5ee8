"""``max_pool(relu(bn(conv(x))))`` that keeps less for backward: the ImageNet stem of MSDNet
under ``memory_efficient``.

Plain autograd keeps three full-resolution tensors of this stem for backward: the convolution
output (BatchNorm's backward), the ReLU output (the ReLU's and the max-pool's backward) and the
pool's int64 indices; at 160x160, batch 32, 62.5 MiB besides the image. This node keeps the
convolution output only (``keep_conv_output=True``), or nothing but the image, which the
convolution's weight gradient needs anyway (``False``), and recomputes the rest in backward
with the same ops. BatchNorm's running statistics are updated once, in forward, by the module
itself; the recomputation normalizes with the batch statistics and touches no running
statistics. Only for a BatchNorm in training mode: with running statistics (eval mode) the
stem runs as plain modules.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu_max_pool(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                          pool: nn.MaxPool2d, keep_conv_output: bool) -> torch.Tensor:
    """``pool(relu(bn(conv(x))))`` with ``bn`` in training mode, recomputed in backward."""
    if not bn.training:
        raise ValueError(f"{bn}: expected a BatchNorm in training mode (batch statistics)")
    return _ConvBNReLUMaxPool.apply(x, conv.weight, conv.bias, bn.weight, bn.bias, conv, bn, pool,
                                    keep_conv_output)


class _ConvBNReLUMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, conv_weight, conv_bias, bn_weight, bn_bias, conv, bn, pool,
                keep_conv_output):
        y = conv(x)
        out = pool(F.relu(bn(y)))  # the module: its running statistics updated once, here
        ctx.save_for_backward(x, y if keep_conv_output else None, conv_weight, conv_bias,
                              bn_weight, bn_bias)
        ctx.geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)
        ctx.eps, ctx.pool = bn.eps, pool
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, y, weight, bias, bn_weight, bn_bias = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        needs = ctx.needs_input_grad[:5]
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_(need)
                      for t, need in zip((x, weight, bias, bn_weight, bn_bias), needs)]
            x_, weight_, bias_, bn_weight_, bn_bias_ = leaves
            if y is None:  # the convolution recomputed, in this graph
                y_ = F.conv2d(x_, weight_, bias_, stride, padding, dilation, groups)
                inputs = [t for t in leaves if t is not None and t.requires_grad]
            else:  # from the kept output; the convolution's backward below
                y_ = y.detach().requires_grad_()
                inputs = [y_] + [t for t in (bn_weight_, bn_bias_)
                                 if t is not None and t.requires_grad]
            out = ctx.pool(F.relu(F.batch_norm(y_, None, None, bn_weight_, bn_bias_, True, 0.0,
                                               ctx.eps)))
            grads = dict(zip(map(id, inputs), torch.autograd.grad(out, inputs, grad_out)))
        if y is not None:
            grads[id(x_)], grads[id(weight_)], grads[id(bias_)] = \
                torch.ops.aten.convolution_backward(
                    grads[id(y_)], x, weight, None if bias is None else [bias.shape[0]],
                    list(stride), list(padding), list(dilation), False, [0, 0], groups,
                    list(needs[:3]))
        return tuple(grads.get(id(t)) if need else None
                     for t, need in zip(leaves, needs)) + (None,) * 4
