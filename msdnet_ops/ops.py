"""The package's custom ops (``torch.ops.msdnet_ops.*``): schema, validation, backend dispatch,
fake (meta) implementations for torch.compile, and autograd.

Ops (semantics in :mod:`msdnet_ops.reference`):

=============================  ===========================================================
``channel_stats``              per-channel batch mean and invstd of a (strided) NCHW view
``channel_stats_backward_``    finalize: add the statistics part of the BN gradient, in place
``affine_relu``                ``relu(scale*x+shift)``
``affine_relu_backward_``      its backward, accumulated into shared gradient buffers
``transform_conv``             ``conv(pool(relu(scale*x+shift)), W)``, functional
``transform_conv_into_``       the same, written into a channel slice of a feature buffer
``transform_conv_backward_``   its backward: accumulates grad_x/grad_scale/grad_shift, returns grad_weight
``gather_batch``               batch compaction (early exit)
=============================  ===========================================================

The functional ops have autograd (``register_autograd``) so they compose with ordinary
PyTorch code; the ``_``-suffixed ops mutate their ``grad_*``/``out`` arguments and are what the
fused dense-block autograd (:mod:`msdnet_ops.nn.functions`) calls to share one gradient
buffer between all consumers of a channel.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends, conv_choice
from . import validation as check

_LIB = "msdnet_ops"
_UNDECORATED: dict = {}


def _custom_op(name: str, mutates_args):
    """``torch.library.custom_op`` that also remembers the plain function, for :data:`eager`."""
    def register(fn):
        _UNDECORATED[name] = fn
        return torch.library.custom_op(f"{_LIB}::{name}", mutates_args=mutates_args)(fn)
    return register


def _kernels(t: Tensor):
    backend = backends.resolve(t.device, t.dtype)
    if backend == "triton" and t.dtype == torch.float64 and t.device.type == "cuda":
        backend = "cuda"  # Triton's tl.dot has no float64 path on GPUs
    return backend, backends.kernels_for(backend)


# --------------------------------------------------------------------------- channel statistics

def _check_stats_args(x, mean, invstd, grad_mean, grad_invstd, grad_x):
    check.check_features(x, "x")
    for v, name in ((mean, "mean"), (invstd, "invstd"), (grad_mean, "grad_mean"), (grad_invstd, "grad_invstd")):
        check.check_channel_vector(v, name, x)
    check.check_like(grad_x, "grad_x", x, "x")


@_custom_op("channel_stats", mutates_args=())
def channel_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-channel batch ``mean`` and ``invstd = 1/sqrt(var + eps)`` (biased variance) of ``x``."""
    check.check_features(x, "x")
    if not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps}")
    if x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"x: batch statistics need more than one value per channel, got shape "
                         f"{tuple(x.shape)} (as nn.BatchNorm2d in training mode)")
    _, kernels = _kernels(x)
    return kernels.channel_stats(x, eps)


@channel_stats.register_fake
def _(x, eps):
    c = x.shape[1]
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((c,), dtype=dt), x.new_empty((c,), dtype=dt)


@_custom_op("channel_stats_backward_", mutates_args=("grad_x",))
def channel_stats_backward_(x: Tensor, mean: Tensor, invstd: Tensor, grad_mean: Tensor,
                            grad_invstd: Tensor, grad_x: Tensor) -> None:
    """``grad_x += grad_mean/n - grad_invstd*(x-mean)*invstd^3/n`` (n = N*H*W)."""
    _check_stats_args(x, mean, invstd, grad_mean, grad_invstd, grad_x)
    _, kernels = _kernels(x)
    kernels.channel_stats_backward_(x, mean, invstd, grad_mean, grad_invstd, grad_x)


@channel_stats_backward_.register_fake
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
    grad_x = torch.zeros_like(x)
    channel_stats_backward_(x, mean, invstd, grad_mean, grad_invstd, grad_x)
    return grad_x, None


channel_stats.register_autograd(_channel_stats_backward, setup_context=_channel_stats_setup)


# --------------------------------------------------------------------------- transform

def _check_affine_args(x, scale, shift):
    check.check_features(x, "x")
    check.check_channel_vector(scale, "scale", x)
    check.check_channel_vector(shift, "shift", x)


@_custom_op("affine_relu", mutates_args=())
def affine_relu(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``relu(scale[c] * x + shift[c])``, contiguous output in ``x``'s dtype."""
    _check_affine_args(x, scale, shift)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _, kernels = _kernels(x)
    kernels.affine_relu_into(x, scale, shift, out)
    return out


@affine_relu.register_fake
def _(x, scale, shift):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@_custom_op("affine_relu_backward_", mutates_args=("grad_x", "grad_scale", "grad_shift"))
def affine_relu_backward_(x: Tensor, scale: Tensor, shift: Tensor, grad_z: Tensor, grad_x: Tensor,
                          grad_scale: Tensor, grad_shift: Tensor) -> None:
    """Accumulates the backward of :func:`affine_relu` into the ``grad_*`` buffers."""
    _check_affine_args(x, scale, shift)
    check.check_like(grad_z, "grad_z", x, "x")
    check.check_like(grad_x, "grad_x", x, "x")
    check.check_channel_vector(grad_scale, "grad_scale", x)
    check.check_channel_vector(grad_shift, "grad_shift", x)
    _, kernels = _kernels(x)
    kernels.affine_relu_backward_(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift)


@affine_relu_backward_.register_fake
def _(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift):
    return None


def _affine_relu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _affine_relu_backward(ctx, grad_z):
    x, scale, shift = ctx.saved_tensors
    grad_x = torch.zeros_like(x)
    grad_scale, grad_shift = torch.zeros_like(scale), torch.zeros_like(shift)
    affine_relu_backward_(x, scale, shift, grad_z.contiguous(), grad_x, grad_scale, grad_shift)
    return grad_x, grad_scale, grad_shift


affine_relu.register_autograd(_affine_relu_backward, setup_context=_affine_relu_setup)


# --------------------------------------------------------------------------- transform-conv

def _check_transform_conv_args(x, scale, shift, weight, stride, padding, pool):
    _check_affine_args(x, scale, shift)
    check.check_conv_args(x, weight, stride, padding, pool)


def _conv(z, weight, stride, padding):
    return F.conv2d(z, weight, None, stride, padding)


def _conv_backward(grad_out, z, weight, stride, padding):
    """(grad_z, grad_weight) of :func:`_conv`. (Measured on the 2-core CPU: oneDNN's 1x1
    convolution beats a batched-GEMM formulation by 10-25 % at DenseNet-BC shapes.)"""
    grad_z, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_out, z, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1,
        [True, True, False])
    return grad_z, grad_weight


class _Scratch(threading.local):
    """Reused per-thread temporaries for the transformed prefix on the CPU, where a fresh
    prefix-sized tensor per call costs more in page faults than the transform itself (CUDA's
    caching allocator has no such cost, and a reused tensor there would need stream care).
    Grow-only: it keeps the largest prefix of the network, which a training step's peak
    holds anyway. One flat tensor per (slot, dtype)."""

    def __init__(self):
        self.flat = {}

    def get(self, slot: str, shape, like: Tensor) -> Tensor:
        if like.device.type != "cpu":
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        numel = 1
        for d in shape:
            numel *= d
        key = (slot, like.dtype)
        flat = self.flat.get(key)
        if flat is None or flat.numel() < numel:
            flat = self.flat[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return flat[:numel].view(shape)


_scratch = _Scratch()


def _transform_conv_unfused_into(kernels, x, scale, shift, weight, stride, padding, pool, out):
    """Memory-bound transform by our kernels, convolution by BLAS / cuDNN / oneDNN: the
    transformed prefix is a temporary (never kept per layer)."""
    z = _scratch.get("z", x.shape, x)
    kernels.affine_relu_into(x, scale, shift, z)
    if pool != 1:
        z = F.avg_pool2d(z, pool)
    out.copy_(_conv(z, weight, stride, padding))


@_custom_op("transform_conv_into_", mutates_args=("out",))
def transform_conv_into_(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, stride: int,
                         padding: int, pool: int, out: Tensor) -> None:
    """Writes ``conv2d(avg_pool(relu(scale*x+shift), pool), weight, stride, padding)`` into
    ``out`` (typically a channel slice of a feature buffer)."""
    _check_transform_conv_args(x, scale, shift, weight, stride, padding, pool)
    check.check_like(out, "out", x, "x", check.conv_output_shape(x, weight, stride, padding, pool))
    check.check_not_overlapping(out, "out", (x, "x"))
    backend, kernels = _kernels(x)

    def run(path):  # both paths overwrite out: a timing trial leaves a valid result
        if path == "fused":
            kernels.transform_conv_into(x, scale, shift, weight, stride, padding, pool, out)
        else:
            _transform_conv_unfused_into(kernels, x, scale, shift, weight, stride, padding, pool, out)

    key = lambda: conv_choice.shape_key("transform_conv_into_", x, weight, stride, padding, pool)  # noqa: E731
    run("fused" if conv_choice.fused(backend, key, run, x.device) else "unfused")


@transform_conv_into_.register_fake
def _(x, scale, shift, weight, stride, padding, pool, out):
    return None


@_custom_op("transform_conv", mutates_args=())
def transform_conv(x: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, stride: int,
                   padding: int, pool: int) -> Tensor:
    """Functional :func:`transform_conv_into_` (allocates the output)."""
    _check_transform_conv_args(x, scale, shift, weight, stride, padding, pool)
    out = x.new_empty(check.conv_output_shape(x, weight, stride, padding, pool))
    transform_conv_into_(x, scale, shift, weight, stride, padding, pool, out)
    return out


@transform_conv.register_fake
def _(x, scale, shift, weight, stride, padding, pool):
    return x.new_empty(check.conv_output_shape(x, weight, stride, padding, pool))


def _transform_conv_backward_unfused(kernels, grad_out, x, scale, shift, weight, stride, padding,
                                     pool, grad_x, grad_scale, grad_shift):
    z = _scratch.get("z", x.shape, x)
    kernels.affine_relu_into(x, scale, shift, z)
    zp = F.avg_pool2d(z, pool) if pool != 1 else z
    grad_zp, grad_weight = _conv_backward(grad_out, zp, weight, stride, padding)
    del zp
    if pool != 1:
        grad_z = torch.ops.aten.avg_pool2d_backward(grad_zp, z, [pool] * 2, [pool] * 2, [0, 0],
                                                    False, True, None)
    else:
        grad_z = grad_zp
    del z
    kernels.affine_relu_backward_(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift)
    return grad_weight


@_custom_op("transform_conv_backward_",
            mutates_args=("grad_x", "grad_scale", "grad_shift"))
def transform_conv_backward_(grad_out: Tensor, x: Tensor, scale: Tensor, shift: Tensor,
                             weight: Tensor, stride: int, padding: int, pool: int, grad_x: Tensor,
                             grad_scale: Tensor, grad_shift: Tensor) -> Tensor:
    """Backward of :func:`transform_conv`: accumulates into ``grad_x`` (the shared gradient
    buffer prefix), ``grad_scale`` and ``grad_shift``; returns ``grad_weight``."""
    _check_transform_conv_args(x, scale, shift, weight, stride, padding, pool)
    check.check_like(grad_out, "grad_out", x, "x", check.conv_output_shape(x, weight, stride, padding, pool))
    check.check_like(grad_x, "grad_x", x, "x")
    check.check_channel_vector(grad_scale, "grad_scale", x)
    check.check_channel_vector(grad_shift, "grad_shift", x)
    backend, kernels = _kernels(x)

    def run(path, grads):
        if path == "fused":
            return kernels.transform_conv_backward_(grad_out, x, scale, shift, weight, stride,
                                                    padding, pool, *grads).to(weight.dtype)
        return _transform_conv_backward_unfused(kernels, grad_out, x, scale, shift, weight, stride,
                                                padding, pool, *grads)

    def trial(path):  # on scratch gradients: the real ones must be updated exactly once
        run(path, [g.clone() for g in (grad_x, grad_scale, grad_shift)])

    key = lambda: conv_choice.shape_key("transform_conv_backward_", x, weight, stride, padding, pool)  # noqa: E731
    path = "fused" if conv_choice.fused(backend, key, trial, x.device) else "unfused"
    return run(path, (grad_x, grad_scale, grad_shift))


@transform_conv_backward_.register_fake
def _(grad_out, x, scale, shift, weight, stride, padding, pool, grad_x, grad_scale, grad_shift):
    return torch.empty_like(weight)


def _transform_conv_setup(ctx, inputs, output):
    x, scale, shift, weight, stride, padding, pool = inputs
    ctx.save_for_backward(x, scale, shift, weight)
    ctx.conv = (stride, padding, pool)


def _transform_conv_backward(ctx, grad_out):
    x, scale, shift, weight = ctx.saved_tensors
    grad_x = torch.zeros_like(x)
    grad_scale, grad_shift = torch.zeros_like(scale), torch.zeros_like(shift)
    grad_weight = transform_conv_backward_(grad_out.contiguous(), x, scale, shift, weight,
                                           *ctx.conv, grad_x, grad_scale, grad_shift)
    return grad_x, grad_scale, grad_shift, grad_weight, None, None, None


transform_conv.register_autograd(_transform_conv_backward, setup_context=_transform_conv_setup)


# --------------------------------------------------------------------------- batch compaction

@_custom_op("gather_batch", mutates_args=())
def gather_batch(src: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` of ``src`` (dim 0), contiguous: the samples still running after an exit."""
    check.check_features(src, "src")
    if index.dim() != 1 or index.dtype != torch.int64 or index.device != src.device:
        raise ValueError(f"index: expected a 1-D int64 tensor on {src.device}, got "
                         f"{index.dim()}-D {index.dtype} on {index.device}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= src.shape[0]):
        raise ValueError(f"index: expected values in [0, {src.shape[0]}), got "
                         f"[{int(index.min())}, {int(index.max())}]")
    out = src.new_empty((index.numel(),) + tuple(src.shape[1:]))
    if index.numel():
        _, kernels = _kernels(src)
        kernels.gather_batch_into(src, index, out)
    return out


@gather_batch.register_fake
def _(src, index):
    return src.new_empty((index.shape[0],) + tuple(src.shape[1:]))


# --------------------------------------------------------------------------- eager fast path

class _Eager:
    """The ops without the custom-op dispatcher, for the fused modules' autograd functions,
    which call them from inside their own forward/backward (no autograd or tracing needed
    there). The dispatcher's Python layers cost ~20 us a call: ~10 ms of a 240 ms
    DenseNet-BC training step on the CPU. Under torch.compile the registered ops are used."""

    def __init__(self):
        for name, fn in _UNDECORATED.items():
            setattr(self, name, self._choose(globals()[name], fn))

    @staticmethod
    def _choose(op, fn):
        def call(*args):
            if torch.compiler.is_compiling():
                return op(*args)
            device_type = args[0].device.type
            if torch.is_autocast_enabled(device_type):  # the op's insides never autocast
                with torch.autocast(device_type, enabled=False):
                    return fn(*args)
            return fn(*args)
        call.__name__ = fn.__name__
        call.__doc__ = fn.__doc__
        return call


eager = _Eager()
