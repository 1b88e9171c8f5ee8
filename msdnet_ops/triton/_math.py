"""Element-wise ``@triton.jit`` helpers shared by the kernels."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def relu(v):
    """``max(v, 0)`` that keeps NaN, as ``torch.relu`` does (``tl.maximum``'s default turns it
    into 0)."""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)
