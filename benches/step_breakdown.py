#!/usr/bin/env python
"""Where ours' training step spends its time, by part, measured inside real steps.

    python benches/step_breakdown.py [--model msdnet-cifar100-anytime] [--batch 32] [--steps 10]
    python benches/step_breakdown.py --cells [--model msdnet-cifar100-anytime] [--batch 64]

``--cells`` (MSDNet): per plan cell of an inference forward (``--steps`` forwards), its
multiply-adds, its time and their ratio: where the anytime pass's time goes, by exit.

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


def cell_breakdown(model: str, batch: int, forwards: int) -> tuple[float, list]:
    """Where an MSDNet inference forward spends its time, by plan cell: (seconds per forward,
    [(cell index, kind, scale, per-sample multiply-adds, seconds per forward)] in run order).
    The anytime goal compares time with multiply-adds per exit; this shows which cells run
    slowest per multiply-add."""
    from msdnet_ops.models import msdnet_runtime
    net, fmt = cases.build_model(model, "ours", "cpu", torch.float32)
    if not hasattr(net, "cell_macs"):
        raise SystemExit(f"--cells: {model} is not an MSDNet")
    net.eval()
    x, _ = cases.model_input(model, batch, "cpu", torch.float32, fmt)
    macs = net.cell_macs(tuple(x.shape[1:]))
    seconds, order = collections.defaultdict(float), []
    original = msdnet_runtime.PlanRun.run_cell

    def timed(run, index):
        t0 = time.perf_counter()
        try:
            return original(run, index)
        finally:
            seconds[index] += time.perf_counter() - t0
            if index not in order:
                order.append(index)
    msdnet_runtime.PlanRun.run_cell = timed
    try:
        with torch.no_grad():
            for _ in range(2):  # warm-up: per-shape convolution choices, allocations
                net(x)
            seconds.clear()
            t0 = time.perf_counter()
            for _ in range(forwards):
                net(x)
            per_forward = (time.perf_counter() - t0) / forwards
    finally:
        msdnet_runtime.PlanRun.run_cell = original
    cells = net.plan.cells
    return per_forward, [(i, cells[i].kind, cells[i].scale, macs[i], seconds[i] / forwards)
                         for i in order]


def _print_cells(model, batch, forwards) -> None:
    per_forward, rows = cell_breakdown(model, batch, forwards)
    print(f"{model}, batch {batch}, float32, {torch.get_num_threads()} threads: "
          f"{per_forward * 1e3:.1f} ms per inference forward (mean of {forwards})")
    print("| cell | kind | scale | MMAC / sample | ms / forward | GMAC/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for index, kind, scale, macs, seconds in rows:
        print(f"| {index} | {kind} | {scale} | {macs / 1e6:.2f} | {seconds * 1e3:.2f} | "
              f"{macs * batch / seconds / 1e9:.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="msdnet-cifar100-anytime",
                    choices=sorted(cases.MODEL_CASES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cells", action="store_true",
                    help="MSDNet only: time each plan cell of an inference forward instead")
    args = ap.parse_args(argv)
    if args.batch < 1 or args.steps < 1:
        ap.error("--batch and --steps: expected positive counts")
    if args.cells:
        _print_cells(args.model, args.batch, args.steps)
        return 0
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
