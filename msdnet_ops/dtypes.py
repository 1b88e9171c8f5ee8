"""The dtypes of feature values and of per-channel vectors, shared by every backend."""
from __future__ import annotations

import torch

FEATURE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of per-channel vectors (statistics, scale/shift and their gradients) for feature
    values of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
