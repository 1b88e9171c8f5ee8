"""Kernel launches of one training step on a GPU, counted on the CPU (no GPU needed).

A forward and backward of the model (no optimizer step) runs on CPU tensors:

* every ATen operation that reaches a kernel is counted (a ``TorchDispatchMode`` below
  autograd: views, allocations, other metadata-only operations and operations whose outputs
  have no elements launch nothing on a GPU and are left out);
* ``ours`` runs on the ``triton`` backend inside :func:`msdnet_ops.triton._runtime.capturing`,
  so each Triton kernel launch is decided as on a GPU and counted instead of run (its outputs
  are left unwritten: nothing here reads them).

A count is one launch per counted operation: cuDNN may use two kernels for one convolution, so
plain's count is a lower bound. ``benches/roofline.py`` uses these counts for its launch term,
and they bound how fast a step can be issued: a host that needs ``t`` microseconds per launch
cannot finish a step in less than ``launches * t``.
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# operations that allocate or only rewrite metadata: no kernel on a GPU
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
              "set_", "resize_", "lift_fresh", "_has_compatible_shallow_copy_type",
              "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset"}


class _CountOps(TorchDispatchMode):
    """Counts the ATen operations that launch a kernel, by name."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if not (func.is_view or name in _NO_KERNEL or _all_empty(out)):
            self.counts["aten." + name] += 1
        return out


def _all_empty(out) -> bool:
    """Whether the operation produced only tensors of no elements (on a GPU, ATen returns
    before launching for those: e.g. autograd summing the empty gradients of the fused nodes'
    ordering tokens)."""
    tensors = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return bool(tensors) and all(t.numel() == 0 for t in tensors)


class _CountTriton:
    """The ``record`` callable of ``capturing``: one launch per recorded kernel call."""

    def __init__(self, counts: collections.Counter):
        self.counts = counts

    def __call__(self, kernel, args, meta, configs, tuning):
        self.counts["triton." + getattr(kernel, "__name__", str(kernel))] += 1


def count_launches(name: str, variant: str, batch: int = 2, image: int | None = None
                   ) -> collections.Counter:
    """Kernel launches, by operation, of one training forward + backward of model ``name``
    (``variant``: ``plain`` or ``ours``) at ``batch`` (counts do not depend on it)."""
    from benches import cases
    from benches.gpu_launches import triton_backend_on_cpu
    from msdnet_ops.triton import _runtime
    if variant not in ("plain", "ours"):
        raise ValueError(f"variant: expected 'plain' or 'ours', got {variant!r}")
    counter = _CountOps()
    if variant == "ours":
        env = triton_backend_on_cpu()
        capture = _runtime.capturing(_CountTriton(counter.counts))
    else:
        env = capture = contextlib.nullcontext()
    with env:
        model, fmt = cases.build_model(name, variant, "cpu")
        x, y = cases.model_input(name, batch, "cpu", torch.float32, fmt, image=image)
        model.train()
        with capture, counter:
            cases.loss_of(model(x), y).backward()
    return counter.counts


def main() -> None:
    for name in ("densenet-bc100", "msdnet-cifar100-anytime"):
        for variant in ("plain", "ours"):
            counts = count_launches(name, variant)
            print(f"{name} {variant}: {sum(counts.values())} launches; most: "
                  + ", ".join(f"{k} {v}" for k, v in counts.most_common(8)))


if __name__ == "__main__":
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if ROOT not in sys.path:  # run as a script: python benches/launch_count.py
        sys.path.insert(0, ROOT)
    main()
