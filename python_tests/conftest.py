"""Shared test fixtures.

Triton kernels run on CPU tensors through Triton's interpreter when no GPU is present; the
interpreter must be chosen before Triton is imported, hence the environment set up here.
"""
import os
import shutil

if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def backend_params(include_triton: bool = True):
    """Backends a parity test runs on: every one this machine can run. The CPU kernels must
    have been built (a missing build fails the test, it is not skipped)."""
    params = ["reference", "cpu"]
    if include_triton:
        params.append(pytest.param("triton", marks=pytest.mark.triton))
    params.append(pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU")))
    return params


def device_for(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def require_float64(backend: str, device: torch.device) -> None:
    """Skips a float64 check of the Triton backend on a GPU, where Triton's GEMMs have no
    float64 path (the backend refuses it); the interpreter runs the same check on CPU tensors."""
    if backend == "triton" and device.type == "cuda":
        pytest.skip("Triton has no float64 GEMMs on GPUs (checked in the interpreter instead)")


# Tests written for Triton's interpreter (CPU tensors, float64, tiny odd shapes). Where Triton
# compiles (a GPU machine, TRITON_INTERPRET unset) a CPU tensor cannot reach a Triton kernel, so
# they skip, saying so; there the GPU tests and the backend-parametrised tests run the compiled
# kernels, and CI (no GPU) runs these.
interpreter_only = pytest.mark.skipif(  # evaluated per test (a module may set the flag late);
    # never on a machine without CUDA, where a lost flag must fail these tests, not skip them
    "torch.cuda.is_available() and os.environ.get('TRITON_INTERPRET') != '1'",
    reason="a Triton-interpreter test (CPU tensors; TRITON_INTERPRET=1, as CI runs it): this "
           "machine compiles Triton kernels, which its GPU tests cover")


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 results are checked against float64 references at float32 tolerances, so on a
    GPU no test lets cuDNN, cuBLAS or our Triton GEMMs (which follow ``cudnn.allow_tf32``)
    round operands to TF32; a test of TF32 itself sets it back. (TF32 accuracy: ``op parity``
    in ``benches/gpu.py``.) No effect without CUDA."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def use_backend(monkeypatch):
    """Select a backend for the rest of the test: ``use_backend("cpu")`` returns the device."""
    def select(name: str) -> torch.device:
        monkeypatch.setenv("MSDNET_OPS_BACKEND", name)
        return device_for(name)
    return select


def run_msdnet(capsys, *args):
    """``msdnet ARGS`` in this process: (exit status, stdout, stderr)."""
    from msdnet_ops import cli

    status = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


# ---------------------------------------------------------------------------- MSDNet pairs

MSDNET_SMALL = dict(nBlocks=3, nChannels=4, base=2, stepmode="even", step=2, growthRate=4,
                    grFactor=(1, 2, 4), bnFactor=(1, 2, 4), prune="max", reduction=0.5,
                    bottleneck=True, num_classes=5, stem="cifar")
# name -> (constructor arguments, input side)
MSDNET_CONFIGS = {
    "cifar-max": (MSDNET_SMALL, 32),
    # prune min, lin_grow, no bottleneck, two scales, odd input size
    "min-nobottleneck": (dict(MSDNET_SMALL, nBlocks=3, base=1, stepmode="lin_grow", step=1,
                              growthRate=2, grFactor=(1, 2), bnFactor=(1, 2), prune="min",
                              bottleneck=False), 17),
    # ImageNet stem (7x7 conv with bias, max-pool: already-activated channels), four scales
    "imagenet": (dict(MSDNET_SMALL, nBlocks=2, base=2, stepmode="lin_grow", step=1,
                      grFactor=(1, 2, 4, 4), bnFactor=(1, 2, 4, 4), stem="imagenet"), 129),
}


def msdnet_pair(cfg, dtype=torch.float64, device="cpu"):
    """``(MSDNetPlain, msdnet_ops.MSDNet)`` of ``cfg`` with the same weights (BatchNorm
    affines randomised, so no BN is the identity)."""
    import msdnet_ops
    from msdnet_ops.models import MSDNetPlain
    torch.manual_seed(0)
    ref = MSDNetPlain(**cfg)
    g = torch.Generator().manual_seed(1)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    ref = ref.to(dtype=dtype, device=device)
    ours = msdnet_ops.MSDNet(**cfg).to(dtype=dtype, device=device)
    ours.load_reference_state_dict(ref.state_dict())
    return ref, ours
