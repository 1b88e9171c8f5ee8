"""Element-wise ``@triton.jit`` helpers shared by the kernels."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def relu(v):
    """``max(v, 0)`` that keeps NaN, as ``torch.relu`` does (``tl.maximum`` turns it into 0)."""
    return tl.where(v < 0.0, 0.0, v)
