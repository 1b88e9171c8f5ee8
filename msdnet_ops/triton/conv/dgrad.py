"""Data-gradient kernel, with the transform's backward in its epilogue.

GEMM of ``grad_out`` with ``W^T``: rows are input pixels, columns input channels, the reduction
runs over (tap, output-channel block) pairs in one loop.

* Stride 2 is split into its 4 phases (a grid axis): the input pixels of one phase
  ``(ih % 2, iw % 2)`` receive gradient from the same taps only (``kh = kh0 + 2j``), so each
  program loops over just those taps (no masked-out work).
* ``pool == 2`` (1x1, stride 1): rows are the input pixels too, each reading the gradient of
  the pooled pixel it belongs to (``grad_zp / 4``): 4x the GEMM rows of the pooled pixels (a
  cheap 1x1), but a row's epilogue touches one pixel, contiguous with its neighbours' (NCHW).

Epilogue, at each row's input pixel: with ``TRANSFORM``, ``pre = scale*x + shift`` is
recomputed from ``x``, ``dpre = dz * (pre > 0)``, ``grad_x += scale * dpre``
(read-modify-write through ``grad_x``'s strides, or a write with ``ACCUMULATE`` off; every
element belongs to one program) and the per-channel sums of ``dpre * x`` and ``dpre`` are
atomically added to ``grad_scale`` and ``grad_shift``; without, ``grad_x += dz``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _autotune
from .. import _runtime as rt
from .operand import pixels_of_rows


ZERO_BLOCK = tl.constexpr(256)  # elements each program zeroes per step (``zero``)


@triton.jit(do_not_specialize=["n_zero"],
            do_not_specialize_on_alignment=["scale_ptr", "shift_ptr", "gscale_ptr", "gshift_ptr"])
def _conv_dgrad_kernel(
    gy_ptr, x_ptr, scale_ptr, shift_ptr, w_ptr, gx_ptr, gscale_ptr, gshift_ptr, zero_ptr,
    M, Cin, H, W, Cout, Ho, Wo, Hq, Wq, n_zero,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    swo, swi, swh, sww,
    sdn, sdc, sdh, sdw,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, POOL: tl.constexpr,
    TRANSFORM: tl.constexpr, HAS_GX: tl.constexpr, ACCUMULATE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr, DOT_UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ZERO: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2)
    ph = phase // STRIDE
    pw = phase - ph * STRIDE

    if ZERO:  # the weight gradient's accumulator, for the wgrad kernel launched next
        # (first: nothing of the GEMM is live yet, so it costs the main loop no registers)
        programs = tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2)
        first = (pid_m + tl.num_programs(0) * (pid_n + tl.num_programs(1) * phase)) * ZERO_BLOCK
        zoffs = tl.arange(0, ZERO_BLOCK)
        for z0 in range(first, n_zero, programs * ZERO_BLOCK):
            tl.store(zero_ptr + z0 + zoffs, tl.zeros((ZERO_BLOCK,), zero_ptr.dtype.element_ty),
                     mask=z0 + zoffs < n_zero)

    # rows: (n, qh, qw), input pixel (qh*STRIDE + ph, qw*STRIDE + pw); reading grad_out at
    # (qh // POOL + dh, qw // POOL + dw) for each tap
    n, qh, qw, mask_m = pixels_of_rows(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), M, Hq, Wq)
    gy_row = n * sgn + (qh // POOL) * sgh + (qw // POOL) * sgw

    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_c = offs_c < Cin
    arange_k = tl.arange(0, BLOCK_K)

    # the taps reaching this phase: kh = kh0 + STRIDE*j (ih = oh*STRIDE - PAD + kh)
    kh0 = (ph + PAD) % STRIDE
    kw0 = (pw + PAD) % STRIDE
    taps_w = (KSIZE - kw0 + STRIDE - 1) // STRIDE
    taps = ((KSIZE - kh0 + STRIDE - 1) // STRIDE) * taps_w
    k_blocks = tl.cdiv(Cout, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for i in range(0, taps * k_blocks):
        if KSIZE == 1:
            kh = kh0
            kw = kw0
            k0 = i * BLOCK_K
        else:
            tap = i // k_blocks
            k0 = (i - tap * k_blocks) * BLOCK_K
            jh = tap // taps_w
            kh = kh0 + jh * STRIDE
            kw = kw0 + (tap - jh * taps_w) * STRIDE
        # oh = qh + dh exactly (dh = (ph + PAD - kh) / STRIDE is an integer by the choice of kh)
        dh = (ph + PAD - kh) // STRIDE
        dw = (pw + PAD - kw) // STRIDE
        offs_k = k0 + arange_k
        mask_k = offs_k < Cout
        oh = qh // POOL + dh
        ow = qw // POOL + dw
        valid = mask_m & (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)
        a_offs = (gy_row + (dh * sgh + dw * sgw))[:, None] + (offs_k * sgc)[None, :]
        a = tl.load(gy_ptr + a_offs, mask=valid[:, None] & mask_k[None, :], other=0.0).to(X_DTYPE)
        b_offs = (offs_k * swo)[:, None] + (offs_c * swi)[None, :] + (kh * swh + kw * sww)
        b = tl.load(w_ptr + b_offs, mask=mask_k[:, None] & mask_c[None, :], other=0.0).to(X_DTYPE)
        if DOT_UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    # ---- epilogue at each row's input pixel
    dz = acc * (1.0 / (POOL * POOL))
    ih = qh * STRIDE + ph
    iw = qw * STRIDE + pw
    emask = (mask_m & (ih < H) & (iw < W))[:, None] & mask_c[None, :]
    if HAS_GX:
        g_offs = (n * sdn + ih * sdh + iw * sdw)[:, None] + (offs_c * sdc)[None, :]
    if TRANSFORM:
        sc = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)[None, :]
        sh = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0).to(ACC_DTYPE)[None, :]
        x_offs = (n * sxn + ih * sxh + iw * sxw)[:, None] + (offs_c * sxc)[None, :]
        xv = tl.load(x_ptr + x_offs, mask=emask, other=0.0).to(ACC_DTYPE)
        dpre = tl.where(emask & (xv * sc + sh > 0), dz, 0.0)
        tl.atomic_add(gscale_ptr + offs_c, tl.sum(dpre * xv, axis=0).to(gscale_ptr.dtype.element_ty), mask=mask_c)
        tl.atomic_add(gshift_ptr + offs_c, tl.sum(dpre, axis=0).to(gshift_ptr.dtype.element_ty), mask=mask_c)
        dz = dpre * sc
    if HAS_GX:
        if ACCUMULATE:  # else grad_x is only written: its old values are never read
            dz += tl.load(gx_ptr + g_offs, mask=emask, other=0.0).to(ACC_DTYPE)
        tl.store(gx_ptr + g_offs, dz.to(gx_ptr.dtype.element_ty), mask=emask)


INTERPRET_BLOCKS = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16)


def launch_dgrad(grad_out, x, scale, shift, weight, g, grad_x, grad_scale, grad_shift,
                 accumulate: bool = True, zero=None) -> None:
    """Launch the dgrad kernel over one batch chunk (arguments validated). ``scale`` None: no
    transform (then ``grad_x`` is required); ``grad_x`` None: only the vector gradients;
    ``accumulate=False``: ``grad_x`` is overwritten (every pixel: pool 1 or even sizes).
    ``zero``: a dense tensor the kernel's programs also fill with zeros (the weight gradient
    the wgrad kernel accumulates into next: one launch fewer than a separate fill)."""
    dev = x.device
    transform = scale is not None
    if g.pool == 1:
        Hq, Wq, phases = rt.cdiv(g.H, g.stride), rt.cdiv(g.W, g.stride), g.stride ** 2
    else:  # the input pixels of complete pooling windows (an odd last row/column gets none)
        Hq, Wq, phases = g.pool * g.Ho, g.pool * g.Wo, 1
    has_gx = grad_x is not None
    gx = grad_x if has_gx else x  # placeholder pointer, never dereferenced
    if transform:  # the kernel adds into the vector gradients as contiguous vectors
        gs = grad_scale if grad_scale.is_contiguous() else torch.zeros_like(grad_scale, memory_format=torch.contiguous_format)
        gh = grad_shift if grad_shift.is_contiguous() else torch.zeros_like(grad_shift, memory_format=torch.contiguous_format)
    vecs = (scale.contiguous(), shift.contiguous(), gs, gh) if transform else (weight,) * 4
    M = x.shape[0] * Hq * Wq
    args = (grad_out, x, vecs[0], vecs[1], weight, gx, vecs[2], vecs[3],
            weight if zero is None else zero,
            M, g.Cin, g.H, g.W, g.Cout, g.Ho, g.Wo, Hq, Wq, 0 if zero is None else zero.numel(),
            *grad_out.stride(), *x.stride(), *weight.stride(), *gx.stride())
    meta = dict(KSIZE=g.k, STRIDE=g.stride, PAD=g.padding, POOL=g.pool, TRANSFORM=transform,
                HAS_GX=has_gx, ACCUMULATE=bool(accumulate), ACC_DTYPE=rt.acc_tl_dtype(x.dtype),
                X_DTYPE=rt.tl_dtype(x.dtype),
                DOT_UPCAST=rt.dot_upcast(_conv_dgrad_kernel, x.dtype, dev),
                INPUT_PRECISION=rt.input_precision(x.dtype, dev), ZERO=zero is not None)
    # the kernel accumulates into its outputs: the autotuner restores them between its runs
    restore = (("gx_ptr",) if has_gx else ()) + (("gscale_ptr", "gshift_ptr") if transform else ())
    tuning = _autotune.Tuning("conv_dgrad", _autotune.operand_class(x.dtype),
                              _autotune.shape_class(g.k, g.pool),
                              width=("Cin", "BLOCK_N"),
                              key=("M", "Cin", "H", "W", "Cout", "STRIDE", "PAD", "POOL",
                                   "TRANSFORM", "HAS_GX", "ACCUMULATE"),
                              restore=restore)

    def grid(META):
        return (rt.cdiv(M, META["BLOCK_M"]), rt.cdiv(g.Cin, META["BLOCK_N"]), phases)

    rt.launch(_conv_dgrad_kernel, grid, args, meta, INTERPRET_BLOCKS, dev, tuning)
    if transform:
        for grad, acc in ((grad_scale, gs), (grad_shift, gh)):
            if acc is not grad:
                grad.add_(acc)
