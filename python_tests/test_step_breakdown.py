"""benches/step_breakdown.py: its timers count and time what they wrap and put the originals
back; the script prints a row per part of a real training step of ours."""
import os
import subprocess
import sys
import time
import types

from benches import step_breakdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Node:
    @staticmethod
    def forward(x):
        time.sleep(0.002)
        return x + 1

    def method(self, x):
        return 2 * x


def test_timers_count_time_and_restore():
    module = types.SimpleNamespace(f=lambda x: x * 3)
    originals = (module.f, _Node.__dict__["forward"], _Node.__dict__["method"])
    timers = step_breakdown.Timers()
    timers.wrap(module, "f", "f")
    timers.wrap(_Node, "forward", "forward", static=True)
    timers.wrap(_Node, "method", "method")
    assert (module.f(2), _Node.forward(2), _Node().method(5)) == (6, 3, 10)
    assert _Node.forward(1) == 2
    assert timers.totals["f"][0] == 1 and timers.totals["method"][0] == 1
    calls, seconds = timers.totals["forward"]
    assert calls == 2 and seconds >= 0.004  # the sleeps, timed
    timers.restore()
    assert (module.f, _Node.__dict__["forward"], _Node.__dict__["method"]) == originals
    module.f(1)
    assert timers.totals["f"][0] == 1  # no longer counted


def test_script_prints_the_parts_of_a_training_step():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benches", "step_breakdown.py"),
                          "--batch", "2", "--steps", "1"], capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "ms per training step" in lines[0]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in lines[3:]}
    # one unit per conv -> BN -> ReLU of MSDNet cifar100-anytime, both ways, counted apart
    assert rows["ConvBNReLUWrite.forward"][0] == rows["ConvBNReLUWrite.backward"][0]
    assert int(rows["ConvBNReLUWrite.forward"][0]) > 10
    assert "ops.eager.batchnorm_relu_into_" in rows and "cpu_conv.conv_backward_" in rows
    assert float(rows["ConvBNReLUWrite.backward"][1]) > 0


def test_script_refuses_bad_counts():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benches", "step_breakdown.py"),
                          "--steps", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--batch and --steps: expected positive counts" in out.stderr


def test_cells_prints_every_cell_of_an_inference_forward():
    """``--cells``: a row per plan cell of MSDNet cifar100-anytime in run order, whose
    multiply-adds add up to the full network's as counted by hooks on the plain model."""
    import torch
    from msdnet_ops import MSDNetPlain, msdnet_config
    from msdnet_ops.models import exit_macs
    from benches import cases
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benches", "step_breakdown.py"),
                          "--cells", "--batch", "2", "--steps", "1"], capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "ms per inference forward" in lines[0]
    rows = [line.strip("| ").split(" | ") for line in lines[3:]]
    model, _ = cases.build_model("msdnet-cifar100-anytime", "ours", "cpu", torch.float32)
    assert sorted(int(r[0]) for r in rows) == list(range(len(model.plan.cells)))
    assert all(r[1] == model.plan.cells[int(r[0])].kind for r in rows)
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows)
    plain = MSDNetPlain(**msdnet_config("cifar100-anytime"))
    total = sum(float(r[3]) for r in rows) * 1e6  # printed in MMAC, two decimals
    assert abs(total - exit_macs(plain)[-1]) < 0.001 * total
