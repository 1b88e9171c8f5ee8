"""Pure-PyTorch references of every kernel in the package.

These define the semantics the CPU (C++), CUDA and Triton kernels must reproduce. Tests and
benchmarks use them as ground truth; the ``reference`` backend runs them directly.

Conventions shared by every kernel:

* ``x`` is an NCHW tensor with arbitrary strides (typically a channel prefix or slice view of
  a feature buffer ``[N, C_cap, H, W]``); kernels read it through its strides, never copy it.
* Per-channel vectors (``mean``, ``invstd``, ``scale``, ``shift`` and their gradients) are
  float32 for float16/bfloat16/float32 inputs and float64 for float64 inputs ("stats dtype").
* The transform of a channel is ``z = relu(scale * x + shift)``. With batch statistics and a
  BatchNorm's ``(g, h)``: ``scale = g * invstd`` and ``shift = h - g * mean * invstd``.
* The ReLU derivative at exactly zero is 0 (as ``torch.relu``'s backward).
* Functions whose name ends in ``_`` accumulate into (``+=``) their ``grad_*`` arguments.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .dtypes import stats_dtype


_SELF = sys.modules[__name__]  # the ``kernels`` of the references' own compositions


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def channel_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch statistics of each channel over (N, H, W): ``mean`` and ``invstd = 1/sqrt(var+eps)``
    with the biased variance (what BatchNorm normalizes with)."""
    xs = x.to(stats_dtype(x.dtype))
    var, mean = torch.var_mean(xs, dim=(0, 2, 3), correction=0)
    return mean, torch.rsqrt(var + eps)


def channel_stats_backward_(x, mean, invstd, grad_mean, grad_invstd, grad_x) -> None:
    """Backward of :func:`channel_stats`, accumulated into ``grad_x``.

    ``grad_x += grad_mean / n - grad_invstd * (x - mean) * invstd**3 / n`` with ``n = N*H*W``.
    This is the "finalize" step: when ``grad_x`` already holds the direct gradient of every
    consumer (``sum_l scale_l * dpre_l``), adding the statistics part once per channel gives
    the exact BatchNorm input gradient (see docs/ARCHITECTURE.md §3).
    """
    n = x.shape[0] * x.shape[2] * x.shape[3]
    xs = x.to(mean.dtype)
    extra = _per_channel(grad_mean) / n - _per_channel(grad_invstd) * (xs - _per_channel(mean)) * _per_channel(invstd) ** 3 / n
    grad_x.add_(extra.to(grad_x.dtype))


def affine_relu(x, scale, shift) -> torch.Tensor:
    """``z = relu(scale * x + shift)`` per channel, in ``x``'s dtype (computed in stats dtype)."""
    xs = x.to(scale.dtype)
    return torch.relu(xs * _per_channel(scale) + _per_channel(shift)).to(x.dtype)


def affine_relu_backward_(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift,
                          accumulate: bool = True) -> None:
    """Backward of :func:`affine_relu`, accumulated: with ``dpre = grad_z * (scale*x+shift > 0)``,
    ``grad_x += scale * dpre``, ``grad_scale += sum(dpre * x)``, ``grad_shift += sum(dpre)``
    (sums over N, H, W). ``accumulate=False``: ``grad_x = scale * dpre``, its old values never
    read (a sole consumer's gradient: no zero-filled buffer needed)."""
    xs = x.to(scale.dtype)
    pre = xs * _per_channel(scale) + _per_channel(shift)
    dpre = torch.where(pre > 0, grad_z.to(scale.dtype), torch.zeros((), dtype=scale.dtype, device=x.device))
    grad = (dpre * _per_channel(scale)).to(grad_x.dtype)
    grad_x.add_(grad) if accumulate else grad_x.copy_(grad)
    grad_scale.add_((dpre * xs).sum(dim=(0, 2, 3)))
    grad_shift.add_(dpre.sum(dim=(0, 2, 3)))


def bn_scale_shift_into(mean, invstd, weight, bias, out) -> None:
    """A BatchNorm's per-channel transform written into the ``[2, C]`` rows ``out`` (of
    ``mean``'s dtype): ``scale = weight * invstd``, ``shift = bias - mean * scale``
    (``weight`` None: 1, ``bias`` None: 0)."""
    scale, shift = out[0], out[1]
    if weight is None:
        scale.copy_(invstd)
    else:
        torch.mul(weight.to(mean.dtype), invstd, out=scale)
    if bias is None:
        torch.mul(mean, scale, out=shift).neg_()
    else:
        torch.addcmul(bias.to(mean.dtype), mean, scale, value=-1, out=shift)


def bn_scale_shift_backward_(grad, mean, invstd, weight, grad_mean, grad_invstd,
                             accumulate: bool = True) -> torch.Tensor:
    """Backward of :func:`bn_scale_shift_into` for ``grad`` = rows ``(grad_scale, grad_shift)``:
    returns ``grad_weight = invstd * centred`` with ``centred = grad_scale - grad_shift * mean``
    (``grad_bias`` is ``grad_shift``); given ``grad_mean`` and ``grad_invstd`` (both or
    neither: batch statistics), accumulates ``grad_invstd += weight * centred`` and
    ``grad_mean -= grad_shift * weight * invstd``; ``accumulate=False``: writes them instead,
    their old values never read (the statistics' sole consumer: no zero-filled vectors)."""
    grad_scale, grad_shift = grad[0], grad[1]
    centred = torch.addcmul(grad_scale, grad_shift, mean, value=-1)
    if grad_invstd is not None:
        w = None if weight is None else weight.to(mean.dtype)
        scale = invstd if w is None else w * invstd
        if accumulate:
            grad_invstd.add_(centred) if w is None else grad_invstd.addcmul_(w, centred)
            grad_mean.addcmul_(grad_shift, scale, value=-1)
        else:
            grad_invstd.copy_(centred) if w is None else torch.mul(w, centred, out=grad_invstd)
            torch.mul(grad_shift, scale, out=grad_mean).neg_()
    return invstd * centred


def batchnorm_relu_into(y, eps: float, weight, bias, stats, rows, out) -> None:
    """A training-mode BatchNorm (batch statistics) followed by ReLU, written into ``out``,
    with what its backward needs: ``stats`` rows ``(mean, invstd)`` of ``y`` and ``rows``
    ``(scale, shift)`` (``[2, C]``, stats dtype, written)."""
    composed_batchnorm_relu_into(_SELF, y, eps, weight, bias, stats, rows, out)


def batchnorm_relu_backward_(y, grad_z, stats, rows, weight, grad_y, grad_params) -> None:
    """Backward of :func:`batchnorm_relu_into` for ``grad_z`` (w.r.t. ``out``): writes
    ``grad_y`` (never read: the whole gradient w.r.t. ``y``, the statistics' part included)
    and ``grad_params`` rows ``(grad_weight, grad_bias)`` (``[2, C]``, stats dtype)."""
    composed_batchnorm_relu_backward_(_SELF, y, grad_z, stats, rows, weight, grad_y, grad_params)


def composed_batchnorm_relu_into(kernels, y, eps, weight, bias, stats, rows, out) -> None:
    """:func:`batchnorm_relu_into` as the steps of ``kernels`` (a module with
    ``channel_stats_into``, ``bn_scale_shift_into``, ``affine_relu_into``: these references,
    or a backend without a fused kernel for it)."""
    kernels.channel_stats_into(y, eps, stats[0], stats[1])
    kernels.bn_scale_shift_into(stats[0], stats[1], weight, bias, rows)
    kernels.affine_relu_into(y, rows[0], rows[1], out)


def composed_batchnorm_relu_backward_(kernels, y, grad_z, stats, rows, weight, grad_y,
                                      grad_params) -> None:
    """:func:`batchnorm_relu_backward_` as the steps of ``kernels``."""
    grad_params.zero_()  # (grad_scale, grad_shift) accumulate here; grad_shift is grad_bias
    kernels.affine_relu_backward_(y, rows[0], rows[1], grad_z, grad_y, grad_params[0],
                                  grad_params[1], False)
    _batchnorm_part_backward_(kernels, y, stats, weight, grad_y, grad_params)


def _batchnorm_part_backward_(kernels, y, stats, weight, grad_y, grad_params) -> None:
    """What a sole consumer's transform backward leaves to do: ``grad_params`` holds
    ``(grad_scale, grad_shift)`` and ``grad_y`` the gradient through the transform alone;
    turns the first row into the weight's gradient and adds the batch statistics' part to
    ``grad_y``."""
    grad_stats = torch.empty_like(stats)  # (grad_mean, grad_invstd), written
    grad_params[0] = kernels.bn_scale_shift_backward_(grad_params, stats[0], stats[1], weight,
                                                      grad_stats[0], grad_stats[1], False)
    kernels.channel_stats_backward_(y, stats[0], stats[1], grad_stats[0], grad_stats[1], grad_y)


def batchnorm_relu_conv_backward_(grad_out, y, stats, rows, weight, conv_weight, stride: int,
                                  padding: int, grad_y, grad_params) -> torch.Tensor:
    """Backward of ``conv2d(relu(bn(y)), conv_weight, stride, padding)`` with the BatchNorm of
    :func:`batchnorm_relu_into` (``stats``, ``rows``): writes ``grad_y`` (the whole gradient)
    and ``grad_params`` rows ``(grad_weight, grad_bias)``; returns the convolution weight's
    gradient."""
    return composed_batchnorm_relu_conv_backward_(_SELF, grad_out, y, stats, rows, weight,
                                                  conv_weight, stride, padding, grad_y,
                                                  grad_params)


def composed_batchnorm_relu_conv_backward_(kernels, grad_out, y, stats, rows, weight, conv_weight,
                                           stride, padding, grad_y, grad_params) -> torch.Tensor:
    """:func:`batchnorm_relu_conv_backward_` as the steps of ``kernels``: the transform-conv's
    backward (a sole consumer: ``grad_y`` written), then the BatchNorm's own part."""
    grad_params.zero_()
    grad_conv_weight = kernels.transform_conv_backward_(
        grad_out, y, rows[0], rows[1], conv_weight, stride, padding, 1, grad_y, grad_params[0],
        grad_params[1], False)
    _batchnorm_part_backward_(kernels, y, stats, weight, grad_y, grad_params)
    return grad_conv_weight


def transform_conv(x, scale, shift, weight, stride: int, padding: int, pool: int) -> torch.Tensor:
    """``conv2d(avg_pool(relu(scale*x+shift), pool), weight, stride, padding)`` (no bias).

    ``pool`` is 1 (none) or 2 (2x2 average pooling *before* a 1x1 convolution: equal to pooling
    after it, since both are linear, with 4x fewer GEMM rows: the DenseNet transition)."""
    z = affine_relu(x, scale, shift)
    if pool != 1:
        z = F.avg_pool2d(z, pool)
    return F.conv2d(z, weight, None, stride, padding)


def transform_conv_backward_(grad_out, x, scale, shift, weight, stride, padding, pool,
                             grad_x, grad_scale, grad_shift, accumulate: bool = True) -> torch.Tensor:
    """Backward of :func:`transform_conv`: accumulates into ``grad_x`` (``accumulate=False``:
    overwrites it), ``grad_scale``, ``grad_shift`` (as :func:`affine_relu_backward_`) and
    returns ``grad_weight``."""
    z = affine_relu(x, scale, shift)
    zp = F.avg_pool2d(z, pool) if pool != 1 else z
    grad_zp, grad_weight = torch.ops.aten.convolution_backward(
        grad_out, zp, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1,
        [True, True, False])[:2]
    if pool != 1:
        grad_z = torch.ops.aten.avg_pool2d_backward(grad_zp, z, [pool] * 2, [pool] * 2, [0, 0], False, True, None)
    else:
        grad_z = grad_zp
    affine_relu_backward_(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift, accumulate)
    return grad_weight


def conv(x, weight, stride: int, padding: int, pool: int) -> torch.Tensor:
    """``conv2d(avg_pool(x, pool), weight, stride, padding)`` (no bias, no transform): a consumer
    of *activated* buffer channels (post-activation networks store ``relu(bn(.))`` once, when the
    channel is written, so its consumers convolve the stored values as they are)."""
    if pool != 1:
        x = F.avg_pool2d(x, pool)
    return F.conv2d(x, weight, None, stride, padding)


def conv_backward_(grad_out, x, weight, stride, padding, pool, grad_x) -> torch.Tensor:
    """Backward of :func:`conv`: accumulates the input gradient into ``grad_x`` (``+=``, the
    shared gradient buffer prefix) and returns ``grad_weight``."""
    xp = F.avg_pool2d(x, pool) if pool != 1 else x
    grad_xp, grad_weight = torch.ops.aten.convolution_backward(
        grad_out, xp, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1,
        [True, True, False])[:2]
    if pool != 1:
        grad_xp = torch.ops.aten.avg_pool2d_backward(grad_xp, x, [pool] * 2, [pool] * 2, [0, 0],
                                                     False, True, None)
    grad_x.add_(grad_xp.to(grad_x.dtype))
    return grad_weight


def gather_batch(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Batch compaction for early exit: ``out[i] = src[index[i]]`` along dim 0."""
    return src.index_select(0, index)


# "_into" forms: the signatures the compiled and Triton kernels share (write into ``out``).

def channel_stats_into(x, eps, mean, invstd) -> None:
    m, i = channel_stats(x, eps)
    mean.copy_(m)
    invstd.copy_(i)


def affine_relu_into(x, scale, shift, out) -> None:
    out.copy_(affine_relu(x, scale, shift))


def transform_conv_into(x, scale, shift, weight, stride, padding, pool, out) -> None:
    out.copy_(transform_conv(x, scale, shift, weight, stride, padding, pool))


def conv_into(x, weight, stride, padding, pool, out) -> None:
    out.copy_(conv(x, weight, stride, padding, pool))


def gather_batch_into(src, index, out) -> None:
    out.copy_(gather_batch(src, index))
