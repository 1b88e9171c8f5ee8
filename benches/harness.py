"""Timing, statistics, machine description and the fresh-process memory probe runner.

Timing rules:

* every callable is warmed up first (one-time allocations, oneDNN/cuDNN primitive creation,
  Triton compilation stay out of the numbers);
* the device is synchronized before the clock starts and before it stops;
* variants that are compared are run *interleaved* (A B C, B C A, C A B, ...) so that drift
  in the machine's load hits every variant alike, and the ratios are taken within one run;
* a sample is one call, or the mean over ``inner`` back-to-back calls when one call is
  shorter than ``min_sample_s`` (small kernels), and we report the median with the
  interquartile range and min/max over samples.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- statistics

@dataclass
class Stat:
    """Summary of timing samples, in seconds (per call)."""
    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int
    inner: int = 1
    samples: list = field(default_factory=list)

    @classmethod
    def of(cls, samples, inner: int = 1) -> "Stat":
        s = sorted(samples)
        if len(s) == 1:
            q1 = q3 = s[0]
        else:
            q = statistics.quantiles(s, n=4, method="inclusive")
            q1, q3 = q[0], q[2]
        return cls(statistics.median(s), q1, q3, s[0], s[-1], len(s), inner, list(samples))

    def to_json(self) -> dict:
        return asdict(self)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    """Drops what the previous case left (between cases, never while timing)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _one_sample(fn, inner: int, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / inner


def time_interleaved(fns: dict, device="cpu", *, warmup: int = 1, min_reps: int = 3,
                     max_reps: int = 15, budget_s: float = 3.0, min_sample_s: float = 0.0,
                     max_inner: int = 200) -> dict:
    """Times every callable of ``fns`` (name -> fn) interleaved; returns name -> :class:`Stat`.

    Runs ``warmup`` untimed calls of each, then rounds of one sample of each (rotating the
    order) until at least ``min_reps`` rounds are done and either ``max_reps`` rounds are done
    or ``budget_s`` seconds have passed. ``min_sample_s``: calls faster than this are repeated
    back to back inside one sample (the warm-up call's time decides how many)."""
    names = list(fns)
    inner = {}
    for name in names:
        t = 0.0
        for _ in range(max(1, warmup)):
            t = _one_sample(fns[name], 1, device)
        inner[name] = 1 if t <= 0 or t >= min_sample_s else \
            max(1, min(max_inner, int(min_sample_s / t)))
    samples = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while True:
        order = names[rounds % len(names):] + names[:rounds % len(names)]
        for name in order:
            samples[name].append(_one_sample(fns[name], inner[name], device))
        rounds += 1
        if rounds >= max_reps or (rounds >= min_reps and time.perf_counter() - start >= budget_s):
            break
    return {name: Stat.of(samples[name], inner[name]) for name in names}


# --------------------------------------------------------------------------- machine

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import torchvision
        out["torchvision"] = torchvision.__version__
    except Exception as e:  # pragma: no cover - reported, not fatal
        out["torchvision"] = f"unavailable ({e})"
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception as e:
        out["triton"] = f"unavailable ({type(e).__name__})"
    import msdnet_ops
    out["msdnet_ops"] = getattr(msdnet_ops, "__version__", "unknown")
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                           capture_output=True, text=True,
                                           timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        out["git_dirty"] = bool(dirty.strip())
    except Exception:
        pass
    return out


def machine(device: torch.device) -> dict:
    from msdnet_ops.kernels import cpu as cpu_kernels
    info = {
        "device": str(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_kernels": (f"built ({cpu_kernels.isa()})" if cpu_kernels.available()
                        else f"missing: {cpu_kernels.load_error()}"),
        "backend_env": os.environ.get("MSDNET_OPS_BACKEND", "auto"),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    cudnn_tf32=torch.backends.cudnn.allow_tf32,
                    matmul_tf32=torch.backends.cuda.matmul.allow_tf32)
    return info


# --------------------------------------------------------------------------- memory probes

# glibc: every allocation over 64 KiB is its own mmap, returned to the OS when freed (no
# dynamic threshold, no heap retention); see memory_probe.py for why.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072",
             "MALLOC_TOP_PAD_": "0", "MALLOC_ARENA_MAX": "2"}


def run_probe(spec: dict, timeout_s: float = 600.0, retries: int = 1) -> dict:
    """Runs ``python -m benches.memory_probe`` on ``spec`` in a fresh process; returns its JSON
    (``{'error': ...}`` when it fails twice)."""
    env = dict(os.environ)
    if spec.get("allocator", "strict") == "strict" and spec.get("device", "cpu") == "cpu":
        env.update(PROBE_ENV)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "benches.memory_probe", json.dumps(spec)]
    last = ""
    for _ in range(retries + 1):
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=timeout_s)
        except subprocess.TimeoutExpired:
            last = f"timed out after {timeout_s:.0f} s"
            continue
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode == 0 and lines:
            return dict(json.loads(lines[-1]), wall_s=round(time.perf_counter() - t0, 2))
        last = f"rc={p.returncode}: {(p.stderr or p.stdout).strip()[-600:]}"
    return {"error": last, "spec": spec}
