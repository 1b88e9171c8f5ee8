"""Launch plumbing shared by the Triton kernels of this package.

* CUDA tensors run the compiled kernels (autotuned over the config tables of ``_autotune``).
* CPU tensors run the same kernels in Triton's interpreter (what CI tests use), which needs
  ``TRITON_INTERPRET=1`` in the environment before Triton is imported (then ``@triton.jit``
  makes interpretable kernels and device helpers; ``msdnet_ops.backends`` checks it). Interpreted
  launches take fixed small block sizes.
* :func:`capturing` records launches instead of running them, deciding everything as on a GPU
  (blocks, configs, precision): how ``benches/gpu_compile.py`` learns what a model launches.
* Validation helpers raise clear errors before any kernel runs.
"""
from __future__ import annotations

import contextlib
import functools
import struct

import torch
import triton
import triton.language as tl

from ..dtypes import stats_dtype  # noqa: F401  (used by the kernels' launchers)
from . import _direct_launch

try:  # Triton >= 3.0
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover
    InterpretedFunction = None

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}

INT32_MAX = 2**31 - 1


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPES[dtype]


def acc_tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# the active launch recorder (see capturing), or None, and the GPU size it plans for
_capture = None
_capture_sms = 132


def is_interpreted(device: torch.device) -> bool:
    """CPU tensors always go through the interpreter (except while capturing launches, which
    are decided as on a GPU)."""
    return device.type != "cuda" and _capture is None


def _interpreted(kernel):
    if InterpretedFunction is None or not isinstance(kernel, InterpretedFunction):
        raise RuntimeError("msdnet_ops: Triton kernels on CPU tensors run in Triton's interpreter, "
                           "which needs TRITON_INTERPRET=1 in the environment before triton is "
                           "imported")
    return kernel


def interpreting(kernel, device: torch.device) -> bool:
    """Whether ``kernel`` will run in the interpreter for tensors on ``device``."""
    if is_interpreted(device):
        return True
    return _capture is None and InterpretedFunction is not None and isinstance(kernel, InterpretedFunction)


def launch(kernel, grid, args, meta, blocks, device: torch.device, tuning=None) -> None:
    """Launch ``kernel[grid](*args, **meta)``.

    Interpreted (CPU tensors, or ``TRITON_INTERPRET=1``): with the fixed ``blocks``.
    Compiled: autotuned over ``tuning``'s configs (an ``_autotune.Tuning``), or with ``blocks``
    when ``tuning`` is None; a launch like an earlier one skips Triton's binder
    (:mod:`._direct_launch`). While :func:`capturing`, recorded instead."""
    if _capture is not None:
        from . import _autotune
        named = dict(zip(kernel.arg_names, args))
        configs = [blocks] if tuning is None else _autotune.candidates(tuning, named)
        _capture(kernel, args, meta, configs, tuning)
    elif is_interpreted(device):
        _interpreted(kernel)[grid](*args, **meta, **blocks)
    elif interpreting(kernel, device):
        with on_device(device):
            kernel[grid](*args, **meta, **blocks)
    else:
        with on_device(device):
            index = torch.cuda.current_device() if device.index is None else device.index
            if tuning is None:
                _direct_launch.launch(kernel, grid, args, meta, blocks, index,
                                      lambda: (kernel[grid](*args, **meta, **blocks), blocks))
            else:
                _direct_launch.launch(kernel, grid, args, meta, None, index,
                                      lambda: _launch_tuned(kernel, tuning, grid, args, meta), tuning)


def _launch_tuned(kernel, tuning, grid, args, meta):
    """Triton's autotuned launch; returns the compiled kernel it ran and the block sizes chosen
    (the config's own dict: copied only where the launch is remembered)."""
    from . import _autotune
    tuned = _autotune.autotuned(kernel, tuning)
    compiled = tuned[grid](*args, **meta)
    return compiled, tuned.best_config.kwargs


_CURRENT = contextlib.nullcontext()


def on_device(device: torch.device):
    """The context a launch on ``device`` runs in: Triton launches on the current CUDA device,
    so switch only when ``device`` is another one (entering ``torch.cuda.device`` costs a few
    microseconds, and a training step makes over a thousand launches)."""
    if device.index is None or device.index == torch.cuda.current_device():
        return _CURRENT
    return torch.cuda.device(device)


@contextlib.contextmanager
def capturing(record, sms: int = 132):
    """Within the block, kernel launches (on CPU tensors too) are decided as on a GPU with
    ``sms`` multiprocessors and, instead of running, passed to ``record(kernel, args, meta,
    configs, tuning)``: ``configs`` are the block/warp/stage dicts the autotuner would try (or
    the one fixed choice). Outputs are left unwritten. Not thread-safe; for tools."""
    global _capture, _capture_sms
    if _capture is not None:
        raise RuntimeError("capturing: already capturing")
    _capture, _capture_sms = record, sms
    try:
        yield
    finally:
        _capture = None


def dot_upcast(kernel, dtype: torch.dtype, device: torch.device) -> bool:
    """The interpreter's ``tl.dot`` multiplies bfloat16 blocks as raw uint16 bits: upcast
    bfloat16 operands to float32 there (exact: bf16 -> fp32 is lossless)."""
    return interpreting(kernel, device) and dtype == torch.bfloat16


# float32 convolutions follow PyTorch's own switch for cuDNN convolutions (TF32 allowed by
# default on Ampere and later). Set to "ieee" or "tf32" to override.
FLOAT32_PRECISION: str | None = None


def input_precision(dtype: torch.dtype, device: torch.device) -> str:
    if dtype != torch.float32 or is_interpreted(device):
        return "ieee"
    if FLOAT32_PRECISION is not None:
        return FLOAT32_PRECISION
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if _capture is not None:
        return _capture_sms
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def split_float(v: float) -> tuple[float, float]:
    """``v`` as two float32-representable parts (Triton passes Python floats as float32): a
    float64 kernel adds both to recover ``v`` to ~2**-48 relative. Rounded on the host in
    Python (no tensor: a statistics launch would otherwise cost two small tensors)."""
    hi = _float32(v)
    return hi, _float32(v - hi)


def _float32(v: float) -> float:
    """``v`` rounded to the nearest float32 (ties to even, as the hardware does)."""
    return struct.unpack("f", struct.pack("f", v))[0]


# Host-side integer helpers in plain Python: triton.cdiv / triton.next_power_of_2 are
# ConstexprFunctions (Triton 3.6, 3.8), a few microseconds per call on the host, and launches
# make thousands of these calls per training step (host time is what a GPU step waits for).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


# ----------------------------------------------------------------------------- validation

def check_features(name: str, t, dtypes=SUPPORTED_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name}: expected a 4-d NCHW tensor, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {t.dtype} is not supported by the Triton backend "
                        f"(expected one of {', '.join(str(d) for d in dtypes)})")
    if t.device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"{name}: Triton kernels need CUDA tensors (or CPU tensors under the "
                           f"interpreter), got device {t.device}")
    if t.numel() > 0:
        # per-image offsets are computed in int32; the batch offset in int64 (written out, not
        # as a generator: this runs a few thousand times per training step, on the host)
        _, c, h, w = t.shape
        sn, sc, sh, sw = t.stride()
        if sn < 0 or sc < 0 or sh < 0 or sw < 0:
            raise ValueError(f"{name}: negative strides are not supported")
        if (c - 1) * sc + (h - 1) * sh + (w - 1) * sw > INT32_MAX:
            raise ValueError(f"{name}: one image spans more than 2**31 elements; not supported")


def check_same_shape(name: str, t, shape, ref_name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} (as {ref_name}), got {tuple(t.shape)}")


def check_vector(name: str, v, length: int, device: torch.device, dtype=None) -> None:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(v).__name__}")
    if v.dim() != 1 or v.shape[0] != length:
        raise ValueError(f"{name}: expected a vector of {length} per-channel values, got shape {tuple(v.shape)}")
    if not v.dtype.is_floating_point or v.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected a floating per-channel vector, got dtype {v.dtype}")
    if dtype is not None and v.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {v.dtype}")
    if v.device != device:
        raise RuntimeError(f"{name}: expected device {device}, got {v.device}")


def check_device(name: str, t, device: torch.device) -> None:
    if t.device != device:
        raise RuntimeError(f"{name}: expected device {device} (as x), got {t.device}")


def check_writable_grad(name: str, t, shape, device: torch.device) -> None:
    check_same_shape(name, t, shape, "x")
    check_features(name, t)
    check_device(name, t, device)
