"""CPU kernels (``msdnet_ops._cpu_kernels``, C++ / OpenMP) for CPU tensors of float32 or
float64. Thread count follows ``torch.get_num_threads()``. Semantics: :mod:`msdnet_ops.reference`;
argument validation is the caller's (:mod:`msdnet_ops.ops`)."""
from __future__ import annotations

import torch

from ._common import DTYPE_CODES, LazyModule, stats_dtype, vec, view

_MODULE = LazyModule("msdnet_ops._cpu_kernels", "CPU kernels",
                     "pip install --no-build-isolation .")
_CPU_DTYPES = (torch.float32, torch.float64)


def available() -> bool:
    """Whether the compiled CPU module is importable."""
    return _MODULE.get() is not None


def load_error() -> str | None:
    """Why the compiled CPU module is not importable (``None`` when it is)."""
    return _MODULE.error


def _module():
    return _MODULE.require()


def _code(t: torch.Tensor) -> int:
    if t.dtype not in _CPU_DTYPES:
        raise TypeError(f"msdnet_ops CPU kernels run float32 and float64 tensors, got {t.dtype}")
    return DTYPE_CODES[t.dtype]


def channel_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    m = _module()
    code = _code(x)
    mean = torch.empty(x.shape[1], dtype=stats_dtype(x.dtype))
    invstd = torch.empty_like(mean)
    m.channel_stats(code, view(x), float(eps), vec(mean), vec(invstd), torch.get_num_threads())
    return mean, invstd


def channel_stats_backward_(x, mean, invstd, grad_mean, grad_invstd, grad_x) -> None:
    _module().channel_stats_backward(_code(x), view(x), vec(mean), vec(invstd), vec(grad_mean),
                                     vec(grad_invstd), view(grad_x), torch.get_num_threads())


def affine_relu_into(x, scale, shift, out) -> None:
    _module().affine_relu(_code(x), view(x), vec(scale), vec(shift), view(out),
                          torch.get_num_threads())


def affine_relu_backward_(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift,
                          accumulate: bool = True) -> None:
    _module().affine_relu_backward(_code(x), view(x), vec(scale), vec(shift), view(grad_z),
                                   view(grad_x), vec(grad_scale), vec(grad_shift),
                                   bool(accumulate), torch.get_num_threads())


def gather_batch_into(src, index, out) -> None:
    m = _module()
    index = index.contiguous()
    m.gather_batch(src.element_size(), view(src), index.data_ptr(), view(out),
                   torch.get_num_threads())


def isa() -> str | None:
    """The instruction-set variant in use (``baseline``, ``avx2``, ``avx512``), if built."""
    m = _MODULE.get()
    return None if m is None else m.current_isa()
