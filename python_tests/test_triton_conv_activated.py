"""Triton ``conv_into`` / ``conv_backward_`` (convolution of activated buffer channels) against
``reference.conv`` / ``conv_backward_``, and every Triton kernel on channel-prefix views of
channels_last (NHWC) buffers. Runs in Triton's interpreter on the CPU (see conftest.py)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from conftest import interpreter_only  # noqa: E402

from msdnet_ops import reference as R  # noqa: E402
from msdnet_ops import triton as T  # noqa: E402

CPU = torch.device("cpu")
F64 = torch.float64
SENTINEL = 123.0
TOL = {torch.float32: 2e-5, F64: 1e-12}


def prefix_view(N, C, H, W, dtype, layout, gen, extra=3):
    """``buf[:, :C]`` of a ``C + extra``-channel buffer stored NCHW or NHWC."""
    if layout == "nchw":
        buf = torch.randn(N, C + extra, H, W, dtype=F64, generator=gen)
    else:
        buf = torch.randn(N, H, W, C + extra, dtype=F64, generator=gen).permute(0, 3, 1, 2)
    buf = buf.to(dtype)
    return buf, buf[:, :C]


def slice_view(N, C, H, W, dtype, layout, lo=2, hi=3):
    """``buf[:, lo:lo+C]`` of a buffer filled with SENTINEL (NCHW or NHWC)."""
    if layout == "nchw":
        buf = torch.full((N, lo + C + hi, H, W), SENTINEL, dtype=dtype)
    else:
        buf = torch.full((N, H, W, lo + C + hi), SENTINEL, dtype=dtype).permute(0, 3, 1, 2)
    return buf, buf[:, lo:lo + C]


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def out_size(size, k, s, p, pool):
    return (size // pool + 2 * p - k) // s + 1


# (id, k, stride, padding, pool, N, Cin, Cout, H, W)
CASES = [
    ("1x1", 1, 1, 0, 1, 3, 20, 18, 5, 7),
    ("3x3", 3, 1, 1, 1, 1, 5, 3, 7, 5),
    ("3x3-s2", 3, 2, 1, 1, 3, 7, 6, 7, 7),
    ("3x3-s2-even", 3, 2, 1, 1, 1, 18, 20, 6, 6),
    ("1x1-s2", 1, 2, 0, 1, 1, 5, 4, 5, 5),
    ("pool2", 1, 1, 0, 2, 3, 7, 5, 5, 7),
]
IDS = [c[0] for c in CASES]
LAYOUTS = ["nchw", "nhwc"]


def conv_case(case, dtype, layout, seed=0):
    _, k, s, p, pool, N, Cin, Cout, H, W = case
    gen = torch.Generator().manual_seed(seed)
    _, x = prefix_view(N, Cin, H, W, dtype, layout, gen)
    x = x.abs() if seed % 2 else x  # activated values are >= 0; the kernel must not care
    weight = (torch.randn(Cout, Cin, k, k, dtype=F64, generator=gen) / (Cin * k * k) ** 0.5).to(dtype)
    Ho, Wo = out_size(H, k, s, p, pool), out_size(W, k, s, p, pool)
    return x, weight, (s, p, pool), (N, Cout, Ho, Wo), gen


@interpreter_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_conv_into(case, dtype, layout):
    x, weight, (s, p, pool), (N, Cout, Ho, Wo), _ = conv_case(case, dtype, layout, seed=1)
    obuf, out = slice_view(N, Cout, Ho, Wo, dtype, layout)
    T.conv_into(x, weight, s, p, pool, out)
    ref = R.conv(x.to(F64), weight.to(F64), s, p, pool)
    assert rel_err(out, ref) < TOL[dtype]
    assert (obuf[:, :2] == SENTINEL).all() and (obuf[:, 2 + Cout:] == SENTINEL).all(), "wrote outside out"


@interpreter_only
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_conv_backward(case, dtype, layout):
    x, weight, (s, p, pool), out_shape, gen = conv_case(case, dtype, layout)
    N, Cout, Ho, Wo = out_shape
    _, grad_out = prefix_view(N, Cout, Ho, Wo, dtype, layout, gen, extra=2)
    gbuf, grad_x = prefix_view(*x.shape, dtype, layout, gen, extra=4)  # accumulated into
    gbuf0 = gbuf.clone()
    ref_gx = grad_x.to(F64).clone()
    ref_gw = R.conv_backward_(grad_out.to(F64), x.to(F64), weight.to(F64), s, p, pool, ref_gx)
    gw = T.conv_backward_(grad_out, x, weight, s, p, pool, grad_x)
    assert gw.shape == weight.shape and gw.dtype == weight.dtype
    assert rel_err(gw, ref_gw) < TOL[dtype]
    assert rel_err(grad_x, ref_gx) < TOL[dtype]
    assert torch.equal(gbuf[:, x.shape[1]:], gbuf0[:, x.shape[1]:]), "grad_x: wrote outside the prefix"


@interpreter_only
def test_conv_backward_without_grad_x():
    x, weight, (s, p, pool), (N, Cout, Ho, Wo), gen = conv_case(CASES[2], torch.float32, "nhwc")
    grad_out = torch.randn(N, Cout, Ho, Wo, generator=gen)
    gw = T.conv_backward_(grad_out, x, weight, s, p, pool, None)
    ref = R.conv_backward_(grad_out.double(), x.double(), weight.double(), s, p, pool,
                           torch.zeros(x.shape, dtype=F64))
    assert rel_err(gw, ref) < TOL[torch.float32]


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv_low_precision(dtype):
    """Within 2x PyTorch's own error in that dtype (plus one ulp for the final rounding)."""
    eps = torch.finfo(dtype).eps
    x, weight, (s, p, pool), (N, Cout, Ho, Wo), gen = conv_case(CASES[5], dtype, "nhwc")
    out = torch.empty(N, Cout, Ho, Wo, dtype=dtype)
    T.conv_into(x, weight, s, p, pool, out)
    ref64 = R.conv(x.double(), weight.double(), s, p, pool)
    ref_lp = R.conv(x.float(), weight.float(), s, p, pool).to(dtype)  # CPU has no half avg_pool
    assert rel_err(out, ref64) <= 2 * rel_err(ref_lp, ref64) + eps


def test_conv_bad_input():
    x = torch.randn(1, 5, 5, 5)
    w1 = torch.randn(4, 5, 1, 1)
    out = torch.empty(1, 4, 5, 5)
    with pytest.raises(TypeError, match="x"):
        T.conv_into(x.to(torch.int32), w1, 1, 0, 1, out)
    with pytest.raises(ValueError, match="weight"):
        T.conv_into(x, torch.randn(4, 6, 1, 1), 1, 0, 1, out)
    with pytest.raises(ValueError, match="pool"):
        T.conv_into(x, torch.randn(4, 5, 3, 3), 1, 1, 2, out)
    with pytest.raises(ValueError, match="out"):
        T.conv_into(x, w1, 2, 0, 1, out)
    with pytest.raises(TypeError, match="out"):
        T.conv_into(x, w1, 1, 0, 1, out.double())
    with pytest.raises(ValueError, match="grad_out"):
        T.conv_backward_(out[:, :3], x, w1, 1, 0, 1, torch.zeros_like(x))
    with pytest.raises(ValueError, match="grad_x"):
        T.conv_backward_(out, x, w1, 1, 0, 1, torch.zeros(1, 4, 5, 5))


# ----------------------------------------------------------------------------- NHWC everywhere

@interpreter_only
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_transform_conv_nhwc(case):
    """The transform-conv forward and backward on NHWC prefix views (x, out, grad_out, grad_x)."""
    _, k, s, p, pool, N, Cin, Cout, H, W = case
    gen = torch.Generator().manual_seed(7)
    _, x = prefix_view(N, Cin, H, W, F64, "nhwc", gen)
    scale = torch.rand(Cin, dtype=F64, generator=gen) + 0.5
    shift = torch.randn(Cin, dtype=F64, generator=gen) * 0.5
    weight = torch.randn(Cout, Cin, k, k, dtype=F64, generator=gen)
    Ho, Wo = out_size(H, k, s, p, pool), out_size(W, k, s, p, pool)
    _, out = slice_view(N, Cout, Ho, Wo, F64, "nhwc")
    T.transform_conv_into(x, scale, shift, weight, s, p, pool, out)
    torch.testing.assert_close(out, R.transform_conv(x, scale, shift, weight, s, p, pool))
    _, grad_out = prefix_view(N, Cout, Ho, Wo, F64, "nhwc", gen)
    _, gx = prefix_view(N, Cin, H, W, F64, "nhwc", gen)
    gs, gh = torch.randn(Cin, dtype=F64, generator=gen), torch.randn(Cin, dtype=F64, generator=gen)
    rx, rs, rh = gx.clone(), gs.clone(), gh.clone()
    gw = T.transform_conv_backward_(grad_out, x, scale, shift, weight, s, p, pool, gx, gs, gh)
    rw = R.transform_conv_backward_(grad_out, x, scale, shift, weight, s, p, pool, rx, rs, rh)
    for a, b in ((gx, rx), (gs, rs), (gh, rh), (gw, rw)):
        torch.testing.assert_close(a, b)


@interpreter_only
def test_memory_bound_kernels_nhwc():
    """Statistics, their backward, affine+ReLU and its backward, batch gather: inputs and
    outputs all channel-prefix (or slice) views of NHWC buffers, odd sizes."""
    gen = torch.Generator().manual_seed(8)
    N, C, H, W = 3, 5, 5, 7
    _, x = prefix_view(N, C, H, W, F64, "nhwc", gen)
    mean, invstd = T.channel_stats(x, 1e-5)
    rm, ri = R.channel_stats(x, 1e-5)
    torch.testing.assert_close((mean, invstd), (rm, ri))
    gm, gi = torch.randn(C, dtype=F64, generator=gen), torch.randn(C, dtype=F64, generator=gen)
    gbuf, gx = prefix_view(N, C, H, W, F64, "nhwc", gen, extra=2)
    gbuf0, ref = gbuf.clone(), gx.clone()
    T.channel_stats_backward_(x, mean, invstd, gm, gi, gx)
    R.channel_stats_backward_(x, rm, ri, gm, gi, ref)
    torch.testing.assert_close(gx, ref)
    assert torch.equal(gbuf[:, C:], gbuf0[:, C:])
    scale, shift = torch.rand(C, dtype=F64, generator=gen) + 0.5, torch.randn(C, dtype=F64, generator=gen)
    obuf, out = slice_view(N, C, H, W, F64, "nhwc")
    T.affine_relu_into(x, scale, shift, out)
    torch.testing.assert_close(out, R.affine_relu(x, scale, shift), rtol=0, atol=0)
    assert (obuf[:, :2] == SENTINEL).all() and (obuf[:, 2 + C:] == SENTINEL).all()
    _, gz = prefix_view(N, C, H, W, F64, "nhwc", gen)
    gs, gh = torch.zeros(C, dtype=F64), torch.zeros(C, dtype=F64)
    rx, rs, rh = gx.clone(), gs.clone(), gh.clone()
    T.affine_relu_backward_(x, scale, shift, gz, gx, gs, gh)
    R.affine_relu_backward_(x, scale, shift, gz, rx, rs, rh)
    torch.testing.assert_close((gx, gs, gh), (rx, rs, rh))
    index = torch.tensor([2, 0], dtype=torch.int64)
    gbuf, gout = slice_view(2, C, H, W, F64, "nhwc")
    T.gather_batch_into(x, index, gout)
    torch.testing.assert_close(gout, R.gather_batch(x, index), rtol=0, atol=0)
