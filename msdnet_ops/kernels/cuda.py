"""CUDA kernels (``msdnet_ops._cuda_kernels``) for CUDA tensors of float32, float64, float16
and bfloat16, launched on the tensors' device and its current stream. Semantics:
:mod:`msdnet_ops.reference`; argument validation is the caller's (:mod:`msdnet_ops.ops`).

Importing this module needs neither a GPU nor a CUDA runtime: the compiled module is loaded on
first use (it links the CUDA runtime statically and needs the driver only to launch).
"""
from __future__ import annotations

import torch

from ._common import DTYPE_CODES, LazyModule, stats_dtype, vec, view

_MODULE = LazyModule("msdnet_ops._cuda_kernels", "CUDA kernels",
                     "with a CUDA toolkit, FORCE_CUDA=1 pip install --no-build-isolation .")


def available() -> bool:
    """Whether the compiled CUDA module is importable (built with a CUDA toolkit). Running a
    kernel also needs a CUDA device (``torch.cuda.is_available()``)."""
    return _MODULE.get() is not None


def load_error() -> str | None:
    """Why the compiled CUDA module is not importable (``None`` when it is)."""
    return _MODULE.error


def _module():
    return _MODULE.require()


def _launch(t: torch.Tensor) -> tuple[int, int]:
    """(device index, current stream handle) for a kernel reading ``t``."""
    device = t.device if t.device.index is not None else torch.device("cuda", torch.cuda.current_device())
    return device.index, torch.cuda.current_stream(device).cuda_stream


def _workspace(m, code: int, x: torch.Tensor, device: int) -> torch.Tensor:
    nbytes = max(int(m.reduction_workspace_bytes(code, view(x), device)), 1)
    return torch.empty(nbytes, dtype=torch.uint8, device=x.device)


def channel_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.empty(x.shape[1], dtype=stats_dtype(x.dtype), device=x.device)
    invstd = torch.empty_like(mean)
    channel_stats_into(x, eps, mean, invstd)
    return mean, invstd


def channel_stats_into(x, eps: float, mean, invstd) -> None:
    m = _module()
    code = DTYPE_CODES[x.dtype]
    device, stream = _launch(x)
    ws = _workspace(m, code, x, device)
    m.channel_stats(code, view(x), float(eps), vec(mean), vec(invstd), ws.data_ptr(), ws.numel(),
                    device, stream)


def channel_stats_backward_(x, mean, invstd, grad_mean, grad_invstd, grad_x) -> None:
    m = _module()
    device, stream = _launch(x)
    m.channel_stats_backward(DTYPE_CODES[x.dtype], view(x), vec(mean), vec(invstd),
                             vec(grad_mean), vec(grad_invstd), view(grad_x), device, stream)


def affine_relu_into(x, scale, shift, out) -> None:
    m = _module()
    device, stream = _launch(x)
    m.affine_relu(DTYPE_CODES[x.dtype], view(x), vec(scale), vec(shift), view(out), device, stream)


def affine_relu_backward_(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift,
                          accumulate: bool = True) -> None:
    m = _module()
    code = DTYPE_CODES[x.dtype]
    device, stream = _launch(x)
    ws = _workspace(m, code, x, device)
    m.affine_relu_backward(code, view(x), vec(scale), vec(shift), view(grad_z), view(grad_x),
                           vec(grad_scale), vec(grad_shift), bool(accumulate), ws.data_ptr(),
                           ws.numel(), device, stream)


def gather_batch_into(src, index, out) -> None:
    m = _module()
    device, stream = _launch(src)
    index = index.contiguous()
    m.gather_batch(src.element_size(), view(src), index.data_ptr(), view(out), device, stream)
