"""The package's custom ops (``torch.ops.msdnet_ops.*``): schema, validation, backend dispatch,
fake (meta) implementations for torch.compile, and autograd.

Ops (semantics in :mod:`msdnet_ops.reference`):

=============================  ===========================================================
``channel_stats``              per-channel batch mean and invstd of a (strided) NCHW view
``channel_stats_into_``        the same, written into given vectors (slices of a buffer's)
``channel_stats_backward_``    finalize: add the statistics part of the BN gradient, in place
``bn_scale_shift``             a BatchNorm's ``(scale, shift)`` from weight, bias, mean, invstd
``bn_scale_shift_backward_``   its backward: the weight's gradient; the statistics' gradients
                               accumulated in place (one launch each on the GPU)
``affine_relu`` / ``_into_``   ``relu(scale*x+shift)``, allocated / written into ``out``
``affine_relu_backward_``      its backward, accumulated into shared gradient buffers (or
                               written, for a sole consumer: no zero-filled buffer)
``batchnorm_relu_into_``       a training-mode BatchNorm then ReLU written into ``out``, with
                               its statistics and ``(scale, shift)`` (one call on the CPU)
``batchnorm_relu_backward_``   its backward: the input's whole gradient and the parameters'
``batchnorm_relu_conv_backward_``  the backward of a convolution of that ReLU's output (a
                               bottleneck's), through it: the same gradients and the weight's
``transform_conv``             ``conv(pool(relu(scale*x+shift)), W)``, functional
``transform_conv_into_``       the same, written into a channel slice of a feature buffer
``transform_conv_backward_``   its backward: accumulates grad_x/grad_scale/grad_shift (or writes
                               grad_x, for a sole consumer), returns grad_weight
``conv`` / ``conv_into_``      ``conv(pool(x), W)`` of *activated* channels (no transform)
``conv_backward_``             its backward: accumulates grad_x, returns grad_weight
``gather_batch``               batch compaction (early exit)
=============================  ===========================================================

The functional ops have autograd (``register_autograd``) so they compose with ordinary
PyTorch code; the ``_``-suffixed ops mutate their ``grad_*``/``out`` arguments and are what the
fused dense-block autograd (:mod:`msdnet_ops.nn.functions`) calls to share one gradient
buffer between all consumers of a channel.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .backends.composed import new_output
from . import validation as check
from .dtypes import stats_dtype
from .layout import dense, empty_like_layout

_LIB = "msdnet_ops"
_UNCHECKED: dict = {}   # op name -> the backend dispatch alone (see :data:`eager`)
_REGISTERED: dict = {}  # op name -> the registered custom op
_CHECKS: dict = {}      # op name -> its argument checks


def _custom_op(name: str, mutates_args, checks):
    """``torch.library.custom_op`` of ``checks(*args)`` followed by the decorated function (the
    backend dispatch). :data:`eager` calls the decorated function alone: the fused modules call
    the ops from inside their autograd functions with arguments they built themselves, and
    validated their own inputs already; there the checks would cost more than small kernels."""
    def register(run):
        @functools.wraps(run)
        def checked(*args):
            checks(*args)
            return run(*args)
        _UNCHECKED[name] = run
        _CHECKS[name] = checks
        op = _REGISTERED[name] = torch.library.custom_op(f"{_LIB}::{name}",
                                                          mutates_args=mutates_args)(checked)
        return op
    return register


def _fake(op, checks=None):
    """``op.register_fake`` of a fake implementation that runs the op's checks first
    (``checks``: those that need no tensor data): an argument on the meta device sends the
    whole call to the fake implementation, and tracing runs it too."""
    checks = checks or _CHECKS[op._name.split("::")[-1]]

    def register(fn):
        @functools.wraps(fn)
        def checked(*args):
            checks(*args)
            return fn(*args)
        return op.register_fake(checked)
    return register


def _kernels(t: Tensor):
    """The backend module (:mod:`msdnet_ops.backends`) that runs ops on tensors like ``t``."""
    return backends.kernels_for(backends.resolve(t.device, t.dtype))


# --------------------------------------------------------------------------- channel statistics

def _check_channel_stats(x, eps):
    check.check_features(x, "x")
    if not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps}")
    if x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"x: batch statistics need more than one value per channel, got shape "
                         f"{tuple(x.shape)} (as nn.BatchNorm2d in training mode)")


@_custom_op("channel_stats", mutates_args=(), checks=_check_channel_stats)
def channel_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-channel batch ``mean`` and ``invstd = 1/sqrt(var + eps)`` (biased variance) of ``x``."""
    return _kernels(x).channel_stats(x, eps)


@_fake(channel_stats)
def _(x, eps):
    c = x.shape[1]
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((c,), dtype=dt), x.new_empty((c,), dtype=dt)


def _check_channel_stats_into(x, eps, mean, invstd):
    _check_channel_stats(x, eps)
    check.check_channel_vector(mean, "mean", x)
    check.check_channel_vector(invstd, "invstd", x)
    for v, name in ((mean, "mean"), (invstd, "invstd")):
        if x.shape[1] > 1 and v.stride(0) != 1:
            raise ValueError(f"{name}: expected unit stride, got stride {v.stride(0)}")


@_custom_op("channel_stats_into_", mutates_args=("mean", "invstd"),
            checks=_check_channel_stats_into)
def channel_stats_into_(x: Tensor, eps: float, mean: Tensor, invstd: Tensor) -> None:
    """:func:`channel_stats` written into ``mean``/``invstd`` (unit-stride vectors, e.g. the
    slices of a buffer's statistics for the channels a layer appends: no copy afterwards)."""
    _kernels(x).channel_stats_into(x, eps, mean, invstd)


@_fake(channel_stats_into_)
def _(x, eps, mean, invstd):
    return None


def _check_channel_stats_backward(x, mean, invstd, grad_mean, grad_invstd, grad_x):
    check.check_features(x, "x")
    for v, name in ((mean, "mean"), (invstd, "invstd"), (grad_mean, "grad_mean"), (grad_invstd, "grad_invstd")):
        check.check_channel_vector(v, name, x)
    check.check_like(grad_x, "grad_x", x, "x")


@_custom_op("channel_stats_backward_", mutates_args=("grad_x",),
            checks=_check_channel_stats_backward)
def channel_stats_backward_(x: Tensor, mean: Tensor, invstd: Tensor, grad_mean: Tensor,
                            grad_invstd: Tensor, grad_x: Tensor) -> None:
    """``grad_x += grad_mean/n - grad_invstd*(x-mean)*invstd^3/n`` (n = N*H*W)."""
    _kernels(x).channel_stats_backward_(x, mean, invstd, grad_mean, grad_invstd, grad_x)


@_fake(channel_stats_backward_)
def _(x, mean, invstd, grad_mean, grad_invstd, grad_x):
    return None


def _channel_stats_setup(ctx, inputs, output):
    x, _ = inputs
    mean, invstd = output
    ctx.save_for_backward(x, mean, invstd)


def _channel_stats_backward(ctx, grad_mean, grad_invstd):
    x, mean, invstd = ctx.saved_tensors
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean.contiguous()
    grad_invstd = torch.zeros_like(invstd) if grad_invstd is None else grad_invstd.contiguous()
    grad_x = empty_like_layout(x).zero_()
    channel_stats_backward_(x, mean, invstd, grad_mean, grad_invstd, grad_x)
    return grad_x, None


channel_stats.register_autograd(_channel_stats_backward, setup_context=_channel_stats_setup)


# --------------------------------------------------------------------------- BatchNorm vectors

def _check_bn_scale_shift(mean, invstd, weight, bias):
    check.check_bn_mean(mean)
    check.check_bn_vector(invstd, "invstd", mean, mean.dtype)
    check.check_bn_vector(weight, "weight", mean, optional=True)
    check.check_bn_vector(bias, "bias", mean, optional=True)


@_custom_op("bn_scale_shift", mutates_args=(), checks=_check_bn_scale_shift)
def bn_scale_shift(mean: Tensor, invstd: Tensor, weight: Tensor | None,
                   bias: Tensor | None) -> Tensor:
    """A BatchNorm as the per-channel transform the kernels apply: ``[2, C]`` rows
    ``scale = weight * invstd`` and ``shift = bias - mean * scale`` in ``mean``'s dtype
    (``weight`` None: 1, ``bias`` None: 0). One launch on the GPU."""
    out = mean.new_empty((2,) + tuple(mean.shape))
    _kernels(mean).bn_scale_shift_into(mean, invstd, weight, bias, out)
    return out


@_fake(bn_scale_shift)
def _(mean, invstd, weight, bias):
    return mean.new_empty((2,) + tuple(mean.shape))


def _check_bn_scale_shift_backward(grad, mean, invstd, weight, grad_mean, grad_invstd,
                                   accumulate=True):
    _check_bn_scale_shift(mean, invstd, weight, None)
    if not isinstance(grad, torch.Tensor) or tuple(grad.shape) != (2,) + tuple(mean.shape) \
            or grad.dtype != mean.dtype or grad.device != mean.device:
        raise ValueError(f"grad: expected a [2, {mean.shape[0]}] {mean.dtype} tensor on "
                         f"{mean.device} (grad_scale, grad_shift), got "
                         f"{getattr(grad, 'shape', type(grad).__name__)}")
    if (grad_mean is None) != (grad_invstd is None):
        raise ValueError("grad_mean, grad_invstd: expected both (batch statistics) or neither")
    check.check_bn_vector(grad_mean, "grad_mean", mean, mean.dtype, optional=True)
    check.check_bn_vector(grad_invstd, "grad_invstd", mean, mean.dtype, optional=True)


@_custom_op("bn_scale_shift_backward_", mutates_args=("grad_mean", "grad_invstd"),
            checks=_check_bn_scale_shift_backward)
def bn_scale_shift_backward_(grad: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
                             grad_mean: Tensor | None, grad_invstd: Tensor | None,
                             accumulate: bool = True) -> Tensor:
    """Backward of :func:`bn_scale_shift` for ``grad`` = rows ``(grad_scale, grad_shift)``:
    returns the weight's gradient (the bias's is ``grad_shift``); adds the statistics'
    gradients to ``grad_mean``/``grad_invstd`` when given (batch statistics), or with
    ``accumulate=False`` writes them, never reading them (the statistics' sole consumer).
    One launch on the GPU."""
    return _kernels(mean).bn_scale_shift_backward_(grad, mean, invstd, weight, grad_mean,
                                                   grad_invstd, accumulate)


@_fake(bn_scale_shift_backward_)
def _(grad, mean, invstd, weight, grad_mean, grad_invstd, accumulate=True):
    return mean.new_empty(mean.shape)


def _bn_scale_shift_setup(ctx, inputs, output):
    mean, invstd, weight, bias = inputs
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(mean, invstd, weight)


def _bn_scale_shift_autograd_backward(ctx, grad):
    mean, invstd, weight = ctx.saved_tensors
    grad_mean, grad_invstd = torch.empty_like(mean), torch.empty_like(invstd)
    grad_weight = bn_scale_shift_backward_(grad.contiguous(), mean, invstd, weight, grad_mean,
                                           grad_invstd, False)
    return (grad_mean, grad_invstd,
            None if ctx.weight_dtype is None else grad_weight.to(ctx.weight_dtype),
            None if ctx.bias_dtype is None else grad[1].to(ctx.bias_dtype))


bn_scale_shift.register_autograd(_bn_scale_shift_autograd_backward,
                                 setup_context=_bn_scale_shift_setup)


# --------------------------------------------------------------------------- BatchNorm + ReLU

def _check_rows(t, name: str, y) -> None:
    """A dense ``[2, C]`` tensor of per-channel rows for features ``y`` (stats dtype)."""
    c = y.shape[1]
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (2, c) or not t.is_contiguous() \
            or t.dtype != stats_dtype(y.dtype) or t.device != y.device:
        got = (f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor)
               else type(t).__name__)
        raise ValueError(f"{name}: expected a dense [2, {c}] {stats_dtype(y.dtype)} tensor on "
                         f"{y.device}, got {got}")


def _check_batchnorm_relu_into(y, eps, weight, bias, stats, rows, out):
    _check_channel_stats(y, eps)
    _check_rows(stats, "stats", y)
    _check_rows(rows, "rows", y)
    check.check_bn_vector(weight, "weight", stats[0], optional=True)
    check.check_bn_vector(bias, "bias", stats[0], optional=True)
    check.check_like(out, "out", y, "y")
    check.check_not_overlapping(out, "out", (y, "y"))


@_custom_op("batchnorm_relu_into_", mutates_args=("stats", "rows", "out"),
            checks=_check_batchnorm_relu_into)
def batchnorm_relu_into_(y: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None,
                         stats: Tensor, rows: Tensor, out: Tensor) -> None:
    """A training-mode BatchNorm then ReLU (a post-activation unit's epilogue): writes
    ``relu(bn(y))`` into ``out`` (e.g. the unit's channel slice of a feature buffer) and what
    backward needs: ``stats`` rows ``(mean, invstd)`` (``y``'s batch statistics) and ``rows``
    ``(scale, shift)``. One call on the CPU."""
    _kernels(y).batchnorm_relu_into(y, eps, weight, bias, stats, rows, out)


@_fake(batchnorm_relu_into_)
def _(y, eps, weight, bias, stats, rows, out):
    return None


def fuses_batchnorm_relu(y: Tensor) -> bool:
    """Whether the backend for tensors like ``y`` runs :func:`batchnorm_relu_into_`, its
    backward and :func:`batchnorm_relu_conv_backward_` in fewer kernel calls than their steps
    (the CPU: one C++ call each; Triton: a launch fewer each way, the BatchNorm's vectors and
    their gradients computed in the kernels that use them), so that a post-activation unit and
    a bottleneck's one reader call them; elsewhere the modules call the steps one by one."""
    return getattr(_kernels(y), "FUSED_BATCHNORM_RELU", False)


def transform_in_conv_prologue(y: Tensor) -> bool:
    """Whether the backend's convolutions of tensors like ``y`` apply a BatchNorm+ReLU as they
    load them (Triton's prologue), so that a bottleneck's reader gives them its statistics'
    ``(scale, shift)`` instead of an activated copy (the CPU's, written by
    :func:`batchnorm_relu_into_` with the statistics in one call)."""
    return getattr(_kernels(y), "TRANSFORM_IN_CONV_PROLOGUE", False)


def _check_batchnorm_backward_rows(y, stats, rows, weight, grad_params):
    for t, name in ((stats, "stats"), (rows, "rows"), (grad_params, "grad_params")):
        _check_rows(t, name, y)
    check.check_bn_vector(weight, "weight", stats[0], optional=True)


def _check_batchnorm_relu_backward(y, grad_z, stats, rows, weight, grad_y, grad_params):
    check.check_features(y, "y")
    check.check_like(grad_z, "grad_z", y, "y")
    check.check_like(grad_y, "grad_y", y, "y")
    check.check_not_overlapping(grad_y, "grad_y", (y, "y"), (grad_z, "grad_z"))
    _check_batchnorm_backward_rows(y, stats, rows, weight, grad_params)


@_custom_op("batchnorm_relu_backward_", mutates_args=("grad_y", "grad_params"),
            checks=_check_batchnorm_relu_backward)
def batchnorm_relu_backward_(y: Tensor, grad_z: Tensor, stats: Tensor, rows: Tensor,
                             weight: Tensor | None, grad_y: Tensor, grad_params: Tensor) -> None:
    """Backward of :func:`batchnorm_relu_into_` for ``grad_z`` (the gradient w.r.t. ``out``):
    writes ``grad_y`` (the whole gradient w.r.t. ``y``, the batch statistics' part included;
    its old values never read) and ``grad_params`` rows ``(grad_weight, grad_bias)``."""
    _kernels(y).batchnorm_relu_backward_(y, grad_z, stats, rows, weight, grad_y, grad_params)


@_fake(batchnorm_relu_backward_)
def _(y, grad_z, stats, rows, weight, grad_y, grad_params):
    return None


def _check_batchnorm_relu_conv_backward(grad_out, y, stats, rows, weight, conv_weight, stride,
                                        padding, grad_y, grad_params):
    check.check_features(y, "y")
    check.check_conv_args(y, conv_weight, stride, padding, 1, "y", "conv_weight")
    check.check_like(grad_out, "grad_out", y, "y",
                     check.conv_output_shape(y, conv_weight, stride, padding, 1))
    check.check_like(grad_y, "grad_y", y, "y")
    check.check_not_overlapping(grad_y, "grad_y", (y, "y"), (grad_out, "grad_out"))
    _check_batchnorm_backward_rows(y, stats, rows, weight, grad_params)


@_custom_op("batchnorm_relu_conv_backward_", mutates_args=("grad_y", "grad_params"),
            checks=_check_batchnorm_relu_conv_backward)
def batchnorm_relu_conv_backward_(grad_out: Tensor, y: Tensor, stats: Tensor, rows: Tensor,
                                  weight: Tensor | None, conv_weight: Tensor, stride: int,
                                  padding: int, grad_y: Tensor, grad_params: Tensor) -> Tensor:
    """Backward of ``conv2d(z, conv_weight, stride, padding)`` where ``z`` was written by
    :func:`batchnorm_relu_into_` from ``y`` (its ``stats`` and ``rows``; ``z`` itself is not
    needed: it is computed again): writes ``grad_y`` (the whole gradient w.r.t. ``y``, the
    batch statistics' part included) and ``grad_params`` rows ``(grad_weight, grad_bias)``;
    returns the convolution weight's gradient. ``y`` is read by this convolution alone (a
    bottleneck's output). On the CPU the BatchNorm+ReLU part is one call."""
    return _like_weight(_kernels(y).batchnorm_relu_conv_backward_(
        grad_out, y, stats, rows, weight, conv_weight, stride, padding, grad_y, grad_params),
        conv_weight)


@_fake(batchnorm_relu_conv_backward_)
def _(grad_out, y, stats, rows, weight, conv_weight, stride, padding, grad_y, grad_params):
    return torch.empty_like(conv_weight)


# --------------------------------------------------------------------------- transform

def _check_affine(x, scale, shift):
    check.check_features(x, "x")
    check.check_channel_vector(scale, "scale", x)
    check.check_channel_vector(shift, "shift", x)


def _check_affine_relu_into(x, scale, shift, out):
    _check_affine(x, scale, shift)
    check.check_like(out, "out", x, "x")
    check.check_not_overlapping(out, "out", (x, "x"))


@_custom_op("affine_relu_into_", mutates_args=("out",), checks=_check_affine_relu_into)
def affine_relu_into_(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> None:
    """Writes ``relu(scale[c] * x + shift[c])`` into ``out`` (e.g. a channel slice of a feature
    buffer: a post-activation unit storing its output activated)."""
    _kernels(x).affine_relu_into(x, scale, shift, out)


@_fake(affine_relu_into_)
def _(x, scale, shift, out):
    return None


@_custom_op("affine_relu", mutates_args=(), checks=_check_affine)
def affine_relu(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``relu(scale[c] * x + shift[c])``, a dense output in ``x``'s dtype and layout."""
    out = empty_like_layout(x)
    _kernels(x).affine_relu_into(x, scale, shift, out)
    return out


@_fake(affine_relu)
def _(x, scale, shift):
    return empty_like_layout(x)


def _check_affine_relu_backward(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift,
                                accumulate=True):
    _check_affine(x, scale, shift)
    check.check_like(grad_z, "grad_z", x, "x")
    check.check_like(grad_x, "grad_x", x, "x")
    check.check_channel_vector(grad_scale, "grad_scale", x)
    check.check_channel_vector(grad_shift, "grad_shift", x)


@_custom_op("affine_relu_backward_", mutates_args=("grad_x", "grad_scale", "grad_shift"),
            checks=_check_affine_relu_backward)
def affine_relu_backward_(x: Tensor, scale: Tensor, shift: Tensor, grad_z: Tensor, grad_x: Tensor,
                          grad_scale: Tensor, grad_shift: Tensor, accumulate: bool = True) -> None:
    """Accumulates the backward of :func:`affine_relu` into the ``grad_*`` buffers;
    ``accumulate=False`` overwrites ``grad_x`` instead, never reading it (a sole consumer's
    gradient: the buffer may be uninitialised)."""
    _kernels(x).affine_relu_backward_(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift,
                                      accumulate)


@_fake(affine_relu_backward_)
def _(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift, accumulate=True):
    return None


def _affine_relu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _affine_relu_backward(ctx, grad_z):
    x, scale, shift = ctx.saved_tensors
    grad_x = empty_like_layout(x).zero_()
    grad_scale, grad_shift = torch.zeros_like(scale), torch.zeros_like(shift)
    affine_relu_backward_(x, scale, shift, dense(grad_z), grad_x, grad_scale, grad_shift)
    return grad_x, grad_scale, grad_shift


affine_relu.register_autograd(_affine_relu_backward, setup_context=_affine_relu_setup)


# --------------------------------------------------------------------------- convolutions

def _like_weight(grad_weight: Tensor, weight: Tensor) -> Tensor:
    """``grad_weight`` in ``weight``'s dtype and strides (what the fake implementations
    promise; oneDNN returns channels_last weight gradients for channels_last inputs)."""
    if grad_weight.dtype == weight.dtype and grad_weight.stride() == weight.stride():
        return grad_weight
    return torch.empty_like(weight).copy_(grad_weight)


def _check_conv(x, weight, stride, padding, pool):
    check.check_features(x, "x")
    check.check_conv_args(x, weight, stride, padding, pool)


def _check_conv_into(x, weight, stride, padding, pool, out):
    _check_conv(x, weight, stride, padding, pool)
    check.check_like(out, "out", x, "x", check.conv_output_shape(x, weight, stride, padding, pool))
    check.check_not_overlapping(out, "out", (x, "x"))


def _check_conv_backward(grad_out, x, weight, stride, padding, pool, grad_x):
    _check_conv(x, weight, stride, padding, pool)
    check.check_like(grad_out, "grad_out", x, "x", check.conv_output_shape(x, weight, stride, padding, pool))
    check.check_like(grad_x, "grad_x", x, "x")


def _check_transform_conv(x, scale, shift, weight, stride, padding, pool):
    _check_affine(x, scale, shift)
    check.check_conv_args(x, weight, stride, padding, pool)


def _check_transform_conv_into(x, scale, shift, weight, stride, padding, pool, out):
    _check_conv_into(x, weight, stride, padding, pool, out)
    _check_affine(x, scale, shift)


def _check_transform_conv_backward(grad_out, x, scale, shift, weight, stride, padding, pool,
                                   grad_x, grad_scale, grad_shift, accumulate=True):
    _check_conv_backward(grad_out, x, weight, stride, padding, pool, grad_x)
    _check_affine(x, scale, shift)
    check.check_channel_vector(grad_scale, "grad_scale", x)
    check.check_channel_vector(grad_shift, "grad_shift", x)


@_custom_op("transform_conv_into_", mutates_args=("out",), checks=_check_transform_conv_into)
def transform_conv_into_(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, stride: int,
                         padding: int, pool: int, out: Tensor) -> None:
    """Writes ``conv2d(avg_pool(relu(scale*x+shift), pool), weight, stride, padding)`` into
    ``out`` (typically a channel slice of a feature buffer)."""
    _kernels(x).transform_conv_into(x, scale, shift, weight, stride, padding, pool, out)


@_fake(transform_conv_into_)
def _(x, scale, shift, weight, stride, padding, pool, out):
    return None


@_custom_op("transform_conv", mutates_args=(), checks=_check_transform_conv)
def transform_conv(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, stride: int,
                   padding: int, pool: int) -> Tensor:
    """Functional :func:`transform_conv_into_`: a new dense tensor in ``x``'s layout."""
    return _kernels(x).transform_conv(x, scale, shift, weight, stride, padding, pool)


@_fake(transform_conv)
def _(x, scale, shift, weight, stride, padding, pool):
    return new_output(x, weight, stride, padding, pool)


@_custom_op("transform_conv_backward_", mutates_args=("grad_x", "grad_scale", "grad_shift"),
            checks=_check_transform_conv_backward)
def transform_conv_backward_(grad_out: Tensor, x: Tensor, scale: Tensor, shift: Tensor,
                             weight: Tensor, stride: int, padding: int, pool: int, grad_x: Tensor,
                             grad_scale: Tensor, grad_shift: Tensor,
                             accumulate: bool = True) -> Tensor:
    """Backward of :func:`transform_conv`: accumulates into ``grad_x`` (the shared gradient
    buffer prefix; ``accumulate=False``: overwrites it, never reading it, for a sole
    consumer), ``grad_scale`` and ``grad_shift``; returns ``grad_weight``."""
    return _like_weight(_kernels(x).transform_conv_backward_(
        grad_out, x, scale, shift, weight, stride, padding, pool, grad_x, grad_scale,
        grad_shift, accumulate), weight)


@_fake(transform_conv_backward_)
def _(grad_out, x, scale, shift, weight, stride, padding, pool, grad_x, grad_scale, grad_shift,
      accumulate=True):
    return torch.empty_like(weight)


def _transform_conv_setup(ctx, inputs, output):
    x, scale, shift, weight, stride, padding, pool = inputs
    ctx.save_for_backward(x, scale, shift, weight)
    ctx.conv = (stride, padding, pool)


def _transform_conv_backward(ctx, grad_out):
    x, scale, shift, weight = ctx.saved_tensors
    grad_x = empty_like_layout(x).zero_()
    grad_scale, grad_shift = torch.zeros_like(scale), torch.zeros_like(shift)
    grad_weight = transform_conv_backward_(dense(grad_out), x, scale, shift, weight,
                                           *ctx.conv, grad_x, grad_scale, grad_shift)
    return grad_x, grad_scale, grad_shift, grad_weight, None, None, None


transform_conv.register_autograd(_transform_conv_backward, setup_context=_transform_conv_setup)


@_custom_op("conv_into_", mutates_args=("out",), checks=_check_conv_into)
def conv_into_(x: Tensor, weight: Tensor, stride: int, padding: int, pool: int, out: Tensor) -> None:
    """Writes ``conv2d(avg_pool(x, pool), weight, stride, padding)`` into ``out``: the consumer
    of *activated* buffer channels, which reads them as they are (no transform)."""
    _kernels(x).conv_into(x, weight, stride, padding, pool, out)


@_fake(conv_into_)
def _(x, weight, stride, padding, pool, out):
    return None


@_custom_op("conv", mutates_args=(), checks=_check_conv)
def conv(x: Tensor, weight: Tensor, stride: int, padding: int, pool: int) -> Tensor:
    """Functional :func:`conv_into_`: a new dense tensor in ``x``'s layout."""
    return _kernels(x).conv(x, weight, stride, padding, pool)


@_fake(conv)
def _(x, weight, stride, padding, pool):
    return new_output(x, weight, stride, padding, pool)


@_custom_op("conv_backward_", mutates_args=("grad_x",), checks=_check_conv_backward)
def conv_backward_(grad_out: Tensor, x: Tensor, weight: Tensor, stride: int, padding: int,
                   pool: int, grad_x: Tensor) -> Tensor:
    """Backward of :func:`conv`: accumulates the input gradient into ``grad_x`` (the shared
    gradient buffer prefix) and returns ``grad_weight``."""
    return _like_weight(_kernels(x).conv_backward_(grad_out, x, weight, stride, padding, pool,
                                                   grad_x), weight)


@_fake(conv_backward_)
def _(grad_out, x, weight, stride, padding, pool, grad_x):
    return torch.empty_like(weight)


def _conv_setup(ctx, inputs, output):
    x, weight, stride, padding, pool = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv = (stride, padding, pool)


def _conv_autograd_backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x = empty_like_layout(x).zero_()
    grad_weight = conv_backward_(dense(grad_out), x, weight, *ctx.conv, grad_x)
    return grad_x, grad_weight, None, None, None


conv.register_autograd(_conv_autograd_backward, setup_context=_conv_setup)


# --------------------------------------------------------------------------- batch compaction

def _check_gather_batch_structure(src, index):
    check.check_features(src, "src")
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        raise TypeError(f"index: expected an int64 tensor, got "
                        f"{getattr(index, 'dtype', type(index).__name__)}")
    if index.dim() != 1 or index.device != src.device:
        raise ValueError(f"index: expected a 1-D tensor on {src.device}, got {index.dim()}-D on "
                         f"{index.device}")


def _check_gather_batch(src, index):
    _check_gather_batch_structure(src, index)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= src.shape[0]):
        raise ValueError(f"index: expected values in [0, {src.shape[0]}), got "
                         f"[{int(index.min())}, {int(index.max())}]")


@_custom_op("gather_batch", mutates_args=(), checks=_check_gather_batch)
def gather_batch(src: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` of ``src`` (dim 0), dense in ``src``'s layout: the samples still running
    after an exit."""
    out = empty_like_layout(src, (index.numel(),) + tuple(src.shape[1:]))
    if index.numel():
        _kernels(src).gather_batch_into(src, index, out)
    return out


@_fake(gather_batch, _check_gather_batch_structure)
def _(src, index):
    return empty_like_layout(src, (index.shape[0],) + tuple(src.shape[1:]))


# --------------------------------------------------------------------------- eager fast path

class _Eager:
    """The ops without the custom-op dispatcher and without argument checks, for the fused
    modules' autograd functions, which call them from inside their own forward/backward with
    arguments they built themselves (no autograd or tracing needed there). The dispatcher's
    Python layers cost ~20 us a call: ~10 ms of a 240 ms DenseNet-BC training step on the CPU.
    Under torch.compile the registered (checked) ops are used."""

    def __init__(self):
        for name, fn in _UNCHECKED.items():
            setattr(self, name, self._choose(_REGISTERED[name], fn))

    @staticmethod
    def _choose(op, fn):
        def call(*args):
            if torch.compiler.is_compiling():
                return op(*args)
            # (is_cuda: cheaper than building args[0].device; the ops run CPU or CUDA tensors)
            device_type = "cuda" if args[0].is_cuda else "cpu"
            if torch.is_autocast_enabled(device_type):  # the op's insides never autocast
                with torch.autocast(device_type, enabled=False):
                    return fn(*args)
            return fn(*args)
        call.__name__ = fn.__name__
        call.__doc__ = fn.__doc__
        return call


eager = _Eager()


# --------------------------------------------------------------------------- inference convolution

def _check_conv_bias_relu_out(x, weight, stride, padding, out):
    check.check_like(out, "out", x, "x", check.conv_output_shape(x, weight, stride, padding, 1))
    check.check_not_overlapping(out, "out", (x, "x"))


def conv_bias_relu(x: Tensor, weight: Tensor, bias: Tensor, stride: int, padding: int,
                   out: Tensor | None = None) -> Tensor:
    """``relu(conv2d(x, weight, bias, stride, padding))`` as a dense tensor in ``x``'s layout,
    or written into ``out`` (e.g. the channel slice of a feature buffer the unit appends to:
    no copy afterwards) and returned: a convolution with an eval-mode BatchNorm folded into
    ``weight``/``bias`` (inference of post-activation networks; no autograd). ``x`` may be a
    strided buffer prefix.

    * cpu: oneDNN (with the bias; ReLU apart, which keeps NaN as torch.relu does), on the
      prefix copied into a reused dense scratch (oneDNN would reorder it into a fresh
      allocation each time), or for 1x1
      convolutions a GEMM reading the prefix in place; chosen per shape
      (:mod:`msdnet_ops.kernels.cpu_conv`).
    * triton (1x1 and 3x3): the convolution reads the prefix in place; bias and ReLU in one
      more pass over the (small) output.
    * cuda, reference: ``F.conv2d`` of a dense copy, then ReLU.
    """
    if torch.compiler.is_compiling():  # torch.compile picks its own kernels
        y = torch.relu(F.conv2d(x, weight, bias, stride, padding))
        return y if out is None else out.copy_(y)
    if out is not None:  # (outside tracing: the overlap check reads storage addresses)
        _check_conv_bias_relu_out(x, weight, stride, padding, out)
    if torch.is_autocast_enabled(x.device.type):  # the buffers' dtype decides, not autocast
        with torch.autocast(x.device.type, enabled=False):
            return conv_bias_relu(x, weight, bias, stride, padding, out)
    return _kernels(x).conv_bias_relu(x, weight, bias, stride, padding, out)


def bottleneck_conv_bias_relu(x: Tensor, w1: Tensor, b1: Tensor, weight: Tensor, bias: Tensor,
                              stride: int, padding: int, out: Tensor | None = None) -> Tensor:
    """``conv_bias_relu(conv_bias_relu(x, w1, b1, 1, 0), weight, bias, stride, padding, out)``:
    a 1x1 unit (``w1``: ``[mid, C, 1, 1]``) then a k x k unit, both with folded BatchNorms
    (an MSDNet path's bottleneck and 3x3 in inference).

    * cpu: where our direct kernel applies (a bottleneck of at most 32 channels, at most 64
      outputs, NHWC-strided ``x`` and ``out``), the 1x1 unit's output is computed row by row
      into the kernel's scratch and never stored; chosen per shape against the two calls.
    * others: the two :func:`conv_bias_relu` calls.
    """
    if w1.dim() != 4 or tuple(w1.shape[2:]) != (1, 1) or w1.shape[1] != x.shape[1]:
        raise ValueError(f"w1: expected a 1x1 convolution weight [mid, {x.shape[1]}, 1, 1] "
                         f"(x has {x.shape[1]} channels), got {list(w1.shape)}")
    if weight.dim() != 4 or weight.shape[1] != w1.shape[0]:
        raise ValueError(f"weight: expected [out, {w1.shape[0]}, k, k] (w1 has {w1.shape[0]} "
                         f"outputs), got {list(weight.shape)}")
    if torch.compiler.is_compiling():  # torch.compile picks its own kernels
        return conv_bias_relu(conv_bias_relu(x, w1, b1, 1, 0), weight, bias, stride, padding,
                              out)
    if out is not None:
        _check_conv_bias_relu_out(x, weight, stride, padding, out)
    if torch.is_autocast_enabled(x.device.type):  # the buffers' dtype decides, not autocast
        with torch.autocast(x.device.type, enabled=False):
            return bottleneck_conv_bias_relu(x, w1, b1, weight, bias, stride, padding, out)
    return _kernels(x).bottleneck_conv_bias_relu(x, w1, b1, weight, bias, stride, padding, out)


def _conv_bias_relu_unchecked(x, weight, bias, stride, padding, out=None):
    return _kernels(x).conv_bias_relu(x, weight, bias, stride, padding, out)


def _bottleneck_conv_bias_relu_unchecked(x, w1, b1, weight, bias, stride, padding, out=None):
    return _kernels(x).bottleneck_conv_bias_relu(x, w1, b1, weight, bias, stride, padding, out)


# in :data:`eager` too: a model's inference run builds every argument itself, and the checks
# cost ~10-20 us a call, a tenth of a small convolution's
eager.conv_bias_relu = _Eager._choose(conv_bias_relu, _conv_bias_relu_unchecked)
eager.bottleneck_conv_bias_relu = _Eager._choose(bottleneck_conv_bias_relu,
                                                 _bottleneck_conv_bias_relu_unchecked)


# --------------------------------------------------------------------------- prepared inference calls

def preparation_key(device: torch.device, dtype: torch.dtype):
    """What a prepared call (:func:`prepared_conv_bias_relu`) on ``device``/``dtype`` tensors
    depends on beyond its arguments' shapes and strides: the backend and its settings
    (hashable); None where prepared calls are not to be used (under torch.compile, or with
    autocast on, which the eager ops turn off around their kernels)."""
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(device.type):
        return None
    backend = backends.resolve(device, dtype)
    key = getattr(backends.kernels_for(backend), "prepared_key", None)
    return backend, (key() if key is not None else ())


def prepared_conv_bias_relu(x, weight, bias, stride: int, padding: int, out):
    """``eager.conv_bias_relu(x, weight, bias, stride, padding, out)`` as ``run(x, out)`` for
    tensors of the same shapes, strides, dtype and device, under the same
    :func:`preparation_key`: for an inference run that calls one unit on every forward pass
    (unchecked; the CPU backend makes its per-shape choice and its kernels' weight layout once,
    the others run the op)."""
    kernels = _kernels(x)
    prepare = getattr(kernels, "prepared_conv_bias_relu", None)
    if prepare is not None:
        return prepare(x, weight, bias, stride, padding, out)
    return lambda x, out: kernels.conv_bias_relu(x, weight, bias, stride, padding, out)


def prepared_bottleneck_conv_bias_relu(x, w1, b1, weight, bias, stride: int, padding: int, out):
    """:func:`prepared_conv_bias_relu` of ``eager.bottleneck_conv_bias_relu``."""
    kernels = _kernels(x)
    prepare = getattr(kernels, "prepared_bottleneck_conv_bias_relu", None)
    if prepare is not None:
        return prepare(x, w1, b1, weight, bias, stride, padding, out)
    return lambda x, out: kernels.bottleneck_conv_bias_relu(x, w1, b1, weight, bias, stride,
                                                            padding, out)
