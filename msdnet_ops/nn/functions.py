"""Autograd for the fused dense connectivity: the shared-gradient algorithm of docs/ARCHITECTURE.md §3.

Each function is one autograd node that writes channels into (or reads them out of) a
:class:`~msdnet_ops.nn.feature_buffer.BufferState`. Nodes pass *tokens* (empty tensors) along
every buffer they touch, so autograd runs a channel's producer only after every consumer of
that channel: consumers accumulate into the buffer's shared gradient, and the producer then
finalizes its slice (the BatchNorm-statistics part, once per channel) and propagates on.
"""
from __future__ import annotations

import torch

from .. import ops
from .bn_affine import AffineParams


def _token(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def _token_grads(like: torch.Tensor, *present: bool):
    """Empty (but defined) gradients for the token inputs that were given."""
    return tuple(like.new_empty(0) if p else None for p in present)


class WriteFeatures(torch.autograd.Function):
    """Copies an external tensor into the slice [start, start + C) (block inputs, stems)."""

    @staticmethod
    def forward(ctx, dst, start, x, with_stats, dst_token):
        stop = start + x.shape[1]
        dst.values[:, start:stop].copy_(x)
        if with_stats:
            dst.compute_stats(start, stop)
        ctx.dst, ctx.range, ctx.with_stats = dst, (start, stop), with_stats
        ctx.has_token = dst_token is not None
        return _token(x)

    @staticmethod
    def backward(ctx, _):
        dst, (start, stop) = ctx.dst, ctx.range
        grad_x = dst.finalize(start, stop, ctx.with_stats).clone()
        if start == 0:
            dst.release_grads()
        return (None, None, grad_x, None) + _token_grads(grad_x, ctx.has_token)


class ReadFeatures(torch.autograd.Function):
    """The raw values of channels [start, stop) as an ordinary tensor (a view, no copy)."""

    @staticmethod
    def forward(ctx, src, start, stop, src_token):
        ctx.src, ctx.range = src, (start, stop)
        ctx.has_token = src_token is not None
        return src.values[:, start:stop]

    @staticmethod
    def backward(ctx, grad):
        src, (start, stop) = ctx.src, ctx.range
        src.ensure_grads()
        src.grad[:, start:stop] += grad
        return None, None, None, (grad.new_empty(0) if ctx.has_token else None)


class TransformRead(torch.autograd.Function):
    """``relu(bn(x))`` of channels [0, channels) as an ordinary tensor (final norm, heads).

    ``bn_weight``/``bn_bias``/``mean``/``invstd`` are per-channel vectors for those channels
    (``mean``/``invstd``: the buffer's batch statistics when ``batch_stats``, else running
    statistics); the same holds for :class:`TransformConvWrite`."""

    @staticmethod
    def forward(ctx, src, channels, batch_stats, bn_weight, bn_bias, mean, invstd, src_token):
        affine = AffineParams(bn_weight, bn_bias, mean, invstd, batch_stats)
        ctx.src, ctx.channels, ctx.affine = src, channels, affine
        ctx.has_token = src_token is not None
        return ops.eager.affine_relu(src.values[:, :channels], affine.scale, affine.shift)

    @staticmethod
    def backward(ctx, grad_z):
        src, c, affine = ctx.src, ctx.channels, ctx.affine
        src.ensure_grads()
        grad_scale, grad_shift = torch.zeros_like(affine.scale), torch.zeros_like(affine.shift)
        ops.eager.affine_relu_backward_(src.values[:, :c], affine.scale, affine.shift,
                                        grad_z.contiguous(), src.grad[:, :c], grad_scale,
                                        grad_shift)
        grad_w, grad_b = affine.backward(grad_scale, grad_shift, src, c)
        return (None, None, None, grad_w, grad_b, None, None,
                grad_z.new_empty(0) if ctx.has_token else None)


class TransformConvWrite(torch.autograd.Function):
    """``conv(pool(relu(bn(src[:, :in_channels]))))`` written into ``dst[:, start:start+C_out]``,
    optionally followed by dropout; the written channels' statistics are computed once here."""

    @staticmethod
    def forward(ctx, src, in_channels, dst, start, batch_stats, stride, padding, pool,
                dropout_p, bn_weight, bn_bias, mean, invstd, conv_weight, src_token, dst_token):
        affine = AffineParams(bn_weight, bn_bias, mean, invstd, batch_stats)
        stop = start + conv_weight.shape[0]
        out = dst.values[:, start:stop]
        x = src.values[:, :in_channels]
        weight = conv_weight.detach()
        if weight.dtype != x.dtype and torch.is_autocast_enabled(x.device.type):
            weight = weight.to(x.dtype)  # autocast: low-precision features, float32 parameters
        ops.eager.transform_conv_into_(x, affine.scale, affine.shift, weight, stride, padding,
                                       pool, out)
        mask = None
        if dropout_p > 0:
            keep = torch.rand(out.shape, device=out.device) >= dropout_p
            mask = keep.to(out.dtype) / (1 - dropout_p)
            out.mul_(mask)
        dst.compute_stats(start, stop)
        ctx.save_for_backward(weight)
        ctx.weight_dtype = conv_weight.dtype
        ctx.src, ctx.dst, ctx.channels, ctx.range = src, dst, in_channels, (start, stop)
        ctx.affine, ctx.conv, ctx.mask = affine, (stride, padding, pool), mask
        ctx.tokens = (src_token is not None, dst_token is not None)
        return _token(conv_weight)

    @staticmethod
    def backward(ctx, _):
        (weight,) = ctx.saved_tensors
        src, dst, c, affine = ctx.src, ctx.dst, ctx.channels, ctx.affine
        start, stop = ctx.range
        grad_out = dst.finalize(start, stop)
        if ctx.mask is not None:
            grad_out = grad_out * ctx.mask
        grad_out = grad_out.contiguous()
        if start == 0 and src is not dst:
            dst.release_grads()  # the first writer of a buffer runs backward last
        src.restore_values()  # a recomputed (memory_efficient) bottleneck
        src.ensure_grads()
        grad_scale, grad_shift = torch.zeros_like(affine.scale), torch.zeros_like(affine.shift)
        grad_weight = ops.eager.transform_conv_backward_(
            grad_out, src.values[:, :c], affine.scale, affine.shift, weight, *ctx.conv,
            src.grad[:, :c], grad_scale, grad_shift).to(ctx.weight_dtype)
        grad_w, grad_b = affine.backward(grad_scale, grad_shift, src, c)
        return ((None,) * 9 + (grad_w, grad_b, None, None, grad_weight)
                + _token_grads(grad_weight, *ctx.tokens))
