"""Mixed precision: which autocast dtype to use and the gradient scaler that goes with it.

``--amp auto`` (default): bfloat16 on a GPU that supports it, else float16 on a GPU, and full
float32 on the CPU (where the fused model's kernels take float32 only). float16 trains with a
:class:`torch.amp.GradScaler`; bfloat16 needs none.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import UserError

AMP_MODES = ("auto", "bf16", "fp16", "off")


def supports_autocast(model, device: torch.device) -> bool:
    """Whether ``model`` runs under autocast on ``device``. The plain model runs anywhere. The
    fused models (``supports_autocast = True``) keep their feature buffers in the autocast
    dtype, which their kernels take on GPUs (Triton); their CPU kernels run float32/float64."""
    if type(model).__name__ == "MSDNetPlain":
        return True
    return device.type == "cuda" and bool(getattr(model, "supports_autocast", False))


def resolve_amp(mode: str, device: torch.device, model_supports_autocast: bool = True) -> Optional[torch.dtype]:
    """The autocast dtype for ``mode`` on ``device`` (``None``: no autocast). ``auto`` is
    float32 for a model that does not run under autocast; an explicit half precision is then
    an error."""
    if mode not in AMP_MODES:
        raise UserError(f"--amp {mode!r}: expected one of {', '.join(AMP_MODES)}")
    if mode == "off":
        return None
    if not model_supports_autocast:
        if mode == "auto":
            return None
        raise UserError(f"--amp {mode}: the fused model runs mixed precision on GPUs only (its CPU kernels "
                        "take float32); use --impl plain for mixed precision on the CPU, or --amp off")
    if device.type != "cuda":
        if mode == "auto":
            return None
        if mode == "fp16":
            raise UserError("--amp fp16 needs a GPU; on the CPU use --amp bf16 or --amp off")
        return torch.bfloat16
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """The autocast context for ``dtype`` (disabled when ``dtype`` is ``None``)."""
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def make_scaler(device: torch.device, dtype: Optional[torch.dtype]) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for float16."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def amp_name(dtype: Optional[torch.dtype]) -> str:
    return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
