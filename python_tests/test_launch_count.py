"""benches/launch_count.py: the kernel launches of a training step, counted on the CPU.

The counts are checked against what the models are built of (their ``Conv2d`` modules), and
ours must not read a tensor value on the host (``.item()``, ``float(t)``): on a GPU each such
read waits for every queued kernel.
"""
import os
import sys

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benches import cases  # noqa: E402
from benches.launch_count import count_launches  # noqa: E402

NAME = "msdnet-cifar100-anytime"


def _convolutions(name: str) -> int:
    model, _ = cases.build_model(name, "plain", "cpu")
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def test_plain_launches_one_forward_and_one_backward_per_convolution():
    counts = count_launches(NAME, "plain")
    convs = _convolutions(NAME)
    assert counts["aten.convolution"] == convs
    assert counts["aten.convolution_backward"] == convs
    assert counts["aten.native_batch_norm"] == convs  # MSDNet: every conv is followed by a BN


def test_ours_launches_a_triton_convolution_per_conv_and_never_reads_values_on_the_host():
    counts = count_launches(NAME, "ours")
    forward = sum(n for k, n in counts.items() if k.startswith("triton._conv_fwd"))
    assert forward == _convolutions(NAME)
    assert counts["aten.convolution"] == 0  # no convolution left to cuDNN at these sizes
    assert counts["aten._local_scalar_dense"] == 0


def test_ours_densenet_never_reads_values_on_the_host():
    counts = count_launches("densenet-bc100", "ours")
    assert sum(n for k, n in counts.items() if k.startswith("triton.")) > 0  # it did capture
    assert counts["aten._local_scalar_dense"] == 0


def _batchnorms(name: str) -> int:
    model, _ = cases.build_model(name, "plain", "cpu")
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name", [NAME, "densenet-bc100"])
def test_ours_batchnorm_vectors_are_one_launch_each_way_per_batchnorm(name):
    """Each BatchNorm's (scale, shift) and their backward are at most one kernel each: no
    per-channel PyTorch arithmetic (which took 6 launches per BatchNorm), no copy of
    statistics into a buffer's vectors, and the running-statistics counters in one launch; in
    all, DenseNet launches no more kernels than plain."""
    counts = count_launches(name, "ours")
    bns = _batchnorms(name)
    # MSDNet's post-activation units compute their vectors inside the kernel that applies
    # them, the others (read by a convolution, whose prologue applies them) in a kernel of
    # their own; the post-activation units and the bottlenecks' sole readers compute their
    # gradients in the kernel that adds the statistics' part, the others in their own
    in_epilogue = counts["triton._batchnorm_relu_rows_kernel"]
    in_backward = counts["triton._batchnorm_backward_rows_kernel"]
    assert (in_epilogue > 0) == (name != "densenet-bc100")
    assert in_backward > in_epilogue
    assert counts["triton._bn_scale_shift_kernel"] + in_epilogue == bns
    assert counts["triton._bn_scale_shift_backward_kernel"] + in_backward == bns
    # per BatchNorm these would number about bns (>= 99); the few left are the loss's and the
    # stem's copy into its first buffer
    for op in ("aten.mul", "aten.addcmul", "aten.addcmul_", "aten.copy_", "aten.add_"):
        assert counts[op] <= 3, (op, counts[op])
    if name == "densenet-bc100":
        assert sum(counts.values()) <= sum(count_launches(name, "plain").values())


@pytest.mark.parametrize("name", [NAME, "densenet-bc100"])
def test_fused_batchnorm_relu_saves_a_launch_per_batchnorm_and_way(monkeypatch, name):
    """Against the same step with the BatchNorm+ReLUs' steps one by one (statistics, vectors,
    transform; the transform's backward, the vectors', the statistics'): a post-activation
    unit's BatchNorm+ReLU computes the vectors in the kernel that applies them, and it and a
    bottleneck's sole reader compute their gradients in the kernel that adds the statistics'
    part: exactly one Triton launch fewer for each, and no more PyTorch ones (fewer: a reader
    that writes its bottleneck's whole gradient needs no zero-filled statistics gradients)."""
    fused = count_launches(name, "ours")
    from msdnet_ops import ops
    monkeypatch.setattr(ops, "fuses_batchnorm_relu", lambda y: False)
    steps = count_launches(name, "ours")
    units = fused["triton._batchnorm_relu_rows_kernel"]
    backward = fused["triton._batchnorm_backward_rows_kernel"]
    assert backward > units and steps["triton._batchnorm_backward_rows_kernel"] == 0
    assert steps["triton._bn_scale_shift_kernel"] - fused["triton._bn_scale_shift_kernel"] == units
    for kernel in ("_bn_scale_shift_backward_kernel", "_channel_stats_backward_rows_kernel"):
        assert steps["triton." + kernel] - fused["triton." + kernel] == backward, kernel

    def launches(counts, kind):
        return sum(n for op, n in counts.items() if op.startswith(kind))
    assert launches(steps, "triton.") - launches(fused, "triton.") == units + backward
    assert launches(steps, "aten.") >= launches(fused, "aten.")


@pytest.mark.parametrize("name", [NAME, "densenet-bc100"])
def test_weight_gradients_are_zeroed_inside_the_dgrad_launch(monkeypatch, name):
    """A convolution's weight-gradient accumulator (the wgrad kernel adds its split-K partial
    tiles into it) is zeroed by the programs of the dgrad kernel launched before it, not by a
    fill of its own: against the same step with a zero-filled accumulator, exactly one
    PyTorch launch fewer per dgrad launch, and the same Triton launches."""
    zeroed = count_launches(name, "ours")
    from msdnet_ops.triton import conv
    monkeypatch.setattr(conv, "new_weight_grad", torch.zeros_like)
    filled = count_launches(name, "ours")
    dgrads = zeroed["triton._conv_dgrad_kernel"]
    assert dgrads > 0
    assert filled["aten.zeros_like"] - zeroed["aten.zeros_like"] == dgrads
    assert sum(n for op, n in filled.items() if op.startswith("aten.")) \
        - sum(n for op, n in zeroed.items() if op.startswith("aten.")) == dgrads
    assert {op: n for op, n in filled.items() if op.startswith("triton.")} \
        == {op: n for op, n in zeroed.items() if op.startswith("triton.")}


def test_bad_variant_is_named():
    with pytest.raises(ValueError, match="variant"):
        count_launches(NAME, "channels_last")


def test_host_overhead_script_times_ours_with_launches_dropped():
    """benches/host_overhead.py (a subprocess: it selects the triton backend for its process)
    prints one row per model: host ms per step and the Triton launches it dropped."""
    import re
    import subprocess
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benches", "host_overhead.py"),
                          "--models", "densenet-bc100", "--reps", "1"],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    row = re.search(r"^\| densenet-bc100 \| 2 \| ([\d.]+) \| [\d.]+-[\d.]+ \| (\d+) \| (\d+) \|$", out, re.M)
    assert row, out
    ms, launches = float(row[1]), int(row[2])
    assert ms > 0 and launches > 100  # a DenseNet-BC-100 step launches hundreds of kernels
