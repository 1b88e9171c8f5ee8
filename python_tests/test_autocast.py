"""Mixed precision: the fused DenseNet and MSDNet under ``torch.autocast`` err against float64
at most ~2x what the plain PyTorch model errs under the same autocast.

Where the backend has low-precision kernels (Triton: on GPUs, or here on the CPU through the
interpreter) the feature buffers hold the autocast dtype (float32 statistics and accumulation,
float32 parameters). The CPU C++ kernels take float32/float64: under CPU autocast, where
torchvision's DenseNet runs in bfloat16, ours runs a float32 compute path (as autocast runs
BatchNorm) and returns the autocast dtype where plain PyTorch does.
"""
import copy

import pytest
import torch
from torchvision.models import densenet as tv

import msdnet_ops

MSDNET_CFG = dict(nBlocks=1, nChannels=4, base=1, step=1, stepmode="even", growthRate=4,
                  grFactor=[1, 2, 4], bnFactor=[1, 2, 4], prune="max", reduction=0.5,
                  bottleneck=True, num_classes=5, stem="cifar")


def _step(model, x, dtype, amp: bool):
    """Output, input gradient and parameter gradients of one forward/backward."""
    model = copy.deepcopy(model).to(dtype)
    x = x.detach().clone().to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        y = model(x)
    y = torch.stack(y) if isinstance(y, list) else y
    (y.double() ** 2).sum().backward()
    grads = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None])
    return [y.double(), x.grad.double(), grads]


def _relative_errors(got, exact):
    return [((g - e).norm() / e.norm()).item() for g, e in zip(got, exact)]


def _pairs():
    torch.manual_seed(0)
    dense = tv.DenseNet(4, (2, 2), 6, bn_size=2, num_classes=5)
    dense_me = tv.DenseNet(4, (2, 2), 6, bn_size=2, num_classes=5, memory_efficient=True)
    dense_me.load_state_dict(dense.state_dict())
    plain_msd = msdnet_ops.MSDNetPlain(**MSDNET_CFG)
    fused_msd = msdnet_ops.MSDNet(**MSDNET_CFG)
    fused_msd.load_state_dict(plain_msd.state_dict())
    return {"densenet": (dense, msdnet_ops.convert(copy.deepcopy(dense))),
            "densenet-memory-efficient": (dense, msdnet_ops.convert(dense_me)),
            "msdnet": (plain_msd, fused_msd)}


@pytest.mark.triton
@pytest.mark.parametrize("name", ["densenet", "densenet-memory-efficient", "msdnet"])
def test_bfloat16_autocast_errs_like_plain_pytorch(name, use_backend):
    use_backend("triton")
    plain, ours = _pairs()[name]
    # the interpreter emulates bfloat16 slowly: MSDNet gets batch 2 (and one block)
    x = torch.randn(2 if name == "msdnet" else 8, 3, 32, 32)
    exact = _step(plain, x, torch.float64, amp=False)
    plain_err = _relative_errors(_step(plain, x, torch.float32, amp=True), exact)
    ours_err = _relative_errors(_step(ours, x, torch.float32, amp=True), exact)
    for what, p, o in zip(["output", "input gradient", "parameter gradients"], plain_err, ours_err):
        assert 0 < o <= 2 * p + 1e-3, f"{what}: ours errs {o:.3g}, plain PyTorch {p:.3g}"


@pytest.mark.parametrize("name", ["densenet", "densenet-memory-efficient", "msdnet"])
@pytest.mark.parametrize("train", [True, False])
def test_cpu_autocast_runs_a_float32_path(name, train, use_backend):
    """A drop-in model runs wherever torchvision's does: under CPU bfloat16 autocast the CPU
    kernels compute in float32 and err no more than plain PyTorch's bfloat16 autocast (train:
    a training step; eval: inference without autograd, MSDNet's folded-BatchNorm path)."""
    use_backend("cpu")
    plain, ours = _pairs()[name]
    x = torch.randn(4, 3, 32, 32)
    if train:
        exact = _step(plain, x, torch.float64, amp=False)
        plain_err = _relative_errors(_step(plain, x, torch.float32, amp=True), exact)
        ours_err = _relative_errors(_step(ours, x, torch.float32, amp=True), exact)
    else:
        outs = []
        for model, dtype, amp in ((plain, torch.float64, False), (plain, torch.float32, True),
                                  (ours, torch.float32, True)):
            model = copy.deepcopy(model).to(dtype).eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                y = model(x.to(dtype))
            outs.append(torch.stack(y) if isinstance(y, list) else y)
        assert outs[2].dtype == outs[1].dtype, "ours returns another dtype than plain"
        exact = outs[0]
        plain_err, ours_err = (_relative_errors([o.double()], [exact]) for o in outs[1:])
    for what, p, o in zip(["output", "input gradient", "parameter gradients"], plain_err, ours_err):
        assert o <= 2 * p, f"{what}: ours errs {o:.3g}, plain PyTorch {p:.3g}"
