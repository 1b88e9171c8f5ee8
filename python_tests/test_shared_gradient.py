"""docs/ARCHITECTURE.md §3: consumers of a channel accumulate into one shared gradient and the
BatchNorm-statistics part is applied once per channel, by the producer. Exact in float64."""
import pytest
import torch

from msdnet_ops import ops
from msdnet_ops.nn import FeatureBuffer
from msdnet_ops.nn.dense_layer import write_tensor
from msdnet_ops.nn.functions import TransformRead

F64 = torch.float64


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_three_consumers_share_statistics_and_gradient(backend, use_backend, monkeypatch):
    use_backend(backend)
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, 3, dtype=F64)
    bns = [torch.nn.BatchNorm2d(c).double() for c in (5, 3, 5)]
    for bn in bns:
        bn.weight.data.uniform_(-1.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    weights = [torch.randn(3, c, 4, 3, dtype=F64) for c in (5, 3, 5)]

    # plain PyTorch: every consumer runs its own BatchNorm (own statistics, own backward)
    xr = x.clone().requires_grad_()
    loss_r = sum((torch.relu(bn(xr[:, :bn.num_features])) * w).sum() for bn, w in zip(bns, weights))
    loss_r.backward()
    grads_r = [(bn.weight.grad.clone(), bn.bias.grad.clone()) for bn in bns]
    for bn in bns:
        bn.weight.grad = bn.bias.grad = None

    calls = []
    original = ops.eager.channel_stats_backward_
    monkeypatch.setattr(ops.eager, "channel_stats_backward_",
                        lambda *a: (calls.append(a[0].shape[1]), original(*a))[1])

    xo = x.clone().requires_grad_()
    buffer = FeatureBuffer(3, 5, 4, 3, dtype=F64, device="cpu", track_stats=True)
    write_tensor(buffer, xo)
    loss_o = 0
    for bn, w in zip(bns, weights):
        c = bn.num_features
        z = TransformRead.apply(buffer.state, c, True, bn.weight, bn.bias,
                                buffer.state.mean[:c], buffer.state.invstd[:c], buffer.token)
        loss_o = loss_o + (z * w).sum()
    loss_o.backward()

    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-12, atol=1e-12)
    for bn, (gw, gb) in zip(bns, grads_r):
        torch.testing.assert_close(bn.weight.grad, gw, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.bias.grad, gb, rtol=1e-12, atol=1e-12)
    # the statistics backward ran once, over the producer's 5 channels, not once per consumer
    assert calls == [5]
