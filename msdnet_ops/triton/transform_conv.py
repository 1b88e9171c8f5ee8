"""Forward transform-conv: ``out = conv2d(avg_pool(relu(scale*x+shift), pool), weight)``.

One kernel, an implicit GEMM over ``M = N*Ho*Wo`` output pixels (rows), ``Cout`` (columns) and
``K = Cin*k*k`` (the taps are unrolled, the input channels looped over in ``BLOCK_K`` steps).
The prologue loads the ``[BLOCK_M, BLOCK_K]`` tile of ``x`` through its strides (a buffer
prefix is read in place), applies the per-channel transform (and the 2x2 average pooling of a
DenseNet transition when ``pool == 2``), rounds to ``x``'s dtype and feeds ``tl.dot``; the
accumulator is float32 (float64 for float64). Zero padding applies to the transformed values
(``z``), as in the reference. The epilogue writes ``out`` through its strides (a channel slice
of another buffer), masked to its extent.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _runtime as rt


@triton.jit
def _transform_conv_fwd_kernel(
    x_ptr, scale_ptr, shift_ptr, w_ptr, out_ptr,
    N, Cin, H, W, Cout, Ho, Wo,
    sxn, sxc, sxh, sxw,
    s_scale, s_shift,
    swo, swi, swh, sww,
    son, soc, soh, sow,
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr, POOL: tl.constexpr,
    ACC_DTYPE: tl.constexpr, X_DTYPE: tl.constexpr, DOT_UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    M = N * Ho * Wo

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    ow = offs_m % Wo
    t = offs_m // Wo
    oh = t % Ho
    n = t // Ho
    x_row = x_ptr + n.to(tl.int64) * sxn  # [BLOCK_M] pointers to each row's image

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < Cout
    arange_k = tl.arange(0, BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for kh in tl.static_range(KSIZE):
        for kw in tl.static_range(KSIZE):
            if POOL == 1:
                ih = oh * STRIDE - PAD + kh
                iw = ow * STRIDE - PAD + kw
                valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                sp = ih * sxh + iw * sxw
            else:
                ih = oh * POOL
                iw = ow * POOL
                valid = mask_m
                sp = ih * sxh + iw * sxw
            for k0 in range(0, Cin, BLOCK_K):
                offs_k = k0 + arange_k
                mask_k = offs_k < Cin
                sc = tl.load(scale_ptr + offs_k * s_scale, mask=mask_k, other=0.0).to(ACC_DTYPE)
                sh = tl.load(shift_ptr + offs_k * s_shift, mask=mask_k, other=0.0).to(ACC_DTYPE)
                amask = valid[:, None] & mask_k[None, :]
                a_ptrs = x_row[:, None] + (sp[:, None] + offs_k[None, :] * sxc)
                if POOL == 1:
                    xv = tl.load(a_ptrs, mask=amask, other=0.0).to(ACC_DTYPE)
                    z = tl.maximum(xv * sc[None, :] + sh[None, :], 0.0)
                    z = tl.where(amask, z, 0.0)
                    a = z.to(X_DTYPE)
                else:
                    zsum = tl.zeros((BLOCK_M, BLOCK_K), dtype=ACC_DTYPE)
                    for dy in tl.static_range(POOL):
                        for dx in tl.static_range(POOL):
                            xv = tl.load(a_ptrs + (dy * sxh + dx * sxw), mask=amask, other=0.0).to(ACC_DTYPE)
                            z = tl.maximum(xv * sc[None, :] + sh[None, :], 0.0)
                            # the reference pools z already rounded to x's dtype
                            zsum += z.to(X_DTYPE).to(ACC_DTYPE)
                    z = tl.where(amask, zsum * (1.0 / (POOL * POOL)), 0.0)
                    a = z.to(X_DTYPE)
                b_ptrs = w_ptr + (offs_n[None, :] * swo + offs_k[:, None] * swi + kh * swh + kw * sww)
                b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(X_DTYPE)
                if DOT_UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    o_ptrs = out_ptr + (n.to(tl.int64) * son + oh * soh + ow * sow)[:, None] + (offs_n * soc)[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# GPU configs: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
_GPU_CONFIGS = [
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (128, 32, 32, 4, 4),
    (64, 32, 64, 4, 3),
]
# Interpreter (CPU) config: small, so that tiny test shapes still exercise several tiles.
INTERPRET_BLOCKS = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16)


def _prune_n(configs, named_args, **kwargs):
    """Drop configs whose column tile is much wider than the output channels."""
    cout = named_args["Cout"]
    limit = max(32, rt.next_pow2(cout))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= limit]
    return kept or configs[:1]


@functools.lru_cache(maxsize=None)
def _tuned_fwd():
    configs = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=w, num_stages=s)
               for bm, bn, bk, w, s in _GPU_CONFIGS]
    return triton.autotune(configs=configs,
                           key=["N", "Cin", "H", "W", "Cout", "KSIZE", "STRIDE", "POOL"],
                           prune_configs_by={"early_config_prune": _prune_n})(_transform_conv_fwd_kernel)


def conv_out_size(size: int, k: int, stride: int, padding: int, pool: int) -> int:
    size = size // pool
    return (size + 2 * padding - k) // stride + 1


def check_conv_args(x, scale, shift, weight, stride, padding, pool):
    """Validate the arguments shared by forward and backward; returns (N, Cin, H, W, Cout, k, Ho, Wo)."""
    rt.check_features("x", x)
    N, Cin, H, W = x.shape
    rt.check_vector("scale", scale, Cin, x.device)
    rt.check_vector("shift", shift, Cin, x.device)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"weight: expected a 4-d [Cout, Cin, k, k] tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    Cout, wcin, kh, kw = weight.shape
    if wcin != Cin or kh != kw or kh not in (1, 3):
        raise ValueError(f"weight: expected shape [Cout, {Cin}, k, k] with k in (1, 3), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected dtype {x.dtype} (as x), got {weight.dtype}")
    rt.check_device("weight", weight, x.device)
    if any(s < 0 for s in weight.stride()):
        raise ValueError("weight: negative strides are not supported")
    k = kh
    if stride not in (1, 2):
        raise ValueError(f"stride: expected 1 or 2, got {stride}")
    if not isinstance(padding, int) or not 0 <= padding <= min(k, 2):
        raise ValueError(f"padding: expected an int in [0, {min(k, 2)}], got {padding}")
    if pool not in (1, 2):
        raise ValueError(f"pool: expected 1 or 2, got {pool}")
    if pool == 2 and (k != 1 or stride != 1 or padding != 0):
        raise ValueError("pool=2 is only supported with a 1x1 kernel, stride 1 and padding 0 "
                         f"(got k={k}, stride={stride}, padding={padding})")
    Ho = conv_out_size(H, k, stride, padding, pool)
    Wo = conv_out_size(W, k, stride, padding, pool)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"x: spatial size {H}x{W} is too small for k={k}, stride={stride}, "
                         f"padding={padding}, pool={pool}")
    return N, Cin, H, W, Cout, k, Ho, Wo


def transform_conv_into(x, scale, shift, weight, stride, padding, pool, out) -> None:
    """``out[...] = conv2d(avg_pool(relu(scale*x+shift), pool), weight, stride, padding)``.

    ``x`` (NCHW, any strides), ``scale``/``shift`` (per-channel, float32 or float64),
    ``weight`` ``[Cout, Cin, k, k]`` with ``k`` in (1, 3) and ``x``'s dtype; ``out``
    ``[N, Cout, Ho, Wo]`` of ``x``'s dtype, any strides (e.g. a channel slice of a buffer),
    written in place and nowhere else."""
    N, Cin, H, W, Cout, k, Ho, Wo = check_conv_args(x, scale, shift, weight, stride, padding, pool)
    rt.check_features("out", out)
    rt.check_same_shape("out", out, (N, Cout, Ho, Wo), "the convolution's output")
    if out.dtype != x.dtype:
        raise TypeError(f"out: expected dtype {x.dtype} (as x), got {out.dtype}")
    rt.check_device("out", out, x.device)
    if out.numel() == 0:
        return
    if Cin == 0:
        out.zero_()
        return

    dev = x.device
    args = (x, scale, shift, weight, out,
            N, Cin, H, W, Cout, Ho, Wo,
            *x.stride(), scale.stride(0), shift.stride(0), *weight.stride(), *out.stride())
    meta = dict(KSIZE=k, STRIDE=stride, PAD=padding, POOL=pool,
                ACC_DTYPE=rt.acc_tl_dtype(x.dtype), X_DTYPE=rt.tl_dtype(x.dtype),
                DOT_UPCAST=rt.dot_upcast(_transform_conv_fwd_kernel, x.dtype, dev),
                INPUT_PRECISION=rt.input_precision(x.dtype, dev))
    M = N * Ho * Wo

    def grid(META):
        return (triton.cdiv(M, META["BLOCK_M"]), triton.cdiv(Cout, META["BLOCK_N"]))

    rt.launch(_transform_conv_fwd_kernel, _tuned_fwd, grid, args, meta, INTERPRET_BLOCKS, dev)


def transform_conv(x, scale, shift, weight, stride, padding, pool):
    """Allocating variant of :func:`transform_conv_into` (contiguous output)."""
    N, Cin, H, W, Cout, k, Ho, Wo = check_conv_args(x, scale, shift, weight, stride, padding, pool)
    out = torch.empty((N, Cout, Ho, Wo), dtype=x.dtype, device=x.device)
    transform_conv_into(x, scale, shift, weight, stride, padding, pool, out)
    return out
