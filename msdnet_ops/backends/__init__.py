"""Which kernels run an op: the backend registry and its selection.

Every backend is a module of this package implementing the same functions with the same
signatures (:data:`OP_FUNCTIONS`; semantics: :mod:`msdnet_ops.reference`), so the ops layer
(:mod:`msdnet_ops.ops`) validates once and calls ``kernels_for(backend).<function>`` without
knowing which backend it is:

* :mod:`.reference`: the pure-PyTorch references, any device;
* :mod:`.cpu`: the C++ CPU kernels; convolutions by oneDNN (or MKL GEMMs on the strided
  buffer rows where faster, :mod:`msdnet_ops.kernels.cpu_conv`);
* :mod:`.cuda`: the CUDA C++ kernels; convolutions by cuDNN;
* :mod:`.triton`: the Triton kernels (fused transform-convolutions), or per shape the
  transform materialised and cuDNN's convolution (:func:`transform_conv_policy`).

Convolutions of engines that take dense inputs only (oneDNN, cuDNN) are composed from the
backend's own memory-bound kernels in :mod:`.composed`. Adding an op: its schema, checks, fake
and autograd in ``ops.py``, its reference in ``reference.py``, one function per backend
module here (a kernel file where the backend has its own kernel), and its tests.

``MSDNET_OPS_BACKEND`` (read at every call, so tests and users may change it at run time):

* ``auto`` (default): CPU tensors -> the C++ CPU kernels; CUDA tensors -> the Triton fused
  transform-conv kernels plus the CUDA C++ memory-bound kernels (float64 on CUDA, which Triton
  GEMMs do not serve, runs the CUDA C++ kernels with a cuBLAS/cuDNN convolution).
* ``reference``: the pure-PyTorch references (``msdnet_ops.reference``), any device.
* ``cpu``: the C++ CPU kernels; CPU tensors only.
* ``cuda``: the CUDA C++ kernels (convolutions by cuDNN); CUDA tensors only.
* ``triton``: the Triton kernels for every op; CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before Triton was imported (how CI tests them).

A backend that cannot serve a request raises; nothing falls back silently. The only fallback is
``auto`` on a CPU when the compiled CPU module is missing: the references compute the same
results more slowly, and a warning says so once.

``MSDNET_OPS_TRANSFORM_CONV`` (read at every call): how the ``triton`` backend runs a
transform-conv and its backward (:func:`transform_conv_policy`).
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from .. import environment

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
_warned_fallback = False


def requested_backend() -> str:
    name = environment.setting("MSDNET_OPS_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"MSDNET_OPS_BACKEND={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_resolved: dict = {}


def resolve(device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs an op on tensors of ``device``/``dtype``: one of
    ``reference``, ``cpu``, ``cuda``, ``triton``. Raises when the requested one cannot.
    Answers are remembered per environment, device type and dtype (every op asks)."""
    key = (environment.raw("MSDNET_OPS_BACKEND"), environment.raw("TRITON_INTERPRET"),
           device.type, dtype)
    backend = _resolved.get(key)
    if backend is None:
        backend = _resolved[key] = _resolve(device, dtype)
    return backend


def _resolve(device: torch.device, dtype: torch.dtype) -> str:
    name = requested_backend()
    if name == "reference":
        return name
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"msdnet_ops: tensors on {device.type!r} are not supported "
                           "(expected cpu or cuda); set MSDNET_OPS_BACKEND=reference to run the "
                           "pure-PyTorch references")
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16) and name != "triton":
        raise TypeError(f"msdnet_ops: {dtype} features are supported on CUDA devices only; "
                        "use float32 or float64 on the CPU")
    if name == "auto":
        if device.type == "cuda":
            return "cuda" if dtype == torch.float64 else "triton"
        from ..kernels import cpu as cpu_kernels
        if cpu_kernels.available():
            return "cpu"
        global _warned_fallback
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn("msdnet_ops: the compiled CPU kernels are missing "
                          f"({cpu_kernels.load_error()}); running the pure-PyTorch references "
                          "instead (same results, slower). Reinstall with "
                          "`pip install --no-build-isolation .` to build them.", RuntimeWarning)
        return "reference"
    if name == "cpu" and device.type != "cpu":
        raise RuntimeError("MSDNET_OPS_BACKEND=cpu runs CPU tensors only, got a CUDA tensor")
    if name == "cuda" and device.type != "cuda":
        raise RuntimeError("MSDNET_OPS_BACKEND=cuda runs CUDA tensors only, got a CPU tensor")
    if name == "triton" and device.type == "cuda" and dtype == torch.float64:
        raise TypeError("MSDNET_OPS_BACKEND=triton: Triton's GEMMs have no float64 path on GPUs; "
                        "use MSDNET_OPS_BACKEND=auto (the CUDA C++ kernels for float64) or cuda")
    if name == "triton" and device.type == "cpu" and not triton_interpreting():
        raise RuntimeError("MSDNET_OPS_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 "
                           "in the environment before Triton is imported")
    return name


TRANSFORM_CONV_POLICIES = ("fused", "unfused", "timed")


def transform_conv_policy(device: torch.device) -> str:
    """How the ``triton`` backend runs ``transform_conv_into_`` and its backward:

    * ``fused``: the fused Triton kernels (prologue transform, implicit GEMM);
    * ``unfused``: the transform materialised by our kernel, then cuDNN's convolution;
    * ``timed``: per shape, whichever of the two was faster when that shape was first seen
      (timed once, then cached: ``msdnet_ops.conv_choice``).

    ``MSDNET_OPS_TRANSFORM_CONV`` selects one; unset: ``timed`` when the backend was chosen
    automatically on a CUDA device (``MSDNET_OPS_BACKEND=auto``), else ``fused`` (an explicit
    ``triton`` backend runs Triton's kernels)."""
    key = (environment.raw("MSDNET_OPS_TRANSFORM_CONV"), environment.raw("MSDNET_OPS_BACKEND"),
           device.type)
    policy = _policies.get(key)
    if policy is None:
        policy = _policies[key] = _transform_conv_policy(device)
    return policy


_policies: dict = {}  # (stored settings, device type) -> policy: every transform-conv asks


def _transform_conv_policy(device: torch.device) -> str:
    name = environment.setting("MSDNET_OPS_TRANSFORM_CONV", "")
    if not name:
        return "timed" if device.type == "cuda" and requested_backend() == "auto" else "fused"
    if name not in TRANSFORM_CONV_POLICIES:
        raise ValueError(f"MSDNET_OPS_TRANSFORM_CONV={name!r}: expected one of "
                         f"{', '.join(TRANSFORM_CONV_POLICIES)}")
    return name


def runs_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the backend chosen for ``device`` runs ``dtype`` features (the CPU kernels run
    float32 and float64 only)."""
    try:
        resolve(device, dtype)
    except TypeError:
        return False
    return True


OP_FUNCTIONS = (
    "channel_stats", "channel_stats_into", "channel_stats_backward_", "bn_scale_shift_into",
    "bn_scale_shift_backward_", "affine_relu_into", "affine_relu_backward_", "batchnorm_relu_into",
    "batchnorm_relu_backward_", "batchnorm_relu_conv_backward_", "gather_batch_into",
    "transform_conv", "transform_conv_into", "transform_conv_backward_", "conv", "conv_into",
    "conv_backward_", "conv_bias_relu", "bottleneck_conv_bias_relu",
)
_modules: dict = {}


def kernels_for(backend: str):
    """The module implementing every op (:data:`OP_FUNCTIONS`) for ``backend``, imported on
    first use (the Triton one imports Triton)."""
    module = _modules.get(backend)
    if module is None:
        if backend not in BACKENDS[1:]:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS[1:])}, got {backend!r}")
        module = _modules[backend] = importlib.import_module(f"{__name__}.{backend}")
    return module
