"""Per-shape choice between the fused Triton convolution and the unfused path (our
memory-bound transform kernel materialising ``relu(scale*x+shift)``, then cuDNN), made the
first time a shape is seen by timing both, and remembered for the process, as
``torch.backends.cudnn.benchmark`` does for cuDNN's algorithms.

Which policy applies is ``backends.transform_conv_policy``: ``fused``, ``unfused`` or
``timed``. Timing runs each path on scratch outputs (a backward accumulates into its
gradients, which must see exactly one update), after one warm-up call each (Triton's autotuning
and compilation, cuDNN's algorithm search), and keeps the faster; ties go to the fused path
(less memory).
"""
from __future__ import annotations

import threading
import time

import torch

from . import backends

PATHS = ("fused", "unfused")
_chosen: dict = {}
timings: dict = {}  # key -> {path: seconds}: the measurements behind each choice, for reports
_lock = threading.Lock()
REPEATS = 3


def shape_key(op: str, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int, pool: int,
              *extra) -> tuple:
    """What the choice depends on: the op, device, dtype, shapes, geometry and x's layout."""
    layout = "nhwc" if x.stride(1) == 1 and x.shape[1] > 1 else "nchw"
    return (op, str(x.device), x.dtype, tuple(x.shape), tuple(weight.shape), stride, padding, pool,
            layout, *extra)


def _time(run, device: torch.device) -> float:
    """Best of REPEATS calls of ``run`` (after the caller's warm-up), seconds."""
    best = float("inf")
    for _ in range(REPEATS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
    return best


def choose(key: tuple, trial, device: torch.device) -> str:
    """The path for ``key``: cached, or timed now with ``trial(path)`` (runs ``path`` once on
    scratch outputs)."""
    path = _chosen.get(key)
    if path is not None:
        return path
    times = {}
    for p in PATHS:
        trial(p)  # warm-up: compile, autotune, algorithm search
        times[p] = _time(lambda p=p: trial(p), device)
    path = "fused" if times["fused"] <= times["unfused"] else "unfused"
    with _lock:
        _chosen.setdefault(key, path)
        timings[key] = times
    return _chosen[key]


def fused(key, trial, device: torch.device) -> bool:
    """Whether this call of the ``triton`` backend runs the fused kernel (``key()``: its
    :func:`shape_key`, computed only when needed), as ``backends.transform_conv_policy``
    says (timing only outside CUDA-graph capture, where it cannot synchronise: there the fused
    kernel runs)."""
    policy = backends.transform_conv_policy(device)
    if policy != "timed":
        return policy == "fused"
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _chosen.get(key(), "fused") == "fused"
    return choose(key(), trial, device) == "fused"


def reset() -> None:
    """Forget every choice (tests; after changing the GPU's clocks or the library)."""
    with _lock:
        _chosen.clear()
        timings.clear()
