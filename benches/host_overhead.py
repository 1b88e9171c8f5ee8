#!/usr/bin/env python
"""Host time of ours' training step on the GPU path, measured without a GPU.

    python benches/host_overhead.py [--models a,b] [--batch 2] [--reps 7]

On an H200 a training step of ours is host-bound (``benches/RESULTS-gpu.md``: the device is
busy 4% of it), so the host time per step is the figure to cut. Here each model's training
step runs on CPU tensors with ``MSDNET_OPS_BACKEND=triton`` inside
``msdnet_ops.triton._runtime.capturing``: every launch is decided as on a GPU (blocks,
autotune candidates) and then dropped instead of run, so the time left is ours' Python
(checks, autograd Functions, buffer bookkeeping, launch preparation) plus the CPU cost of the
small ATen ops (allocations, zero fills) at a tiny batch. Triton's own launcher
(``JITFunction.run``, ~90 us per launch under cProfile on the H200's host) is not included.
Prints the median and spread of ``--reps`` steps and the launches per step.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors may reach Triton launchers (then dropped)
os.environ["MSDNET_OPS_BACKEND"] = "triton"

if __name__ == "__main__":  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benches import cases  # noqa: E402

MODELS = ("msdnet-cifar100-anytime", "densenet-bc100")


def host_step(name: str, batch: int, reps: int) -> dict:
    """Median/min/max host seconds of a training step with launches dropped, and launches/step."""
    from msdnet_ops.triton import _runtime
    launches = [0]

    def drop(*_):
        launches[0] += 1
    with _runtime.capturing(drop):
        model, fmt = cases.build_model(name, "ours", "cpu", torch.float32)
        x, y = cases.model_input(name, batch, "cpu", torch.float32, fmt)
        step = cases.train_step_fn(model, x, y)
        step()
        step()
        launches[0] = 0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    times.sort()
    return dict(model=name, batch=batch, median_s=times[len(times) // 2], min_s=times[0],
                max_s=times[-1], launches=launches[0] / reps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args(argv)
    unknown = [n for n in args.models.split(",") if n not in cases.MODEL_CASES]
    if unknown:
        ap.error(f"--models: unknown {', '.join(unknown)} (expected some of {', '.join(sorted(cases.MODEL_CASES))})")
    torch.set_num_threads(1)  # host overhead is single-threaded Python
    print("| model | batch | host ms/step (median) | min-max | Triton launches/step | host us/launch |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        r = host_step(name, args.batch, args.reps)
        print(f"| {name} | {r['batch']} | {r['median_s'] * 1e3:.1f} | {r['min_s'] * 1e3:.1f}-"
              f"{r['max_s'] * 1e3:.1f} | {r['launches']:.0f} | {r['median_s'] / r['launches'] * 1e6:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
