"""Forward kernel: ``out = conv2d(avg_pool(z, pool), weight)`` with ``z = relu(scale*x+shift)``
(``TRANSFORM``) or ``z = x``.

An implicit GEMM over ``M = N*Ho*Wo`` output pixels (rows), ``Cout`` (columns) and
``K = k*k*Cin``, walked as ONE loop over (tap, channel block) pairs, so that a 3x3 has one
pipelined main loop, not nine. The prologue builds the ``[BLOCK_M, BLOCK_K]`` operand from ``x``
through its strides (:func:`operand.load_input_tile`); the accumulator is float32 (float64 for
float64); the epilogue writes ``out`` through its strides (a channel slice of another buffer).
Every offset is int32 from the base of the launch's batch chunk (see ``args.batch_chunks``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .. import _autotune
from .. import _runtime as rt
from .operand import load_input_tile, pixels_of_rows


@triton.jit(do_not_specialize_on_alignment=["scale_ptr", "shift_ptr"])
def _conv_fwd_kernel(
    x_ptr, scale_ptr, shift_ptr, w_ptr, out_ptr,
    M, Cin, H, W, Cout, Ho, Wo,
    sxn, sxc, sxh, sxw,
    swo, swi, swh, sww,
    son, soc, soh, sow,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, POOL: tl.constexpr,
    TRANSFORM: tl.constexpr,
    ACC_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr, DOT_UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)

    n, oh, ow, mask_m = pixels_of_rows(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), M, Ho, Wo)
    # top-left input pixel of each row's window (POOL == 2 implies STRIDE == 1, PAD == 0)
    ih0 = oh * (STRIDE * POOL) - PAD
    iw0 = ow * (STRIDE * POOL) - PAD
    row0 = n * sxn + ih0 * sxh + iw0 * sxw

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < Cout
    arange_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    k_blocks = tl.cdiv(Cin, BLOCK_K)
    for i in range(0, KSIZE * KSIZE * k_blocks):
        if KSIZE == 1:
            kh = 0
            kw = 0
            k0 = i * BLOCK_K
        else:
            tap = i // k_blocks
            k0 = (i - tap * k_blocks) * BLOCK_K
            kh = tap // KSIZE
            kw = tap - kh * KSIZE
        offs_k = k0 + arange_k
        mask_k = offs_k < Cin
        if PAD == 0:  # every tap inside the image
            valid = mask_m
        else:
            ih = ih0 + kh
            iw = iw0 + kw
            valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = load_input_tile(x_ptr, row0 + (kh * sxh + kw * sxw), valid, offs_k, mask_k,
                            sxc, sxh, sxw, scale_ptr, shift_ptr, TRANSFORM, POOL, ACC_DTYPE, X_DTYPE)
        b_offs = (offs_k * swi)[:, None] + (offs_n * swo)[None, :] + (kh * swh + kw * sww)
        b = tl.load(w_ptr + b_offs, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(X_DTYPE)
        if DOT_UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    o_offs = (n * son + oh * soh + ow * sow)[:, None] + (offs_n * soc)[None, :]
    tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# Interpreter (CPU) blocks: small, so that tiny test shapes still exercise several tiles.
INTERPRET_BLOCKS = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16)


def launch_forward(x, scale, shift, weight, g, out) -> None:
    """``out = conv(pool(z))`` over one batch chunk (arguments validated; ``scale`` None: no
    transform)."""
    dev = x.device
    transform = scale is not None
    vec = (scale.contiguous(), shift.contiguous()) if transform else (weight, weight)  # placeholders
    M = x.shape[0] * g.Ho * g.Wo
    args = (x, *vec, weight, out,
            M, g.Cin, g.H, g.W, g.Cout, g.Ho, g.Wo,
            *x.stride(), *weight.stride(), *out.stride())
    meta = dict(KSIZE=g.k, STRIDE=g.stride, PAD=g.padding, POOL=g.pool, TRANSFORM=transform,
                ACC_DTYPE=rt.acc_tl_dtype(x.dtype), X_DTYPE=rt.tl_dtype(x.dtype),
                DOT_UPCAST=rt.dot_upcast(_conv_fwd_kernel, x.dtype, dev),
                INPUT_PRECISION=rt.input_precision(x.dtype, dev))
    tuning = _autotune.Tuning("conv_fwd", _autotune.operand_class(x.dtype),
                              _autotune.shape_class(g.k, g.pool),
                              width=("Cout", "BLOCK_N"),
                              key=("M", "Cin", "H", "W", "Cout", "STRIDE", "PAD", "POOL", "TRANSFORM"))

    def grid(META):
        return (rt.cdiv(M, META["BLOCK_M"]), rt.cdiv(g.Cout, META["BLOCK_N"]))

    rt.launch(_conv_fwd_kernel, grid, args, meta, INTERPRET_BLOCKS, dev, tuning)
