"""Weight-gradient kernel of transform-conv: ``grad_W[co, ci, kh, kw] = sum_p grad_out[p, co] * z[p@tap, ci]``.

A GEMM per tap with rows ``Cout``, columns ``Cin`` and the reduction over the output pixels
``N*Ho*Wo``. The ``[BLOCK_P, BLOCK_CI]`` operand ``z = relu(scale*x + shift)`` (2x2-average
pooled when ``pool == 2``) is recomputed on the fly from ``x`` in the prologue, never
materialized. The pixel reduction is split over a grid axis (split-K, for parallelism: the
output is small, the reduction long); partial tiles are atomically added into a zeroed
float32 (float64) buffer.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

from . import _runtime as rt


@triton.jit
def _transform_conv_wgrad_kernel(
    gy_ptr, x_ptr, scale_ptr, shift_ptr, gw_ptr,
    N, Cin, H, W, Cout, Ho, Wo,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    s_scale, s_shift,
    swo, swi, swh, sww,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, POOL: tl.constexpr,
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
    kw = tap % KSIZE

    offs_co = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    mask_co = offs_co < Cout
    offs_ci = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    mask_ci = offs_ci < Cin
    sc = tl.load(scale_ptr + offs_ci * s_scale, mask=mask_ci, other=0.0).to(ACC_DTYPE)
    sh = tl.load(shift_ptr + offs_ci * s_shift, mask=mask_ci, other=0.0).to(ACC_DTYPE)
    arange_p = tl.arange(0, BLOCK_P)

    P = N * Ho * Wo
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC_DTYPE)
    for p0 in range(pid_k * BLOCK_P, P, split * BLOCK_P):
        offs_p = p0 + arange_p
        mask_p = offs_p < P
        ow = offs_p % Wo
        t = offs_p // Wo
        oh = t % Ho
        n64 = (t // Ho).to(tl.int64)

        a_ptrs = gy_ptr + (n64 * sgn + oh * sgh + ow * sgw)[None, :] + (offs_co * sgc)[:, None]
        a = tl.load(a_ptrs, mask=mask_co[:, None] & mask_p[None, :], other=0.0).to(X_DTYPE)

        if POOL == 1:
            ih = oh * STRIDE - PAD + kh
            iw = ow * STRIDE - PAD + kw
            valid = mask_p & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            bmask = valid[:, None] & mask_ci[None, :]
            x_ptrs = x_ptr + (n64 * sxn + ih * sxh + iw * sxw)[:, None] + (offs_ci * sxc)[None, :]
            xv = tl.load(x_ptrs, mask=bmask, other=0.0).to(ACC_DTYPE)
            z = tl.maximum(xv * sc[None, :] + sh[None, :], 0.0)
            b = tl.where(bmask, z, 0.0).to(X_DTYPE)
        else:
            bmask = mask_p[:, None] & mask_ci[None, :]
            x_ptrs = x_ptr + (n64 * sxn + (oh * POOL) * sxh + (ow * POOL) * sxw)[:, None] + (offs_ci * sxc)[None, :]
            zsum = tl.zeros((BLOCK_P, BLOCK_CI), dtype=ACC_DTYPE)
            for dy in tl.static_range(POOL):
                for dx in tl.static_range(POOL):
                    xv = tl.load(x_ptrs + (dy * sxh + dx * sxw), mask=bmask, other=0.0).to(ACC_DTYPE)
                    z = tl.maximum(xv * sc[None, :] + sh[None, :], 0.0)
                    zsum += z.to(X_DTYPE).to(ACC_DTYPE)
            b = tl.where(bmask, zsum * (1.0 / (POOL * POOL)), 0.0).to(X_DTYPE)
        if DOT_UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    gw_ptrs = gw_ptr + (offs_co * swo)[:, None] + (offs_ci * swi)[None, :] + (kh * swh + kw * sww)
    tl.atomic_add(gw_ptrs, acc.to(gw_ptr.dtype.element_ty), mask=mask_co[:, None] & mask_ci[None, :])


# GPU configs: (BLOCK_CO, BLOCK_CI, BLOCK_P, num_warps, num_stages)
_GPU_CONFIGS = [
    (64, 64, 64, 4, 3),
    (128, 64, 32, 4, 4),
    (32, 64, 64, 4, 4),
    (64, 128, 32, 8, 3),
]
INTERPRET_BLOCKS = dict(BLOCK_CO=16, BLOCK_CI=16, BLOCK_P=32)
INTERPRET_SPLIT = 2


def _prune_co(configs, named_args, **kwargs):
    cout = named_args["Cout"]
    limit = max(32, rt.next_pow2(cout))
    kept = [c for c in configs if c.kwargs["BLOCK_CO"] <= limit]
    return kept or configs[:1]


@functools.lru_cache(maxsize=None)
def _tuned_wgrad():
    configs = [triton.Config(dict(BLOCK_CO=bo, BLOCK_CI=bi, BLOCK_P=bp), num_warps=w, num_stages=s)
               for bo, bi, bp, w, s in _GPU_CONFIGS]
    return triton.autotune(configs=configs,
                           key=["N", "Cin", "H", "W", "Cout", "KSIZE", "STRIDE", "POOL"],
                           prune_configs_by={"early_config_prune": _prune_co},
                           reset_to_zero=["gw_ptr"])(_transform_conv_wgrad_kernel)


def launch_wgrad(grad_out, x, scale, shift, weight, stride, padding, pool, grad_w, k, Ho, Wo) -> None:
    """Add the weight gradient into ``grad_w`` (zero-initialized float32/float64, shape of weight)."""
    N, Cin, H, W = x.shape
    Cout = weight.shape[0]
    dev = x.device
    P = N * Ho * Wo
    taps = k * k
    interp = rt.interpreting(_transform_conv_wgrad_kernel, dev)
    target = 4 * rt.sm_count(dev)

    def grid(META):
        tiles = triton.cdiv(Cout, META["BLOCK_CO"]) * triton.cdiv(Cin, META["BLOCK_CI"])
        kblocks = triton.cdiv(P, META["BLOCK_P"])
        if interp:
            split = min(INTERPRET_SPLIT, kblocks)
        else:  # enough programs to fill the GPU, each reducing at least 8 pixel blocks
            split = max(1, min(triton.cdiv(target, tiles * taps), kblocks // 8))
        return (tiles, taps, split)

    args = (grad_out, x, scale, shift, grad_w,
            N, Cin, H, W, Cout, Ho, Wo,
            *grad_out.stride(), *x.stride(), scale.stride(0), shift.stride(0), *grad_w.stride())
    meta = dict(KSIZE=k, STRIDE=stride, PAD=padding, POOL=pool,
                ACC_DTYPE=rt.acc_tl_dtype(x.dtype), X_DTYPE=rt.tl_dtype(x.dtype),
                DOT_UPCAST=rt.dot_upcast(_transform_conv_wgrad_kernel, x.dtype, dev),
                INPUT_PRECISION=rt.input_precision(x.dtype, dev))
    rt.launch(_transform_conv_wgrad_kernel, _tuned_wgrad, grid, args, meta, INTERPRET_BLOCKS, dev)
