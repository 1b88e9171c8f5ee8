#!/usr/bin/env python
"""Where a model's training step spends its time: host (Python, launches) or device (kernels).

    python benches/gpu_profile.py [--model msdnet-cifar100-anytime] [--variants plain,ours]
                                  [--batch 64] [--steps 5] [--out DIR] [--device cuda]

For each variant, after two warm-up steps (compilation, autotuning, cuDNN's search):

* wall time per training step (synchronised), and the device's busy time per step: the sum of
  the kernels' durations in a ``torch.profiler`` trace. Busy far below wall means the step is
  host-bound (launch and Python overhead), not kernel-bound;
* kernel launches per step, and the kernels that take the most device time;
* the host side: ``cProfile`` of the same steps, the functions with the most own time.

Writes ``profile-<model>.txt`` into ``--out`` (and prints it).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

if __name__ == "__main__":  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benches import cases, harness  # noqa: E402


def _wall_per_step(step, device, steps: int) -> float:
    harness.sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    harness.sync(device)
    return (time.perf_counter() - t0) / steps


def _device_kernels(step, device, steps: int):
    """(busy seconds per step, launches per step, key_averages table) from a profiler trace."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        harness.sync(device)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_us = sum(e.device_time for e in kernels)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70)
    return busy_us / 1e6 / steps, len(kernels) / steps, table


def _host_profile(step, device, steps: int) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(steps):
        step()
    harness.sync(device)
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(30)
    return buf.getvalue()


def profile_variant(name: str, variant: str, batch: int, device, steps: int) -> tuple:
    """(figures, text): wall and device-busy seconds and launches per step, and the report."""
    model, fmt = cases.build_model(name, variant, device, torch.float32)
    x, y = cases.model_input(name, batch, device, torch.float32, fmt)
    step = cases.train_step_fn(model, x, y)
    for _ in range(2):
        step()
    wall = _wall_per_step(step, device, steps)
    busy, launches, table = _device_kernels(step, device, steps)
    host = _host_profile(step, device, steps)
    head = (f"## {name} {variant}, batch {batch}: wall {wall * 1e3:.1f} ms/step, device busy "
            f"{busy * 1e3:.1f} ms/step ({busy / wall:.0%}), {launches:.0f} kernel launches/step")
    print(head, flush=True)
    figures = dict(variant=variant, wall_s=wall, busy_s=busy, launches=launches)
    return figures, "\n".join([head, "", table, "", "host (cProfile, own time):", host])


def write_profiles(name: str, variants, batch: int, device, steps: int, out_dir: str) -> list:
    """Profiles ``variants`` of model ``name`` into ``out_dir/profile-<name>.txt``; their figures."""
    figures, parts = [], []
    for v in variants:
        fig, text = profile_variant(name, v, batch, device, steps)
        figures.append(fig)
        parts.append(text)
        harness.free_memory()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"profile-{name}.txt"), "w") as f:
        f.write("\n\n".join(parts) + "\n")
    return figures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="msdnet-cifar100-anytime", choices=sorted(cases.MODEL_CASES))
    ap.add_argument("--variants", default="plain,ours")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    write_profiles(args.model, args.variants.split(","), args.batch, device, args.steps, args.out)
    print(f"[gpu_profile] wrote {os.path.join(args.out, f'profile-{args.model}.txt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
