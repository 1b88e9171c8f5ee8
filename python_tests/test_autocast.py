"""Mixed precision: a drop-in model runs wherever torchvision's does, under ``torch.autocast``.

Where the backend has low-precision kernels (Triton: on GPUs, or here on the CPU through the
interpreter; the references) the feature buffers hold the autocast dtype (float32 statistics
and accumulation, float32 parameters). The CPU C++ kernels take float32/float64: under CPU
autocast, where torchvision's DenseNet runs in bfloat16, ours runs a float32 compute path (as
autocast runs BatchNorm) and returns the dtype plain PyTorch returns. How far each errs from a
float64 truth, against plain PyTorch under the same autocast: ``test_numerics.py``.
"""
import copy

import pytest
import torch
from torchvision.models import densenet as tv

import msdnet_ops

MSDNET_CFG = dict(nBlocks=1, nChannels=4, base=1, step=1, stepmode="even", growthRate=4,
                  grFactor=[1, 2, 4], bnFactor=[1, 2, 4], prune="max", reduction=0.5,
                  bottleneck=True, num_classes=5, stem="cifar")


def _pair(name):
    torch.manual_seed(0)
    if name == "densenet":
        plain = tv.DenseNet(4, (2, 2), 6, bn_size=2, num_classes=5)
        return plain, msdnet_ops.convert(copy.deepcopy(plain))
    plain = msdnet_ops.MSDNetPlain(**MSDNET_CFG)
    ours = msdnet_ops.MSDNet(**MSDNET_CFG)
    ours.load_state_dict(plain.state_dict())
    return plain, ours


def _outputs(model, x, dtype, train):
    model = copy.deepcopy(model).train(train)
    x = x.clone().requires_grad_(train)
    with torch.set_grad_enabled(train), torch.autocast("cpu", dtype=dtype):
        y = model(x)
    ys = y if isinstance(y, list) else [y]
    if train:
        sum(o.float().sum() for o in ys).backward()
        assert x.grad is not None and x.grad.dtype == x.dtype
    return ys


CPU_BACKENDS = ["reference", "cpu", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["densenet", "msdnet"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cpu_autocast_runs_and_returns_plain_dtypes(train, name, dtype, backend, use_backend):
    """Training (forward and backward) and inference under CPU autocast: no exception, and
    every output in the dtype plain PyTorch's gives, whatever the backend computes in."""
    use_backend(backend)
    plain, ours = _pair(name)
    x = torch.randn(2, 3, 20, 20)
    expected, got = _outputs(plain, x, dtype, train), _outputs(ours, x, dtype, train)
    assert [o.dtype for o in got] == [o.dtype for o in expected]
    assert [o.shape for o in got] == [o.shape for o in expected]
    assert all(torch.isfinite(o).all() for o in got)
