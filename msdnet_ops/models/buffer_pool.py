"""The scale buffers of MSDNet's inference runs, kept from one forward pass to the next.

A CPU inference run fills a handful of large NHWC buffers (6.5 MiB for the finest scale of
cifar100-anytime at batch 32). Freshly allocated, every one of their pages faults on its first
write (glibc returns blocks this large to the system when they are freed): ~4000 page faults
per cifar100-anytime forward at batch 32, most of them in the first block, i.e. before the first
exit. Handing the same tensors to the next run of the same shape removes them (measured
side by side, ``python benches/before_after.py``; docs/ARCHITECTURE.md). CUDA's caching
allocator already reuses its blocks, so only CPU tensors are kept.

Every value a run reads from a buffer it wrote first in that run (a unit writes its channels
before any consumer reads them), so a reused buffer needs no clearing.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from ..layout import empty_nhwc


class BufferPool:
    """Free NHWC tensors by (shape, dtype, device), at most ``max_shapes`` distinct keys (the
    least recently returned go first), one tensor per key.

    :meth:`take` hands a tensor to one run only (a lock guards the free lists, so concurrent
    runs on one model never share one); the run gives it back when no later cell reads it.
    Copies and pickles of a model start with an empty pool."""

    def __init__(self, max_shapes: int):
        self.max_shapes = int(max_shapes)
        self._free: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def take(self, shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A kept tensor of this shape, dtype and device, else a new one (uninitialised)."""
        key = (tuple(shape), dtype, torch.device(device))
        with self._lock:
            kept = self._free.pop(key, None)
        return kept if kept is not None else empty_nhwc(shape, dtype=dtype, device=device)

    def give_back(self, t: torch.Tensor) -> None:
        """Keeps ``t`` (a tensor :meth:`take` returned, no longer read) for a later run."""
        if t.device.type != "cpu":
            return
        key = (tuple(t.shape), t.dtype, t.device)
        with self._lock:
            self._free.pop(key, None)
            self._free[key] = t
            while len(self._free) > self.max_shapes:
                self._free.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()

    def nbytes(self) -> int:
        """Bytes held by the kept tensors."""
        with self._lock:
            return sum(t.numel() * t.element_size() for t in self._free.values())

    # a copied or unpickled model starts empty (kept tensors are no state)
    def __deepcopy__(self, memo):
        return BufferPool(self.max_shapes)

    def __getstate__(self):
        return {"max_shapes": self.max_shapes}

    def __setstate__(self, state):
        self.__init__(state["max_shapes"])
