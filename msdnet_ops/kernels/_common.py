"""Helpers shared by the CPU and CUDA kernel wrappers: lazy module loading, and tensors ->
the plain integers the compiled modules take (no torch types cross into C++)."""
from __future__ import annotations

import importlib
import threading

import torch

from ..dtypes import stats_dtype  # noqa: F401  (re-exported for the wrappers)

# dtype codes of csrc/include/msdnet_ops/common.h
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def view(t: torch.Tensor) -> tuple:
    """A 4-D tensor as ``(data_ptr, N, C, H, W, sN, sC, sH, sW)`` (strides in elements)."""
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    return (t.data_ptr(), n, c, h, w, sn, sc, sh, sw)


def vec(t: torch.Tensor) -> tuple:
    """A per-channel vector as ``(data_ptr, stride)``."""
    return (t.data_ptr(), t.stride(0))


class LazyModule:
    """Imports a compiled module on first use and remembers the outcome (module or error)."""

    def __init__(self, name: str, what: str, how_to_build: str):
        self.name = name
        self.what = what
        self.how_to_build = how_to_build
        self._module = None
        self._error: str | None = None
        self._tried = False
        self._lock = threading.Lock()

    def get(self):
        if not self._tried:
            with self._lock:
                if not self._tried:
                    try:
                        self._module = importlib.import_module(self.name)
                    except Exception as exc:  # ImportError, or OSError from the loader
                        self._error = f"importing {self.name} failed: {type(exc).__name__}: {exc}"
                    self._tried = True
        return self._module

    @property
    def error(self) -> str | None:
        self.get()
        return self._error

    def require(self):
        """The module, or a RuntimeError that says why it is missing and how to build it."""
        m = self.get()
        if m is None:
            raise RuntimeError(f"msdnet_ops was built without its {self.what} ({self._error}); "
                               f"rebuild them: {self.how_to_build}")
        return m

    def reset(self) -> None:
        """Forget the outcome (tests)."""
        with self._lock:
            self._module, self._error, self._tried = None, None, False
