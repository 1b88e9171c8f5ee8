"""Memory-bound kernels on NHWC (channels_last) feature maps, read as a matrix of pixel rows:
affine-ReLU and its backward, BatchNorm+ReLU from the statistics and the rest of its backward,
the statistics and their backward (finalize), and the batch gather of early exit.

The plane kernels of ``affine_relu`` and ``channel_stats`` give each program one (image,
channel) plane. On NHWC buffers, the layout of every feature map in the models, a plane's
neighbouring pixels lie a whole row of channels apart, so a warp's loads touch one 32-byte
sector per element. Here a tensor whose pixels are equally spaced rows with unit-stride
channels (a channel prefix or slice of an NHWC buffer) is a ``[N*H*W, C]`` matrix with row
stride ``rs``; each program takes ``[BLOCK_P, BLOCK_C]`` tiles, loading along the contiguous
channels (16-byte loads on sm_90, where the plane kernels load 4 bytes at a time from these
views), with the per-channel vectors loaded once per tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime as rt
from ._math import invstd_of, relu
from .bn_vectors import grads_of_scale_shift, scale_shift_of


def row_stride(t: torch.Tensor) -> int | None:
    """``rs`` when ``t[n, c, h, w]`` lies at ``((n*H + h)*W + w) * rs + c`` (unit-stride
    channels, pixels equally spaced), else None. Dimensions of size 1 do not constrain it."""
    N, C, H, W = t.shape
    sn, sc, sh, sw = t.stride()
    if C > 1 and sc != 1:
        return None
    rs = sw if W > 1 else sh if H > 1 else sn if N > 1 else max(C, 1)
    if (H > 1 and sh != W * rs) or (N > 1 and sn != H * W * rs):
        return None
    return rs if rs >= max(C, 1) else None  # rows must not overlap


def tiles(P: int, C: int, interp: bool) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): channels as wide as the tensor (up to 64), about 2048 elements a tile."""
    if interp:
        return 8, min(8, rt.next_pow2(C))
    block_c = min(64, rt.next_pow2(C))
    return max(16, 2048 // block_c), block_c


@triton.jit
def _tile(P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    return rows.to(tl.int64), cols, mask_c, (rows < P)[:, None] & mask_c[None, :]


@triton.jit
def _affine_relu_tile(x_ptr, out_ptr, sc, sh, rows, cols, m, sxp, sop, ACC_DTYPE: tl.constexpr):
    xv = tl.load(x_ptr + rows[:, None] * sxp + cols[None, :], mask=m, other=0.0).to(ACC_DTYPE)
    z = relu(xv * sc[None, :] + sh[None, :])
    tl.store(out_ptr + rows[:, None] * sop + cols[None, :], z.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _affine_relu_rows_kernel(
    x_ptr, scale_ptr, shift_ptr, out_ptr,
    P, C, sxp, sop, s_scale, s_shift,
    ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows, cols, mask_c, m = _tile(P, C, BLOCK_P, BLOCK_C)
    sc = tl.load(scale_ptr + cols * s_scale, mask=mask_c, other=0.0).to(ACC_DTYPE)
    sh = tl.load(shift_ptr + cols * s_shift, mask=mask_c, other=0.0).to(ACC_DTYPE)
    _affine_relu_tile(x_ptr, out_ptr, sc, sh, rows, cols, m, sxp, sop, ACC_DTYPE)


def affine_relu_into(x, scale, shift, out, sxp: int, sop: int) -> None:
    """``out = relu(scale * x + shift)`` for pixel-row tensors (checked by the caller)."""
    N, C, H, W = x.shape
    P = N * H * W
    interp = rt.interpreting(_affine_relu_rows_kernel, x.device)
    bp, bc = tiles(P, C, interp)
    rt.launch(_affine_relu_rows_kernel, (rt.cdiv(P, bp), rt.cdiv(C, bc)),
              (x, scale, shift, out, P, C, sxp, sop, scale.stride(0), shift.stride(0)),
              dict(ACC_DTYPE=rt.acc_tl_dtype(x.dtype)), dict(BLOCK_P=bp, BLOCK_C=bc, num_warps=4),
              x.device)


@triton.jit
def _batchnorm_relu_rows_kernel(
    x_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, vec_ptr, out_ptr,
    P, C, sxp, sop, s_mean, s_invstd, s_w, s_b, s_vec_row, s_vec,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``relu(scale * x + shift)`` with a BatchNorm's ``(scale, shift)`` computed from its
    statistics and parameters by every program for its channels (a few flops: cheaper than a
    launch of their own); the programs of the first row tile also write them into ``vec``
    (rows ``(scale, shift)``), which the backward reads."""
    rows, cols, mask_c, m = _tile(P, C, BLOCK_P, BLOCK_C)
    sc, sh = scale_shift_of(mean_ptr, invstd_ptr, w_ptr, b_ptr, cols, mask_c, s_mean, s_invstd,
                            s_w, s_b, HAS_WEIGHT, HAS_BIAS, ACC_DTYPE)
    if tl.program_id(0) == 0:
        tl.store(vec_ptr + cols * s_vec, sc.to(vec_ptr.dtype.element_ty), mask=mask_c)
        tl.store(vec_ptr + s_vec_row + cols * s_vec, sh.to(vec_ptr.dtype.element_ty), mask=mask_c)
    _affine_relu_tile(x_ptr, out_ptr, sc, sh, rows, cols, m, sxp, sop, ACC_DTYPE)


def batchnorm_relu_into(x, mean, invstd, weight, bias, vectors, out, sxp: int, sop: int) -> None:
    """``out = relu(bn(x))`` from the statistics, ``vectors`` = ``(scale, shift)`` written, for
    pixel-row tensors (checked by the caller; ``weight``/``bias`` may be None)."""
    N, C, H, W = x.shape
    P = N * H * W
    interp = rt.interpreting(_batchnorm_relu_rows_kernel, x.device)
    bp, bc = tiles(P, C, interp)
    w = mean if weight is None else weight  # placeholder pointers, never dereferenced
    b = mean if bias is None else bias
    rt.launch(_batchnorm_relu_rows_kernel, (rt.cdiv(P, bp), rt.cdiv(C, bc)),
              (x, mean, invstd, w, b, vectors, out, P, C, sxp, sop, mean.stride(0),
               invstd.stride(0), w.stride(0), b.stride(0), vectors.stride(0), vectors.stride(1)),
              dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                   ACC_DTYPE=rt.acc_tl_dtype(x.dtype)),
              dict(BLOCK_P=bp, BLOCK_C=bc, num_warps=4), x.device)


@triton.jit
def _stats_backward_tile(x_ptr, gx_ptr, rows, cols, m, sxp, sdp, P, mean, invstd, gm, gi,
                         ACC_DTYPE: tl.constexpr):
    """``grad_x += grad_mean/n - grad_invstd*(x-mean)*invstd^3/n`` on one tile (n = ``P``)."""
    inv_n = 1.0 / (tl.zeros((), dtype=ACC_DTYPE) + P)
    a = gm * inv_n
    b = gi * invstd * invstd * invstd * inv_n
    x_ptrs = x_ptr + rows[:, None] * sxp + cols[None, :]
    g_ptrs = gx_ptr + rows[:, None] * sdp + cols[None, :]
    xv = tl.load(x_ptrs, mask=m, other=0.0).to(ACC_DTYPE)
    g = tl.load(g_ptrs, mask=m, other=0.0).to(ACC_DTYPE)
    g = g + (a[None, :] - b[None, :] * (xv - mean[None, :]))
    tl.store(g_ptrs, g.to(gx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _batchnorm_backward_rows_kernel(
    x_ptr, mean_ptr, invstd_ptr, w_ptr, g_ptr, gx_ptr, out_ptr,
    P, C, sxp, sdp, s_mean, s_invstd, s_w, s_g_row, s_g, s_out_row, s_out,
    HAS_WEIGHT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The rest of a training-mode BatchNorm's backward once its transform's backward has left
    ``(grad_scale, grad_shift)`` in ``g`` and the gradient through the transform in ``gx``:
    every program derives its channels' statistics gradients from them (a few flops: cheaper
    than a launch of their own) and adds the statistics' part to its tile of ``gx``; the
    programs of the first row tile write ``out`` = rows ``(grad_weight, grad_bias)`` (``out``
    is not ``g``: the other programs still read it)."""
    rows, cols, mask_c, m = _tile(P, C, BLOCK_P, BLOCK_C)
    g_scale = tl.load(g_ptr + cols * s_g, mask=mask_c, other=0.0).to(ACC_DTYPE)
    g_shift = tl.load(g_ptr + s_g_row + cols * s_g, mask=mask_c, other=0.0).to(ACC_DTYPE)
    mean = tl.load(mean_ptr + cols * s_mean, mask=mask_c, other=0.0).to(ACC_DTYPE)
    invstd = tl.load(invstd_ptr + cols * s_invstd, mask=mask_c, other=0.0).to(ACC_DTYPE)
    grad_weight, gm, gi = grads_of_scale_shift(g_scale, g_shift, mean, invstd, w_ptr, cols,
                                               mask_c, s_w, HAS_WEIGHT, ACC_DTYPE)
    if tl.program_id(0) == 0:
        tl.store(out_ptr + cols * s_out, grad_weight.to(out_ptr.dtype.element_ty), mask=mask_c)
        tl.store(out_ptr + s_out_row + cols * s_out, g_shift.to(out_ptr.dtype.element_ty),
                 mask=mask_c)
    _stats_backward_tile(x_ptr, gx_ptr, rows, cols, m, sxp, sdp, P, mean, invstd, gm, gi,
                         ACC_DTYPE)


def batchnorm_backward_(x, mean, invstd, weight, grads, grad_x, grad_params, sxp: int,
                        sdp: int) -> None:
    """Adds the statistics' part of a BatchNorm's backward to ``grad_x`` and writes
    ``grad_params`` rows ``(grad_weight, grad_bias)``, from ``grads`` rows ``(grad_scale,
    grad_shift)`` (another tensor), for pixel-row tensors (checked by the caller)."""
    N, C, H, W = x.shape
    P = N * H * W
    interp = rt.interpreting(_batchnorm_backward_rows_kernel, x.device)
    bp, bc = tiles(P, C, interp)
    w = mean if weight is None else weight  # placeholder pointer, never dereferenced
    rt.launch(_batchnorm_backward_rows_kernel, (rt.cdiv(P, bp), rt.cdiv(C, bc)),
              (x, mean, invstd, w, grads, grad_x, grad_params, P, C, sxp, sdp, mean.stride(0),
               invstd.stride(0), w.stride(0), grads.stride(0), grads.stride(1),
               grad_params.stride(0), grad_params.stride(1)),
              dict(HAS_WEIGHT=weight is not None, ACC_DTYPE=rt.acc_tl_dtype(x.dtype)),
              dict(BLOCK_P=bp, BLOCK_C=bc, num_warps=4), x.device)


@triton.jit
def _channel_stats_backward_rows_kernel(
    x_ptr, mean_ptr, invstd_ptr, gmean_ptr, ginvstd_ptr, gx_ptr,
    P, C, sxp, sdp, s_mean, s_invstd, s_gmean, s_ginvstd,
    HAS_GMEAN: tl.constexpr, HAS_GINVSTD: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows, cols, mask_c, m = _tile(P, C, BLOCK_P, BLOCK_C)
    mean = tl.load(mean_ptr + cols * s_mean, mask=mask_c, other=0.0).to(ACC_DTYPE)
    invstd = tl.load(invstd_ptr + cols * s_invstd, mask=mask_c, other=0.0).to(ACC_DTYPE)
    gm = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    gi = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    if HAS_GMEAN:
        gm = tl.load(gmean_ptr + cols * s_gmean, mask=mask_c, other=0.0).to(ACC_DTYPE)
    if HAS_GINVSTD:
        gi = tl.load(ginvstd_ptr + cols * s_ginvstd, mask=mask_c, other=0.0).to(ACC_DTYPE)
    _stats_backward_tile(x_ptr, gx_ptr, rows, cols, m, sxp, sdp, P, mean, invstd, gm, gi,
                         ACC_DTYPE)


def channel_stats_backward_(x, mean, invstd, grad_mean, grad_invstd, grad_x, sxp: int, sdp: int) -> None:
    """The finalize step for pixel-row tensors (checked by the caller; one gradient may be None)."""
    N, C, H, W = x.shape
    P = N * H * W
    interp = rt.interpreting(_channel_stats_backward_rows_kernel, x.device)
    bp, bc = tiles(P, C, interp)
    gm = grad_mean if grad_mean is not None else mean
    gi = grad_invstd if grad_invstd is not None else invstd
    rt.launch(_channel_stats_backward_rows_kernel, (rt.cdiv(P, bp), rt.cdiv(C, bc)),
              (x, mean, invstd, gm, gi, grad_x, P, C, sxp, sdp,
               mean.stride(0), invstd.stride(0), gm.stride(0), gi.stride(0)),
              dict(HAS_GMEAN=grad_mean is not None, HAS_GINVSTD=grad_invstd is not None,
                   ACC_DTYPE=rt.acc_tl_dtype(x.dtype)),
              dict(BLOCK_P=bp, BLOCK_C=bc, num_warps=4), x.device)


@triton.jit(do_not_specialize=["chunk"])
def _channel_stats_rows_kernel(
    x_ptr, part_ptr, mean_ptr, invstd_ptr,
    P, C, sxp, chunk, eps_hi, eps_lo,
    FINAL: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Statistics of ``BLOCK_C`` channels over one chunk of rows: each tile's count, mean and
    sum of squared deviations (two passes over the registers), merged into the running ones
    with Chan's formula. Writes ``mean``/``invstd`` (one chunk) or ``(count, mean, M2)``
    partials at ``(channel * n_chunks + chunk) * 3``, as the plane kernel does."""
    j = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    start = j * chunk
    end = tl.minimum(start + chunk, P)
    cnt = tl.zeros((), dtype=ACC_DTYPE)
    mean = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    m2 = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    for r0 in range(start, end, BLOCK_P):
        rows = r0 + tl.arange(0, BLOCK_P)
        mask_r = rows < end
        m = mask_r[:, None] & mask_c[None, :]
        xv = tl.load(x_ptr + rows.to(tl.int64)[:, None] * sxp + cols[None, :], mask=m, other=0.0).to(ACC_DTYPE)
        nb = tl.sum(mask_r.to(ACC_DTYPE), axis=0)
        mb = tl.sum(xv, axis=0) / nb
        d = tl.where(m, xv - mb[None, :], 0.0)
        tot = cnt + nb
        delta = mb - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + tl.sum(d * d, axis=0) + delta * delta * (cnt * nb / tot)
        cnt = tot
    if FINAL:
        invstd = invstd_of(m2, cnt, eps_hi, eps_lo, ACC_DTYPE)
        tl.store(mean_ptr + cols, mean.to(mean_ptr.dtype.element_ty), mask=mask_c)
        tl.store(invstd_ptr + cols, invstd.to(invstd_ptr.dtype.element_ty), mask=mask_c)
    else:
        p = part_ptr + (cols * tl.num_programs(0) + j) * 3
        tl.store(p, (cnt + tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)).to(part_ptr.dtype.element_ty), mask=mask_c)
        tl.store(p + 1, mean.to(part_ptr.dtype.element_ty), mask=mask_c)
        tl.store(p + 2, m2.to(part_ptr.dtype.element_ty), mask=mask_c)


def stats_chunks(P: int, C: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_C, chunk, n_chunks) of the reducing kernels (statistics, affine-ReLU
    backward): enough programs to fill the GPU, each reducing at least 8 row tiles."""
    interp = rt.interpreting(_channel_stats_rows_kernel, device)
    bp, bc = tiles(P, C, interp)
    row_tiles = rt.cdiv(P, bp)
    if interp:
        n_chunks = min(2, row_tiles)
    else:
        n_chunks = max(1, min(rt.cdiv(4 * rt.sm_count(device), rt.cdiv(C, bc)), row_tiles // 8))
    chunk = rt.cdiv(row_tiles, n_chunks) * bp
    return bp, bc, chunk, rt.cdiv(P, chunk)


def channel_stats_partials(x, sxp, eps, mean, invstd, part, blocks) -> None:
    """Launches :func:`_channel_stats_rows_kernel` with ``blocks = stats_chunks(...)``; ``part``
    is None when there is one chunk (``mean``/``invstd`` written directly)."""
    N, C, H, W = x.shape
    P = N * H * W
    bp, bc, chunk, n_chunks = blocks
    final = part is None
    rt.launch(_channel_stats_rows_kernel, (n_chunks, rt.cdiv(C, bc)),
              (x, mean if final else part, mean, invstd, P, C, sxp, chunk, *rt.split_float(eps)),
              dict(FINAL=final, ACC_DTYPE=rt.acc_tl_dtype(x.dtype)),
              dict(BLOCK_P=bp, BLOCK_C=bc, num_warps=4), x.device)


@triton.jit
def _gather_batch_rows_kernel(
    src_ptr, index_ptr, out_ptr, HW, C, ssp, sop,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """``out[i] = src[index[i]]``: program (i, pixel tile, channel tile) copies one tile of
    image ``index[i]``'s pixel rows."""
    i = tl.program_id(0)
    px = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = (px < HW)[:, None] & (cols < C)[None, :]
    src_row = tl.load(index_ptr + i).to(tl.int64) * HW + px
    out_row = i.to(tl.int64) * HW + px
    v = tl.load(src_ptr + src_row[:, None] * ssp + cols[None, :], mask=m)
    tl.store(out_ptr + out_row[:, None] * sop + cols[None, :], v, mask=m)


def gather_batch_into(src, index, out, ssp: int, sop: int) -> None:
    """Batch compaction for pixel-row tensors (checked by the caller)."""
    _, C, H, W = src.shape
    HW = H * W
    interp = rt.interpreting(_gather_batch_rows_kernel, src.device)
    bp, bc = tiles(HW, C, interp)
    rt.launch(_gather_batch_rows_kernel, (index.shape[0], rt.cdiv(HW, bp), rt.cdiv(C, bc)),
              (src, index, out, HW, C, ssp, sop), {}, dict(BLOCK_P=bp, BLOCK_C=bc, num_warps=4),
              src.device)


@triton.jit(do_not_specialize=["chunk"], do_not_specialize_on_alignment=["gscale_ptr", "gshift_ptr"])
def _affine_relu_backward_rows_kernel(
    x_ptr, scale_ptr, shift_ptr, gz_ptr, gx_ptr, gscale_ptr, gshift_ptr,
    P, C, sxp, szp, sdp, s_scale, s_shift, s_gscale, s_gshift, chunk,
    HAS_GX: tl.constexpr, ACCUMULATE: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The backward of ``relu(scale * x + shift)`` over one chunk of rows and ``BLOCK_C``
    channels: ``grad_x`` per element, the chunk's sums for ``grad_scale``/``grad_shift`` added
    atomically once per program."""
    j = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    sc = tl.load(scale_ptr + cols * s_scale, mask=mask_c, other=0.0).to(ACC_DTYPE)
    sh = tl.load(shift_ptr + cols * s_shift, mask=mask_c, other=0.0).to(ACC_DTYPE)
    start = j * chunk
    end = tl.minimum(start + chunk, P)
    sum_dx = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    sum_d = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    for r0 in range(start, end, BLOCK_P):
        rows = (r0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        m = (rows < end)[:, None] & mask_c[None, :]
        xv = tl.load(x_ptr + rows[:, None] * sxp + cols[None, :], mask=m, other=0.0).to(ACC_DTYPE)
        gz = tl.load(gz_ptr + rows[:, None] * szp + cols[None, :], mask=m, other=0.0).to(ACC_DTYPE)
        dpre = tl.where(m & (xv * sc[None, :] + sh[None, :] > 0), gz, 0.0)
        if HAS_GX:
            d_ptrs = gx_ptr + rows[:, None] * sdp + cols[None, :]
            gx = sc[None, :] * dpre
            if ACCUMULATE:  # else grad_x is only written: its old values are never read
                gx += tl.load(d_ptrs, mask=m, other=0.0).to(ACC_DTYPE)
            tl.store(d_ptrs, gx.to(gx_ptr.dtype.element_ty), mask=m)
        sum_dx += tl.sum(dpre * xv, axis=0)
        sum_d += tl.sum(dpre, axis=0)
    tl.atomic_add(gscale_ptr + cols * s_gscale, sum_dx.to(gscale_ptr.dtype.element_ty), mask=mask_c)
    tl.atomic_add(gshift_ptr + cols * s_gshift, sum_d.to(gshift_ptr.dtype.element_ty), mask=mask_c)


def affine_relu_backward_(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift, accumulate,
                          sxp: int, szp: int, sdp: int) -> None:
    """The affine-ReLU backward for pixel-row tensors (checked by the caller; ``grad_x`` may
    be None, then ``sdp`` is ignored)."""
    N, C, H, W = x.shape
    P = N * H * W
    bp, bc, chunk, n_chunks = stats_chunks(P, C, x.device)
    has_gx = grad_x is not None
    rt.launch(_affine_relu_backward_rows_kernel, (n_chunks, rt.cdiv(C, bc)),
              (x, scale, shift, grad_z, grad_x if has_gx else grad_z, grad_scale, grad_shift,
               P, C, sxp, szp, sdp if has_gx else 0, scale.stride(0), shift.stride(0),
               grad_scale.stride(0), grad_shift.stride(0), chunk),
              dict(HAS_GX=has_gx, ACCUMULATE=bool(accumulate), ACC_DTYPE=rt.acc_tl_dtype(x.dtype)),
              # 8 warps: with 4, a thread holds ~5 tiles' worth of 16 values and the accumulating
              # float32 variant spilled 8 B on sm_90 (found by gpu_compile --with-trials)
              dict(BLOCK_P=bp, BLOCK_C=bc, num_warps=8), x.device)
