#!/usr/bin/env python
"""Eager training and inference on a GPU: ours launching remembered kernels directly vs ours
launching every kernel through Triton's ``JITFunction.run``, beside plain cuDNN, in one process.

    python benches/gpu_direct_launch.py [--models a,b] [--batch 64] [--out DIR] [--budget-s 8]

Per model: plain and plain channels_last (``cudnn.benchmark`` on), and ours (``auto``
backend) twice, its steps alternating between ``_direct_launch.ENABLED`` on and off (same
model, same kernels, same choices: only the launch path differs), whatever
``MSDNET_OPS_DIRECT_LAUNCH`` says. Steps are interleaved
(``harness.time_interleaved``); medians with the interquartile range. Also counts the launches
of one step of each way. Writes ``direct-launch.md`` and ``direct-launch.json`` under ``--out``.
Run it after Triton's cache is warm (``benches/gpu_compile.py --all``), else ours' first steps
compile kernels one at a time.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

if __name__ == "__main__":  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benches import cases, harness  # noqa: E402
from msdnet_ops.triton import _direct_launch  # noqa: E402

MODELS = ("msdnet-cifar100-anytime", "densenet-bc100")


@contextlib.contextmanager
def direct_launches(on: bool):
    saved = _direct_launch.ENABLED
    _direct_launch.ENABLED = on
    try:
        yield
    finally:
        _direct_launch.ENABLED = saved


def launching(fn, direct: bool):
    """``fn`` with direct launches on or off while it runs."""
    def run():
        with direct_launches(direct):
            return fn()
    return run


def launches_of(fn, device) -> dict:
    """Direct and through-Triton launches of one call of ``fn``."""
    before = dict(_direct_launch.stats)
    fn()
    harness.sync(device)
    return {k: _direct_launch.stats[k] - before[k] for k in before}


def measure(name: str, batch: int, device, budget_s: float) -> dict:
    fns, infer = {}, {}
    for variant in ("plain", "channels_last", "ours"):
        model, fmt = cases.build_model(name, variant, device)
        x, y = cases.model_input(name, batch, device, torch.float32, fmt)
        step, inf = cases.train_step_fn(model, x, y), cases.infer_fn(model, x)
        for _ in range(3):  # ours: autotuning and the fused/unfused choices; cuDNN: its search
            step()
            inf()
        if variant == "ours":
            fns["ours direct"], fns["ours through Triton"] = launching(step, True), launching(step, False)
            infer["ours direct"], infer["ours through Triton"] = launching(inf, True), launching(inf, False)
            fns["ours direct"]()  # its first launches go through Triton and are remembered
            counts = {"direct": launches_of(fns["ours direct"], device),
                      "through Triton": launches_of(fns["ours through Triton"], device)}
        else:
            fns[variant], infer[variant] = step, inf
    harness.sync(device)
    train = harness.time_interleaved(fns, device, warmup=1, min_reps=5, max_reps=30, budget_s=budget_s)
    inference = harness.time_interleaved(infer, device, warmup=1, min_reps=5, max_reps=30, budget_s=budget_s / 2)
    return {"name": name, "batch": batch, "launches_per_step": counts,
            "train": {k: v.to_json() for k, v in train.items()},
            "infer": {k: v.to_json() for k, v in inference.items()}}


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else harness.cpu_model()


def table(results: list, device, heading: bool = True) -> str:
    lines = [f"# Eager steps on {device_name(device)}: direct launches vs Triton's launcher", "",
             f"torch {torch.__version__}, triton {__import__('triton').__version__}; "] if heading else [""]
    lines[-1] += ("float32 (TF32 on, as by default), `cudnn.benchmark` on; medians of interleaved steps "
                  "[q1-q3] in ms. `python benches/gpu_direct_launch.py`.")
    lines += ["", "| model | batch | | plain | channels_last | ours direct | ours through Triton "
              "| direct vs Triton | ours direct vs plain |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for what in ("train", "infer"):
            s = r[what]

            def cell(k):
                return f"{s[k]['median'] * 1e3:.1f} [{s[k]['q1'] * 1e3:.1f}-{s[k]['q3'] * 1e3:.1f}]"
            lines.append(f"| {r['name']} | {r['batch']} | {what} | {cell('plain')} | {cell('channels_last')} | "
                         f"{cell('ours direct')} | {cell('ours through Triton')} | "
                         f"{s['ours through Triton']['median'] / s['ours direct']['median']:.2f}x | "
                         f"{s['plain']['median'] / s['ours direct']['median']:.2f}x |")
    lines += ["", "Launches in one training step of ours (Triton kernels; direct / through Triton):", ""]
    for r in results:
        c = r["launches_per_step"]
        lines.append(f"- {r['name']}: direct way {c['direct']['direct']} direct + "
                     f"{c['direct']['through_triton']} through Triton; Triton way "
                     f"{c['through Triton']['direct']} + {c['through Triton']['through_triton']}")
    return "\n".join(lines) + "\n"


def run(models, device, budget_s: float, out_dir: str) -> list:
    """Measures each ``(name, batch)`` of ``models``; rewrites ``direct-launch.md`` and
    ``direct-launch.json`` under ``out_dir`` after each. Returns the results."""
    results = []
    os.makedirs(out_dir, exist_ok=True)
    for name, batch in models:
        results.append(measure(name, batch, device, budget_s))
        harness.free_memory()
        with open(os.path.join(out_dir, "direct-launch.md"), "w") as f:
            f.write(table(results, device))
        with open(os.path.join(out_dir, "direct-launch.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--budget-s", type=float, default=8.0, help="timing budget per model (training)")
    ap.add_argument("--out", default=".")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to try the logic (no Triton launches)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device (use --device cpu --batch 2 to try the logic)")
    if _direct_launch._knobs is None:
        ap.error("direct launches need Triton >= 3.4")
    torch.backends.cudnn.benchmark = True
    results = run([(name, args.batch) for name in args.models.split(",")], device, args.budget_s, args.out)
    print(table(results, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
