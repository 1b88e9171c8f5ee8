"""The per-shape fused/unfused choice for transform-conv (``msdnet_ops.conv_choice``): timed once
per shape and cached, gradients updated exactly once, every policy gives the reference's
results. On the CPU through the Triton interpreter (the policy is forced by environment)."""
import pytest
import torch

from conftest import interpreter_only
from msdnet_ops import backends, conv_choice, ops, reference

F64 = torch.float64


@pytest.fixture
def timed_triton(monkeypatch):
    monkeypatch.setenv("MSDNET_OPS_BACKEND", "triton")
    monkeypatch.setenv("MSDNET_OPS_TRANSFORM_CONV", "timed")
    conv_choice.reset()
    yield
    conv_choice.reset()


def _inputs(k=3, stride=1, pool=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 6, 5, 7, dtype=F64, generator=g)[:, :5]
    scale = torch.rand(5, dtype=F64, generator=g) + 0.5
    shift = torch.randn(5, dtype=F64, generator=g) * 0.3
    w = torch.randn(4, 5, k, k, dtype=F64, generator=g)
    return x, scale, shift, w, (stride, (k - 1) // 2, pool)


def test_policy_from_environment(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("MSDNET_OPS_TRANSFORM_CONV", raising=False)
    monkeypatch.setenv("MSDNET_OPS_BACKEND", "auto")
    assert backends.transform_conv_policy(cuda) == "timed"
    assert backends.transform_conv_policy(cpu) == "fused"
    monkeypatch.setenv("MSDNET_OPS_BACKEND", "triton")
    assert backends.transform_conv_policy(cuda) == "fused"
    monkeypatch.setenv("MSDNET_OPS_TRANSFORM_CONV", "unfused")
    assert backends.transform_conv_policy(cuda) == "unfused"
    monkeypatch.setenv("MSDNET_OPS_TRANSFORM_CONV", "fastest")
    with pytest.raises(ValueError, match="MSDNET_OPS_TRANSFORM_CONV"):
        backends.transform_conv_policy(cuda)


@interpreter_only
def test_timed_once_per_shape_and_cached(timed_triton, monkeypatch):
    calls = []
    real = conv_choice.choose

    def counting(key, trial, device):
        calls.append(key)
        return real(key, trial, device)
    monkeypatch.setattr(conv_choice, "choose", counting)
    x, scale, shift, w, (s, p, pool) = _inputs(k=1)
    out = torch.empty(2, 4, 5, 7, dtype=F64)
    for _ in range(2):
        ops.transform_conv_into_(x, scale, shift, w, s, p, pool, out)
        torch.testing.assert_close(out, reference.transform_conv(x, scale, shift, w, s, p, pool))
    assert len(calls) == 2 and calls[0] == calls[1]      # asked twice ...
    assert len(conv_choice.timings) == 1                  # ... timed once
    (times,) = conv_choice.timings.values()
    assert set(times) == {"fused", "unfused"} and all(t > 0 for t in times.values())
    # another shape is another choice
    ops.transform_conv_into_(x[:1], scale, shift, w, s, p, pool, out[:1])
    assert len(conv_choice.timings) == 2


@interpreter_only
@pytest.mark.parametrize("policy", ["timed", "fused", "unfused"])
def test_backward_accumulates_exactly_once(timed_triton, monkeypatch, policy):
    monkeypatch.setenv("MSDNET_OPS_TRANSFORM_CONV", policy)
    x, scale, shift, w, (s, p, pool) = _inputs(k=3, stride=2)
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(2, 4, 3, 4, dtype=F64, generator=g)
    gx, gs, gh = (torch.randn(x.shape, dtype=F64, generator=g), torch.randn(5, dtype=F64, generator=g),
                  torch.randn(5, dtype=F64, generator=g))
    rx, rs, rh = gx.clone(), gs.clone(), gh.clone()
    gw = ops.transform_conv_backward_(grad_out, x, scale, shift, w, s, p, pool, gx, gs, gh)
    rw = reference.transform_conv_backward_(grad_out, x, scale, shift, w, s, p, pool, rx, rs, rh)
    for a, b in ((gx, rx), (gs, rs), (gh, rh), (gw, rw)):
        torch.testing.assert_close(a, b)
    assert (len(conv_choice.timings) == 1) == (policy == "timed")
