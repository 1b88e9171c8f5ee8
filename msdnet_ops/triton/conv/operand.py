"""Device helpers of the convolution kernels: GEMM rows as pixels, and the input operand built
on the fly in a GEMM prologue (never materialised)."""
from __future__ import annotations

import triton
import triton.language as tl

from .._math import relu


@triton.jit
def pixels_of_rows(offs, rows, H, W):
    """``(n, h, w)`` of GEMM rows ``offs`` numbering the pixels of ``[N, H, W]`` (row-major),
    and whether each row is one (``offs < rows``)."""
    w = offs % W
    t = offs // W
    return t // H, t % H, w, offs < rows


@triton.jit
def load_input_tile(x_ptr, row, valid, offs_k, mask_k, sxc, sxh, sxw, scale_ptr, shift_ptr,
                    TRANSFORM: tl.constexpr, POOL: tl.constexpr, ACC_DTYPE: tl.constexpr,
                    X_DTYPE: tl.constexpr):
    """The ``[rows, BLOCK_K]`` tile ``z[row, k]`` in ``X_DTYPE``, zero where ``valid`` (per row)
    or ``mask_k`` (per channel) is false (zero padding applies to ``z``).

    ``z = relu(scale*x + shift)`` when ``TRANSFORM``, else ``x`` as stored (activated buffer
    channels); averaged over the 2x2 window whose top-left pixel is at offset ``row`` when
    ``POOL == 2``. ``row`` holds int32 element offsets from ``x_ptr`` (one per row), ``offs_k``
    the channels."""
    mask = valid[:, None] & mask_k[None, :]
    offs = row[:, None] + (offs_k * sxc)[None, :]
    if TRANSFORM:
        sc = tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0).to(ACC_DTYPE)[None, :]
        sh = tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0).to(ACC_DTYPE)[None, :]
    if POOL == 1:
        xv = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if TRANSFORM:
            z = tl.where(mask, relu(xv.to(ACC_DTYPE) * sc + sh), 0.0)
        else:
            z = xv
    else:
        z = tl.zeros(offs.shape, dtype=ACC_DTYPE)
        for dy in tl.static_range(POOL):
            for dx in tl.static_range(POOL):
                xv = tl.load(x_ptr + (offs + (dy * sxh + dx * sxw)), mask=mask, other=0.0)
                if TRANSFORM:
                    # the reference pools z already rounded to x's dtype
                    xv = relu(xv.to(ACC_DTYPE) * sc + sh).to(X_DTYPE)
                z += xv.to(ACC_DTYPE)
        z = tl.where(mask, z * (1.0 / (POOL * POOL)), 0.0)
    return z.to(X_DTYPE)
