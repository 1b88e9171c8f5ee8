"""Peak memory of training steps, measured in a fresh process.

    python -m benches.memory_probe '{"what": "model", "name": "densenet-bc-k12-64px",
                                     "variant": "ours", "batch": 64, "device": "cpu",
                                     "allocator": "strict"}'

prints one JSON line. Every (network, variant) runs in its own process, so nothing another
variant allocated lingers. The process imports torch, builds the model, the SGD optimizer
(momentum 0.9), the input batch and the labels; then, on the CPU, one of two measurements
of "the memory a training step adds to the process at its peak" (peak resident set size,
``VmHWM``, whose mark is reset through ``/proc/self/clear_refs``):

* ``allocator="default"`` (glibc as it comes): baseline ``VmRSS`` before the first step,
  then ``steps`` training steps; ``peak = VmHWM - baseline``. This is what a user sees when
  training starts, including the parameter gradients and momentum buffers (twice the
  parameters: equal for every variant), oneDNN's primitive caches and glibc's fragmentation
  (freed blocks that cannot be reused for a later, larger tensor).
* ``allocator="strict"`` (the parent sets ``MALLOC_MMAP_THRESHOLD_=65536``, see
  ``harness.PROBE_ENV``: every block above 64 KiB is its own mapping, returned to the OS
  when freed): one warm-up step (one-time allocations), ``zero_grad(set_to_none=True)``,
  baseline ``VmRSS``, one measured step; ``peak = VmHWM - baseline``: the step's own peak
  of live memory, nearly free of allocator effects (includes the parameter gradients the
  step creates). Without the fixed threshold glibc would keep the warm-up step's freed
  memory in its heap and the measured step would reuse it without growing RSS.

On CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` around a step after a
warm-up step (``reset_peak_memory_stats``; the caching allocator's reserve is not counted);
``mem_limit_gib`` caps what the process may allocate (out of memory -> ``"oom": true``).
"""
from __future__ import annotations

import gc
import json
import sys
import time

import torch


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return -1


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build(spec, device, dtype):
    from benches import cases
    what = spec["what"]
    if what in ("model", "fits"):
        model, fmt = cases.build_model(spec["name"], spec["variant"], device, dtype,
                                       **({"depth_per_block": spec["depth_per_block"]}
                                          if "depth_per_block" in spec else {}))
        x, y = cases.model_input(spec["name"], spec["batch"], device, dtype, fmt,
                                 image=spec.get("image"))
        step = cases.train_step_fn(model, x, y)
        return step, step.optimizer
    if what == "block":
        block = cases.build_dense_block(spec["variant"], spec["layers"], device, dtype,
                                        cin=spec.get("cin", 24), growth=spec.get("growth", 12))
        hw, n = spec["hw"], spec["batch"]
        x = cases.randn((n, spec.get("cin", 24), hw, hw), device, dtype, 1, True)
        cout = spec.get("cin", 24) + spec["layers"] * spec.get("growth", 12)
        g = cases.randn((n, cout, hw, hw), device, dtype, 2)
        opt = torch.optim.SGD(block.parameters(), lr=1e-3, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            x.grad = None
            block(x).backward(g)
            opt.step()
        return step, opt
    raise ValueError(f"unknown probe {what!r}")


def main(spec: dict) -> dict:
    device = torch.device(spec.get("device", "cpu"))
    dtype = getattr(torch, spec.get("dtype", "float32"))
    if "threads" in spec:
        torch.set_num_threads(int(spec["threads"]))
    out = {"spec": spec}
    if device.type == "cuda":
        torch.cuda.init()
        if "mem_limit_gib" in spec:  # a fixed budget: "does it fit in N GiB"
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, spec["mem_limit_gib"] * 2**30 / total), device)
    try:
        step, opt = _build(spec, device, dtype)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            step()  # warm-up
            torch.cuda.synchronize()
            opt.zero_grad(set_to_none=True)
            gc.collect()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            out["step_s"] = time.perf_counter() - t0
            out["peak"] = torch.cuda.max_memory_allocated() - base
            out["baseline"] = base
            out["reserved"] = torch.cuda.max_memory_reserved()
            out["method"] = "torch.cuda.max_memory_allocated"
        elif spec.get("allocator", "strict") == "default":
            steps, times = int(spec.get("steps", 2)), []
            base = _status_bytes("VmRSS")
            out["hwm_reset"] = _reset_peak_rss()
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            out["peak"] = _status_bytes("VmHWM") - base
            out["step_s"] = min(times)
            out["baseline"] = base
            out["method"] = (f"VmHWM - VmRSS over the first {steps} steps (fresh process, "
                             "default glibc allocator)")
        else:
            step()  # warm-up: one-time allocations
            opt.zero_grad(set_to_none=True)
            gc.collect()
            base = _status_bytes("VmRSS")
            out["hwm_reset"] = _reset_peak_rss()
            t0 = time.perf_counter()
            step()
            out["step_s"] = time.perf_counter() - t0
            out["peak"] = _status_bytes("VmHWM") - base
            out["baseline"] = base
            out["method"] = ("VmHWM - VmRSS of one step after a warm-up step (fresh process, "
                             "glibc mmap threshold 64 KiB)")
        out["ok"] = True
    except torch.cuda.OutOfMemoryError as e:
        out["ok"] = False
        out["oom"] = True
        out["error"] = str(e).splitlines()[0][:300]
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            out["ok"], out["oom"], out["error"] = False, True, str(e).splitlines()[0][:300]
        else:
            raise
    return out


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]))
    sys.stdout.write(json.dumps(result) + "\n")
