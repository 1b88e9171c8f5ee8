"""Argument checks run before any kernel: each error names the argument and what was expected."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from .dtypes import FEATURE_DTYPES, stats_dtype


def check_features(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D NCHW tensor, got shape {tuple(t.shape)}")
    if t.dtype not in FEATURE_DTYPES:
        raise TypeError(f"{name}: expected float32, float64, float16 or bfloat16, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(t.shape)}")


def check_like(t, name: str, ref: torch.Tensor, ref_name: str, shape=None) -> None:
    """``t`` has ``ref``'s device and dtype, and ``shape`` (default ``ref``'s shape)."""
    shape = tuple(ref.shape) if shape is None else tuple(shape)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} like {ref_name}, got {t.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} like {ref_name}, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")


def check_channel_vector(v, name: str, x: torch.Tensor, x_name: str = "x") -> None:
    """A per-channel vector for ``x``: shape [C], stats dtype, x's device."""
    channels = x.shape[1]
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(v).__name__}")
    if tuple(v.shape) != (channels,):
        raise ValueError(f"{name}: expected one value per channel of {x_name}, shape ({channels},), "
                         f"got {tuple(v.shape)}")
    if v.dtype != stats_dtype(x.dtype):
        raise TypeError(f"{name}: expected dtype {stats_dtype(x.dtype)} for {x.dtype} features, "
                        f"got {v.dtype}")
    if v.device != x.device:
        raise ValueError(f"{name}: expected a tensor on {x.device} like {x_name}, got {v.device}")


def check_bn_mean(mean) -> None:
    """A BatchNorm's statistics vector: 1-D, float32 or float64 (the stats dtypes)."""
    if not isinstance(mean, torch.Tensor):
        raise TypeError(f"mean: expected a torch.Tensor, got {type(mean).__name__}")
    if mean.dim() != 1 or mean.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"mean: expected 1-D float32 or float64 statistics, got shape "
                        f"{tuple(mean.shape)} {mean.dtype}")


def check_bn_vector(v, name: str, mean: torch.Tensor, dtype=None, optional: bool = False) -> None:
    """A BatchNorm per-channel vector beside ``mean`` (checked by :func:`check_bn_mean`):
    ``mean``'s length and device, ``dtype`` if given (else any floating dtype); None allowed
    when ``optional``."""
    if v is None and optional:
        return
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(v).__name__}")
    if tuple(v.shape) != tuple(mean.shape):
        raise ValueError(f"{name}: expected shape {tuple(mean.shape)} (one value per channel, as "
                         f"mean), got {tuple(v.shape)}")
    if not v.dtype.is_floating_point or (dtype is not None and v.dtype != dtype):
        raise TypeError(f"{name}: expected dtype {dtype or 'floating'}, got {v.dtype}")
    if v.device != mean.device:
        raise ValueError(f"{name}: expected a tensor on {mean.device} like mean, got {v.device}")


def check_not_overlapping(out: torch.Tensor, out_name: str, *inputs: tuple[torch.Tensor, str]) -> None:
    """A written tensor must not share memory with a tensor the same kernel reads. Channel views
    of one NCHW buffer interleave in memory, so for those compare channel ranges."""
    if out.device.type == "meta" or is_fake(out):  # tracing: no data to compare
        return
    for t, name in inputs:
        if t.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
            continue
        if out.stride() == t.stride() and t.stride(1) > 0:
            a0 = out.storage_offset() // out.stride(1)
            b0 = t.storage_offset() // t.stride(1)
            if a0 + out.shape[1] <= b0 or b0 + t.shape[1] <= a0:
                continue
        raise ValueError(f"{out_name}: shares memory with {name}; write into a channel slice "
                         "that the op does not read")


def check_conv_args(x: torch.Tensor, weight, stride: int, padding: int, pool: int,
                    x_name: str = "x", weight_name: str = "weight") -> None:
    """A convolution of ``x`` by ``weight`` the kernels run (errors name the arguments as
    ``x_name`` / ``weight_name``)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"{weight_name}: expected a 4-D [C_out, C_in, k, k] tensor, got "
                         f"{getattr(weight, 'shape', type(weight).__name__)}")
    k = weight.shape[2]
    if weight.shape[3] != k or k not in (1, 3):
        raise ValueError(f"{weight_name}: expected a square 1x1 or 3x3 kernel, got {tuple(weight.shape[2:])}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"{weight_name}: expected {x.shape[1]} input channels (those of {x_name}), got {weight.shape[1]}")
    if weight.shape[0] < 1:
        raise ValueError(f"{weight_name}: expected at least one output channel, got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{weight_name}: expected dtype {x.dtype} like {x_name}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"{weight_name}: expected a tensor on {x.device} like {x_name}, got {weight.device}")
    if stride not in (1, 2):
        raise ValueError(f"stride: expected 1 or 2, got {stride}")
    if padding not in (0, 1):
        raise ValueError(f"padding: expected 0 or 1, got {padding}")
    if pool not in (1, 2):
        raise ValueError(f"pool: expected 1 (none) or 2 (2x2 average), got {pool}")
    if pool == 2 and (k != 1 or stride != 1):
        raise ValueError("pool: 2x2 average pooling is fused only before a 1x1 stride-1 convolution")
    if pool == 2 and padding != 0:
        raise ValueError(f"padding: expected 0 with 2x2 pooling (pool=2), got {padding}")
    h, w = x.shape[2] // pool, x.shape[3] // pool
    if h + 2 * padding < k or w + 2 * padding < k:
        raise ValueError(f"{x_name}: spatial size {tuple(x.shape[2:])} is too small for a {k}x{k} "
                         f"convolution with padding {padding}")


def conv_output_shape(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, pool: int):
    k = weight.shape[2]
    h, w = x.shape[2] // pool, x.shape[3] // pool
    return (x.shape[0], weight.shape[0], (h + 2 * padding - k) // stride + 1,
            (w + 2 * padding - k) // stride + 1)
