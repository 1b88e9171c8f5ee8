"""Batch compaction for early exit: ``out[i] = src[index[i]]`` along dim 0 (NCHW, any strides
for ``src`` and ``out``). One program per (output image, channel) plane and block of pixels."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _runtime as rt
from . import pixel_rows


@triton.jit
def _gather_batch_kernel(
    src_ptr, index_ptr, out_ptr,
    C, H, W,
    ssn, ssc, ssh, ssw,
    son, soc, soh, sow,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    i = pid // C
    c = pid % C
    hw = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = hw < H * W
    h = hw // W
    w = hw % W
    src_n = tl.load(index_ptr + i).to(tl.int64)
    v = tl.load(src_ptr + (src_n * ssn + c * ssc) + (h * ssh + w * ssw), mask=m)
    tl.store(out_ptr + (i.to(tl.int64) * son + c * soc) + (h * soh + w * sow), v, mask=m)


GPU_BLOCK = 1024
INTERPRET_BLOCK = 32


def gather_batch_into(src, index, out) -> None:
    """``out[i] = src[index[i]]`` (as ``reference.gather_batch``); ``index`` is a 1-D int64
    tensor of valid row numbers (not checked against ``src``'s batch size here)."""
    rt.check_features("src", src)
    if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype != torch.int64:
        raise ValueError("index: expected a 1-D int64 tensor")
    rt.check_device("index", index, src.device)
    rt.check_features("out", out)
    rt.check_same_shape("out", out, (index.shape[0],) + tuple(src.shape[1:]), "src[index]")
    if out.dtype != src.dtype:
        raise TypeError(f"out: expected dtype {src.dtype} (as src), got {out.dtype}")
    rt.check_device("out", out, src.device)
    if out.numel() == 0:
        return
    index = index.contiguous()
    ssp, sop = pixel_rows.row_stride(src), pixel_rows.row_stride(out)
    if ssp is not None and sop is not None:  # NHWC: tiles of pixel rows, copies along channels
        pixel_rows.gather_batch_into(src, index, out, ssp, sop)
        return
    _, C, H, W = src.shape
    dev = src.device
    interp = rt.interpreting(_gather_batch_kernel, dev)
    block = INTERPRET_BLOCK if interp else min(GPU_BLOCK, rt.next_pow2(H * W))
    grid = (index.shape[0] * C, rt.cdiv(H * W, block))
    rt.launch(_gather_batch_kernel, grid,
              (src, index, out, C, H, W, *src.stride(), *out.stride()), {},
              dict(BLOCK=block, num_warps=4 if block >= 512 else 2), dev)
