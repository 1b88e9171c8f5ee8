"""Backward of the channel statistics (the "finalize" step), accumulated into ``grad_x``:

    grad_x += grad_mean / n - grad_invstd * (x - mean) * invstd**3 / n      (n = N*H*W)

An element-wise kernel: one program per (image, channel) plane and block of pixels, with the
per-channel coefficients loaded once as scalars.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import _runtime as rt


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


GPU_BLOCK = 1024
INTERPRET_BLOCK = 32


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
    interp = rt.interpreting(_channel_stats_backward_kernel, dev)
    block = INTERPRET_BLOCK if interp else min(GPU_BLOCK, rt.next_pow2(H * W))
    gm = grad_mean if grad_mean is not None else mean
    gi = grad_invstd if grad_invstd is not None else invstd
    args = (x, mean, invstd, gm, gi, grad_x, N, C, H, W, *x.stride(), *grad_x.stride(),
            mean.stride(0), invstd.stride(0), gm.stride(0), gi.stride(0))
    meta = dict(HAS_GMEAN=grad_mean is not None, HAS_GINVSTD=grad_invstd is not None,
                ACC_DTYPE=rt.acc_tl_dtype(x.dtype))
    grid = (N * C, triton.cdiv(H * W, block))
    rt.launch(_channel_stats_backward_kernel, None, grid, args, meta,
              dict(BLOCK=block, num_warps=4 if block >= 512 else 2), dev)
