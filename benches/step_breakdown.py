#!/usr/bin/env python
"""Where ours' training step spends its time, by part, measured inside real steps.

    python benches/step_breakdown.py [--model msdnet-cifar100-anytime] [--batch 32] [--steps 10]

Wraps timers around each fused autograd node's forward and backward
(:mod:`msdnet_ops.nn.functions`), every ``ops.eager`` op, the CPU convolution entry points
(:mod:`msdnet_ops.kernels.cpu_conv`) and the buffer bookkeeping, runs ``--steps`` training
steps after warm-up, and prints per part: calls per step, milliseconds per step, share of the
step and microseconds per call. Parts nest (a node's time includes the ops it calls), so
shares do not add up to 100 %. Why in a real step: measured there, the small per-unit ops
cost 2-3x what they cost in a loop of their own (the convolutions between them evict the
caches), which is what decided fusing a unit's BatchNorm+ReLU into one call
(``ops.batchnorm_relu_into_``). The timers add ~1 us per call.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time

if __name__ == "__main__":  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benches import cases  # noqa: E402


class Timers:
    """Accumulated (calls, seconds) per label, around functions replaced in place."""

    def __init__(self):
        self.totals = collections.defaultdict(lambda: [0, 0.0])
        self._undo = []

    def _timed(self, fn, label):
        totals = self.totals

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                entry = totals[label]
                entry[0] += 1
                entry[1] += time.perf_counter() - t0
        return timed

    def wrap(self, owner, name: str, label: str, static: bool = False) -> None:
        """Times ``owner.name`` (a module function, an instance attribute, a method, or with
        ``static`` a staticmethod of a class) until :meth:`restore`."""
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
        fn = original.__func__ if static else original
        timed = self._timed(fn, label)
        setattr(owner, name, staticmethod(timed) if static else timed)
        self._undo.append((owner, name, original))

    def restore(self) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()


def instrument(timers: Timers) -> None:
    """The parts of ours' training step that :func:`breakdown` reports."""
    from msdnet_ops import ops
    from msdnet_ops.kernels import cpu_conv
    from msdnet_ops.nn import batchnorm_relu, bn_affine, feature_buffer, functions
    for name in list(vars(ops.eager)):
        timers.wrap(ops.eager, name, f"ops.eager.{name}")
    for node in (functions.TransformConvWrite, functions.ConvBNReLUWrite,
                 functions.TransformRead, functions.WriteFeatures, functions.ReadFeatures):
        for name in ("forward", "backward"):
            timers.wrap(node, name, f"{node.__name__}.{name}", static=True)
    for name in ("conv", "conv_backward_", "dense_conv_backward", "dense_input"):
        timers.wrap(cpu_conv, name, f"cpu_conv.{name}")
    for name in ("compute_stats", "finalize", "ensure_grads"):
        timers.wrap(feature_buffer.BufferState, name, f"BufferState.{name}")
    for name in ("__init__", "backward"):
        timers.wrap(bn_affine.AffineParams, name, f"AffineParams.{name}")
        timers.wrap(batchnorm_relu.BatchNormReLU, name, f"BatchNormReLU.{name}")
    for name in ("__init__", "conv", "conv_backward"):
        timers.wrap(batchnorm_relu.BatchNormReLURead, name, f"BatchNormReLURead.{name}")


def breakdown(model: str, batch: int, steps: int) -> tuple[float, list]:
    """(seconds per step, [(label, calls per step, seconds per step)] by time, largest first)."""
    timers = Timers()
    instrument(timers)  # first: backends bind some of these functions when first imported
    try:
        net, fmt = cases.build_model(model, "ours", "cpu", torch.float32)
        x, y = cases.model_input(model, batch, "cpu", torch.float32, fmt)
        step = cases.train_step_fn(net, x, y)
        for _ in range(3):  # warm-up: per-shape convolution choices, allocations
            step()
        timers.totals.clear()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        per_step = (time.perf_counter() - t0) / steps
    finally:
        timers.restore()
    rows = [(label, calls / steps, seconds / steps)
            for label, (calls, seconds) in timers.totals.items()]
    return per_step, sorted(rows, key=lambda r: -r[2])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="msdnet-cifar100-anytime",
                    choices=sorted(cases.MODEL_CASES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    if args.batch < 1 or args.steps < 1:
        ap.error("--batch and --steps: expected positive counts")
    per_step, rows = breakdown(args.model, args.batch, args.steps)
    print(f"{args.model}, batch {args.batch}, float32, {torch.get_num_threads()} threads: "
          f"{per_step * 1e3:.1f} ms per training step (mean of {args.steps})")
    print("| part | calls / step | ms / step | share | us / call |")
    print("| --- | --- | --- | --- | --- |")
    for label, calls, seconds in rows:
        print(f"| {label} | {calls:.0f} | {seconds * 1e3:.2f} | {seconds / per_step:.0%} | "
              f"{seconds / calls * 1e6:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
