#!/usr/bin/env python
"""Compile report, no GPU needed: every GPU kernel the models launch, compiled for sm_80 and
sm_90 and read back from its SASS.

    python benches/gpu_compile.py [--json PATH] [--jobs N] [--models a,b] [--dtypes float32,...]

* Triton: each specialisation ``benches/gpu_launches.py`` finds (DenseNet-BC-100,
  DenseNet-121, the six MSDNet configurations; training step and inference; each autotune
  candidate config; float32 as TF32, bfloat16, float16) is compiled with
  ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32), options=...)``.
* The CUDA extension (``msdnet_ops/_cuda_kernels*.so``, built for sm_80 and sm_90): every
  kernel in its fatbinary.

Registers, stack (spill) bytes and shared memory come from ``cuobjdump --dump-resource-usage``
(Triton's bundled copy) and Triton's metadata; tensor-core use from the SASS (``HMMA`` on
sm_80, ``HGMMA`` (wgmma) or ``HMMA`` on sm_90). Writes a JSON list (``--json``) and prints a
summary. Exit status 1 on any spill, any shared memory over the architecture's limit, or a GEMM
kernel without tensor-core instructions.

By default one specialisation is compiled per group that differs only in Triton's
divisibility-by-16 attributes (alignment of pointers, multiples of 16 among sizes and
strides): the one with the fewest, which has the least alignment information and so the most
per-element address registers (the worst case for spills); ``--all`` compiles every one (about
5x as many). Compiles run in parallel (``--jobs``, default: all cores); results are cached by everything
that determines them (Triton version, kernel source, specialisation, config, arch) under
``$MSDNET_OPS_COMPILE_CACHE`` (default ``~/.cache/msdnet_ops/gpu_compile``), and Triton keeps
its own binary cache, so a rerun takes seconds.
"""
from __future__ import annotations

import os

# kernels must be compiled kernels, not the interpreter's (CI exports TRITON_INTERPRET=1 for
# the tests): drop it before anything imports Triton
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import glob  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402

ARCHS = (80, 90)
# opt-in maximum of dynamic shared memory per block (A100: 163 KiB, H100/H200: 227 KiB)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TENSOR_CORE_OPS = re.compile(r"\b(HGMMA|HMMA)\.")
RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
CACHE_DIR = os.environ.get("MSDNET_OPS_COMPILE_CACHE",
                           os.path.join(os.path.expanduser("~"), ".cache", "msdnet_ops", "gpu_compile"))


def cuobjdump() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(path, os.X_OK):
        raise SystemExit(f"gpu_compile: Triton's bundled cuobjdump is missing ({path})")
    return path


# --------------------------------------------------------------------------- inspection

def inspect_cubin(cubin: bytes) -> dict:
    """Registers, stack+local bytes, static shared bytes and the tensor-core instruction of the
    one kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([cuobjdump(), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = RESOURCE.search(usage)
    mma = sorted(set(TENSOR_CORE_OPS.findall(sass)))
    return dict(registers=int(m[1]), spill_bytes=int(m[2]) + int(m[4]), static_shared=int(m[3]),
                mma="+".join(mma) or None)


def _cache_key(job) -> str:
    from benches.gpu_launches import load_kernel
    kernel = load_kernel(job["kernel"])
    text = repr((triton.__version__, kernel.cache_key, sorted(job["signature"].items()),
                 sorted((str(k), str(v)) for k, v in job["constexprs"].items()),
                 sorted((str(k), str(v)) for k, v in job["attrs"].items()),
                 sorted(job["config"].items()), job["arch"]))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def compile_job(job) -> dict:
    """Compile one specialisation for one arch (in a worker process); cached."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from benches.gpu_launches import load_kernel
    key = _cache_key(job)
    path = os.path.join(CACHE_DIR, key[:2], key + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return dict(json.load(f), cached=True)
    config = dict(job["config"])
    options = {k: config.pop(k) for k in ("num_warps", "num_stages") if k in config}
    t0 = time.perf_counter()
    kernel = load_kernel(job["kernel"])
    src = ASTSource(fn=kernel, signature=job["signature"], constexprs=job["constexprs"], attrs=job["attrs"])
    compiled = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=options)
    found = inspect_cubin(compiled.asm["cubin"])
    result = dict(found, shared_bytes=max(compiled.metadata.shared, found.pop("static_shared")),
                  compile_s=round(time.perf_counter() - t0, 2))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)
    return dict(result, cached=False)


def representatives(specs) -> list:
    """Per group of specialisations that differ only in divisibility attributes, the one with the
    fewest (its ``used_by`` the group's, ``variants`` the group's size)."""
    groups = {}
    for s in specs:
        key = (s.kernel, tuple(s.signature.items()), tuple(sorted(s.constexprs.items(), key=str)),
               tuple(sorted(s.config.items())))
        groups.setdefault(key, []).append(s)
    out = []
    for group in groups.values():
        rep = min(group, key=lambda s: sum(1 for v in s.attrs.values() if v))
        rep.used_by = set().union(*(s.used_by for s in group))
        rep.variants = len(group)
        out.append(rep)
    return out


def triton_records(specs, jobs: int, log=print, archs=ARCHS) -> list:
    """One record per (specialisation, arch); each compile also lands in Triton's own cache,
    where a GPU process launching that specialisation finds it (``benches/gpu.py`` warms the
    cache so, in parallel, instead of compiling one kernel at a time in its first steps)."""
    work, meta = [], []
    for s in specs:
        for arch in archs:
            work.append(dict(kernel=s.kernel, signature=s.signature, constexprs=s.constexprs,
                             attrs=s.attrs, config=s.config, arch=arch))
            meta.append(dict(kernel=s.kernel.split(":")[1], arch=f"sm_{arch}", dtype=s.dtype,
                             config=_config_text(s.config), gemm=s.gemm,
                             geometry=_geometry(s), used_by=sorted(s.used_by),
                             attr_variants=getattr(s, "variants", 1), source="triton"))
    t0 = time.perf_counter()
    out, done = [], 0
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        for m, r in zip(meta, ex.map(compile_job, work, chunksize=1)):
            done += 1
            if done % 100 == 0 or done == len(work):
                log(f"[compile] {done}/{len(work)} ({time.perf_counter() - t0:.0f} s)")
            out.append(dict(m, **r, tensor_cores=r["mma"] is not None))
    return out


def _config_text(config) -> str:
    blocks = "x".join(str(v) for k, v in config.items() if k.startswith("BLOCK"))
    warps = f" w{config['num_warps']}" if "num_warps" in config else ""
    stages = f" s{config['num_stages']}" if "num_stages" in config else ""
    return (blocks or "-") + warps + stages


def _geometry(spec) -> str:
    parts = []
    for name in ("KSIZE", "STRIDE", "PAD", "POOL", "TRANSFORM", "HAS_GX", "FINAL"):
        v = spec.meta(name)
        if v is not None:
            parts.append(f"{name.lower()}={int(v) if isinstance(v, bool) else v}")
    if "sxp" in spec.signature:  # pixel_rows kernels: NHWC read as rows, channels contiguous
        layout = "nhwc rows"
    else:
        layout = "nhwc" if spec.meta("sxc") == 1 else "nchw"
    return " ".join(parts + [layout]) if parts else layout


# --------------------------------------------------------------------------- CUDA extension

def _ext_dtype(name: str) -> str:
    for code, dt in (("13__nv_bfloat16", "bfloat16"), ("6__half", "float16"), ("If", "float32"),
                     ("Id", "float64")):
        if code in name:
            return dt
    return "-"


def extension_records() -> list:
    """One record per kernel and arch of the built CUDA extension."""
    sos = glob.glob(os.path.join(ROOT, "msdnet_ops", "_cuda_kernels*.so"))
    if not sos:
        import msdnet_ops
        sos = glob.glob(os.path.join(os.path.dirname(msdnet_ops.__file__), "_cuda_kernels*.so"))
    if not sos:
        raise SystemExit("gpu_compile: the CUDA extension is not built (FORCE_CUDA=1 pip install "
                         "--no-build-isolation -e .), or pass --skip-extension")
    usage = subprocess.run([cuobjdump(), "--dump-resource-usage", sos[0]], capture_output=True,
                           text=True, check=True).stdout
    sass = subprocess.run([cuobjdump(), "-sass", sos[0]], capture_output=True, text=True,
                          check=True).stdout
    with_mma = set()
    arch, func = None, None
    for line in sass.splitlines():
        if m := re.search(r"arch = (sm_\d+)", line):
            arch = m[1]
        elif m := re.search(r"Function : (\S+)", line):
            func = m[1]
        elif TENSOR_CORE_OPS.search(line):
            with_mma.add((arch, func))
    out, arch, func = [], None, None
    for line in usage.splitlines():
        if m := re.search(r"arch = (sm_\d+)", line):
            arch = m[1]
        elif m := re.search(r"Function (\S+):", line):
            func = m[1]
        elif (m := RESOURCE.search(line)) and func:
            out.append(dict(kernel=_short(func), symbol=func, arch=arch, dtype=_ext_dtype(func),
                            config="-", registers=int(m[1]), spill_bytes=int(m[2]) + int(m[4]),
                            shared_bytes=int(m[3]), gemm=False,
                            tensor_cores=(arch, func) in with_mma, source="cuda-extension"))
            func = None
    return out


def _short(symbol: str) -> str:
    m = re.search(r"detail\d+(\w+?_kernel)I", symbol) or re.search(r"(\w+_kernel)", symbol)
    return m[1] if m else symbol


# --------------------------------------------------------------------------- gate and summary

def failures(records) -> list:
    bad = []
    for r in records:
        what = f"{r['kernel']} {r['arch']} {r['dtype']} {r['config']} {r.get('geometry', '')}".rstrip()
        if r["spill_bytes"] > 0:
            bad.append(f"spills {r['spill_bytes']} B: {what}")
        limit = SHARED_LIMIT[int(r["arch"][3:])]
        if r["shared_bytes"] > limit:
            bad.append(f"shared memory {r['shared_bytes']} B > {limit} B: {what}")
        if r["gemm"] and not r["tensor_cores"]:
            bad.append(f"GEMM without tensor-core instructions: {what}")
    return bad


def summary(records) -> str:
    """One line per (source, kernel, arch, dtype): specialisations, max registers, max spill,
    max shared memory, tensor-core instruction."""
    groups = {}
    for r in records:
        groups.setdefault((r["source"], r["kernel"], r["arch"], r["dtype"]), []).append(r)
    lines = [f"{'kernel':34} {'arch':6} {'dtype':9} {'n':>4} {'max reg':>7} {'max spill':>9} "
             f"{'max smem':>9}  mma"]
    for (src, kernel, arch, dtype), rs in sorted(groups.items()):
        mma = sorted({r.get("mma") or ("-" if not r["tensor_cores"] else "yes") for r in rs})
        lines.append(f"{kernel[:34]:34} {arch:6} {dtype:9} {len(rs):4d} "
                     f"{max(r['registers'] for r in rs):7d} {max(r['spill_bytes'] for r in rs):9d} "
                     f"{max(r['shared_bytes'] for r in rs):9d}  {','.join(mma)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from benches import gpu_launches
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write the records (a JSON list) here")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    ap.add_argument("--models", default=None,
                    help="comma-separated subset of " + ",".join(m[0] for m in gpu_launches.MODELS))
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--archs", default=",".join(map(str, ARCHS)),
                    help="comma-separated compute capabilities (default: %(default)s)")
    ap.add_argument("--with-trials", action="store_true",
                    help="also the kernels of the fused/unfused trials that `auto` runs on a GPU "
                         "(for warming a GPU's Triton cache; one CPU convolution per trial)")
    ap.add_argument("--skip-extension", action="store_true", help="do not inspect the CUDA extension")
    ap.add_argument("--all", action="store_true",
                    help="every specialisation, not one per group differing only in divisibility attributes")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    models = gpu_launches.MODELS
    if args.models:
        wanted = args.models.split(",")
        unknown = set(wanted) - {m[0] for m in models}
        if unknown:
            ap.error(f"--models: unknown {', '.join(sorted(unknown))}")
        models = tuple(m for m in models if m[0] in wanted)
    dtypes = tuple(getattr(torch, d) for d in args.dtypes.split(","))
    archs = tuple(int(a) for a in args.archs.split(","))
    if not set(archs) <= set(SHARED_LIMIT):
        ap.error(f"--archs: expected some of {','.join(map(str, SHARED_LIMIT))}, got {args.archs}")
    specs = gpu_launches.capture(models, dtypes, trials=args.with_trials)
    found = len(specs)
    if not args.all:
        specs = representatives(specs)
    print(f"[gpu_compile] {found} Triton specialisations launched; compiling {len(specs)} x "
          f"{len(archs)} archs ({time.perf_counter() - t0:.0f} s to capture)", flush=True)
    records = triton_records(specs, max(1, args.jobs), archs=archs)
    if not args.skip_extension:
        records += extension_records()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    print(summary(records))
    bad = failures(records)
    fresh = sum(1 for r in records if r.get("cached") is False)
    print(f"[gpu_compile] {len(records)} kernels ({fresh} compiled now, the rest cached) in "
          f"{time.perf_counter() - t0:.0f} s; {len(bad)} failures")
    for b in bad[:50]:
        print("  FAIL", b)
    if len(bad) > 50:
        print(f"  ... and {len(bad) - 50} more (see --json)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
