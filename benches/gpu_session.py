"""One command for the day a GPU comes (``python benches/gpu.py``): within a fixed time budget
(8 minutes by default) it

1. checks every op on every GPU backend against the reference in-process (float32 and
   bfloat16), and measures the copy bandwidth achieved by each memory-bound kernel (against a
   device copy, NCHW and NHWC);
2. per dtype, compiles every Triton specialisation the models launch in parallel processes
   (``benches/gpu_compile.py``) into Triton's cache, so that ours' first steps do not compile
   ~200 kernels one at a time (the first H200 run spent its time there), then times
   MSDNet cifar100-anytime and imagenet-step4, DenseNet-BC-100 and DenseNet-121: training
   step, inference and peak training memory, ours (``MSDNET_OPS_BACKEND=auto``: per shape the
   fused Triton kernel or materialise-then-cuDNN, timed once and cached by
   ``msdnet_ops.conv_choice``) against plain cuDNN (``cudnn.benchmark`` on, for both),
   channels_last and memory_efficient; ours' first step records how many kernels it still
   had to compile; then the headline model (plain and ours) captured in CUDA graphs, and
   profiled (``benches/gpu_profile.py``: wall vs device-busy time per step);
3. runs the GPU tests (``pytest`` on the CUDA/Triton tests, a subprocess with a timeout, in
   parallel with pytest-xdist where installed; the whole output in ``gpu-tests.log``); then,
   as time allows, torch.compile, plain and ours with each step captured in a CUDA graph (no
   per-kernel launch cost: what the roofline's "launches free" column predicts), and the
   models in bfloat16; ours' eager steps with direct launches against Triton's launcher
   (``benches/gpu_direct_launch.py``) come right after the tests;
4. writes ``RESULTS-gpu.md`` and ``results-gpu.json``, after every step (a run cut short
   leaves the report of what it did).

Every step has an estimate; a step that would overrun the budget is skipped and the report says
so, a step that fails is recorded and the others still run. The planning, deadlines and report
writing are tested on the CPU (``python_tests/test_gpu_session.py``) with tiny shapes.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = (("msdnet-cifar100-anytime", 64, None), ("densenet-bc100", 64, None),
          ("msdnet-imagenet-step4", 32, None), ("densenet121", 32, None))  # the headline first
GPU_TESTS = ["python_tests/test_triton_kernels.py", "python_tests/test_triton_conv_activated.py",
             "python_tests/test_ops.py", "python_tests/test_op_properties.py",
             "python_tests/test_native_kernels.py", "python_tests/test_conv_choice.py",
             "python_tests/test_cuda_graph.py", "python_tests/test_direct_launch.py"]
TESTS_LOG = "gpu-tests.log"  # the tests' whole output, beside the report
WARM_JSON = "gpu-compile.json"  # the cache warm-up's compile records, beside the report


@dataclass
class Params:
    budget_s: float = 480.0          # the whole run
    reserve_s: float = 15.0          # kept for writing the report
    tests_timeout_s: float = 220.0   # 150 s reached ~92% with 14 workers (H200 host, 16 cores)
    models: tuple = MODELS
    dtypes: tuple = (torch.float32, torch.bfloat16)
    variants: tuple = ("plain", "channels_last", "memory_efficient", "ours")
    compile: bool = True             # torch.compile baseline, after everything else, as time allows
    graphs: bool = True              # plain and ours with each step captured in a CUDA graph
    # estimates from the first H200 run (2026-12-04): the eager baselines of one model took
    # 19-45 s (cuDNN's algorithm search in each first step: 7-20 s), torch.compile 121-131 s
    model_estimate_s: float = 60.0   # one model, one dtype, in the variants above
    compile_estimate_s: float = 130.0
    warm_estimate_s: float = 150.0   # Triton cache warm-up (H200 host: 47 s, 3 models, no trials)
    graphs_estimate_s: float = 45.0
    profile_estimate_s: float = 45.0   # plain and ours, 3 steps each, three ways
    direct_estimate_s: float = 90.0    # two models: 3 variants built and warmed, timed ~12 s
    time_budget_s: float = 2.0       # per timed group
    bandwidth_shape: tuple = (64, 512, 32, 56)   # batch, prefix channels, growth, side
    run_tests: bool = True


def quick_params(budget_s: float = 120.0) -> Params:
    """Tiny shapes for a CPU run of the whole logic (tests, CI)."""
    return Params(budget_s=budget_s, reserve_s=2.0, tests_timeout_s=30.0,
                  models=(("densenet-bc100", 2, None), ("msdnet-cifar100-anytime", 2, None)),
                  dtypes=(torch.float32,), variants=("plain", "ours"), compile=False, model_estimate_s=5.0,
                  warm_estimate_s=5.0, compile_estimate_s=5.0, graphs_estimate_s=5.0,
                  time_budget_s=0.0, bandwidth_shape=(2, 16, 8, 8), run_tests=False)


@dataclass
class Clock:
    """Deadline bookkeeping: ``fits(estimate)`` when the step can finish before the reserve."""
    budget_s: float
    reserve_s: float
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def fits(self, estimate_s: float) -> bool:
        return self.left() - self.reserve_s >= estimate_s


class Session:
    """Runs named steps against a :class:`Clock`; records each one's status and result."""

    def __init__(self, clock: Clock, log=print, on_step=lambda: None):
        self.clock, self.log, self.on_step = clock, log, on_step
        self.steps: list = []

    def skip(self, name: str, reason: str) -> None:
        self.log(f"[gpu] {name}: skipped: {reason}")
        self.steps.append(dict(name=name, status=f"skipped: {reason}", result=None))
        self.on_step()

    def step(self, name: str, estimate_s: float, fn, *args):
        if not self.clock.fits(estimate_s):
            status, result = f"skipped: needs ~{estimate_s:.0f} s, {max(0, self.clock.left()):.0f} s left", None
            self.log(f"[gpu] {name}: {status}")
        else:
            t0 = time.perf_counter()
            self.log(f"[gpu] {name} ...")
            try:
                result, status = fn(*args), "ok"
            except Exception as e:
                traceback.print_exc()
                result, status = None, f"failed: {type(e).__name__}: {e}"
            self.log(f"[gpu] {name}: {status} ({time.perf_counter() - t0:.1f} s)")
        self.steps.append(dict(name=name, status=status, result=result))
        self.on_step()
        return result


# --------------------------------------------------------------------------- steps

def _xdist_workers() -> int:
    """Test processes to run in parallel: Triton compiles on the CPU, so a many-core GPU host
    finishes the tests several times sooner with pytest-xdist (if installed)."""
    if importlib.util.find_spec("xdist") is None:  # optional: not among the package's extras
        return 0
    cores = os.cpu_count() or 1
    return min(14, cores - 2) if cores >= 8 else 0


def run_tests(timeout_s: float, files=GPU_TESTS, log_path: str | None = None) -> dict:
    """The test files in a subprocess (compiled kernels: TRITON_INTERPRET unset), every failure
    reported (up to 25), the whole output in ``log_path`` (kept also when time runs out; each
    test's outcome is logged as it ends, so a run cut short still names its failures)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-v", "-rsfE", "--maxfail=25", "--no-header",
           "-p", "no:cacheprovider", *files]
    workers = _xdist_workers()
    if workers:
        cmd[3:3] = ["-n", str(workers)]
    if log_path is None:
        fd, log_path = tempfile.mkstemp(suffix=".log")
        os.close(fd)
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            failed = _failed_so_far(log_path)
            raise RuntimeError(f"tests did not finish within {timeout_s:.0f} s; failed so far "
                               f"({len(failed)}): {' | '.join(failed) or 'none'}")
    tail = _tail(log_path, 15)
    if p.returncode != 0:
        failed = [line for line in tail if line.startswith(("FAILED", "ERROR"))]
        raise RuntimeError(f"pytest exit {p.returncode}: " + " | ".join((failed or tail)[-3:]))
    return {"summary": tail[-1] if tail else "", "workers": workers}


def _failed_so_far(path: str) -> list:
    """Test ids ``pytest -v`` logged as FAILED or ERROR so far: ``id FAILED`` without xdist,
    ``[gwN] [ p%] FAILED id`` with it."""
    with open(path) as f:
        text = f.read()
    found = re.findall(r"^(?:\[gw\d+\] \[ *\d+%\] (?:FAILED|ERROR) (\S+)|(\S+::\S+) (?:FAILED|ERROR))", text, re.M)
    return list(dict.fromkeys(a or b for a, b in found))


def _tail(path: str, n: int) -> list:
    with open(path) as f:
        return f.read().strip().splitlines()[-n:]


BACKENDS = {"cuda": ("auto", "triton", "cuda"), "cpu": ("auto", "cpu")}


def op_parity(device, dtypes) -> list:
    """Every op of ``cases.OpBench`` on every backend of the device vs the reference
    composition (``checks.check_op`` raises beyond the tolerance)."""
    from benches import cases, checks
    rows = []
    saved = os.environ.get("MSDNET_OPS_BACKEND")
    try:
        for backend in BACKENDS[device.type]:
            os.environ["MSDNET_OPS_BACKEND"] = backend
            for dtype in dtypes:
                bench = cases.OpBench(cases.OpShape("parity", 3, 37, 11, 13, 24), device, dtype)
                for op in cases.OP_NAMES:
                    rows.append(dict(backend=backend, dtype=str(dtype)[6:], op=op,
                                     max_rel_err=checks.check_op(bench, op, dtype)))
    finally:
        if saved is None:
            os.environ.pop("MSDNET_OPS_BACKEND", None)
        else:
            os.environ["MSDNET_OPS_BACKEND"] = saved
    return rows


class _Ctx:
    """What ``benches.micro.op_rows`` needs of ``run.Ctx``."""

    def __init__(self, device, budget_s):
        from benches import harness
        self.device, self.budget_s, self._harness = device, budget_s, harness

    def timer(self, fns, budget, **kw):
        return self._harness.time_interleaved(fns, self.device, warmup=2, min_reps=3, max_reps=20,
                                              budget_s=budget, min_sample_s=0.002)


def bandwidth(device, shape, budget_s) -> list:
    """Achieved copy bandwidth of each memory-bound kernel (bytes it must move / time), against
    ``copy_`` of the same bytes, on an NCHW buffer and on an NHWC one (the models' layout)."""
    from benches import cases
    from benches.micro import op_rows
    batch, c, growth, hw = shape
    rows = []
    for layout in ("nchw", "nhwc"):
        bench = cases.OpBench(cases.OpShape("bandwidth", batch, c, growth, hw, 4 * growth), device,
                              layout=layout)
        rows += [dict(r, layout=layout) for r in
                 op_rows(_Ctx(device, budget_s), bench, tuple(cases.MEMORY_BOUND_TRAFFIC), budget_s)]
    return rows


def warm_triton_cache(arch: str, models, dtypes, timeout_s: float, out_dir: str) -> dict:
    """Compiles every Triton specialisation the models launch (training and inference, each
    autotune candidate, every divisibility variant, the fused/unfused trials) for this GPU, in
    parallel processes (``benches/gpu_compile.py``), into Triton's cache, where the models' first steps find them
    instead of compiling them one at a time (on the first H200 run ours' first MSDNet step did
    not finish in ~130 s). Its records (registers, spills, tensor cores with this Triton) go to ``WARM_JSON``."""
    cmd = [sys.executable, os.path.join(ROOT, "benches", "gpu_compile.py"), "--all", "--with-trials",
           "--skip-extension", "--archs", arch, "--models", ",".join(m[0] for m in models),
           "--dtypes", ",".join(str(d)[6:] for d in dtypes), "--json", os.path.join(out_dir, WARM_JSON)]
    env = dict(os.environ, MSDNET_OPS_COMPILE_CACHE=tempfile.mkdtemp())  # compile, not reuse records
    t0 = time.perf_counter()
    # its own process group: at the timeout its compile workers go too (else they would compile
    # on beside the timed steps); what they compiled by then stays in the cache
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    try:
        output, _ = p.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise RuntimeError(f"did not finish within {timeout_s:.0f} s (what it compiled stays cached)")
    lines = output.strip().splitlines()
    done = [line for line in lines if line.startswith("[gpu_compile]")]
    if not done:  # 1 (spills found) still warmed the cache; anything else did not get that far
        raise RuntimeError(f"gpu_compile exit {p.returncode}: " + " | ".join(lines[-3:]))
    return {"summary": done[-1], "exit": p.returncode, "seconds": round(time.perf_counter() - t0, 1)}


def direct_launch(device, models, budget_s, out_dir) -> list:
    """Ours' eager steps with remembered kernels launched directly vs through Triton's
    launcher, beside plain (``benches/gpu_direct_launch.py``; its table beside the report)."""
    from benches import gpu_direct_launch
    return gpu_direct_launch.run(models, device, budget_s, out_dir)


def profile(device, name, batch, out_dir) -> dict:
    """Where plain's and ours' training steps spend their time (``benches/gpu_profile.py``):
    wall vs device-busy time per step and launches; the whole profile beside the report."""
    from benches import gpu_profile
    rows = gpu_profile.write_profiles(name, ("plain", "ours"), batch, device, 3, out_dir)
    return {"name": name, "batch": batch, "rows": rows}


def peak_train_memory(step, device) -> int | None:
    """Peak bytes allocated during one training step, above what was allocated before it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - base


def triton_cache_entries() -> int:
    """Kernels in Triton's on-disk cache (one ``__grp__*.json`` per compiled kernel): the
    difference over ours' first step is what it compiled itself, i.e. what the warm-up missed."""
    try:
        from triton import knobs
        root = knobs.cache.dir
    except (ImportError, AttributeError):
        root = os.path.join(os.path.expanduser("~"), ".triton", "cache")
    if not os.path.isdir(root):
        return 0
    return sum(1 for d in os.scandir(root) if d.is_dir()
               for f in os.scandir(d.path) if f.name.startswith("__grp__"))


GRAPHED = "_graph"  # a variant name's suffix: its training step and inference in CUDA graphs


def graphed_train_step(model, optimizer, x, y, device):
    """The training step as ``msdnet_ops.training.cuda_graph.CudaGraphTrainStep`` runs it, warmed
    up and captured (so that every later call is a replay), and the peak memory that took above
    what was allocated before (the graph's pool holds the step's tensors from then on)."""
    from benches import cases
    from msdnet_ops.training.cuda_graph import CudaGraphTrainStep
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    train = CudaGraphTrainStep(model, optimizer, cases.loss_of)
    while train.captures == 0:
        train(x, y)
    torch.cuda.synchronize(device)
    return (lambda: train(x, y)), torch.cuda.max_memory_allocated(device) - base


def _variant_row(device, name, batch, image, v, dtype, budget_s) -> dict:
    from benches import cases, harness
    graphed = v.endswith(GRAPHED)
    model, fmt = cases.build_model(name, v[:-len(GRAPHED)] if graphed else v, device, dtype)
    x, y = cases.model_input(name, batch, device, dtype, fmt, image=image)
    step, infer = cases.train_step_fn(model, x, y), cases.infer_fn(model, x)
    compiled_before = triton_cache_entries()
    if graphed:  # the package's captured step; memory: what its warm-up and capture took at peak
        step, mem = graphed_train_step(model, step.optimizer, x, y, device)
        infer = cases.cuda_graphed(infer, device)
    t0 = time.perf_counter()
    step()  # warm-up: compilation, autotuning, the fused/unfused choice
    harness.sync(device)
    first_step_s = time.perf_counter() - t0
    compiled = triton_cache_entries() - compiled_before
    if not graphed:
        mem = peak_train_memory(step, device)
    st = harness.time_interleaved({"train": step}, device, warmup=1, min_reps=3, max_reps=15,
                                  budget_s=budget_s)["train"]
    si = harness.time_interleaved({"infer": infer}, device, warmup=1, min_reps=3, max_reps=15,
                                  budget_s=budget_s / 2)["infer"]
    return dict(train_s=st.median, train_iqr=(st.q1, st.q3), infer_s=si.median,
                infer_img_s=batch / si.median, peak_bytes=mem, first_step_s=first_step_s,
                compiled_in_first_step=compiled)


def model_rows(device, name, batch, image, variants, dtype, budget_s) -> dict:
    """Training step, inference and peak memory of each variant of one model (a variant named
    ``<base>_graph``: ``<base>`` with each step captured in a CUDA graph and replayed; its
    peak memory is that of its warm-up and capture)."""
    from benches import cases, harness
    from msdnet_ops import conv_choice
    kind = cases.MODEL_CASES[name].kind
    variants = [v for v in variants if v != "memory_efficient" or kind == "densenet"]
    out = {"name": name, "batch": batch, "dtype": str(dtype)[6:], "variants": {}}
    chosen_before = len(conv_choice.timings)
    for v in variants:
        try:  # one variant failing (a capture, a compile) must not lose the others' numbers
            out["variants"][v] = _variant_row(device, name, batch, image, v, dtype, budget_s)
        except Exception as e:
            traceback.print_exc()
            out["variants"][v] = {"error": f"{type(e).__name__}: {e}"}
        harness.free_memory()
    plain = out["variants"].get("plain")
    if plain and "error" not in plain:
        for r in out["variants"].values():
            if "error" in r:
                continue
            r["train_vs_plain"] = plain["train_s"] / r["train_s"]
            r["infer_vs_plain"] = plain["infer_s"] / r["infer_s"]
            if r["peak_bytes"] and plain["peak_bytes"]:
                r["memory_vs_plain"] = r["peak_bytes"] / plain["peak_bytes"]
    new = list(conv_choice.timings.items())[chosen_before:]
    out["conv_choices"] = {"fused": sum(t["fused"] <= t["unfused"] for _, t in new),
                           "unfused": sum(t["fused"] > t["unfused"] for _, t in new)}
    return out


# --------------------------------------------------------------------------- plan

def run(device, params: Params, out_dir: str, log=print) -> dict:
    """Runs the plan, in order of what matters most should time run out: op parity, bandwidth,
    the float32 models (after warming Triton's cache for them), the first model in CUDA graphs
    and its profile, the tests, ours' direct launches against Triton's launcher,
    torch.compile, the other models in CUDA graphs, then the other dtypes (each after its own
    warm-up). The report is rewritten after every step, so a run
    cut short still leaves one."""
    from benches import harness
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the strongest cuDNN baseline, for plain and ours
    clock = Clock(params.budget_s, params.reserve_s)
    meta = dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                machine=harness.machine(device), versions=harness.versions(), budget_s=params.budget_s,
                cudnn_benchmark=torch.backends.cudnn.benchmark)
    results = {"meta": meta, "steps": []}

    def report():
        meta["seconds"] = round(time.perf_counter() - clock.start, 1)
        write_report(results, out_dir)

    s = Session(clock, log, on_step=report)
    results["steps"] = s.steps
    s.step("op parity", 20.0 if device.type == "cuda" else 5.0, op_parity, device, params.dtypes)
    s.step("bandwidth", 20.0, bandwidth, device, params.bandwidth_shape, params.time_budget_s / 4)
    first, *others = params.dtypes

    def warm(dtype):
        name = f"warm Triton cache {str(dtype)[6:]}"
        if device.type != "cuda":
            s.skip(name, "compiles for a CUDA GPU (CI runs benches/gpu_compile.py itself)")
        elif "ours" in params.variants:
            arch = "".join(map(str, torch.cuda.get_device_capability(device)))
            s.step(name, params.warm_estimate_s, warm_triton_cache, arch, params.models, (dtype,),
                   min(params.warm_estimate_s, clock.left() - params.reserve_s), out_dir)

    def models(dtype):
        warm(dtype)
        for name, batch, image in params.models:
            s.step(f"model {name} {str(dtype)[6:]}", params.model_estimate_s,
                   model_rows, device, name, batch, image, params.variants, dtype, params.time_budget_s)
    def graphs(model_list):  # after the eager measurements: a failed capture cannot spoil them
        for name, batch, image in model_list if params.graphs else ():
            step_name = f"model {name} float32 cuda graphs"
            if device.type != "cuda":
                s.skip(step_name, "CUDA graphs need a CUDA device")
                continue
            s.step(step_name, params.graphs_estimate_s, model_rows, device, name, batch, image,
                   ("plain", "plain" + GRAPHED, "ours", "ours" + GRAPHED), torch.float32,
                   params.time_budget_s)
    models(first)
    # the headline model without host overhead next: on the H200 both plain and ours were
    # host-bound (device busy 15% and 4% of a training step), so this is where kernels compare
    graphs(params.models[:1])
    if device.type != "cuda":
        s.skip("profile", "the device-busy time needs a CUDA device")
    elif "ours" in params.variants:
        name, batch, _ = params.models[0]
        s.step("profile", params.profile_estimate_s, profile, device, name, batch, out_dir)
    if params.run_tests:  # after ours' first timings (op parity above already ran every op)
        s.step("tests", params.tests_timeout_s, run_tests, min(params.tests_timeout_s, clock.left() - params.reserve_s),
               GPU_TESTS, os.path.join(out_dir, TESTS_LOG))
    if device.type != "cuda":
        s.skip("direct launch", "times Triton launches on a CUDA device")
    elif "ours" in params.variants:
        s.step("direct launch", params.direct_estimate_s, direct_launch, device,
               [(n, b) for n, b, _ in params.models[:2]], params.time_budget_s * 4, out_dir)
    if params.compile:
        for name, batch, image in params.models:
            s.step(f"model {name} float32 compile", params.compile_estimate_s, model_rows, device,
                   name, batch, image, ("plain", "compile"), torch.float32, params.time_budget_s)
    graphs(params.models[1:])
    for dtype in others:
        models(dtype)
    report()
    return results


# --------------------------------------------------------------------------- report

def _fmt(v, spec=".2f", none="-"):
    return none if v is None else format(v, spec)


def markdown(results: dict) -> str:
    m = results["meta"]
    lines = ["# GPU results (measured)", "",
             f"{m['date']}; {m['machine'].get('gpu', m['machine'].get('device'))}; torch "
             f"{m['versions'].get('torch')}, triton {m['versions'].get('triton')}; "
             f"{m['seconds']} s of a {m['budget_s']:.0f} s budget; cudnn.benchmark "
             f"{m.get('cudnn_benchmark')}. `python benches/gpu.py`.", "",
             "| step | status |", "| --- | --- |"]
    lines += [f"| {st['name']} | {st['status']} |" for st in results["steps"]]
    for st in results["steps"]:
        r = st["result"]
        if not r:
            continue
        if st["name"].startswith("warm Triton cache"):
            lines += ["", f"Triton cache warm-up: {r['summary']} (exit {r['exit']}, {r['seconds']} s); "
                      f"records: `{WARM_JSON}`."]
        elif st["name"] == "tests":
            lines += ["", f"Tests: {r['summary']} ({r['workers'] or 'no'} parallel workers); "
                      f"the whole output: `{TESTS_LOG}`."]
        elif st["name"] == "op parity":
            worst = {}
            for row in r:
                k = (row["backend"], row["dtype"])
                worst[k] = max(worst.get(k, 0.0), row["max_rel_err"])
            lines += ["", "## Op parity (worst relative error vs the reference, all ops)", "",
                      "| backend | dtype | worst rel. err |", "| --- | --- | --- |"]
            lines += [f"| {b} | {d} | {e:.2e} |" for (b, d), e in sorted(worst.items())]
        elif st["name"] == "direct launch":
            from benches import gpu_direct_launch
            lines += ["", "## Direct launches (`benches/gpu_direct_launch.py`; also `direct-launch.md`)", "",
                      gpu_direct_launch.table(r, None, heading=False)]
        elif st["name"] == "profile":
            lines += ["", f"## Where a training step's time goes: {r['name']}, batch {r['batch']}", "",
                      f"The whole profile: `profile-{r['name']}.txt`.", "",
                      "| variant | wall ms/step | device busy ms/step | busy | kernel launches/step |",
                      "| --- | --- | --- | --- | --- |"]
            lines += [f"| {row['variant']} | {row['wall_s'] * 1e3:.1f} | {row['busy_s'] * 1e3:.1f} | "
                      f"{row['busy_s'] / row['wall_s']:.0%} | {row['launches']:.0f} |" for row in r["rows"]]
        elif st["name"] == "bandwidth":
            lines += ["", "## Memory-bound kernels: achieved bandwidth", "",
                      "| op | layout | bytes | ours GB/s | fraction of copy | plain GB/s |",
                      "| --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {row['op']} | {row.get('layout', 'nchw')} | {row['bytes'] / 2**20:.0f} MiB | {row['ours_gbps']:.0f} | "
                      f"{row['ours_frac_copy']:.2f} | {row['plain_gbps']:.0f} |" for row in r]
        elif st["name"].startswith("model "):
            lines += ["", f"## {r['name']}, batch {r['batch']}, {r['dtype']}", "",
                      f"Fused/unfused transform-conv choices made here: {r['conv_choices']}.", "",
                      "| variant | train step ms | vs plain | inference img/s | vs plain | peak MiB | vs plain "
                      "| first step s | kernels compiled in it |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for v, row in r["variants"].items():
                if "error" in row:
                    lines.append(f"| {v} | failed: {row['error'][:200]} | | | | | | | |")
                    continue
                peak = row["peak_bytes"] / 2**20 if row["peak_bytes"] else None
                lines.append(f"| {v} | {row['train_s'] * 1e3:.1f} | {_fmt(row.get('train_vs_plain'))}x | "
                             f"{row['infer_img_s']:.0f} | {_fmt(row.get('infer_vs_plain'))}x | "
                             f"{_fmt(peak, '.0f')} | {_fmt(row.get('memory_vs_plain'))} | "
                             f"{_fmt(row.get('first_step_s'), '.1f')} | {row.get('compiled_in_first_step', '-')} |")
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results-gpu.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(out_dir, "RESULTS-gpu.md"), "w") as f:
        f.write(markdown(results))
