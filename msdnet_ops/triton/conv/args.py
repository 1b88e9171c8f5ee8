"""Argument checks shared by the convolution launchers, and the batch split that keeps every
kernel offset in int32."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _runtime as rt


@dataclass(frozen=True)
class Geometry:
    """A validated convolution: sizes, kernel size ``k`` and ``stride``/``padding``/``pool``."""
    N: int
    Cin: int
    H: int
    W: int
    Cout: int
    k: int
    stride: int
    padding: int
    pool: int
    Ho: int
    Wo: int


def conv_out_size(size: int, k: int, stride: int, padding: int, pool: int) -> int:
    size = size // pool
    return (size + 2 * padding - k) // stride + 1


def check_conv_args(x, scale, shift, weight, stride, padding, pool) -> Geometry:
    """Validate the arguments shared by forward and backward (``scale``/``shift`` None for the
    convolution without transform)."""
    rt.check_features("x", x)
    N, Cin, H, W = x.shape
    if scale is not None:
        rt.check_vector("scale", scale, Cin, x.device)
        rt.check_vector("shift", shift, Cin, x.device)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"weight: expected a 4-d [Cout, Cin, k, k] tensor, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    Cout, wcin, kh, kw = weight.shape
    if wcin != Cin or kh != kw or kh not in (1, 3):
        raise ValueError(f"weight: expected shape [Cout, {Cin}, k, k] with k in (1, 3), got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected dtype {x.dtype} (as x), got {weight.dtype}")
    rt.check_device("weight", weight, x.device)
    if any(s < 0 for s in weight.stride()):
        raise ValueError("weight: negative strides are not supported")
    k = kh
    if stride not in (1, 2):
        raise ValueError(f"stride: expected 1 or 2, got {stride}")
    if not isinstance(padding, int) or not 0 <= padding <= min(k, 2):
        raise ValueError(f"padding: expected an int in [0, {min(k, 2)}], got {padding}")
    if pool not in (1, 2):
        raise ValueError(f"pool: expected 1 or 2, got {pool}")
    if pool == 2 and (k != 1 or stride != 1 or padding != 0):
        raise ValueError("pool=2 is only supported with a 1x1 kernel, stride 1 and padding 0 "
                         f"(got k={k}, stride={stride}, padding={padding})")
    Ho = conv_out_size(H, k, stride, padding, pool)
    Wo = conv_out_size(W, k, stride, padding, pool)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"x: spatial size {H}x{W} is too small for k={k}, stride={stride}, "
                         f"padding={padding}, pool={pool}")
    return Geometry(N, Cin, H, W, Cout, k, stride, padding, pool, Ho, Wo)


def check_output(name: str, t, g: Geometry, x) -> None:
    """``t``: the convolution's output (or its gradient), ``[N, Cout, Ho, Wo]`` in x's dtype."""
    rt.check_features(name, t)
    rt.check_same_shape(name, t, (g.N, g.Cout, g.Ho, g.Wo), "the convolution's output")
    if t.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} (as x), got {t.dtype}")
    rt.check_device(name, t, x.device)


def batch_chunks(n: int, *tensors) -> list:
    """``[(n0, n1), ...]`` covering ``range(n)`` such that, within each chunk, every element of
    every tensor (``None`` ignored) lies less than 2**31 elements from the chunk's first image:
    the kernels then index in int32 from a per-chunk base. One chunk unless a launch touches
    more than 2**31 elements (``rt.check_features`` bounds one image)."""
    per_chunk = n
    for t in tensors:
        if t is None or t.numel() == 0 or t.stride(0) == 0:
            continue
        image = sum((s - 1) * st for s, st in zip(t.shape[1:], t.stride()[1:]))
        per_chunk = min(per_chunk, max(1, (rt.INT32_MAX - image) // t.stride(0) + 1))
    return [(n0, min(n, n0 + per_chunk)) for n0 in range(0, n, max(1, per_chunk))]
