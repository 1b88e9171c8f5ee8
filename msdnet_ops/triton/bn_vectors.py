"""A BatchNorm's per-channel vectors, forward and backward, one launch each.

Forward: ``out[0] = scale = weight * invstd``, ``out[1] = shift = bias - mean * scale``.
Backward, for ``grad`` = rows ``(grad_scale, grad_shift)``, with ``centred = grad_scale -
grad_shift * mean``: ``grad_weight = invstd * centred`` and, with batch statistics,
``grad_invstd += weight * centred``, ``grad_mean -= grad_shift * weight * invstd`` (or ``=``,
for the statistics' sole consumer).

A few hundred values: as PyTorch ops these are 2 launches forward and 4 backward per
BatchNorm, more launches than a dense unit's convolution and statistics together (the launch
counts of ``benches/launch_count.py``); here one each. One program per block of channels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime as rt


@triton.jit
def scale_shift_of(mean_ptr, invstd_ptr, w_ptr, b_ptr, c, m, s_mean, s_invstd, s_w, s_b,
                   HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``(scale, shift)`` of channels ``c`` (mask ``m``): also the prologue of the fused
    BatchNorm+ReLU kernel (``pixel_rows``), which computes them where it applies them."""
    scale = tl.load(invstd_ptr + c * s_invstd, mask=m, other=0.0).to(ACC_DTYPE)
    if HAS_WEIGHT:
        scale *= tl.load(w_ptr + c * s_w, mask=m, other=0.0).to(ACC_DTYPE)
    shift = -tl.load(mean_ptr + c * s_mean, mask=m, other=0.0).to(ACC_DTYPE) * scale
    if HAS_BIAS:
        shift += tl.load(b_ptr + c * s_b, mask=m, other=0.0).to(ACC_DTYPE)
    return scale, shift


@triton.jit
def grads_of_scale_shift(g_scale, g_shift, mean, invstd, w_ptr, c, m, s_w,
                         HAS_WEIGHT: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``(grad_weight, grad_mean, grad_invstd)`` of channels ``c`` from the gradients of their
    ``(scale, shift)``: also the prologue of the fused BatchNorm backward (``pixel_rows``)."""
    centred = g_scale - g_shift * mean
    w_invstd = invstd
    w_centred = centred
    if HAS_WEIGHT:
        w = tl.load(w_ptr + c * s_w, mask=m, other=0.0).to(ACC_DTYPE)
        w_invstd = w * invstd
        w_centred = w * centred
    return invstd * centred, -g_shift * w_invstd, w_centred


@triton.jit
def _bn_scale_shift_kernel(
    mean_ptr, invstd_ptr, w_ptr, b_ptr, out_ptr,
    C, s_mean, s_invstd, s_w, s_b, s_out_row, s_out,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = c < C
    scale, shift = scale_shift_of(mean_ptr, invstd_ptr, w_ptr, b_ptr, c, m, s_mean, s_invstd,
                                  s_w, s_b, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
    tl.store(out_ptr + c * s_out, scale, mask=m)
    tl.store(out_ptr + s_out_row + c * s_out, shift, mask=m)


@triton.jit
def _bn_scale_shift_backward_kernel(
    grad_ptr, mean_ptr, invstd_ptr, w_ptr, gmean_ptr, ginvstd_ptr, gw_ptr,
    C, s_grad_row, s_grad, s_mean, s_invstd, s_w, s_gmean, s_ginvstd,
    HAS_WEIGHT: tl.constexpr, STATS_GRADS: tl.constexpr, ACCUMULATE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = c < C
    g_scale = tl.load(grad_ptr + c * s_grad, mask=m, other=0.0).to(ACC_DTYPE)
    g_shift = tl.load(grad_ptr + s_grad_row + c * s_grad, mask=m, other=0.0).to(ACC_DTYPE)
    mean = tl.load(mean_ptr + c * s_mean, mask=m, other=0.0).to(ACC_DTYPE)
    invstd = tl.load(invstd_ptr + c * s_invstd, mask=m, other=0.0).to(ACC_DTYPE)
    grad_weight, gm, gi = grads_of_scale_shift(g_scale, g_shift, mean, invstd, w_ptr, c, m, s_w,
                                               HAS_WEIGHT, ACC_DTYPE)
    tl.store(gw_ptr + c, grad_weight, mask=m)
    if STATS_GRADS:
        gi_ptrs = ginvstd_ptr + c * s_ginvstd
        gm_ptrs = gmean_ptr + c * s_gmean
        if ACCUMULATE:  # else only written: their old values are never read
            gi += tl.load(gi_ptrs, mask=m, other=0.0).to(ACC_DTYPE)
            gm += tl.load(gm_ptrs, mask=m, other=0.0).to(ACC_DTYPE)
        tl.store(gi_ptrs, gi, mask=m)
        tl.store(gm_ptrs, gm, mask=m)


GPU_BLOCK = 1024
INTERPRET_BLOCK = 64


def _check(mean, invstd, weight, bias):
    if not isinstance(mean, torch.Tensor) or mean.dim() != 1:
        raise ValueError(f"mean: expected a 1-D per-channel vector, got "
                         f"{getattr(mean, 'shape', type(mean).__name__)}")
    C, dev = mean.shape[0], mean.device
    rt.check_vector("mean", mean, C, dev)
    rt.check_vector("invstd", invstd, C, dev, mean.dtype)
    for name, v in (("weight", weight), ("bias", bias)):
        if v is not None:
            rt.check_vector(name, v, C, dev)
    return C, dev


def _grid(C: int, device: torch.device):
    block = INTERPRET_BLOCK if rt.is_interpreted(device) else min(GPU_BLOCK, rt.next_pow2(C))
    return block, (rt.cdiv(C, block),)


def check_scale_shift_args(mean, invstd, weight, bias, out, out_name: str = "out") -> int:
    """The vectors' checks; ``out``: the ``[2, C]`` rows ``(scale, shift)`` of ``mean``'s
    dtype. Returns ``C``."""
    C, dev = _check(mean, invstd, weight, bias)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, C) \
            or out.dtype != mean.dtype or out.device != dev:
        raise ValueError(f"{out_name}: expected a [2, {C}] {mean.dtype} tensor on {dev}, got "
                         f"{tuple(getattr(out, 'shape', ()))} {getattr(out, 'dtype', type(out))} "
                         f"on {getattr(out, 'device', '-')}")
    return C


def bn_scale_shift_into(mean, invstd, weight, bias, out) -> None:
    """As ``reference.bn_scale_shift_into``: ``out`` ``[2, C]`` (any strides) of ``mean``'s
    dtype."""
    C = check_scale_shift_args(mean, invstd, weight, bias, out)
    dev = mean.device
    if C == 0:
        return
    block, grid = _grid(C, dev)
    w = mean if weight is None else weight  # placeholder pointers, never dereferenced
    b = mean if bias is None else bias
    args = (mean, invstd, w, b, out, C, mean.stride(0), invstd.stride(0), w.stride(0),
            b.stride(0), out.stride(0), out.stride(1))
    rt.launch(_bn_scale_shift_kernel, grid, args,
              dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                   ACC_DTYPE=rt.acc_tl_dtype(mean.dtype)),
              dict(BLOCK=block, num_warps=4), dev)


def bn_scale_shift_backward_(grad, mean, invstd, weight, grad_mean, grad_invstd,
                             accumulate: bool = True) -> torch.Tensor:
    """As ``reference.bn_scale_shift_backward_``: returns ``grad_weight`` (new, ``mean``'s
    dtype); accumulates into ``grad_mean``/``grad_invstd`` when given (both or neither), or
    writes them (``accumulate=False``)."""
    C, dev = _check(mean, invstd, weight, None)
    if tuple(grad.shape) != (2, C) or grad.dtype != mean.dtype or grad.device != dev:
        raise ValueError(f"grad: expected a [2, {C}] {mean.dtype} tensor on {dev}, got "
                         f"{tuple(grad.shape)} {grad.dtype} on {grad.device}")
    if (grad_mean is None) != (grad_invstd is None):
        raise ValueError("grad_mean, grad_invstd: expected both (batch statistics) or neither")
    stats_grads = grad_mean is not None
    if stats_grads:
        rt.check_vector("grad_mean", grad_mean, C, dev, mean.dtype)
        rt.check_vector("grad_invstd", grad_invstd, C, dev, mean.dtype)
    grad_weight = torch.empty(C, dtype=mean.dtype, device=dev)
    if C == 0:
        return grad_weight
    block, grid = _grid(C, dev)
    w = mean if weight is None else weight  # placeholder pointers, never dereferenced
    gm, gi = (grad_mean, grad_invstd) if stats_grads else (mean, mean)
    args = (grad, mean, invstd, w, gm, gi, grad_weight, C, grad.stride(0), grad.stride(1),
            mean.stride(0), invstd.stride(0), w.stride(0), gm.stride(0), gi.stride(0))
    rt.launch(_bn_scale_shift_backward_kernel, grid, args,
              dict(HAS_WEIGHT=weight is not None, STATS_GRADS=stats_grads,
                   ACCUMULATE=bool(accumulate), ACC_DTYPE=rt.acc_tl_dtype(mean.dtype)),
              dict(BLOCK=block, num_warps=4), dev)
    return grad_weight
