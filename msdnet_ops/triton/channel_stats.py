"""Per-channel batch statistics and their backward.

Forward: per-channel batch statistics: ``mean`` and ``invstd = 1/sqrt(var + eps)`` (biased variance)
over (N, H, W), accumulated in float32 (float64 for float64).

Each program reduces one chunk of one channel (read through ``x``'s strides) with a per-lane
Welford update, then merges its lanes with Chan's formula. With one chunk per channel it
writes ``mean``/``invstd`` directly; otherwise it writes ``(count, mean, M2)`` partials that a
second small kernel merges (Chan again) per channel.

Backward of the channel statistics (the "finalize" step), accumulated into ``grad_x``:

    grad_x += grad_mean / n - grad_invstd * (x - mean) * invstd**3 / n      (n = N*H*W)

An element-wise kernel: one program per (image, channel) plane and block of pixels, with the
per-channel coefficients loaded once as scalars.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime as rt
from . import pixel_rows
from ._math import invstd_of


@triton.jit(do_not_specialize=["chunk"])
def _channel_stats_partial_kernel(
    x_ptr, part_ptr, mean_ptr, invstd_ptr,
    N, C, H, W,
    sxn, sxc, sxh, sxw,
    chunk, eps_hi, eps_lo,
    FINAL: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    j = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    HW = H * W
    L = N * HW
    start = j * chunk
    end = tl.minimum(start + chunk, L)
    base = x_ptr + c.to(tl.int64) * sxc
    arange = tl.arange(0, BLOCK)

    cnt = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    mean = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    m2 = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    for i0 in range(start, end, BLOCK):
        offs = i0 + arange
        m = offs < end
        n = offs // HW
        hw = offs % HW
        h = hw // W
        w = hw % W
        xv = tl.load(base + n.to(tl.int64) * sxn + (h * sxh + w * sxw), mask=m, other=0.0).to(ACC_DTYPE)
        cnt_new = cnt + tl.where(m, 1.0, 0.0)
        delta = xv - mean
        mean = mean + tl.where(m, delta / tl.maximum(cnt_new, 1.0), 0.0)
        m2 = m2 + tl.where(m, delta * (xv - mean), 0.0)
        cnt = cnt_new

    tot = tl.sum(cnt, axis=0)
    mu = tl.sum(cnt * mean, axis=0) / tl.maximum(tot, 1.0)
    dev = mean - mu
    M2 = tl.sum(m2, axis=0) + tl.sum(cnt * dev * dev, axis=0)
    if FINAL:
        tl.store(mean_ptr + c, mu.to(mean_ptr.dtype.element_ty))
        tl.store(invstd_ptr + c, invstd_of(M2, tot, eps_hi, eps_lo, ACC_DTYPE).to(invstd_ptr.dtype.element_ty))
    else:
        p = part_ptr + (c * n_chunks + j) * 3
        tl.store(p, tot)
        tl.store(p + 1, mu)
        tl.store(p + 2, M2)


@triton.jit(do_not_specialize=["n_chunks"])
def _channel_stats_merge_kernel(
    part_ptr, mean_ptr, invstd_ptr, n_chunks, eps_hi, eps_lo,
    ACC_DTYPE: tl.constexpr, CHUNKS: tl.constexpr,
):
    c = tl.program_id(0)
    offs = tl.arange(0, CHUNKS)
    m = offs < n_chunks
    p = part_ptr + (c * n_chunks + offs) * 3
    cnt = tl.load(p, mask=m, other=0.0).to(ACC_DTYPE)
    mu_j = tl.load(p + 1, mask=m, other=0.0).to(ACC_DTYPE)
    m2_j = tl.load(p + 2, mask=m, other=0.0).to(ACC_DTYPE)
    tot = tl.sum(cnt, axis=0)
    mu = tl.sum(cnt * mu_j, axis=0) / tot
    dev = mu_j - mu
    M2 = tl.sum(m2_j, axis=0) + tl.sum(cnt * dev * dev, axis=0)
    tl.store(mean_ptr + c, mu.to(mean_ptr.dtype.element_ty))
    tl.store(invstd_ptr + c, invstd_of(M2, tot, eps_hi, eps_lo, ACC_DTYPE).to(invstd_ptr.dtype.element_ty))


GPU_BLOCK = 1024
INTERPRET_BLOCK = 32
INTERPRET_CHUNKS = 2


def channel_stats(x, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, invstd)`` of each channel of ``x`` (NCHW, any strides) over (N, H, W), as
    ``reference.channel_stats``; vectors in float32 (float64 for float64 ``x``)."""
    rt.check_features("x", x)
    sdt = rt.stats_dtype(x.dtype)
    mean = torch.empty(x.shape[1], dtype=sdt, device=x.device)
    invstd = torch.empty_like(mean)
    channel_stats_into(x, eps, mean, invstd)
    return mean, invstd


def channel_stats_into(x, eps: float, mean, invstd) -> None:
    """:func:`channel_stats` written into ``mean``/``invstd`` (unit stride: e.g. a slice of a
    buffer's statistics)."""
    rt.check_features("x", x)
    N, C, H, W = x.shape
    L = N * H * W
    if L == 0:
        raise ValueError(f"x: channel statistics need at least one value per channel, got shape {tuple(x.shape)}")
    sdt = rt.stats_dtype(x.dtype)
    dev = x.device
    for name, v in (("mean", mean), ("invstd", invstd)):
        rt.check_vector(name, v, C, dev, sdt)
        if C > 1 and v.stride(0) != 1:
            raise ValueError(f"{name}: expected unit stride, got stride {v.stride(0)}")
    if C == 0:
        return
    acc = rt.acc_tl_dtype(x.dtype)
    sxp = pixel_rows.row_stride(x)
    if sxp is not None:  # NHWC: tiles of pixel rows, loads along channels
        blocks = pixel_rows.stats_chunks(L, C, dev)
        n_chunks = blocks[3]
        final = n_chunks == 1
        part = None if final else torch.empty(C * n_chunks * 3, dtype=sdt, device=dev)
        pixel_rows.channel_stats_partials(x, sxp, eps, mean, invstd, part, blocks)
    else:
        interp = rt.interpreting(_channel_stats_partial_kernel, dev)
        block = INTERPRET_BLOCK if interp else GPU_BLOCK
        blocks = rt.cdiv(L, block)
        if interp:
            n_chunks = min(INTERPRET_CHUNKS, blocks)
        else:  # enough programs to fill the GPU, each reducing at least 8 blocks
            n_chunks = max(1, min(rt.cdiv(4 * rt.sm_count(dev), C), blocks // 8))
        chunk = rt.cdiv(blocks, n_chunks) * block
        n_chunks = rt.cdiv(L, chunk)
        final = n_chunks == 1
        part = mean if final else torch.empty(C * n_chunks * 3, dtype=sdt, device=dev)
        rt.launch(_channel_stats_partial_kernel, (C, n_chunks),
                  (x, part, mean, invstd, N, C, H, W, *x.stride(), chunk, *rt.split_float(eps)),
                  dict(FINAL=final, ACC_DTYPE=acc), dict(BLOCK=block, num_warps=4), dev)
    if not final:
        rt.launch(_channel_stats_merge_kernel, (C,),
                  (part, mean, invstd, n_chunks, *rt.split_float(eps)),
                  dict(ACC_DTYPE=acc), dict(CHUNKS=rt.next_pow2(n_chunks)), dev)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _channel_stats_backward_kernel(
    x_ptr, mean_ptr, invstd_ptr, gmean_ptr, ginvstd_ptr, gx_ptr,
    N, C, H, W,
    sxn, sxc, sxh, sxw,
    sdn, sdc, sdh, sdw,
    s_mean, s_invstd, s_gmean, s_ginvstd,
    HAS_GMEAN: tl.constexpr, HAS_GINVSTD: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // C
    c = pid % C
    hw = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = hw < H * W
    h = hw // W
    w = hw % W
    inv_n = 1.0 / (tl.zeros((), dtype=ACC_DTYPE) + N * H * W)
    mean = tl.load(mean_ptr + c * s_mean).to(ACC_DTYPE)
    invstd = tl.load(invstd_ptr + c * s_invstd).to(ACC_DTYPE)
    a = tl.zeros((), dtype=ACC_DTYPE)
    b = tl.zeros((), dtype=ACC_DTYPE)
    if HAS_GMEAN:
        a = tl.load(gmean_ptr + c * s_gmean).to(ACC_DTYPE) * inv_n
    if HAS_GINVSTD:
        b = tl.load(ginvstd_ptr + c * s_ginvstd).to(ACC_DTYPE) * invstd * invstd * invstd * inv_n
    x_ptrs = x_ptr + (n.to(tl.int64) * sxn + c * sxc) + (h * sxh + w * sxw)
    g_ptrs = gx_ptr + (n.to(tl.int64) * sdn + c * sdc) + (h * sdh + w * sdw)
    xv = tl.load(x_ptrs, mask=m, other=0.0).to(ACC_DTYPE)
    g = tl.load(g_ptrs, mask=m, other=0.0).to(ACC_DTYPE)
    tl.store(g_ptrs, (g + (a - b * (xv - mean))).to(gx_ptr.dtype.element_ty), mask=m)


def channel_stats_backward_(x, mean, invstd, grad_mean, grad_invstd, grad_x) -> None:
    """Accumulate the backward of :func:`channel_stats` into ``grad_x`` (shape of ``x``, any
    strides and floating dtype), as ``reference.channel_stats_backward_``. ``grad_mean`` or
    ``grad_invstd`` may be None (zero)."""
    rt.check_features("x", x)
    N, C, H, W = x.shape
    dev = x.device
    rt.check_vector("mean", mean, C, dev)
    rt.check_vector("invstd", invstd, C, dev)
    if grad_mean is not None:
        rt.check_vector("grad_mean", grad_mean, C, dev)
    if grad_invstd is not None:
        rt.check_vector("grad_invstd", grad_invstd, C, dev)
    rt.check_writable_grad("grad_x", grad_x, x.shape, dev)
    if x.numel() == 0 or (grad_mean is None and grad_invstd is None):
        return
    sxp, sdp = pixel_rows.row_stride(x), pixel_rows.row_stride(grad_x)
    if sxp is not None and sdp is not None:  # NHWC: tiles of pixel rows, loads along channels
        pixel_rows.channel_stats_backward_(x, mean, invstd, grad_mean, grad_invstd, grad_x, sxp, sdp)
        return
    interp = rt.interpreting(_channel_stats_backward_kernel, dev)
    block = INTERPRET_BLOCK if interp else min(GPU_BLOCK, rt.next_pow2(H * W))
    gm = grad_mean if grad_mean is not None else mean
    gi = grad_invstd if grad_invstd is not None else invstd
    args = (x, mean, invstd, gm, gi, grad_x, N, C, H, W, *x.stride(), *grad_x.stride(),
            mean.stride(0), invstd.stride(0), gm.stride(0), gi.stride(0))
    meta = dict(HAS_GMEAN=grad_mean is not None, HAS_GINVSTD=grad_invstd is not None,
                ACC_DTYPE=rt.acc_tl_dtype(x.dtype))
    grid = (N * C, rt.cdiv(H * W, block))
    rt.launch(_channel_stats_backward_kernel, grid, args, meta,
              dict(BLOCK=block, num_warps=4 if block >= 512 else 2), dev)
