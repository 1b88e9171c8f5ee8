"""Data-gradient kernel of transform-conv, with the transform's backward in its epilogue.

GEMM of ``grad_out`` with ``W^T``: rows are input pixels, columns input channels, the
reduction runs over output channels for each tap (the transposed implicit GEMM of a 3x3).

* Stride 2 is split into its 4 phases (a grid axis): the input pixels of one phase
  ``(ih % 2, iw % 2)`` receive gradient from the same taps only, so each program runs just
  the taps that reach its phase (no masked-out work).
* ``pool == 2`` (1x1, stride 1): rows are pooled pixels; the GEMM gives ``grad_zp`` once and
  the epilogue spreads ``grad_zp / 4`` to the 2x2 input pixels it came from.

Epilogue, at each input position: ``pre = scale*x + shift`` is recomputed from ``x``,
``dpre = dz * (pre > 0)``, ``grad_x += scale * dpre`` (read-modify-write through
``grad_x``'s strides; every element belongs to one program) and the per-channel sums of
``dpre * x`` and ``dpre`` are atomically added to ``grad_scale`` and ``grad_shift``.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

from . import _runtime as rt


@triton.jit
def _transform_conv_dgrad_kernel(
    gy_ptr, x_ptr, scale_ptr, shift_ptr, w_ptr, gx_ptr, gscale_ptr, gshift_ptr,
    N, Cin, H, W, Cout, Ho, Wo, Hq, Wq,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    s_scale, s_shift,
    swo, swi, swh, sww,
    sdn, sdc, sdh, sdw,
    s_gscale, s_gshift,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, POOL: tl.constexpr,
    HAS_GX: tl.constexpr,
    ACC_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr, DOT_UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2)
    ph = phase // STRIDE
    pw = phase % STRIDE
    M = N * Hq * Wq

    # rows: (n, qh, qw); input pixel (qh*STRIDE + ph, qw*STRIDE + pw), or pooled pixel (qh, qw)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    qw = offs_m % Wq
    t = offs_m // Wq
    qh = t % Hq
    n = t // Hq
    n64 = n.to(tl.int64)
    if POOL == 1:
        ih = qh * STRIDE + ph
        iw = qw * STRIDE + pw
        row_valid = mask_m & (ih < H) & (iw < W)
    else:
        row_valid = mask_m

    offs_c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_c = offs_c < Cin
    arange_k = tl.arange(0, BLOCK_K)
    gy_row = gy_ptr + n64 * sgn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for kh in tl.static_range(KSIZE):
        for kw in tl.static_range(KSIZE):
            # ih = oh*STRIDE - PAD + kh  =>  oh = qh + (ph + PAD - kh) / STRIDE when divisible
            dh = ph + (PAD - kh + 2 * STRIDE)
            dw = pw + (PAD - kw + 2 * STRIDE)
            if ((dh % STRIDE) == 0) & ((dw % STRIDE) == 0):
                oh = qh + (dh // STRIDE - 2)
                ow = qw + (dw // STRIDE - 2)
                valid = row_valid & (oh >= 0) & (oh < Ho) & (ow >= 0) & (ow < Wo)
                sp = oh * sgh + ow * sgw
                for k0 in range(0, Cout, BLOCK_K):
                    offs_k = k0 + arange_k
                    mask_k = offs_k < Cout
                    a_ptrs = gy_row[:, None] + (sp[:, None] + offs_k[None, :] * sgc)
                    a = tl.load(a_ptrs, mask=valid[:, None] & mask_k[None, :], other=0.0).to(X_DTYPE)
                    b_ptrs = w_ptr + (offs_k[:, None] * swo + offs_c[None, :] * swi + kh * swh + kw * sww)
                    b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_c[None, :], other=0.0).to(X_DTYPE)
                    if DOT_UPCAST:
                        a = a.to(tl.float32)
                        b = b.to(tl.float32)
                    acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    # ---- epilogue: transform backward at the input positions
    sc = tl.load(scale_ptr + offs_c * s_scale, mask=mask_c, other=0.0).to(ACC_DTYPE)
    sh = tl.load(shift_ptr + offs_c * s_shift, mask=mask_c, other=0.0).to(ACC_DTYPE)
    sum_dx = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    sum_d = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    if POOL == 1:
        emask = row_valid[:, None] & mask_c[None, :]
        x_ptrs = x_ptr + (n64 * sxn + ih * sxh + iw * sxw)[:, None] + (offs_c * sxc)[None, :]
        xv = tl.load(x_ptrs, mask=emask, other=0.0).to(ACC_DTYPE)
        pre = xv * sc[None, :] + sh[None, :]
        dpre = tl.where(emask & (pre > 0), acc, 0.0)
        if HAS_GX:
            g_ptrs = gx_ptr + (n64 * sdn + ih * sdh + iw * sdw)[:, None] + (offs_c * sdc)[None, :]
            g = tl.load(g_ptrs, mask=emask, other=0.0).to(ACC_DTYPE)
            tl.store(g_ptrs, (g + dpre * sc[None, :]).to(gx_ptr.dtype.element_ty), mask=emask)
        sum_dx += tl.sum(dpre * xv, axis=0)
        sum_d += tl.sum(dpre, axis=0)
    else:
        emask = row_valid[:, None] & mask_c[None, :]
        dz = acc * (1.0 / (POOL * POOL))
        for dy in tl.static_range(POOL):
            for dx in tl.static_range(POOL):
                ih = qh * POOL + dy
                iw = qw * POOL + dx
                x_ptrs = x_ptr + (n64 * sxn + ih * sxh + iw * sxw)[:, None] + (offs_c * sxc)[None, :]
                xv = tl.load(x_ptrs, mask=emask, other=0.0).to(ACC_DTYPE)
                pre = xv * sc[None, :] + sh[None, :]
                dpre = tl.where(emask & (pre > 0), dz, 0.0)
                if HAS_GX:
                    g_ptrs = gx_ptr + (n64 * sdn + ih * sdh + iw * sdw)[:, None] + (offs_c * sdc)[None, :]
                    g = tl.load(g_ptrs, mask=emask, other=0.0).to(ACC_DTYPE)
                    tl.store(g_ptrs, (g + dpre * sc[None, :]).to(gx_ptr.dtype.element_ty), mask=emask)
                sum_dx += tl.sum(dpre * xv, axis=0)
                sum_d += tl.sum(dpre, axis=0)
    tl.atomic_add(gscale_ptr + offs_c * s_gscale, sum_dx.to(gscale_ptr.dtype.element_ty), mask=mask_c)
    tl.atomic_add(gshift_ptr + offs_c * s_gshift, sum_d.to(gshift_ptr.dtype.element_ty), mask=mask_c)


# GPU configs: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_GPU_CONFIGS = [
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (128, 32, 32, 4, 4),
    (64, 64, 64, 4, 3),
]
INTERPRET_BLOCKS = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16)


def _prune_n(configs, named_args, **kwargs):
    cin = named_args["Cin"]
    limit = max(32, rt.next_pow2(cin))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= limit]
    return kept or configs[:1]


@functools.lru_cache(maxsize=None)
def _tuned_dgrad():
    configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in _GPU_CONFIGS]
    # the kernel accumulates into its outputs: restore them between tuning runs
    return triton.autotune(configs=configs,
                           key=["N", "Cin", "H", "W", "Cout", "KSIZE", "STRIDE", "POOL", "HAS_GX"],
                           prune_configs_by={"early_config_prune": _prune_n},
                           restore_value=["gx_ptr", "gscale_ptr", "gshift_ptr"])(_transform_conv_dgrad_kernel)


def launch_dgrad(grad_out, x, scale, shift, weight, stride, padding, pool, grad_x, grad_scale, grad_shift,
                 k, Ho, Wo) -> None:
    """Launch the dgrad kernel (arguments already validated). ``grad_x`` may be None."""
    N, Cin, H, W = x.shape
    Cout = weight.shape[0]
    dev = x.device
    if pool == 1:
        Hq, Wq, phases = triton.cdiv(H, stride), triton.cdiv(W, stride), stride * stride
    else:
        Hq, Wq, phases = Ho, Wo, 1
    has_gx = grad_x is not None
    gx = grad_x if has_gx else grad_scale  # placeholder pointer, never dereferenced
    gx_strides = grad_x.stride() if has_gx else (0, 0, 0, 0)
    args = (grad_out, x, scale, shift, weight, gx, grad_scale, grad_shift,
            N, Cin, H, W, Cout, Ho, Wo, Hq, Wq,
            *grad_out.stride(), *x.stride(), scale.stride(0), shift.stride(0), *weight.stride(),
            *gx_strides, grad_scale.stride(0), grad_shift.stride(0))
    meta = dict(KSIZE=k, STRIDE=stride, PAD=padding, POOL=pool, HAS_GX=has_gx,
                ACC_DTYPE=rt.acc_tl_dtype(x.dtype), X_DTYPE=rt.tl_dtype(x.dtype),
                DOT_UPCAST=rt.dot_upcast(_transform_conv_dgrad_kernel, x.dtype, dev),
                INPUT_PRECISION=rt.input_precision(x.dtype, dev))
    M = N * Hq * Wq

    def grid(META):
        return (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(Cin, META["BLOCK_N"]), phases)

    rt.launch(_transform_conv_dgrad_kernel, _tuned_dgrad, grid, args, meta, INTERPRET_BLOCKS, dev)
