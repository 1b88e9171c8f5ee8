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
from ..layout import dense
from .batchnorm_relu import BatchNormReLU, BatchNormReLURead
from .bn_affine import AffineParams, uses_batch_stats
from .feature_buffer import BufferState


def _token(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def _release(ctx, *names: str) -> None:
    """Drops a node's references to feature buffers (and other large state) once its backward
    ran, so that a buffer is freed as soon as the last node using it is done, not when the
    whole graph is: this is what keeps backward's peak memory low. Kept when the pass retains
    the graph (``retain_graph=True``), for the next pass."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep is None or not keep():
        for name in names:
            setattr(ctx, name, None)


def _token_grads(like: torch.Tensor, *present: bool):
    """Empty (but defined) gradients for the token inputs that were given."""
    return tuple(like.new_empty(0) if p else None for p in present)


class WriteFeatures(torch.autograd.Function):
    """Copies an external tensor into the slice [start, start + C) (block inputs, stems)."""

    @staticmethod
    def forward(ctx, dst, start, x, with_stats, dst_token):
        stop = start + x.shape[1]
        dst.values[:, start:stop].copy_(x)
        dst.record_rewrite(None)  # x is not kept
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
        _release(ctx, "dst")
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
        _release(ctx, "src")
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
        accumulate = not src.sole_gradient(c)
        src.ensure_grads(uninitialised=not accumulate)
        grads = affine.zero_grads()
        ops.eager.affine_relu_backward_(src.values[:, :c], affine.scale, affine.shift,
                                        dense(grad_z), src.grad[:, :c], grads[0], grads[1],
                                        accumulate)
        grad_w, grad_b = affine.backward(grads, src, c)
        _release(ctx, "src", "affine")
        return (None, None, None, grad_w, grad_b, None, None,
                grad_z.new_empty(0) if ctx.has_token else None)


def _autocast_weight(conv_weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    weight = conv_weight.detach()
    if weight.dtype != x.dtype and torch.is_autocast_enabled(x.device.type):
        weight = weight.to(x.dtype)  # autocast: low-precision features, float32 parameters
    return weight


def _read(src, batch_stats, bn_weight, bn_bias, mean, invstd, read_bn):
    """How a node reads its source: through ``read_bn`` (a BatchNorm module: the whole source,
    its statistics computed now, :class:`BatchNormReLURead`), through the given vectors
    (:class:`AffineParams`), or as it is (``mean=None``: activated channels)."""
    if read_bn is not None:
        return BatchNormReLURead(src, read_bn, bn_weight, bn_bias)
    return None if mean is None else AffineParams(bn_weight, bn_bias, mean, invstd, batch_stats)


def _read_conv(src, channels: int, affine, weight, conv, out=None) -> torch.Tensor:
    """``conv(pool(relu(affine(src[:, :channels]))))`` (``affine=None``: activated channels,
    convolved as they are; a :class:`BatchNormReLURead`: the whole source through it, no
    pooling) written into ``out``, or returned as a new dense tensor."""
    if isinstance(affine, BatchNormReLURead):
        return affine.conv(src, weight, conv[0], conv[1], out)
    x = src.values[:, :channels]
    if affine is None:
        if out is None:
            return ops.eager.conv(x, weight, *conv)
        return ops.eager.conv_into_(x, weight, *conv, out)
    if out is None:
        return ops.eager.transform_conv(x, affine.scale, affine.shift, weight, *conv)
    return ops.eager.transform_conv_into_(x, affine.scale, affine.shift, weight, *conv, out)


def _read_conv_backward(grad_out, src, channels: int, affine, weight, conv):
    """Backward of :func:`_read_conv`: accumulates into ``src``'s shared gradient; returns
    (grad of the conv weight, grads of the reading BatchNorm's weight and bias)."""
    if isinstance(affine, BatchNormReLURead):
        return affine.conv_backward(grad_out, src, weight, conv[0], conv[1])
    src.restore_values()  # a recomputed (memory_efficient) bottleneck
    accumulate = affine is None or not src.sole_gradient(channels)
    src.ensure_grads(uninitialised=not accumulate)
    x, grad_x = src.values[:, :channels], src.grad[:, :channels]
    if affine is None:
        return ops.eager.conv_backward_(grad_out, x, weight, *conv, grad_x), None, None
    grads = affine.zero_grads()
    grad_weight = ops.eager.transform_conv_backward_(grad_out, x, affine.scale, affine.shift,
                                                     weight, *conv, grad_x, grads[0], grads[1],
                                                     accumulate)
    return (grad_weight,) + affine.backward(grads, src, channels)


class TransformConvWrite(torch.autograd.Function):
    """``conv(pool(relu(bn(src[:, :in_channels]))))`` written into ``dst[:, start:start+C_out]``,
    optionally followed by dropout; the written channels' statistics are computed once here.
    With ``mean=None`` the source channels are already activated and are convolved as they are
    (no transform, no BN parameters); with ``read_bn`` (the BatchNorm module) the whole source,
    a bottleneck output without statistics of its own, is read through
    :class:`BatchNormReLURead` (its batch statistics computed here)."""

    @staticmethod
    def forward(ctx, src, in_channels, dst, start, batch_stats, stride, padding, pool,
                dropout_p, bn_weight, bn_bias, mean, invstd, read_bn, conv_weight, src_token,
                dst_token):
        affine = _read(src, batch_stats, bn_weight, bn_bias, mean, invstd, read_bn)
        stop = start + conv_weight.shape[0]
        weight = _autocast_weight(conv_weight, src.values)
        conv = (stride, padding, pool)
        if start == 0 and stop == dst.values.shape[1]:
            # the only writer of a dense buffer (a bottleneck, a classifier map): the
            # convolution's own output becomes the buffer, no copy
            dst.values = out = _read_conv(src, in_channels, affine, weight, conv)
        else:
            out = dst.values[:, start:stop]
            _read_conv(src, in_channels, affine, weight, conv, out)
        dst.record_rewrite(None)  # rewriting would mean convolving again
        mask = None
        if dropout_p > 0:
            keep = torch.rand(out.shape, device=out.device) >= dropout_p
            mask = keep.to(out.dtype) / (1 - dropout_p)
            out.mul_(mask)
        dst.compute_stats(start, stop)
        ctx.save_for_backward(weight)
        ctx.weight_dtype = conv_weight.dtype
        ctx.src, ctx.dst, ctx.channels, ctx.range = src, dst, in_channels, (start, stop)
        ctx.affine, ctx.conv, ctx.mask = affine, conv, mask
        ctx.tokens = (src_token is not None, dst_token is not None)
        return _token(conv_weight)

    @staticmethod
    def backward(ctx, _):
        (weight,) = ctx.saved_tensors
        src, dst = ctx.src, ctx.dst
        start, stop = ctx.range
        grad_out = dst.finalize(start, stop)
        if ctx.mask is not None:
            grad_out = grad_out * ctx.mask
        if start == 0 and src is not dst:
            dst.release_grads()  # the first writer of a buffer runs backward last
        # grad_out may be a channel slice of dst's gradient: the Triton kernels read it in
        # place; engines that take dense tensors only (oneDNN, cuDNN) copy it themselves
        grad_weight, grad_w, grad_b = _read_conv_backward(grad_out, src, ctx.channels,
                                                          ctx.affine, weight, ctx.conv)
        grad_weight = grad_weight.to(ctx.weight_dtype)
        _release(ctx, "src", "dst", "affine", "mask")
        return ((None,) * 9 + (grad_w, grad_b, None, None, None, grad_weight)
                + _token_grads(grad_weight, *ctx.tokens))


class ConvBNReLUWrite(torch.autograd.Function):
    """A post-activation unit (MSDNet's conv -> BN -> ReLU): ``relu(bn(conv(read(src))))`` written
    into ``dst[:, start:start+C_out]`` once, activated, for all its consumers, where ``read``
    is the reading BatchNorm+ReLU (``in_mean=None``: ``src`` holds activated channels, read as
    they are; ``in_bn``: ``src`` is a bottleneck output without statistics, read whole through
    :class:`BatchNormReLURead`). The convolution's output is kept for backward: where the ReLU
    output is 0 the values before it cannot be recovered from it, and BatchNorm's backward
    needs them; with ``recompute`` it is freed now and computed again (the same convolution of
    the same source) when backward reaches this unit. ``bn`` (the unit's BatchNorm module)
    normalizes with the output's batch statistics, computed here once, or with its running
    statistics; its running statistics are updated here."""

    @staticmethod
    def forward(ctx, src, in_channels, dst, start, in_batch_stats, stride, padding,
                in_weight, in_bias, in_mean, in_invstd, in_bn, conv_weight, bn, bn_weight,
                bn_bias, recompute, src_token, dst_token):
        read = _read(src, in_batch_stats, in_weight, in_bias, in_mean, in_invstd, in_bn)
        weight = _autocast_weight(conv_weight, src.values)
        conv = (stride, padding, 1)
        y = BufferState(_read_conv(src, in_channels, read, weight, conv),
                        uses_batch_stats(bn), bn.eps, dst.sync_group)
        channels = y.values.shape[1]
        epilogue = BatchNormReLU(y, bn, bn_weight, bn_bias, dst.values[:, start:start + channels])
        if recompute:
            def recompute_output():
                src.restore_values()  # a recomputed bottleneck comes back first
                return _read_conv(src, in_channels, read, weight, conv)
            y.forget_values(recompute_output)

        def write_activated(values):
            epilogue.write(y.values, values[:, start:start + channels])
        # while y is kept, the buffer may free these channels until backward and write them
        # again from y (GridRun, memory_efficient=True)
        dst.record_rewrite(None if recompute else write_activated)
        ctx.save_for_backward(weight)
        ctx.weight_dtype = conv_weight.dtype
        ctx.src, ctx.dst, ctx.y, ctx.channels, ctx.start = src, dst, y, in_channels, start
        ctx.read, ctx.epilogue, ctx.conv = read, epilogue, conv
        ctx.tokens = (src_token is not None, dst_token is not None)
        return _token(conv_weight)

    @staticmethod
    def backward(ctx, _):
        (weight,) = ctx.saved_tensors
        src, dst, y, start = ctx.src, ctx.dst, ctx.y, ctx.start
        y.restore_values()
        channels = y.values.shape[1]
        grad_z = dst.finalize(start, start + channels, with_stats=False)
        if start == 0:
            dst.release_grads()  # the first writer of a buffer runs backward last
        grad_y, grad_bn_w, grad_bn_b = ctx.epilogue.backward(y, grad_z)
        grad_weight, grad_in_w, grad_in_b = _read_conv_backward(grad_y, src, ctx.channels,
                                                                ctx.read, weight, ctx.conv)
        y.release_grads()
        _release(ctx, "src", "dst", "y", "read", "epilogue")
        return ((None,) * 7 + (grad_in_w, grad_in_b, None, None, None,
                               grad_weight.to(ctx.weight_dtype), None, grad_bn_w, grad_bn_b, None)
                + _token_grads(grad_weight, *ctx.tokens))
