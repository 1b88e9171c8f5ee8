"""Cheap reads of the environment variables that choose kernels (``MSDNET_OPS_BACKEND``,
``MSDNET_OPS_CPU_CONV``, ``TRITON_INTERPRET``...), which every op consults: a training step
reads them ~2000 times, and ``os.environ.get`` (encode the key, look it up, decode the value)
took ~5% of a batch-1 MSDNet step on the CPU. :func:`raw` looks the stored value up directly,
so a caller can remember what it derived from each value and still follow changes made while
the process runs (``os.environ[...] = ...``, pytest's ``monkeypatch.setenv``).
"""
from __future__ import annotations

import os

# os.environ keeps its values in this mapping (CPython), updated by every assignment to it
_STORED = getattr(os.environ, "_data", None)
_KEYS: dict = {}


def raw(name: str):
    """The value of ``name`` as ``os.environ`` stores it (bytes on POSIX), or None when unset:
    equal values mean an unchanged setting."""
    if _STORED is None:  # another Python: the plain lookup
        return os.environ.get(name)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = os.environ.encodekey(name)
    return _STORED.get(key)


def setting(name: str, default: str) -> str:
    """``os.environ.get(name)`` stripped and lower-cased, or ``default`` when unset or blank."""
    return os.environ.get(name, "").strip().lower() or default
