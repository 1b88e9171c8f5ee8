"""Weight-gradient kernel: ``grad_W[co, ci, kh, kw] = sum_p grad_out[p, co] * z[p@tap, ci]``.

A GEMM per tap (a grid axis) with rows ``Cout``, columns ``Cin`` and the reduction over the
output pixels ``N*Ho*Wo``. The ``[BLOCK_P, BLOCK_CI]`` operand ``z`` (transformed and pooled as
in the forward) is rebuilt in the prologue by :func:`operand.load_input_tile`, never
materialised. The pixel reduction is split over a grid axis (split-K: the output is small, the
reduction long); partial tiles are atomically added into a zeroed float32 (float64) buffer,
which the dgrad kernel launched before it zeroes (``dgrad.launch_dgrad``'s ``zero``; a fill of
its own only where no dgrad runs).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .. import _autotune
from .. import _runtime as rt
from .operand import load_input_tile, pixels_of_rows


@triton.jit(do_not_specialize_on_alignment=["scale_ptr", "shift_ptr"])
def _conv_wgrad_kernel(
    gy_ptr, x_ptr, scale_ptr, shift_ptr, gw_ptr,
    P, Cin, H, W, Cout, Ho, Wo,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    swo, swi, swh, sww,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, POOL: tl.constexpr,
    TRANSFORM: tl.constexpr,
    ACC_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr, DOT_UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_t = tl.program_id(0)
    tap = tl.program_id(1)
    pid_k = tl.program_id(2)
    split = tl.num_programs(2)
    n_co = tl.cdiv(Cout, BLOCK_CO)
    pid_co = pid_t % n_co
    pid_ci = pid_t // n_co
    kh = tap // KSIZE
    kw = tap - kh * KSIZE

    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask_co = offs_co < Cout
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    mask_ci = offs_ci < Cin
    arange_p = tl.arange(0, BLOCK_P)

    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC_DTYPE)
    for p0 in range(pid_k * BLOCK_P, P, split * BLOCK_P):
        n, oh, ow, mask_p = pixels_of_rows(p0 + arange_p, P, Ho, Wo)

        a_offs = (offs_co * sgc)[:, None] + (n * sgn + oh * sgh + ow * sgw)[None, :]
        a = tl.load(gy_ptr + a_offs, mask=mask_co[:, None] & mask_p[None, :], other=0.0).to(X_DTYPE)

        ih = oh * (STRIDE * POOL) - PAD + kh
        iw = ow * (STRIDE * POOL) - PAD + kw
        if PAD == 0:  # every tap inside the image
            valid = mask_p
        else:
            valid = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        b = load_input_tile(x_ptr, n * sxn + ih * sxh + iw * sxw, valid, offs_ci, mask_ci,
                            sxc, sxh, sxw, scale_ptr, shift_ptr, TRANSFORM, POOL, ACC_DTYPE, X_DTYPE)
        if DOT_UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    gw_offs = (offs_co * swo)[:, None] + (offs_ci * swi)[None, :] + (kh * swh + kw * sww)
    tl.atomic_add(gw_ptr + gw_offs, acc.to(gw_ptr.dtype.element_ty), mask=mask_co[:, None] & mask_ci[None, :])


INTERPRET_BLOCKS = dict(BLOCK_CO=16, BLOCK_CI=16, BLOCK_P=32)
INTERPRET_SPLIT = 2


def launch_wgrad(grad_out, x, scale, shift, g, grad_w) -> None:
    """Add the weight gradient of one batch chunk into ``grad_w`` (float32/float64, shape of
    the weight). ``scale`` None: no transform."""
    dev = x.device
    transform = scale is not None
    vecs = (scale.contiguous(), shift.contiguous()) if transform else (grad_w, grad_w)  # placeholders
    P = x.shape[0] * g.Ho * g.Wo
    taps = g.k * g.k
    interp = rt.interpreting(_conv_wgrad_kernel, dev)
    target = 4 * rt.sm_count(dev)

    def grid(META):
        tiles = rt.cdiv(g.Cout, META["BLOCK_CO"]) * rt.cdiv(g.Cin, META["BLOCK_CI"])
        kblocks = rt.cdiv(P, META["BLOCK_P"])
        if interp:
            split = min(INTERPRET_SPLIT, kblocks)
        else:  # enough programs to fill the GPU, each reducing at least 8 pixel blocks
            split = max(1, min(rt.cdiv(target, tiles * taps), kblocks // 8))
        return (tiles, taps, split)

    args = (grad_out, x, *vecs, grad_w,
            P, g.Cin, g.H, g.W, g.Cout, g.Ho, g.Wo,
            *grad_out.stride(), *x.stride(), *grad_w.stride())
    meta = dict(KSIZE=g.k, STRIDE=g.stride, PAD=g.padding, POOL=g.pool, TRANSFORM=transform,
                ACC_DTYPE=rt.acc_tl_dtype(x.dtype), X_DTYPE=rt.tl_dtype(x.dtype),
                DOT_UPCAST=rt.dot_upcast(_conv_wgrad_kernel, x.dtype, dev),
                INPUT_PRECISION=rt.input_precision(x.dtype, dev))
    tuning = _autotune.Tuning("conv_wgrad", _autotune.operand_class(x.dtype),
                              _autotune.shape_class(g.k, g.pool),
                              width=("Cout", "BLOCK_CO"),
                              key=("P", "Cin", "H", "W", "Cout", "STRIDE", "PAD", "POOL", "TRANSFORM"),
                              reset=("gw_ptr",))
    rt.launch(_conv_wgrad_kernel, grid, args, meta, INTERPRET_BLOCKS, dev, tuning)
