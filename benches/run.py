#!/usr/bin/env python
"""Runs every benchmark available on the current device and writes the report.

    python benches/run.py                 # default: ~7-8 min on a 2-core CPU
    python benches/run.py --quick --out /tmp/bench   # CI: tiny shapes, checks it runs (~1 min)
    python benches/run.py --compile       # + torch.compile for every layer shape and model
    python benches/run.py --device cpu    # default: cuda when available
    python benches/run.py --sections densenet_bc_cpu,depth   # a subset (see --help)

Writes ``RESULTS.md`` (``RESULTS_cuda.md`` on a GPU), ``results.json`` (``results_cuda.json``)
and ``memory_vs_depth.png`` (``..._cuda.png``) into ``--out`` (default: ``benches/``).
Exit status 1 when a section failed (the report is written anyway and names the failure).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benches import harness, report  # noqa: E402
from benches.anytime import section_anytime  # noqa: E402
from benches.depth import section_depth  # noqa: E402
from benches.gpu import section_gpu  # noqa: E402
from benches.micro import section_layers, section_msd_layers, section_ops  # noqa: E402
from benches.models import section_densenet_bc_cpu, section_models  # noqa: E402

# --------------------------------------------------------------------------- parameters
# Batch sizes, time budgets (seconds per timed group: rounds continue until both min_reps and
# the budget are reached, or max_reps), which shapes get a torch.compile baseline, ...

PARAMS = {
    # ~7-8 min on a 2-core CPU; torch.compile only for one layer shape (compiling is slow)
    "cpu": dict(
        layer_batch_cifar=16, layer_batch_imagenet=4, msd_layer_batch=16,
        op_batch_cifar=16, op_batch_imagenet=4,
        layer_budget=2.5, op_budget=1.0, min_reps=3, max_reps=11,
        compile_shapes=("bc100 b2 L8",),
        # MSDNet's ImageNet layout at 160x160 (the smallest side it takes is 144)
        models=(("densenet-bc100", 32, None), ("densenet121", 4, None),
                ("msdnet-cifar100-anytime", 32, None), ("msdnet-imagenet-step4", 32, 160)),
        model_compile=("msdnet-cifar100-anytime",),
        model_budget=8.0, model_min_reps=5, model_max_reps=9, model_memory=True,
        densenet_bc_mem_batch=64, densenet_bc_time_batch=32, densenet_bc_budget=12.0,
        densenet_bc_allocators=("strict", "default"), profile=True,
        anytime_batch=64, budget_batch=128, anytime_budget=4.0,
        depth_layers=(4, 8, 16, 24, 32, 48, 64), depth_batch=8, depth_hw=16,
        bandwidth_shape=None, dtypes=(), max_depth=None,
    ),
    # on one GPU: every section; the torch.compile baseline for a few layer shapes
    "cuda": dict(
        layer_batch_cifar=64, layer_batch_imagenet=32, msd_layer_batch=64,
        op_batch_cifar=64, op_batch_imagenet=32,
        layer_budget=1.0, op_budget=0.5, min_reps=5, max_reps=30,
        compile_shapes=("bc100 b1 L16", "d121 b1 L6", "msd L3 s2 (down+normal)"),
        models=(("densenet-bc100", 64, None), ("densenet121", 32, None),
                ("msdnet-cifar100-anytime", 64, None), ("msdnet-imagenet-step4", 32, None)),
        model_compile=("densenet-bc100", "msdnet-cifar100-anytime", "msdnet-imagenet-step4"),
        model_budget=3.0, model_min_reps=5, model_max_reps=20, model_memory=True,
        densenet_bc_mem_batch=64, densenet_bc_time_batch=32, densenet_bc_budget=3.0,
        densenet_bc_allocators=("strict", "default"), profile=True,
        anytime_batch=256, budget_batch=1024, anytime_budget=2.0,
        depth_layers=(8, 16, 32, 64, 128), depth_batch=64, depth_hw=32,
        bandwidth_shape=(64, 512, 32, 56), dtypes=("bfloat16", "float16"),
        max_depth=dict(batch=64, mem_gib=8, start=32, cap=256, timeout_s=300),
    ),
    # CI: tiny shapes, 1-2 repeats; checks that everything runs (numbers mean nothing)
    "quick": dict(
        layer_batch_cifar=2, layer_batch_imagenet=1, msd_layer_batch=2,
        op_batch_cifar=2, op_batch_imagenet=1,
        layer_budget=0.0, op_budget=0.0, min_reps=2, max_reps=2,
        compile_shapes=(),
        models=(("densenet-bc100", 2, None), ("densenet121", 1, 64),
                ("msdnet-cifar100-anytime", 2, None)),
        model_compile=(),
        model_budget=0.0, model_min_reps=1, model_max_reps=2, model_memory=False,
        densenet_bc_mem_batch=4, densenet_bc_time_batch=2, densenet_bc_budget=0.0,
        densenet_bc_allocators=("default",), profile=False,
        anytime_batch=4, budget_batch=8, anytime_budget=0.0,
        depth_layers=(2, 4, 6), depth_batch=2, depth_hw=8,
        bandwidth_shape=(2, 16, 8, 8), dtypes=("bfloat16",),
        max_depth=dict(batch=2, mem_gib=1, start=2, cap=4, timeout_s=120),
    ),
}


class Ctx:
    """What every section gets: the arguments, the device, the parameters and the timer."""

    def __init__(self, args, out_dir):
        self.args, self.out_dir = args, out_dir
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.suffix = "_cuda" if self.cuda else ""  # output file names: RESULTS{suffix}.md
        self.p = dict(PARAMS["quick" if args.quick else ("cuda" if self.cuda else "cpu")])
        self.dtype = torch.float32
        # calls shorter than this are repeated back to back inside one timing sample
        self.min_sample_s = 0.005 if self.cuda else 0.02

    def timer(self, fns, budget, min_reps=None, max_reps=None, min_sample_s=None):
        """name -> :class:`harness.Stat` of the callables ``fns``, timed interleaved."""
        return harness.time_interleaved(
            fns, self.device, warmup=3 if self.cuda else 1,
            min_reps=min_reps or self.p["min_reps"], max_reps=max_reps or self.p["max_reps"],
            budget_s=budget,
            min_sample_s=self.min_sample_s if min_sample_s is None else min_sample_s)

    def probe(self, spec, timeout=900):
        """Runs :mod:`benches.memory_probe` on ``spec`` in a fresh process."""
        return harness.run_probe(dict(spec, device=str(self.device)), timeout_s=timeout)

    def compile_layer(self, shape_name) -> bool:
        """Whether the layer ``shape_name`` gets a torch.compile baseline."""
        cs = self.p["compile_shapes"]
        return self.args.compile or cs == "all" or shape_name in cs


# --------------------------------------------------------------------------- main

SECTIONS = {"ops": section_ops, "layers": section_layers, "msd_layers": section_msd_layers,
            "densenet_bc_cpu": section_densenet_bc_cpu, "models": section_models, "anytime": section_anytime,
            "depth": section_depth, "gpu": section_gpu}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1-2 repeats (CI)")
    ap.add_argument("--out", default=None, help="output directory (default: benches/)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile baseline for every layer shape and every model "
                         "(default: one layer shape on CPU, every layer shape on GPU)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = os.path.abspath(args.out or os.path.dirname(os.path.abspath(__file__)))
    os.makedirs(out_dir, exist_ok=True)
    ctx = Ctx(args, out_dir)
    suffix = ctx.suffix
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections: {', '.join(sorted(unknown))}")

    t_start = time.time()
    results = {"meta": dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        mode="quick" if args.quick else "default", compile_flag=args.compile,
        command="python benches/run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        machine=harness.machine(ctx.device), versions=harness.versions(),
        load_before=harness.load_average(), params={k: v for k, v in ctx.p.items()}),
        "sections": {}}
    failed = []
    for name in SECTIONS:
        if name not in wanted:
            results["sections"][name] = {"status": "not run: not selected (--sections)"}
            continue
        t0 = time.time()
        print(f"[bench] {name} ...", flush=True)
        try:
            res = SECTIONS[name](ctx)
            res.setdefault("status", "ok")
            if res["status"].startswith("failed"):
                failed.append(name)
        except Exception as e:
            traceback.print_exc()
            res = {"status": f"failed: {type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-3000:]}
            failed.append(name)
        res["seconds"] = round(time.time() - t0, 1)
        res["load_after"] = harness.load_average()
        results["sections"][name] = res
        print(f"[bench] {name}: {res['status']} ({res['seconds']} s, load {res['load_after']})",
              flush=True)
        harness.free_memory()
    results["meta"]["total_seconds"] = round(time.time() - t_start, 1)
    results["meta"]["load_after"] = harness.load_average()
    json_path = os.path.join(out_dir, f"results{suffix}.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1, default=_json_default)
    md_path = os.path.join(out_dir, f"RESULTS{suffix}.md")
    with open(md_path, "w") as f:
        f.write(report.markdown(results))
    print(f"[bench] wrote {md_path}, {json_path} in {results['meta']['total_seconds']} s")
    if failed:
        print(f"[bench] FAILED sections: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
