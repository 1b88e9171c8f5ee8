"""Launching an already-compiled kernel without Triton's per-launch binder.

Triton's ``kernel[grid](...)`` (``JITFunction.run``, and ``Autotuner.run`` on top for tuned
kernels) re-derives the kernel's specialisation from every argument, builds a cache key from
it and its options, and looks the compiled kernel up: ~75 us of host time per launch under
cProfile on the H200's host, 1151 launches in one MSDNet training step (``RESULTS-gpu.md``).
A training step repeats the same launches every step, so this module remembers, per launch
*signature*, the ``CompiledKernel`` that Triton chose on the first such launch (compiled and,
for tuned kernels, autotuned there) and calls its launcher directly afterwards.

The signature is stricter than Triton's specialisation, never looser, so a remembered kernel
is only reused where Triton itself would pick it: each tensor's dtype and whether its address
is 16-byte aligned (all Triton specialises a pointer on), each integer's and bool's exact
value (Triton: its width, whether it is 1 or divisible by 16; the autotuner: the values of
its key), the type of each float (Triton does not specialise floats), every keyword argument
the same way, the device, the tuning table and the fixed block sizes. A launch whose
signature is new goes through Triton, which compiles, tunes and launches as always.

**Off by default for now**: this path has not yet run on a GPU (the machine it was written on
has none). ``MSDNET_OPS_DIRECT_LAUNCH=1`` turns it on; ``benches/gpu.py`` runs its GPU test
(``python_tests/test_direct_launch.py``) and times it against Triton's launcher
(``benches/gpu_direct_launch.py``), after which the default can change. Registered Triton
launch hooks (a profiler) send launches through Triton, which calls them, and so does a Triton
older than 3.4 (whose launchers took other arguments: this calls the launcher as Triton
3.4-3.8's ``JITFunction.run`` does).
"""
from __future__ import annotations

import inspect
import os
import warnings

import torch

try:  # Triton >= 3.4
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover
    _knobs = None



def enabled_by(value: str | None) -> bool:
    """The switch's meaning: unset, ``0`` or ``1``; anything else is refused (at import)."""
    if value is None or value.strip() in ("", "0"):
        return False
    if value.strip() == "1":
        return True
    raise ValueError(f"MSDNET_OPS_DIRECT_LAUNCH={value!r}: expected 0 (launch through Triton, the "
                     "default) or 1 (launch remembered kernels directly)")


ENABLED = enabled_by(os.environ.get("MSDNET_OPS_DIRECT_LAUNCH")) and _knobs is not None

_Tensor = torch.Tensor
_FLOAT = object()   # a float argument's place in a signature: Triton passes floats unspecialised
_remembered: dict = {}
MAX_REMEMBERED = 8192
_warned_full = False
stats = {"direct": 0, "through_triton": 0}   # launches of each kind (tests and benches read it)


def clear() -> None:
    """Forget every remembered kernel (tests; also safe at any time: launches go through
    Triton once more and are remembered again)."""
    _remembered.clear()
    stats.update(direct=0, through_triton=0)


def _parts(args) -> tuple:
    """Each positional argument's share of a launch signature (one comprehension: this runs
    per launch)."""
    return tuple([(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, _Tensor)
                  # floats are passed unspecialised; other values by type too (True == 1 and
                  # they hash alike, but Triton types them apart)
                  else (_FLOAT if type(a) is float else (type(a), a)) for a in args])


def signature(device_index: int, kernel, tuning, blocks, args, meta) -> tuple:
    """The key under which a launch's compiled kernel is remembered (see the module docstring).
    Keyword arguments (the constexprs) count by type and value, floats too."""
    return (device_index, kernel, tuning, None if blocks is None else tuple(blocks.items()),
            _parts(args), tuple([(k, type(v), v) for k, v in meta.items()]))


class _Remembered:
    """A compiled kernel and what its launcher needs besides the launch's own arguments."""
    __slots__ = ("compiled", "tail", "blocks")

    def __init__(self, compiled, tail, blocks):
        self.compiled, self.tail, self.blocks = compiled, tail, blocks


def _no_hooks() -> bool:
    """Whether no Triton launch hooks are registered (None in older Triton; an empty
    ``HookChain`` in 3.6+). With hooks, launches go through Triton, which calls them."""
    runtime = _knobs.runtime
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def _stream_getter():
    try:
        from torch._C import _cuda_getCurrentRawStream
        return _cuda_getCurrentRawStream
    except ImportError:  # pragma: no cover
        return lambda index: torch.cuda.current_stream(index).cuda_stream


_current_stream = None


def launch(kernel, grid, args, meta, blocks, device_index: int, call_triton, tuning=None) -> None:
    """Launch ``kernel`` on the current CUDA device: directly when this signature was seen
    before, else through ``call_triton()``: Triton's launch, returning the ``CompiledKernel``
    it ran and the block sizes it ran with (``blocks``, the fixed ones, or None when
    ``tuning`` picks them)."""
    global _current_stream
    if not ENABLED or not _no_hooks():
        call_triton()
        stats["through_triton"] += 1
        return
    key = signature(device_index, kernel, tuning, blocks, args, meta)
    hit = _remembered.get(key)
    if hit is None:
        compiled, chosen = call_triton()
        stats["through_triton"] += 1
        if _rememberable(kernel, compiled, args, meta):
            if len(_remembered) >= MAX_REMEMBERED:
                _forget_all_once()
            tail = _tail(kernel, len(args), meta, chosen)
            _remembered[key] = _Remembered(compiled, tail, dict(chosen))
        return
    if _current_stream is None:
        _current_stream = _stream_getter()
    g = grid(hit.blocks) if callable(grid) else grid
    c = hit.compiled
    c.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1, _current_stream(device_index),
          c.function, c.packed_metadata, None, None, None, *args, *hit.tail)
    stats["direct"] += 1


def _rememberable(kernel, compiled, args, meta) -> bool:
    """Whether the signature of this launch identifies its compiled kernel: not where Triton
    compiles asynchronously (a future), where a keyword argument is a tensor (it would count by
    identity), or where a positional argument is a float constexpr (counted by type only)."""
    if compiled is None or hasattr(compiled, "result") or any(isinstance(v, _Tensor) for v in meta.values()):
        return False
    params = inspect.signature(kernel.fn).parameters.values()
    return not any(type(a) is float and "constexpr" in str(p.annotation) for p, a in zip(params, args))


def _forget_all_once() -> None:
    """Many distinct launches (shapes that change every step, e.g. budgeted inference's
    compacted batches): start over rather than grow without bound; said once."""
    global _warned_full
    _remembered.clear()
    if not _warned_full:
        _warned_full = True
        warnings.warn(f"msdnet_ops: over {MAX_REMEMBERED} distinct Triton launches; the direct-launch "
                      "cache starts over (speed only: first launches of a signature go through Triton)",
                      RuntimeWarning, stacklevel=3)


def _tail(kernel, n_positional: int, meta: dict, blocks: dict) -> tuple:
    """The values of the kernel's parameters after the positional ones, in parameter order:
    the launcher takes every parameter (constexprs too) in the order Triton's binder lists them."""
    named = {**meta, **blocks}
    tail = []
    for p in list(inspect.signature(kernel.fn).parameters.values())[n_positional:]:
        if p.name in named:
            tail.append(named[p.name])
        elif p.default is not inspect.Parameter.empty:
            tail.append(p.default)
        else:
            raise RuntimeError(f"direct launch of {kernel.fn.__name__}: no value for parameter {p.name}")
    return tuple(tail)
