"""GPU-only section (``run.py`` calls it only with a CUDA device), and the one-command GPU run:

    python benches/gpu.py [--out DIR] [--budget-s 480]    # tests, bandwidth, models -> RESULTS-gpu.md

(see :mod:`benches.gpu_session`). The section:

* bandwidth: achieved bandwidth of the memory-bound kernels on one large buffer prefix,
  as a fraction of a device-to-device copy and of the nominal peak of the memory;
* low precision: dense layers and whole-model training steps in bfloat16 / float16, ours vs
  cuDNN (plain and channels_last);
* max depth: the deepest DenseNet-BC (CIFAR, k=12) whose training step fits a fixed memory
  budget (``torch.cuda.set_per_process_memory_fraction``), per variant, each try in a fresh
  process.

Each part is independent: one failing is recorded and the others still run.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

if __name__ == "__main__":  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benches import cases  # noqa: E402
from benches.micro import layer_rows, op_rows  # noqa: E402
from benches.models import train_and_infer  # noqa: E402


def section_gpu(ctx):
    if not ctx.cuda:
        return {"status": "not run: no CUDA device"}
    out = {}
    parts = [("bandwidth", bandwidth), ("low_precision", low_precision)]
    if ctx.p["max_depth"]:
        parts.append(("max_depth", max_depth))
    failed = []
    for name, fn in parts:
        try:
            out[name] = dict(fn(ctx), status="ok")
        except Exception as e:
            traceback.print_exc()
            out[name] = {"status": f"failed: {type(e).__name__}: {e}"}
            failed.append(name)
    if failed:
        out["status"] = f"failed: {', '.join(failed)} (see each part)"
    return out


def peak_bandwidth(device) -> float | None:
    """Nominal memory bandwidth in bytes/s (double data rate x bus width), if reported."""
    p = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(p, "memory_clock_rate", 0), getattr(p, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def bandwidth(ctx):
    batch, c, growth, hw = ctx.p["bandwidth_shape"]
    shape = cases.OpShape("bandwidth", batch, c, growth, hw, 4 * growth)
    bench = cases.OpBench(shape, ctx.device, ctx.dtype)
    rows = op_rows(ctx, bench, tuple(cases.MEMORY_BOUND_TRAFFIC), ctx.p["op_budget"])
    peak = peak_bandwidth(ctx.device)
    for r in rows:
        r["ours_frac_peak"] = r["ours_gbps"] * 1e9 / peak if peak else None
    return {"rows": rows, "peak_gbps": peak / 1e9 if peak else None,
            "prefix_mib": bench.prefix_bytes / 2**20}


def low_precision(ctx):
    p, out = ctx.p, {}
    for name in p["dtypes"]:
        dtype = getattr(torch, name)
        shapes = cases.densenet_layer_shapes(p["layer_batch_cifar"], p["layer_batch_imagenet"])
        layers = layer_rows(ctx, cases.LayerBench, shapes, ("plain", "channels_last", "ours"),
                            p["layer_budget"], dtype)
        models = [train_and_infer(ctx, net, batch, image, ["plain", "channels_last", "ours"],
                                  p["model_budget"], dtype)
                  for net, batch, image in p["models"]]
        out[name] = {"layers": layers, "models": models}
    return out


def _fits(ctx, variant, n):
    md = ctx.p["max_depth"]
    r = ctx.probe(dict(what="fits", name="densenet-bc-depth", variant=variant,
                       depth_per_block=n, batch=md["batch"], mem_limit_gib=md["mem_gib"]),
                  timeout=md["timeout_s"])
    if r.get("ok"):
        return True, r
    if r.get("oom"):
        return False, r
    raise RuntimeError(f"max depth probe {variant} n={n} failed: {r.get('error')}")


def max_depth(ctx):
    """Doubling then bisection over layers per dense block ``n`` (depth ``6n + 4``)."""
    md = ctx.p["max_depth"]
    out = {"batch": md["batch"], "mem_gib": md["mem_gib"], "cap_layers_per_block": md["cap"],
           "variants": {}}
    for variant in ("plain", "memory_efficient", "ours"):
        tries = []
        lo, hi = 0, None   # largest n that fits, smallest n that does not
        n = md["start"]
        while hi is None and n <= md["cap"]:
            ok, r = _fits(ctx, variant, n)
            tries.append(dict(n=n, fits=ok, peak=r.get("peak")))
            if not ok:
                hi = n
            else:
                lo = n
                n = md["cap"] + 1 if n == md["cap"] else min(2 * n, md["cap"])
        while hi is not None and hi - lo > max(1, lo // 8):
            mid = (lo + hi) // 2
            ok, r = _fits(ctx, variant, mid)
            tries.append(dict(n=mid, fits=ok, peak=r.get("peak")))
            lo, hi = (mid, hi) if ok else (lo, mid)
        out["variants"][variant] = dict(layers_per_block=lo, depth=6 * lo + 4 if lo else None,
                                        capped=hi is None, first_oom=hi, tries=tries)
    return out


def main(argv=None) -> int:
    from benches import gpu_session
    ap = argparse.ArgumentParser(description="GPU tests, bandwidth and model benchmarks in one run")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                    help="where RESULTS-gpu.md and results-gpu.json go (default: benches/)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole run's time budget")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the logic")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (trying the logic)")
    ap.add_argument("--models", help="comma-separated model names (default: all four)")
    ap.add_argument("--variants", help="comma-separated eager variants (default: all)")
    ap.add_argument("--no-tests", action="store_true", help="skip the pytest step")
    ap.add_argument("--no-extras", action="store_true", help="float32 eager only: no compile, graphs, bf16")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device (use --device cpu --quick to try the logic)")
    params = gpu_session.quick_params(args.budget_s) if args.quick else gpu_session.Params(budget_s=args.budget_s)
    if args.models:
        known = {m[0]: m for m in (*gpu_session.MODELS, *params.models)}  # --quick's batches win
        unknown = [n for n in args.models.split(",") if n not in known]
        if unknown:
            ap.error(f"--models: unknown {', '.join(unknown)} (expected some of {', '.join(known)})")
        params.models = tuple(known[n] for n in args.models.split(","))
    if args.variants:
        params.variants = tuple(args.variants.split(","))
    if args.no_tests:
        params.run_tests = False
    if args.no_extras:
        params.compile, params.graphs, params.dtypes = False, False, (torch.float32,)
    results = gpu_session.run(device, params, args.out)
    failed = [st["name"] for st in results["steps"] if st["status"].startswith("failed")]
    print(f"[gpu] wrote {os.path.join(args.out, 'RESULTS-gpu.md')}; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
