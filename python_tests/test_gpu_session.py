"""The one-command GPU run (``benches/gpu.py``, ``benches.gpu_session``) on the CPU: its
planning against the time budget, test timeouts, failures recorded, report writing, and one
whole run with tiny shapes, so that the first GPU run is not its first run."""
import os
import sys
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


def test_test_step_times_out(tmp_path):
    slow = tmp_path / "test_slow.py"
    slow.write_text("import time\n\ndef test_slow():\n    time.sleep(30)\n")
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="did not finish within 3 s"):
        gpu_session.run_tests(3.0, [str(slow)])
    assert time.perf_counter() - t0 < 20


def test_test_step_reports_failures(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text("def test_bad():\n    assert 1 == 2\n")
    with pytest.raises(RuntimeError, match="pytest exit 1"):
        gpu_session.run_tests(60.0, [str(bad)])


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
    assert "| ours | 50.0 | 2.00x | 6400 | 1.00x | 512 | 0.50 |" in md
    assert (tmp_path / "results-gpu.json").exists()


def test_whole_run_on_cpu_with_tiny_shapes(tmp_path, monkeypatch):
    monkeypatch.delenv("MSDNET_OPS_BACKEND", raising=False)
    assert gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "RESULTS-gpu.md").read_text()
    for section in ("Op parity", "achieved bandwidth", "densenet-bc100, batch 2", "msdnet-cifar100-anytime"):
        assert section in md
    assert "failed" not in md
    skipped = [line for line in md.splitlines() if "skipped" in line]
    assert skipped and all("cuda graphs" in line and "need a CUDA device" in line
                           for line in skipped)  # the only steps a CPU cannot run


def test_cuda_graph_steps_are_planned_after_the_eager_ones(monkeypatch, tmp_path):
    """On a CUDA device the plan times plain and ours, eager and captured in CUDA graphs, per
    model, after every eager measurement (the steps themselves stubbed: no GPU here)."""
    calls = []
    monkeypatch.setattr(gpu_session, "op_parity", lambda *a: [])
    monkeypatch.setattr(gpu_session, "bandwidth", lambda *a: [])
    monkeypatch.setattr(gpu_session, "model_rows", lambda *a: calls.append((a[1], a[4], a[5])))
    from benches import harness
    monkeypatch.setattr(harness, "machine", lambda device: {"device": "stub"})
    params = gpu_session.quick_params()
    params.compile = False
    results = gpu_session.run(torch.device("cuda"), params, str(tmp_path), log=lambda *_: None)
    graphs = [c for c in calls if any(v.endswith("_graph") for v in c[1])]
    assert [c[0] for c in graphs] == [m[0] for m in params.models]
    assert all(c[1] == ("plain", "plain_graph", "ours", "ours_graph") and c[2] == torch.float32
               for c in graphs)
    assert calls.index(graphs[0]) == len(params.models) * len(params.dtypes)  # after the eager
    assert all(st["status"] == "ok" for st in results["steps"])


def test_cuda_graph_capture_needs_a_cuda_device():
    from benches import cases
    with pytest.raises(ValueError, match="device: CUDA graphs need a CUDA device"):
        cases.cuda_graphed(lambda: None, "cpu")
