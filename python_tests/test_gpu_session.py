"""The one-command GPU run (``benches/gpu.py``, ``benches.gpu_session``) on the CPU: its
planning against the time budget, test timeouts, failures recorded, report writing, and one
whole run with tiny shapes, so that the first GPU run is not its first run."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benches import gpu, gpu_session  # noqa: E402


def test_steps_that_would_overrun_are_skipped_and_failures_recorded():
    log = []
    s = gpu_session.Session(gpu_session.Clock(budget_s=2.0, reserve_s=0.5), log.append)
    assert s.step("fits", 1.0, lambda: 42) == 42
    assert s.step("too long", 5.0, lambda: pytest.fail("a step beyond the budget must not run")) is None

    def boom():
        raise ValueError("bad shape")
    s.step("fails", 0.1, boom)
    status = {st["name"]: st["status"] for st in s.steps}
    assert status["fits"] == "ok"
    assert status["too long"].startswith("skipped: needs ~5 s")
    assert status["fails"] == "failed: ValueError: bad shape"
    assert [st["name"] for st in s.steps] == ["fits", "too long", "fails"]


def test_clock_counts_down():
    c = gpu_session.Clock(budget_s=1.0, reserve_s=0.2)
    assert c.fits(0.5) and not c.fits(0.9)
    time.sleep(0.35)
    assert not c.fits(0.5) and c.fits(0.3)


def test_test_step_times_out_naming_the_failures_so_far(tmp_path):
    slow = tmp_path / "test_slow.py"
    slow.write_text("import time\n\ndef test_bad():\n    assert 1 == 2\n\n"
                    "def test_slow():\n    time.sleep(30)\n")
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"did not finish within 5 s; failed so far \(1\): \S*test_slow.py::test_bad$"):
        gpu_session.run_tests(5.0, [str(slow)])
    assert time.perf_counter() - t0 < 20


def test_test_step_reports_failures(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text("def test_bad():\n    assert 1 == 2\n")
    log = tmp_path / "tests.log"
    with pytest.raises(RuntimeError, match="pytest exit 1: FAILED .*test_bad"):
        gpu_session.run_tests(60.0, [str(bad)], str(log))
    assert "assert 1 == 2" in log.read_text()  # the whole output is kept


def test_report_of_skipped_and_failed_steps(tmp_path):
    results = {"meta": dict(date="d", machine={"device": "cuda", "gpu": "H200"},
                            versions={"torch": "2.11", "triton": "3.6"}, budget_s=480, seconds=470.0),
               "steps": [dict(name="tests", status="failed: RuntimeError: x", result=None),
                         dict(name="model densenet121 float32 compile", status="skipped: needs ~75 s, 9 s left",
                              result=None),
                         dict(name="model densenet-bc100 bfloat16", status="ok", result=dict(
                             name="densenet-bc100", batch=64, dtype="bfloat16", conv_choices={"fused": 3, "unfused": 1},
                             variants={"plain": dict(train_s=0.1, infer_s=0.01, infer_img_s=6400.0, peak_bytes=2**30,
                                                     train_vs_plain=1.0, infer_vs_plain=1.0, memory_vs_plain=1.0),
                                       "ours": dict(train_s=0.05, infer_s=0.01, infer_img_s=6400.0, peak_bytes=2**29,
                                                    train_vs_plain=2.0, infer_vs_plain=1.0, memory_vs_plain=0.5)}))]}
    gpu_session.write_report(results, str(tmp_path))
    md = (tmp_path / "RESULTS-gpu.md").read_text()
    assert "| tests | failed: RuntimeError: x |" in md
    assert "skipped: needs ~75 s" in md
    assert "| ours | 50.0 | 2.00x | 6400 | 1.00x | 512 | 0.50 | - |" in md
    assert (tmp_path / "results-gpu.json").exists()


def test_whole_run_on_cpu_with_tiny_shapes(tmp_path, monkeypatch):
    monkeypatch.delenv("MSDNET_OPS_BACKEND", raising=False)
    assert gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "RESULTS-gpu.md").read_text()
    for section in ("Op parity", "achieved bandwidth", "densenet-bc100, batch 2", "msdnet-cifar100-anytime",
                    "| gather_batch | nchw |", "| gather_batch | nhwc |"):  # both layouts, checked
        assert section in md
    assert "failed" not in md
    skipped = [line for line in md.splitlines() if "skipped" in line]
    assert skipped and all(("cuda graphs" in line and "need a CUDA device" in line)
                           or ("warm Triton cache" in line and "compiles for a CUDA GPU" in line)
                           or ("| profile |" in line and "needs a CUDA device" in line)
                           or ("| direct launch |" in line and "on a CUDA device" in line)
                           for line in skipped)  # the only steps a CPU cannot run


def test_plan_on_a_cuda_device_puts_what_matters_first(monkeypatch, tmp_path):
    """On a CUDA device (the steps themselves stubbed: no GPU here) the plan warms Triton's
    cache, runs the float32 models eager, the first model (plain and ours) in CUDA graphs and
    profiled, ours with and without direct launches, then torch.compile, the other models in CUDA
    graphs, then the other dtypes (each warmed first);
    cudnn.benchmark is on for the whole run."""
    calls = []
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(gpu_session, "op_parity", lambda *a: [])
    monkeypatch.setattr(gpu_session, "bandwidth", lambda *a: [])
    monkeypatch.setattr(gpu_session, "warm_triton_cache",
                        lambda arch, models, dtypes, *a: calls.append(("warm", arch, models, dtypes)) or
                        {"summary": "stub", "exit": 0, "seconds": 0.0})
    monkeypatch.setattr(gpu_session, "model_rows",
                        lambda *a: calls.append((a[1], a[4], a[5], torch.backends.cudnn.benchmark)))
    monkeypatch.setattr(gpu_session, "profile", lambda device, name, *a: calls.append(("profile", name))
                        or {"name": name, "batch": 2, "rows": []})
    monkeypatch.setattr(gpu_session, "direct_launch",
                        lambda device, models, *a: calls.append(("direct", models)) or [])
    from benches import harness
    monkeypatch.setattr(harness, "machine", lambda device: {"device": "stub"})
    params = gpu_session.quick_params()
    params.dtypes, params.compile = (torch.float32, torch.bfloat16), True
    results = gpu_session.run(torch.device("cuda"), params, str(tmp_path), log=lambda *_: None)
    names = [m[0] for m in params.models]
    eager = [(n, params.variants, torch.float32, True) for n in names]
    compiled = [(n, ("plain", "compile"), torch.float32, True) for n in names]
    graphs = [(n, ("plain", "plain_graph", "ours", "ours_graph"), torch.float32, True) for n in names]
    bf16 = [(n, params.variants, torch.bfloat16, True) for n in names]
    def warm(dtype):  # every model, before the first timing in that dtype
        return [("warm", "90", params.models, (dtype,))]
    direct = [("direct", [(n, b) for n, b, _ in params.models[:2]])]
    assert calls == (warm(torch.float32) + eager + graphs[:1] + [("profile", names[0])] + direct + compiled
                     + graphs[1:] + warm(torch.bfloat16) + bf16)
    assert all(st["status"] == "ok" for st in results["steps"])
    assert results["meta"]["cudnn_benchmark"] is True


def test_report_is_rewritten_after_every_step(monkeypatch, tmp_path):
    """A run cut short (the device's time limit) still leaves the report of the steps done."""
    seen = []

    def bandwidth(*a):
        seen.append((tmp_path / "RESULTS-gpu.md").read_text())
        raise KeyboardInterrupt  # the run is killed here
    monkeypatch.setattr(gpu_session, "op_parity", lambda *a: [])
    monkeypatch.setattr(gpu_session, "bandwidth", bandwidth)
    with pytest.raises(KeyboardInterrupt):
        gpu_session.run(torch.device("cpu"), gpu_session.quick_params(), str(tmp_path), log=lambda *_: None)
    assert "| op parity | ok |" in seen[0] and "bandwidth" not in seen[0]
    assert "| op parity | ok |" in (tmp_path / "RESULTS-gpu.md").read_text()


def test_a_failing_variant_keeps_the_others_numbers(monkeypatch):
    from benches import cases
    real_build = cases.build_model

    def build(name, variant, *a, **kw):
        if variant == "channels_last":
            raise RuntimeError("capture failed")
        return real_build(name, variant, *a, **kw)
    monkeypatch.setattr(cases, "build_model", build)
    r = gpu_session.model_rows(torch.device("cpu"), "densenet-bc100", 2, None,
                               ("plain", "channels_last", "ours"), torch.float32, 0.0)
    assert r["variants"]["channels_last"] == {"error": "RuntimeError: capture failed"}
    assert r["variants"]["ours"]["train_s"] > 0 and r["variants"]["ours"]["train_vs_plain"] > 0
    md = gpu_session.markdown({"meta": dict(date="d", machine={"device": "cpu"}, versions={}, budget_s=1,
                                            seconds=1.0),
                               "steps": [dict(name="model densenet-bc100 float32", status="ok", result=r)]})
    assert "| channels_last | failed: RuntimeError: capture failed |" in md
    assert "| ours | " in md


def test_cuda_graph_capture_needs_a_cuda_device():
    from benches import cases
    with pytest.raises(ValueError, match="device: CUDA graphs need a CUDA device"):
        cases.cuda_graphed(lambda: None, "cpu")


def test_a_short_run_of_chosen_models_and_variants(tmp_path, monkeypatch):
    """What a short second GPU call runs: no tests, float32 eager only, chosen models/variants."""
    monkeypatch.delenv("MSDNET_OPS_BACKEND", raising=False)
    assert gpu.main(["--device", "cpu", "--quick", "--no-tests", "--no-extras", "--models",
                     "msdnet-cifar100-anytime", "--variants", "plain,ours", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "RESULTS-gpu.md").read_text()
    assert "## msdnet-cifar100-anytime, batch 2, float32" in md and "densenet-bc100" not in md
    assert "| ours |" in md and "channels_last" not in md and "graphs" not in md
    with pytest.raises(SystemExit):
        gpu.main(["--device", "cpu", "--quick", "--models", "resnet50", "--out", str(tmp_path)])


def test_gpu_compile_takes_only_known_archs():
    # in a subprocess: importing gpu_compile drops TRITON_INTERPRET (it compiles for GPUs),
    # which the interpreter tests after this one need
    p = subprocess.run([sys.executable, os.path.join(gpu_session.ROOT, "benches", "gpu_compile.py"),
                        "--archs", "75", "--models", "densenet-bc100"], capture_output=True, text=True)
    assert p.returncode == 2 and "--archs: expected some of 80,90, got 75" in p.stderr


def test_cache_warm_up_stops_with_its_workers_at_its_timeout(tmp_path):
    """Compiling for sm_90 works without a GPU; stopped at the timeout, no compile worker may
    run on beside the timed steps that follow."""
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="did not finish within 6 s"):
        gpu_session.warm_triton_cache("90", (("densenet-bc100", 2, None),), (torch.float32,), 6.0,
                                      str(tmp_path))
    assert time.perf_counter() - t0 < 30
    time.sleep(1)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "gpu_compile.py --all" not in ps


def test_cache_warm_up_captures_the_fused_unfused_trials_too():
    """On a GPU, ``auto`` first runs each transform-convolution shape both ways (on scratch
    gradients) and mostly keeps the unfused path (transform materialised, then cuDNN): kernels
    the fused-path capture never sees, which the first H200 step of DenseNet-BC-100 had to
    compile (9). ``trials=True`` captures them as well, and leaves the choice machinery and the
    environment as they were. (A subprocess: capturing needs compiled, not interpreted, kernels.)"""
    script = textwrap.dedent("""
        import json, os, sys, torch
        sys.path.insert(0, sys.argv[1])
        from benches import gpu_launches
        from msdnet_ops import conv_choice
        choose, model = conv_choice.choose, (("densenet-bc100", 2, 32),)
        quiet = lambda *_: None
        fused = {s.key() for s in gpu_launches.capture(model, (torch.float32,), log=quiet)}
        trials = {s.key(): s for s in gpu_launches.capture(model, (torch.float32,), log=quiet, trials=True)}
        new = [s for k, s in trials.items() if k not in fused]
        print(json.dumps(dict(subset=fused < set(trials), kernels=sorted({s.kernel for s in new}),
                              labels=sorted({l for s in new for l in s.used_by}),
                              restored=conv_choice.choose is choose,
                              env=os.environ.get("MSDNET_OPS_TRANSFORM_CONV"))))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MSDNET_OPS_TRANSFORM_CONV")}
    p = subprocess.run([sys.executable, "-c", script, gpu_session.ROOT], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["subset"] and r["restored"] and r["env"] is None
    assert r["labels"] and all(label.endswith(("trials", "trials twin")) for label in r["labels"])
    assert {"msdnet_ops.triton.pixel_rows:_affine_relu_rows_kernel",
            "msdnet_ops.triton.pixel_rows:_affine_relu_backward_rows_kernel"} <= set(r["kernels"])


def test_profile_writes_where_a_step_spends_its_time(tmp_path):
    """benches/gpu_profile.py on the CPU (no device-busy time there: 0): wall time, the profiler's
    op table and the host functions, in one file."""
    from benches import gpu_profile
    rows = gpu_profile.write_profiles("densenet-bc100", ("plain",), 2, torch.device("cpu"), 1, str(tmp_path))
    assert [r["variant"] for r in rows] == ["plain"]
    assert rows[0]["wall_s"] > 0 and rows[0]["busy_s"] == 0
    text = (tmp_path / "profile-densenet-bc100.txt").read_text()
    assert text.startswith("## densenet-bc100 plain, batch 2") and "host (cProfile, own time):" in text
    assert "aten::convolution" in text  # plain's convolutions appear in the op table


def test_direct_launch_bench_writes_its_table(tmp_path):
    """benches/gpu_direct_launch.py on the CPU (ours runs the CPU backend there: no Triton
    launches, so both ways of ours are the same code): every variant timed, the table written."""
    from benches import gpu_direct_launch
    results = gpu_direct_launch.run([("densenet-bc100", 2)], torch.device("cpu"), 0.0, str(tmp_path))
    (r,) = results
    for what in ("train", "infer"):
        assert set(r[what]) == {"plain", "channels_last", "ours direct", "ours through Triton"}
        assert all(v["median"] > 0 and v["n"] >= 5 for v in r[what].values())
    assert r["launches_per_step"] == {"direct": {"direct": 0, "through_triton": 0},
                                      "through Triton": {"direct": 0, "through_triton": 0}}
    text = (tmp_path / "direct-launch.md").read_text()
    assert text.count("| densenet-bc100 | 2 |") == 2
    assert json.loads((tmp_path / "direct-launch.json").read_text())[0]["name"] == "densenet-bc100"
