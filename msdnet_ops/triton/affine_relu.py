"""Affine + ReLU, forward and backward.

Forward: ``out = relu(scale * x + shift)`` per channel (computed in float32, float64 for float64),
written in ``x``'s dtype into ``out`` (any strides, e.g. a channel slice of a buffer).

One program per (image, channel) plane and block of pixels; per-channel scalars loaded once.

Backward of ``z = relu(scale * x + shift)``, accumulated: with
``dpre = grad_z * (scale*x + shift > 0)``: ``grad_x += scale * dpre``,
``grad_scale += sum(dpre * x)``, ``grad_shift += sum(dpre)`` (sums over N, H, W).

One program per chunk of one channel (flat over N, H, W): element-wise update of ``grad_x``
and per-lane partial sums, reduced and atomically added to the channel's two gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime as rt
from . import pixel_rows
from ._math import relu


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
    z = relu(xv * sc + sh)
    o_ptrs = out_ptr + (n.to(tl.int64) * son + c * soc) + (h * soh + w * sow)
    tl.store(o_ptrs, z.to(out_ptr.dtype.element_ty), mask=m)


GPU_BLOCK = 1024
INTERPRET_BLOCK = 32
INTERPRET_CHUNKS = 2


def check_output(x, out) -> None:
    """``out``: a feature map of ``x``'s shape, dtype and device (any strides)."""
    rt.check_features("out", out)
    rt.check_same_shape("out", out, x.shape, "x")
    if out.dtype != x.dtype:
        raise TypeError(f"out: expected dtype {x.dtype} (as x), got {out.dtype}")
    rt.check_device("out", out, x.device)


def affine_relu_into(x, scale, shift, out) -> None:
    """``out[...] = relu(scale * x + shift)`` as ``reference.affine_relu``; ``out`` has ``x``'s
    shape and dtype and any strides."""
    rt.check_features("x", x)
    N, C, H, W = x.shape
    dev = x.device
    rt.check_vector("scale", scale, C, dev)
    rt.check_vector("shift", shift, C, dev)
    check_output(x, out)
    if x.numel() == 0:
        return
    sxp, sop = pixel_rows.row_stride(x), pixel_rows.row_stride(out)
    if sxp is not None and sop is not None:  # NHWC: tiles of pixel rows, loads along channels
        pixel_rows.affine_relu_into(x, scale, shift, out, sxp, sop)
        return
    interp = rt.interpreting(_affine_relu_kernel, dev)
    block = INTERPRET_BLOCK if interp else min(GPU_BLOCK, rt.next_pow2(H * W))
    args = (x, scale, shift, out, C, H, W, *x.stride(), *out.stride(), scale.stride(0), shift.stride(0))
    grid = (N * C, rt.cdiv(H * W, block))
    rt.launch(_affine_relu_kernel, grid, args, dict(ACC_DTYPE=rt.acc_tl_dtype(x.dtype)),
              dict(BLOCK=block, num_warps=4 if block >= 512 else 2), dev)


def affine_relu(x, scale, shift) -> torch.Tensor:
    """Allocating variant of :func:`affine_relu_into` (contiguous output)."""
    rt.check_features("x", x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    affine_relu_into(x, scale, shift, out)
    return out


# ----------------------------------------------------------------------------- backward

@triton.jit(do_not_specialize=["chunk"], do_not_specialize_on_alignment=["gscale_ptr", "gshift_ptr"])
def _affine_relu_backward_kernel(
    x_ptr, scale_ptr, shift_ptr, gz_ptr, gx_ptr, gscale_ptr, gshift_ptr,
    N, C, H, W,
    sxn, sxc, sxh, sxw,
    szn, szc, szh, szw,
    sdn, sdc, sdh, sdw,
    s_scale, s_shift, s_gscale, s_gshift,
    chunk,
    HAS_GX: tl.constexpr, ACCUMULATE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    j = tl.program_id(1)
    HW = H * W
    L = N * HW
    start = j * chunk
    end = tl.minimum(start + chunk, L)
    sc = tl.load(scale_ptr + c * s_scale).to(ACC_DTYPE)
    sh = tl.load(shift_ptr + c * s_shift).to(ACC_DTYPE)
    x_base = x_ptr + c.to(tl.int64) * sxc
    z_base = gz_ptr + c.to(tl.int64) * szc
    d_base = gx_ptr + c.to(tl.int64) * sdc
    arange = tl.arange(0, BLOCK)
    sum_dx = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    sum_d = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    for i0 in range(start, end, BLOCK):
        offs = i0 + arange
        m = offs < end
        n64 = (offs // HW).to(tl.int64)
        hw = offs % HW
        h = hw // W
        w = hw % W
        xv = tl.load(x_base + n64 * sxn + (h * sxh + w * sxw), mask=m, other=0.0).to(ACC_DTYPE)
        gz = tl.load(z_base + n64 * szn + (h * szh + w * szw), mask=m, other=0.0).to(ACC_DTYPE)
        pre = xv * sc + sh
        dpre = tl.where(m & (pre > 0), gz, 0.0)
        if HAS_GX:
            d_ptrs = d_base + n64 * sdn + (h * sdh + w * sdw)
            gx = sc * dpre
            if ACCUMULATE:  # else grad_x is only written: its old values are never read
                gx += tl.load(d_ptrs, mask=m, other=0.0).to(ACC_DTYPE)
            tl.store(d_ptrs, gx.to(gx_ptr.dtype.element_ty), mask=m)
        sum_dx += dpre * xv
        sum_d += dpre
    tl.atomic_add(gscale_ptr + c * s_gscale, tl.sum(sum_dx, axis=0).to(gscale_ptr.dtype.element_ty))
    tl.atomic_add(gshift_ptr + c * s_gshift, tl.sum(sum_d, axis=0).to(gshift_ptr.dtype.element_ty))


def affine_relu_backward_(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift,
                          accumulate: bool = True) -> None:
    """As ``reference.affine_relu_backward_``: accumulates into ``grad_x`` (shape of ``x``, any
    strides and floating dtype, or None to skip it; ``accumulate=False``: overwrites it),
    ``grad_scale`` and ``grad_shift`` (per-channel, float32; float64 for float64 ``x``)."""
    rt.check_features("x", x)
    N, C, H, W = x.shape
    dev = x.device
    rt.check_vector("scale", scale, C, dev)
    rt.check_vector("shift", shift, C, dev)
    rt.check_features("grad_z", grad_z)
    rt.check_same_shape("grad_z", grad_z, x.shape, "x")
    rt.check_device("grad_z", grad_z, dev)
    if grad_x is not None:
        rt.check_writable_grad("grad_x", grad_x, x.shape, dev)
    sdt = rt.stats_dtype(x.dtype)
    rt.check_vector("grad_scale", grad_scale, C, dev, sdt)
    rt.check_vector("grad_shift", grad_shift, C, dev, sdt)
    L = N * H * W
    if x.numel() == 0:
        return
    rows = [pixel_rows.row_stride(t) for t in (x, grad_z)] + \
        [pixel_rows.row_stride(grad_x) if grad_x is not None else 0]
    if None not in rows:  # NHWC: tiles of pixel rows, loads along channels
        pixel_rows.affine_relu_backward_(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift,
                                         accumulate, *rows)
        return
    interp = rt.interpreting(_affine_relu_backward_kernel, dev)
    block = INTERPRET_BLOCK if interp else GPU_BLOCK
    blocks = rt.cdiv(L, block)
    if interp:
        n_chunks = min(INTERPRET_CHUNKS, blocks)
    else:
        n_chunks = max(1, min(rt.cdiv(4 * rt.sm_count(dev), C), blocks // 8))
    chunk = rt.cdiv(blocks, n_chunks) * block
    n_chunks = rt.cdiv(L, chunk)
    has_gx = grad_x is not None
    gx = grad_x if has_gx else grad_z  # placeholder pointer, never dereferenced
    gx_strides = grad_x.stride() if has_gx else (0, 0, 0, 0)
    args = (x, scale, shift, grad_z, gx, grad_scale, grad_shift, N, C, H, W,
            *x.stride(), *grad_z.stride(), *gx_strides,
            scale.stride(0), shift.stride(0), grad_scale.stride(0), grad_shift.stride(0), chunk)
    rt.launch(_affine_relu_backward_kernel, (C, n_chunks), args,
              dict(HAS_GX=has_gx, ACCUMULATE=bool(accumulate), ACC_DTYPE=rt.acc_tl_dtype(x.dtype)),
              dict(BLOCK=block, num_warps=4), dev)
