"""``out = relu(scale * x + shift)`` per channel (computed in float32, float64 for float64),
written in ``x``'s dtype into ``out`` (any strides, e.g. a channel slice of a buffer).

One program per (image, channel) plane and block of pixels; per-channel scalars loaded once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime as rt


@triton.jit
def _affine_relu_kernel(
    x_ptr, scale_ptr, shift_ptr, out_ptr,
    C, H, W,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    s_scale, s_shift,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // C
    c = pid % C
    hw = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = hw < H * W
    h = hw // W
    w = hw % W
    sc = tl.load(scale_ptr + c * s_scale).to(ACC_DTYPE)
    sh = tl.load(shift_ptr + c * s_shift).to(ACC_DTYPE)
    xv = tl.load(x_ptr + (n.to(tl.int64) * sxn + c * sxc) + (h * sxh + w * sxw), mask=m, other=0.0).to(ACC_DTYPE)
    z = tl.maximum(xv * sc + sh, 0.0)
    o_ptrs = out_ptr + (n.to(tl.int64) * son + c * soc) + (h * soh + w * sow)
    tl.store(o_ptrs, z.to(out_ptr.dtype.element_ty), mask=m)


GPU_BLOCK = 1024
INTERPRET_BLOCK = 32


def affine_relu_into(x, scale, shift, out) -> None:
    """``out[...] = relu(scale * x + shift)`` as ``reference.affine_relu``; ``out`` has ``x``'s
    shape and dtype and any strides."""
    rt.check_features("x", x)
    N, C, H, W = x.shape
    dev = x.device
    rt.check_vector("scale", scale, C, dev)
    rt.check_vector("shift", shift, C, dev)
    rt.check_features("out", out)
    rt.check_same_shape("out", out, x.shape, "x")
    if out.dtype != x.dtype:
        raise TypeError(f"out: expected dtype {x.dtype} (as x), got {out.dtype}")
    rt.check_device("out", out, dev)
    if x.numel() == 0:
        return
    interp = rt.interpreting(_affine_relu_kernel, dev)
    block = INTERPRET_BLOCK if interp else min(GPU_BLOCK, rt.next_pow2(H * W))
    args = (x, scale, shift, out, C, H, W, *x.stride(), *out.stride(), scale.stride(0), shift.stride(0))
    grid = (N * C, triton.cdiv(H * W, block))
    rt.launch(_affine_relu_kernel, None, grid, args, dict(ACC_DTYPE=rt.acc_tl_dtype(x.dtype)),
              dict(BLOCK=block, num_warps=4 if block >= 512 else 2), dev)


def affine_relu(x, scale, shift) -> torch.Tensor:
    """Allocating variant of :func:`affine_relu_into` (contiguous output)."""
    rt.check_features("x", x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    affine_relu_into(x, scale, shift, out)
    return out
