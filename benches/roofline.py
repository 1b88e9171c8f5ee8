#!/usr/bin/env python
"""A roofline MODEL (not a measurement) of one training step on an H100 / H200: bytes moved and
FLOPs of every op, ours against the plain network, and the time they predict.

    python benches/roofline.py [--out benches/RESULTS-roofline.md]

The plain network's ops are found by running its forward once (batch 1, CPU) with hooks on
``Conv2d``, ``BatchNorm2d``, ``ReLU``, ``AvgPool2d`` and ``torch.cat``, then scaled to the batch.
Per op, elements ``S`` of its input/output, ``b`` bytes per element:

plain (cuDNN convolutions; BN, ReLU and concatenation materialised)
  conv          fwd reads in, writes out; bwd: dgrad reads out-grad, writes in-grad; wgrad
                reads out-grad and in: ``3 in + 3 out``
  BatchNorm     fwd: statistics pass + normalise (``3 S``); bwd: ``5 S``
  ReLU          fwd ``2 S``; bwd ``3 S``
  cat           fwd ``2 S``; bwd: each input's gradient accumulated, ``3 S``
  avg-pool      fwd ``in + out``; bwd ``out + in``
ours (fused: BN+ReLU+pool in the convolution's prologue, no concatenation)
  transform-conv fwd reads the buffer prefix once, writes its slice; bwd: dgrad reads the
                out-grad and ``x`` (ReLU mask) and read-modify-writes the shared gradient;
                wgrad re-reads out-grad and ``x``: ``5 in + 3 out``
  statistics    of each produced channel once: ``1 out``; finalize ``3 out``
  activation    MSDNet (post-activation) only: each unit stores ``relu(bn(y))`` once (fwd reads
                ``y``, writes it: ``2 out``) and applies its ReLU mask and BN backward once
                (``3 out``); its consumers read activated channels, so their dgrad needs no
                ReLU mask: the convolution is ``4 in + 3 out`` there
  (BN, ReLU, cat and pooling traffic otherwise: none)

FLOPs are the convolutions' (``2 N Ho Wo Cout Cin k^2`` forward, twice that backward) for both;
ours pools before a transition's 1x1 (4x fewer forward FLOPs there). Each op's time is
``max(FLOPs / (peak * e_tc), bytes / (bandwidth * e_bw))`` with the assumptions in
:data:`GPUS` and :data:`ASSUMED`; a step is the sum over its ops plus ``launch * launches``,
with the launches of a forward + backward *counted* (``benches/launch_count.py``: every kernel
the code issues, the small per-channel vector operations included), not assumed.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# dense tensor-core peak (FLOP/s) and HBM bandwidth (B/s), vendor figures (SXM)
GPUS = {"H100": dict(bf16=989e12, tf32=494e12, bw=3.35e12),
        "H200": dict(bf16=989e12, tf32=494e12, bw=4.8e12)}
ASSUMED = dict(
    e_bw=0.85,            # achieved fraction of HBM bandwidth by a streaming kernel (copy)
    e_tc_cudnn=0.60,      # cuDNN convolutions: fraction of the tensor-core peak
    e_tc_ours=0.45,       # our Triton implicit GEMMs (prologue transform): lower, assumed
    launch_s=3e-6,        # per kernel launch (no CUDA graphs)
)
MODELS = (("densenet-bc100", 64), ("densenet121", 32), ("msdnet-cifar100-anytime", 64),
          ("msdnet-imagenet-step4", 32))


def plain_ops(name: str) -> list:
    """``(kind, elements_in, elements_out, flops_fwd)`` per op of one batch-1 forward of the
    plain network ``name``."""
    from benches import cases
    model, _ = cases.build_model(name, "plain", "cpu")
    x, _ = cases.model_input(name, 1, "cpu", torch.float32, torch.contiguous_format)
    ops, hooks = [], []

    def hook(module, inputs, output):
        i, o = inputs[0], output
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            flops = 2 * o.numel() * module.in_channels // module.groups * k
            ops.append(("conv", i.numel(), o.numel(), flops))
        elif isinstance(module, nn.BatchNorm2d):
            ops.append(("bn", i.numel(), o.numel(), 0))
        elif isinstance(module, nn.ReLU):
            ops.append(("relu", i.numel(), o.numel(), 0))
        elif isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
            ops.append(("pool", i.numel(), o.numel(), 0))

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.AvgPool2d, nn.MaxPool2d)):
            hooks.append(m.register_forward_hook(hook))
    real_cat = torch.cat

    def cat(tensors, *a, **k):
        out = real_cat(tensors, *a, **k)
        if out.dim() == 4:
            ops.append(("cat", out.numel(), out.numel(), 0))
        return out
    torch.cat = cat
    try:
        model.train()
        with torch.no_grad():
            model(x)
    finally:
        torch.cat = real_cat
        for h in hooks:
            h.remove()
    return ops


def traffic(ops: list, batch: int, bytes_per: int, activated: bool = False) -> dict:
    """Per variant and op kind: [bytes, flops] of a training step (``activated``: MSDNet's
    units store their outputs activated)."""
    out = {"plain": defaultdict(lambda: [0, 0]), "ours": defaultdict(lambda: [0, 0])}
    for kind, i, o, flops in ops:
        i, o, flops = i * batch, o * batch, flops * batch
        p = out["plain"][kind]
        coef = {"conv": (3, 3), "bn": (3 + 5, 0), "relu": (2 + 3, 0), "cat": (2 + 3, 0),
                "pool": (2, 2)}[kind]
        p[0] += (coef[0] * i + coef[1] * o) * bytes_per
        p[1] += 3 * flops
        if kind == "conv":
            q = out["ours"]["conv" if activated else "transform-conv"]
            q[0] += ((4 if activated else 5) * i + 3 * o) * bytes_per
            q[1] += 3 * flops
            out["ours"]["statistics"][0] += (1 + 3) * o * bytes_per
            if activated:
                out["ours"]["activation"][0] += (2 + 3) * o * bytes_per
    return out


def predict(rows: dict, gpu: dict, variant: str, dtype: str) -> float:
    """Seconds the ``rows`` take at the assumed efficiencies (launches not included)."""
    e_tc = ASSUMED["e_tc_ours"] if variant == "ours" else ASSUMED["e_tc_cudnn"]
    total = 0.0
    for nbytes, flops in rows.values():
        compute = flops / (gpu["tf32" if dtype == "float32" else "bf16"] * e_tc)
        memory = nbytes / (gpu["bw"] * ASSUMED["e_bw"])
        total += max(compute, memory)
    return total


def markdown(models=MODELS, dtypes=("bfloat16", "float32")) -> str:
    from benches.launch_count import count_launches
    lines = ["# Roofline model of a training step (a MODEL, not a measurement)", "",
             "Generated by `python benches/roofline.py`; method and every assumption in its "
             "docstring. Assumed: " + ", ".join(f"{k}={v}" for k, v in ASSUMED.items()) +
             "; peaks: " + "; ".join(f"{g}: bf16 {v['bf16'] / 1e12:.0f} TFLOP/s, tf32 "
                                     f"{v['tf32'] / 1e12:.0f} TFLOP/s, {v['bw'] / 1e12:.2f} TB/s"
                                     for g, v in GPUS.items()) + ".", "",
             "Predicted ours/plain below 1 means ours faster. Per-op sums are over the whole step "
             "(forward + backward). Launches are counted, not assumed "
             "(`benches/launch_count.py`: one forward + backward on the CPU, ours on the triton "
             "backend with its launches captured); a host that needs t seconds to issue one "
             "launch cannot run a step in less than launches x t. The last column leaves launches "
             "out (what capturing a step in a CUDA graph would approach).", ""]
    summary = ["| model | batch | dtype | plain GB | ours GB | TFLOP | plain launches | "
               "ours launches | H100 plain ms | H100 ours ms | H100 ours/plain | H200 plain ms | "
               "H200 ours ms | H200 ours/plain | H100 ours/plain, launches free |",
               "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
               "| --- |"]
    details, sources = [], []
    for name, batch in models:
        ops = plain_ops(name)
        counts = {v: count_launches(name, v) for v in ("plain", "ours")}
        launches = {v: sum(c.values()) for v, c in counts.items()}
        sources.append(f"- {name}: ours " + ", ".join(
            f"`{k}` {n}" for k, n in counts["ours"].most_common(6)) + "; plain " + ", ".join(
            f"`{k}` {n}" for k, n in counts["plain"].most_common(4)))
        for dtype in dtypes:
            t = traffic(ops, batch, 2 if dtype == "bfloat16" else 4, name.startswith("msdnet"))
            gb = {v: sum(r[0] for r in t[v].values()) / 1e9 for v in t}
            tflop = sum(r[1] for r in t["plain"].values()) / 1e12
            free = {v: predict(t[v], GPUS["H100"], v, dtype) for v in t}
            pred = {(g, v): predict(t[v], GPUS[g], v, dtype) + launches[v] * ASSUMED["launch_s"]
                    for g in GPUS for v in t}
            summary.append(f"| {name} | {batch} | {dtype} | {gb['plain']:.2f} | {gb['ours']:.2f} | "
                           f"{tflop:.2f} | {launches['plain']} | {launches['ours']} | " + " | ".join(
                               f"{pred[(g, 'plain')] * 1e3:.2f} | {pred[(g, 'ours')] * 1e3:.2f} | "
                               f"{pred[(g, 'ours')] / pred[(g, 'plain')]:.2f}" for g in GPUS)
                           + f" | {free['ours'] / free['plain']:.2f} |")
            if dtype == dtypes[0]:
                details += ["", f"### {name}, batch {batch}, {dtype}: per op kind (launches "
                            "not included)", "",
                            "| variant | op | GB moved | GFLOP | H100 ms |",
                            "| --- | --- | --- | --- | --- |"]
                for v in ("plain", "ours"):
                    for kind, r in sorted(t[v].items()):
                        ms = predict({kind: r}, GPUS["H100"], v, dtype) * 1e3
                        details.append(f"| {v} | {kind} | {r[0] / 1e9:.3f} | {r[1] / 1e9:.1f} | {ms:.3f} |")
    sources = ["", "Most frequent launches per step (counted):", ""] + sources
    return "\n".join(lines + summary + sources + details) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "RESULTS-roofline.md"))
    args = ap.parse_args(argv)
    text = markdown()
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
