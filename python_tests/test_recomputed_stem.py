"""The recomputing ImageNet stem (``max_pool(relu(bn(conv(x))))``) against the plain modules."""
import copy

import pytest
import torch
from torch import nn

from msdnet_ops.nn.recomputed_stem import conv_bn_relu_max_pool

F64 = torch.float64


def _stem(seed=0):
    torch.manual_seed(seed)
    stem = nn.Sequential(nn.Conv2d(3, 5, 7, 2, 3, bias=True), nn.BatchNorm2d(5, momentum=None),
                         nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)).double()
    with torch.no_grad():
        stem[1].weight.uniform_(-1.5, 1.5)  # negative scales too
        stem[1].bias.uniform_(-0.5, 0.5)
    return stem


def _saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


@pytest.mark.parametrize("keep_conv_output", [True, False])
@pytest.mark.parametrize("shape", [(2, 3, 19, 23), (1, 3, 16, 16)])
def test_matches_the_plain_stem(keep_conv_output, shape):
    plain = _stem()
    ours = copy.deepcopy(plain)
    # a non-contiguous input: every other column of a wider image
    wide = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3], dtype=F64)
    x = wide[..., ::2]
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    for step in range(2):  # running statistics follow over steps
        yp, saved_plain = _saved_bytes(lambda: plain(xp))
        yo, saved_ours = _saved_bytes(
            lambda: conv_bn_relu_max_pool(xo, ours[0], ours[1], ours[3], keep_conv_output))
        torch.testing.assert_close(yo, yp, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(yp)
        yp.backward(g)
        yo.backward(g)
        torch.testing.assert_close(xo.grad, xp.grad, rtol=1e-10, atol=1e-12)
        for (name, a), b in zip(plain.named_parameters(), ours.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=name)
        for (name, a), b in zip(plain.named_buffers(), ours.buffers()):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=0, msg=name)
        with torch.no_grad():
            conv_out = plain[0](x).nbytes
        # plain keeps the image, the conv output, the ReLU output and int64 indices
        assert saved_ours <= saved_plain - conv_out - (0 if keep_conv_output else conv_out)
        for t in (xp, xo):
            t.grad = None
        plain.zero_grad()
        ours.zero_grad()


def test_gradcheck():
    stem = nn.Sequential(nn.Conv2d(2, 3, 3, 2, 1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1)).double()
    x = torch.randn(2, 2, 9, 9, dtype=F64, requires_grad=True)
    for keep in (True, False):
        assert torch.autograd.gradcheck(
            lambda x, w, b, g, h: conv_bn_relu_max_pool(x, stem[0], stem[1], stem[3], keep),
            (x, stem[0].weight, stem[0].bias, stem[1].weight, stem[1].bias))


def test_refuses_a_batchnorm_in_eval_mode():
    stem = _stem().eval()
    with pytest.raises(ValueError, match="training mode"):
        conv_bn_relu_max_pool(torch.randn(1, 3, 8, 8, dtype=F64), stem[0], stem[1], stem[3], True)
