"""Triton backend (GPU; CPU tensors run in Triton's interpreter, for tests).

Fused transform-conv kernels (``conv(avg_pool(relu(scale*x+shift)), W)``, 1x1 as a GEMM and
3x3 as an implicit GEMM, stride 1/2, the pool-2 transition) with their backward, and the
small memory-bound kernels (statistics, affine+ReLU, batch gather). Semantics: ``msdnet_ops.reference``.
Every function reads ``x`` through its strides (a buffer prefix is never copied) and writes
its outputs in place through theirs.
"""
from .affine_relu import affine_relu, affine_relu_into
from .affine_relu_backward import affine_relu_backward_
from .channel_stats import channel_stats
from .channel_stats_backward import channel_stats_backward_
from .gather_batch import gather_batch_into
from .transform_conv import transform_conv, transform_conv_into
from .transform_conv_backward import transform_conv_backward_

__all__ = [
    "affine_relu",
    "affine_relu_into",
    "affine_relu_backward_",
    "channel_stats",
    "channel_stats_backward_",
    "gather_batch_into",
    "transform_conv",
    "transform_conv_into",
    "transform_conv_backward_",
]
