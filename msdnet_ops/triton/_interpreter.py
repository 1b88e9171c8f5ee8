"""Triton's interpreter, made to round like a GPU.

CI runs every Triton kernel on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``). Two of
its bfloat16 shortcuts differ from what GPUs do, and both would make our numerics tests measure
the interpreter instead of the kernels:

* ``tl.dot`` multiplies bfloat16 blocks as their raw uint16 bits: the convolution kernels
  upcast bfloat16 operands to float32 there (exact; ``_runtime.dot_upcast``);
* float32 -> bfloat16 conversions (``x.to(tl.bfloat16)``, a store into a bfloat16 tensor)
  *truncate* the mantissa (``triton.runtime.interpreter._convert_float`` without a rounding
  mode), where a GPU rounds to nearest even (``cvt.rn.bf16.f32``), as PyTorch does. Truncation
  doubles the largest error of every rounding and biases it toward zero, so a bfloat16 run in
  the interpreter erred ~2.5x more per convolution than the same kernel on a GPU.
  :func:`round_bfloat16_to_nearest_even` replaces that one conversion, once, by PyTorch's.
"""
from __future__ import annotations

import numpy as np
import torch


def round_bfloat16_to_nearest_even() -> None:
    """Makes the interpreter's float32 -> bfloat16 conversions round to nearest even (what a
    GPU and ``torch.Tensor.to(torch.bfloat16)`` do; NaN stays NaN, overflow becomes inf).
    Other conversions, and an explicit ``fp_downcast_rounding="rtz"``, are left as they are.
    Idempotent; a Triton without the interpreter function it replaces is left alone."""
    try:
        import triton.language as tl
        from triton._C.libtriton import ir
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover  (an older or newer Triton: nothing to fix)
        return
    convert = getattr(interpreter, "_convert_float", None)
    if convert is None or getattr(convert, "rounds_like_gpus", False):
        return
    rtz = ir.ROUNDING_MODE.RTZ

    def convert_float(values, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and rounding_mode != rtz:
            rounded = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
            return rounded.view(torch.int16).numpy().view(np.uint16).reshape(np.shape(values))
        return convert(values, input_dtype, output_dtype, rounding_mode)

    convert_float.rounds_like_gpus = True
    interpreter._convert_float = convert_float
