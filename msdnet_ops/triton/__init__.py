"""Triton backend (GPU; CPU tensors run in Triton's interpreter, for tests).

Convolution kernels (``conv(avg_pool(relu(scale*x+shift)), W)`` for raw buffer channels and
``conv(avg_pool(x), W)`` for activated ones; 1x1 as a GEMM and 3x3 as an implicit GEMM, stride
1/2, the pool-2 transition) with their backward, and the small memory-bound kernels
(statistics, a BatchNorm's per-channel vectors, affine+ReLU, a post-activation
BatchNorm+ReLU, batch gather). Semantics: ``msdnet_ops.reference``.
One module per op, forward and backward together; GPU autotuning in ``_autotune``.
Every function reads ``x`` through its strides (a buffer prefix is never copied) and writes
its outputs in place through theirs.
"""
import os as _os

if _os.environ.get("TRITON_INTERPRET", "0") == "1":  # bfloat16 rounds as on a GPU (see module)
    from ._interpreter import round_bfloat16_to_nearest_even

    round_bfloat16_to_nearest_even()

from .affine_relu import affine_relu, affine_relu_backward_, affine_relu_into
from .batchnorm_relu import batchnorm_backward_rest_, batchnorm_relu_backward_, batchnorm_relu_into
from .bn_vectors import bn_scale_shift_backward_, bn_scale_shift_into
from .channel_stats import channel_stats, channel_stats_backward_, channel_stats_into
from .conv import conv_backward_, conv_into, transform_conv, transform_conv_backward_, transform_conv_into
from .gather_batch import gather_batch_into

__all__ = [
    "affine_relu",
    "affine_relu_into",
    "affine_relu_backward_",
    "batchnorm_backward_rest_",
    "batchnorm_relu_backward_",
    "batchnorm_relu_into",
    "bn_scale_shift_into",
    "bn_scale_shift_backward_",
    "channel_stats",
    "channel_stats_backward_",
    "channel_stats_into",
    "conv_into",
    "conv_backward_",
    "gather_batch_into",
    "transform_conv",
    "transform_conv_into",
    "transform_conv_backward_",
]
