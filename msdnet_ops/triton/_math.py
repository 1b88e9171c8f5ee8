"""Element-wise ``@triton.jit`` helpers shared by the kernels."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def relu(v):
    """``max(v, 0)`` that keeps NaN, as ``torch.relu`` does (``tl.maximum``'s default turns it
    into 0)."""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def invstd_of(m2, count, eps_hi, eps_lo, ACC_DTYPE: tl.constexpr):
    """``1 / sqrt(m2 / count + eps)``: ``eps`` passed as two float32 parts (exact in float64),
    the square root IEEE-rounded as PyTorch's."""
    var = m2 / count + ((tl.zeros((), dtype=ACC_DTYPE) + eps_hi) + eps_lo)
    if ACC_DTYPE == tl.float64:
        std = tl.sqrt(var)  # IEEE-rounded in float64
    else:
        std = tl.sqrt_rn(var)
    return 1.0 / std
