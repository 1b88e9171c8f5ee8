"""Parity of the fused DenseNet pieces with torchvision (copied weights): outputs, input and
parameter gradients, running statistics, train and eval, on every available backend."""
import copy

import pytest
import torch
import torchvision
from torchvision.models import densenet as tv

import msdnet_ops
from conftest import backend_params

F64 = torch.float64


def _randomize_bn(model):
    """Non-trivial BN parameters and running statistics, so that parity means something."""
    g = torch.Generator().manual_seed(123)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _compare(ref, ours, x, train: bool, tol: float, steps: int = 2):
    """Runs ``steps`` forward/backward passes on both and compares everything observable."""
    ref.train(train)
    ours.train(train)
    for step in range(steps):
        xr = x.detach().clone().requires_grad_()
        xo = x.detach().clone().requires_grad_()
        yr, yo = ref(xr), ours(xo)
        torch.testing.assert_close(yo, yr, rtol=tol, atol=tol, msg=f"output, step {step}")
        g = torch.randn_like(yr)
        (yr * g).sum().backward()
        (yo * g).sum().backward()
        torch.testing.assert_close(xo.grad, xr.grad, rtol=tol, atol=tol, msg="input gradient")
    for (name, pr), (_, po) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(po.grad, pr.grad, rtol=tol, atol=tol, msg=f"grad of {name}")
    for (name, br), (_, bo) in zip(ref.named_buffers(), ours.named_buffers()):
        torch.testing.assert_close(bo, br, rtol=tol, atol=tol, msg=f"buffer {name}")


def _pair(ref, dtype, device):
    ref = _randomize_bn(ref).to(dtype=dtype, device=device)
    ours = msdnet_ops.convert(copy.deepcopy(ref))
    return ref, ours


@pytest.mark.parametrize("backend", backend_params(include_triton=False))
@pytest.mark.parametrize("train", [True, False])
def test_dense_layer_block_transition_match_torchvision(backend, use_backend, train):
    dev = use_backend(backend)
    torch.manual_seed(0)
    for ref, shape in [
        (tv._DenseLayer(7, 3, 2, 0.0), (3, 7, 5, 7)),
        (tv._DenseBlock(3, 5, 2, 3, 0.0), (1, 5, 7, 3)),          # batch 1, odd sizes
        (tv._Transition(7, 3), (2, 7, 5, 9)),
    ]:
        ref, ours = _pair(ref, F64, dev)
        assert type(ours).__module__.startswith("msdnet_ops"), type(ours)
        _compare(ref, ours, torch.randn(shape, dtype=F64, device=dev), train, 1e-10)


@pytest.mark.parametrize("backend", backend_params(include_triton=False))
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-9), (torch.float32, 2e-4)])
def test_densenet_matches_torchvision(backend, use_backend, dtype, tol):
    dev = use_backend(backend)
    torch.manual_seed(1)
    ref = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 3, 2), num_init_features=6,
                                      bn_size=2, num_classes=5)
    ref, ours = _pair(ref, dtype, dev)
    assert isinstance(ours, msdnet_ops.DenseNet)
    x = torch.randn(2, 3, 37, 41, dtype=dtype, device=dev)
    _compare(ref, ours, x, True, tol)
    _compare(ref, ours, x, False, tol, steps=1)


def test_densenet_noncontiguous_input(use_backend):
    dev = use_backend("cpu")
    ref, ours = _pair(tv._DenseBlock(2, 4, 2, 3, 0.0), F64, dev)
    x = torch.randn(3, 9, 6, 4, dtype=F64, device=dev)[:, 2:6].transpose(2, 3)
    assert not x.is_contiguous()
    _compare(ref, ours, x, True, 1e-10)
    x = torch.randn(2, 4, 5, 5, dtype=F64).to(memory_format=torch.channels_last)
    _compare(ref, ours, x, True, 1e-10)


@pytest.mark.triton
def test_dense_block_matches_torchvision_on_triton(use_backend):
    """The Triton kernels (interpreted on CPU here) in a whole dense block, train mode."""
    dev = use_backend("triton")
    torch.manual_seed(2)
    ref, ours = _pair(tv._DenseBlock(2, 5, 2, 3, 0.0), torch.float32, dev)
    _compare(ref, ours, torch.randn(2, 5, 5, 3, device=dev), True, 2e-4, steps=1)


def _plain_cifar_layer(cin, k):
    return torch.nn.Sequential(torch.nn.BatchNorm2d(cin), torch.nn.ReLU(),
                               torch.nn.Conv2d(cin, k, 3, 1, 1, bias=False))


def test_layer_without_bottleneck_matches_plain_pytorch(use_backend):
    """bn_size=0 (DenseNet without B): BN-ReLU-Conv3x3 reading the whole prefix."""
    dev = use_backend("cpu")

    class PlainLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            seq = _plain_cifar_layer(6, 4)
            self.norm1, self.relu1, self.conv1 = seq[0], seq[1], seq[2]

        def forward(self, x):
            return self.conv1(torch.relu(self.norm1(x)))

    ref = _randomize_bn(PlainLayer()).to(F64)
    ours = msdnet_ops.DenseLayer(6, 4, bn_size=0, drop_rate=0.0).to(F64)
    ours.load_state_dict(ref.state_dict())
    _compare(ref, ours, torch.randn(2, 6, 5, 5, dtype=F64, device=dev), True, 1e-10)


@pytest.mark.parametrize("backend", backend_params(include_triton=False))
def test_memory_efficient_recomputes_the_bottleneck_exactly(backend, use_backend):
    """memory_efficient=True frees each bottleneck output and recomputes it in backward: same
    outputs, gradients and running statistics as torchvision's plain DenseNet (torchvision's
    own memory_efficient=True updates norm1's running statistics twice per step, because its
    checkpoint re-runs the BatchNorm; ours updates them once)."""
    dev = use_backend(backend)
    torch.manual_seed(3)
    plain = _randomize_bn(tv.DenseNet(6, (3, 4), 8, bn_size=2, num_classes=5)).to(F64).to(dev)
    checkpointed = tv.DenseNet(6, (3, 4), 8, bn_size=2, num_classes=5, memory_efficient=True)
    checkpointed.load_state_dict(plain.state_dict())
    ours = msdnet_ops.convert(checkpointed.to(F64).to(dev))
    layers = [m for m in ours.modules() if isinstance(m, msdnet_ops.DenseLayer)]
    assert layers and all(m.memory_efficient for m in layers)
    _compare(plain, ours, torch.randn(3, 3, 37, 29, dtype=F64, device=dev), True, 1e-10)


def test_state_dicts_are_interchangeable():
    ref = torchvision.models.densenet121()
    ours = msdnet_ops.densenet("densenet121")
    assert list(ours.state_dict().keys()) == list(ref.state_dict().keys())
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    for (k, a), (_, b) in zip(ref.state_dict().items(), ours.state_dict().items()):
        assert a.shape == b.shape and torch.equal(a, b), k


@pytest.mark.parametrize("name,params", [
    ("densenet40-k12", 1.0e6), ("densenet100-k12", 7.0e6), ("densenet100-k24", 27.2e6),
    ("densenet-bc100-k12", 0.8e6), ("densenet-bc250-k24", 15.3e6), ("densenet-bc190-k40", 25.6e6),
])
def test_cifar_configurations_have_the_papers_sizes(name, params):
    """Parameter counts from Table 2 of Huang et al. 2017 (rounded to 0.1 M there)."""
    model = msdnet_ops.densenet(name)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) <= 0.06e6 + 0.01 * params, n


def test_named_imagenet_configurations_match_torchvision():
    for name in ("densenet121", "densenet161", "densenet169", "densenet201"):
        ref = getattr(torchvision.models, name)()
        ours = msdnet_ops.densenet(name)
        assert [tuple(v.shape) for v in ours.state_dict().values()] == \
               [tuple(v.shape) for v in ref.state_dict().values()], name
    assert sum(p.numel() for p in msdnet_ops.densenet("densenet264").parameters()) > 30e6


def test_small_cifar_densenet_trains_one_step(use_backend):
    use_backend("cpu")
    model = msdnet_ops.densenet("densenet-bc100-k12")
    out = model(torch.randn(2, 3, 32, 32))
    out.logsumexp(1).sum().backward()
    assert out.shape == (2, 10)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_input_raises_clear_errors():
    model = msdnet_ops.DenseNet(4, (2, 2), 6, bn_size=2, num_classes=3)
    with pytest.raises(ValueError, match="x: expected 3 channels, got 4"):
        model(torch.randn(2, 4, 32, 32))
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        model(torch.randn(3, 32, 32))
    layer = msdnet_ops.DenseLayer(5, 3, 2, 0.0)
    with pytest.raises(ValueError, match="input: expected 5 channels, got 6"):
        layer(torch.randn(2, 6, 4, 4))
    buffer = msdnet_ops.FeatureBuffer(2, 6, 4, 4, dtype=torch.float32, device="cpu",
                                      track_stats=True)
    buffer.reserve(5)
    with pytest.raises(ValueError, match="would go past its capacity of 6"):
        buffer.reserve(2)
    with pytest.raises(ValueError, match="drop_rate"):
        msdnet_ops.DenseLayer(5, 3, 2, 1.5)
    with pytest.raises(ValueError, match="unknown DenseNet"):
        msdnet_ops.densenet("densenet7")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_a_training_layer_on_a_buffer_without_statistics_is_refused(use_backend, backend):
    """A block whose first layer is in eval mode keeps no batch statistics; a later layer in
    training mode (batch statistics) cannot read it, and says so (on the CPU too, where
    bottleneck outputs without statistics are read through a fused BatchNorm+ReLU)."""
    use_backend(backend)
    block = msdnet_ops.DenseBlock(3, 4, 2, 3, 0.0)
    block.train()
    block.denselayer1.eval()
    with pytest.raises(RuntimeError, match="has no batch statistics"):
        block(torch.randn(2, 4, 5, 5))


def test_dropout_is_applied_and_backpropagated(use_backend):
    """With drop_rate the layer's new channels are dropped (scaled) in training; the gradient
    of a dropped channel position is zero, as for F.dropout."""
    use_backend("cpu")
    torch.manual_seed(3)
    layer = msdnet_ops.DenseLayer(4, 8, 2, drop_rate=0.5).train()
    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    y = layer(x)
    zero = (y == 0)
    assert 0.3 < zero.float().mean().item() < 0.7
    y.sum().backward()
    layer.eval()
    assert (layer(x) != 0).float().mean() > 0.9
