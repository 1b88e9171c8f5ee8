"""Triton kernels against ``msdnet_ops.reference``.

On a machine without a GPU the kernels run on CPU tensors in Triton's interpreter: the
environment is set before Triton is imported (the backend also re-wraps compiled kernels for
the interpreter when CPU tensors reach them, so the order of imports cannot break this).
Shapes are tiny and odd; inputs are channel-prefix views of bigger buffers (NCHW and NHWC
storage), outputs are channel slices of other buffers whose other channels must not change.
The GPU tests at the end run the compiled kernels on larger shapes and skip without CUDA.
"""
import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from conftest import interpreter_only  # noqa: E402

from msdnet_ops import reference as R  # noqa: E402
from msdnet_ops import triton as T  # noqa: E402
from msdnet_ops.triton import _runtime  # noqa: E402

CPU = torch.device("cpu")
SENTINEL = 123.0


# ----------------------------------------------------------------------------- helpers

def prefix_view(N, C, H, W, dtype, device, layout="nchw", extra=3, offset=0.0, gen=None):
    """A channel-prefix view ``buf[:, :C]`` of a bigger buffer (NCHW or NHWC storage)."""
    if layout == "nchw":
        buf = torch.randn(N, C + extra, H, W, dtype=torch.float64, generator=gen)
    else:
        buf = torch.randn(N, H, W, C + extra, dtype=torch.float64, generator=gen).permute(0, 3, 1, 2)
    buf = (buf + offset).to(device=device, dtype=dtype)
    return buf, buf[:, :C]


def slice_view(N, C, H, W, dtype, device, lo=2, hi=3, fill=SENTINEL):
    """A channel slice ``buf[:, lo:lo+C]`` of a buffer filled with ``fill``."""
    buf = torch.full((N, lo + C + hi, H, W), fill, dtype=dtype, device=device)
    return buf, buf[:, lo:lo + C]


def vec(C, dtype, device, gen, scale=1.0, offset=0.0):
    return (torch.randn(C, dtype=torch.float64, generator=gen) * scale + offset).to(device=device, dtype=dtype)


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def out_size(size, k, s, p, pool):
    return (size // pool + 2 * p - k) // s + 1


TOL = {torch.float32: 2e-5, torch.float64: 1e-12}

# (id, k, stride, padding, pool, N, Cin, Cout, H, W, x layout)
CONV_CASES = [
    ("1x1", 1, 1, 0, 1, 3, 20, 18, 5, 7, "nchw"),   # several tiles along M, N and K
    ("3x3", 3, 1, 1, 1, 1, 5, 3, 7, 5, "nhwc"),
    ("3x3-s2", 3, 2, 1, 1, 3, 7, 6, 7, 7, "nchw"),
    ("3x3-s2-even", 3, 2, 1, 1, 1, 18, 20, 6, 6, "nhwc"),
    ("3x3-nopad", 3, 1, 0, 1, 3, 5, 4, 5, 7, "nchw"),
    ("1x1-s2", 1, 2, 0, 1, 1, 5, 4, 5, 5, "nchw"),
    ("pool2", 1, 1, 0, 2, 3, 7, 5, 5, 7, "nhwc"),
]
CONV_IDS = [c[0] for c in CONV_CASES]


def conv_inputs(case, dtype, device, seed=0):
    _, k, s, p, pool, N, Cin, Cout, H, W, layout = case
    gen = torch.Generator().manual_seed(seed)
    sdt = R.stats_dtype(dtype)
    _, x = prefix_view(N, Cin, H, W, dtype, device, layout, gen=gen)
    scale = vec(Cin, sdt, device, gen)
    shift = vec(Cin, sdt, device, gen, scale=0.5)
    weight = (torch.randn(Cout, Cin, k, k, dtype=torch.float64, generator=gen) / (Cin * k * k) ** 0.5).to(device, dtype)
    return x, scale, shift, weight, (k, s, p, pool)


def run_forward(case, dtype, device):
    x, scale, shift, weight, (k, s, p, pool) = conv_inputs(case, dtype, device)
    N, Cout = x.shape[0], weight.shape[0]
    Ho, Wo = out_size(x.shape[2], k, s, p, pool), out_size(x.shape[3], k, s, p, pool)
    obuf, out = slice_view(N, Cout, Ho, Wo, dtype, device)
    T.transform_conv_into(x, scale, shift, weight, s, p, pool, out)
    return (x, scale, shift, weight, (k, s, p, pool)), obuf, out


def check_untouched(buf, lo, C):
    assert (buf[:, :lo] == SENTINEL).all() and (buf[:, lo + C:] == SENTINEL).all(), "wrote outside the slice"


def run_backward(case, dtype, device, with_grad_x=True, seed=1):
    x, scale, shift, weight, (k, s, p, pool) = conv_inputs(case, dtype, device)
    gen = torch.Generator().manual_seed(seed)
    N, Cin, H, W = x.shape
    Cout = weight.shape[0]
    Ho, Wo = out_size(H, k, s, p, pool), out_size(W, k, s, p, pool)
    # grad_out a strided channel slice too; grad_x a prefix of a shared gradient buffer
    gybuf = torch.randn(N, Cout + 3, Ho, Wo, dtype=torch.float64, generator=gen).to(device, dtype)
    grad_out = gybuf[:, 1:1 + Cout]
    sdt = R.stats_dtype(dtype)
    gxbuf, grad_x = prefix_view(N, Cin, H, W, dtype, device, extra=4, gen=gen)
    gxbuf0 = gxbuf.clone()
    grad_scale, grad_shift = vec(Cin, sdt, device, gen), vec(Cin, sdt, device, gen)
    # float64 reference of the same inputs
    d = torch.float64
    ref_gx = grad_x.to(d).clone()
    ref_gs, ref_gh = grad_scale.to(d).clone(), grad_shift.to(d).clone()
    ref_gw = R.transform_conv_backward_(grad_out.to(d), x.to(d), scale.to(d), shift.to(d), weight.to(d),
                                        s, p, pool, ref_gx, ref_gs, ref_gh)
    gs0, gh0 = grad_scale.clone(), grad_shift.clone()
    gw = T.transform_conv_backward_(grad_out, x, scale, shift, weight, s, p, pool,
                                    grad_x if with_grad_x else None, grad_scale, grad_shift)
    assert gw.shape == weight.shape and gw.dtype == weight.dtype
    assert torch.equal(gxbuf[:, Cin:], gxbuf0[:, Cin:]), "grad_x: wrote outside the prefix"
    if not with_grad_x:
        assert torch.equal(gxbuf, gxbuf0)
    return dict(gx=(grad_x, ref_gx), gs=(grad_scale, ref_gs), gh=(grad_shift, ref_gh), gw=(gw, ref_gw),
                inputs=(grad_out, x, scale, shift, weight, (k, s, p, pool)), init=(gxbuf0[:, :Cin], gs0, gh0))


# ----------------------------------------------------------------------------- transform-conv

@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_transform_conv_forward(case, dtype):
    (x, scale, shift, weight, (k, s, p, pool)), obuf, out = run_forward(case, dtype, CPU)
    d = torch.float64
    ref = R.transform_conv(x.to(d), scale.to(d), shift.to(d), weight.to(d), s, p, pool)
    assert rel_err(out, ref) < TOL[dtype]
    check_untouched(obuf, 2, weight.shape[0])


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CONV_CASES, ids=CONV_IDS)
def test_transform_conv_backward(case, dtype):
    r = run_backward(case, dtype, CPU)
    for name in ("gx", "gs", "gh", "gw"):
        got, ref = r[name]
        assert rel_err(got, ref) < TOL[dtype], name


@interpreter_only
def test_transform_conv_backward_without_grad_x():
    case = CONV_CASES[2]
    r = run_backward(case, torch.float32, CPU, with_grad_x=False)
    for name in ("gs", "gh", "gw"):
        got, ref = r[name]
        assert rel_err(got, ref) < TOL[torch.float32], name


@interpreter_only
@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("case", [CONV_CASES[i] for i in (0, 2, 6)],
                         ids=[CONV_CASES[i][0] for i in (0, 2, 6)])
def test_weight_gradient_accumulator_is_zeroed_by_the_dgrad_launch(monkeypatch, case, chunks):
    """The weight gradient's accumulator is allocated uninitialised and zeroed by the dgrad
    kernel's programs (one launch fewer than a fill), before the wgrad kernel adds into it:
    handed out full of NaN here, every element must still come back as the reference's, in
    one batch chunk and in one chunk per image (the int32-indexing split, forced), with and
    without ``grad_x``."""
    from msdnet_ops.triton import conv as C
    handed = []

    def poisoned(weight, dtype, device):
        handed.append(1)
        return torch.full_like(weight, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(C, "new_weight_grad", poisoned)
    if chunks > 1:
        assert case[5] == chunks  # N: one image per chunk
        monkeypatch.setattr(C, "batch_chunks", lambda n, *tensors: [(i, i + 1) for i in range(n)])
    for with_grad_x in (True, False):
        r = run_backward(case, torch.float32, CPU, with_grad_x=with_grad_x)
        got, ref = r["gw"]
        assert rel_err(got, ref) < TOL[torch.float32], with_grad_x
    assert len(handed) == 2  # both runs took the uninitialised accumulator


@interpreter_only
def test_transform_conv_allocating_and_relu_zero():
    """``transform_conv`` allocates; pre-activations of exactly 0 give a zero ReLU derivative;
    a whole image of padding-only taps still writes every output."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 5, 5, 5, generator=gen, dtype=torch.float64)
    x[:, :, 1:3] = 0.0
    scale = torch.ones(5, dtype=torch.float64)
    shift = torch.zeros(5, dtype=torch.float64)
    weight = torch.randn(4, 5, 3, 3, generator=gen, dtype=torch.float64)
    out = T.transform_conv(x, scale, shift, weight, 1, 1, 1)
    torch.testing.assert_close(out, R.transform_conv(x, scale, shift, weight, 1, 1, 1))
    grad_out = torch.randn_like(out)
    gx, gs, gh = torch.zeros_like(x), torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    rx, rs, rh = gx.clone(), gs.clone(), gh.clone()
    gw = T.transform_conv_backward_(grad_out, x, scale, shift, weight, 1, 1, 1, gx, gs, gh)
    rw = R.transform_conv_backward_(grad_out, x, scale, shift, weight, 1, 1, 1, rx, rs, rh)
    for a, b in ((gx, rx), (gs, rs), (gh, rh), (gw, rw)):
        torch.testing.assert_close(a, b)
    assert (gx[:, :, 1:3] == 0).all()


LOWP_CASES = [CONV_CASES[2], CONV_CASES[6]]


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", LOWP_CASES, ids=[c[0] for c in LOWP_CASES])
def test_transform_conv_low_precision(case, dtype):
    """Errors against float64 at most ~2x PyTorch's own in that dtype (plus one unit in the last
    place of the largest value, for the final rounding)."""
    eps = torch.finfo(dtype).eps
    d = torch.float64
    (x, scale, shift, weight, (k, s, p, pool)), obuf, out = run_forward(case, dtype, CPU)
    ref64 = R.transform_conv(x.to(d), scale.to(d), shift.to(d), weight.to(d), s, p, pool)
    ref_lp = R.transform_conv(x, scale, shift, weight, s, p, pool)
    assert rel_err(out, ref64) <= 2 * rel_err(ref_lp, ref64) + eps
    check_untouched(obuf, 2, weight.shape[0])

    r = run_backward(case, dtype, CPU)
    grad_out, x, scale, shift, weight, (k, s, p, pool) = r["inputs"]
    gx0, gs0, gh0 = r["init"]
    lp_gx, lp_gs, lp_gh = gx0.clone(), gs0.clone(), gh0.clone()
    lp_gw = R.transform_conv_backward_(grad_out, x, scale, shift, weight, s, p, pool, lp_gx, lp_gs, lp_gh)
    for name, lp in (("gx", lp_gx), ("gs", lp_gs), ("gh", lp_gh), ("gw", lp_gw)):
        got, ref = r[name]
        assert rel_err(got, ref) <= 2 * rel_err(lp, ref) + eps, name


def test_transform_conv_bad_input():
    x = torch.randn(1, 5, 5, 5)
    sc, sh = torch.ones(5), torch.zeros(5)
    w1, w3 = torch.randn(4, 5, 1, 1), torch.randn(4, 5, 3, 3)
    out = torch.empty(1, 4, 5, 5)
    with pytest.raises(TypeError, match="x"):
        T.transform_conv_into(x.to(torch.int32), sc, sh, w1, 1, 0, 1, out)
    with pytest.raises(ValueError, match="pool"):
        T.transform_conv_into(x, sc, sh, w3, 1, 1, 2, out)
    with pytest.raises(ValueError, match="weight"):
        T.transform_conv_into(x, sc, sh, torch.randn(4, 6, 1, 1), 1, 0, 1, out)
    with pytest.raises(ValueError, match="weight"):
        T.transform_conv_into(x, sc, sh, torch.randn(4, 5, 5, 5), 1, 2, 1, out)
    with pytest.raises(ValueError, match="stride"):
        T.transform_conv_into(x, sc, sh, w1, 3, 0, 1, out)
    with pytest.raises(ValueError, match="out"):
        T.transform_conv_into(x, sc, sh, w1, 2, 0, 1, out)
    with pytest.raises(TypeError, match="out"):
        T.transform_conv_into(x, sc, sh, w1, 1, 0, 1, out.double())
    with pytest.raises(ValueError, match="scale"):
        T.transform_conv_into(x, torch.ones(4), sh, w1, 1, 0, 1, out)
    with pytest.raises(TypeError, match="grad_scale"):
        T.transform_conv_backward_(out, x, sc, sh, w1, 1, 0, 1, torch.zeros_like(x),
                                   torch.zeros(5, dtype=torch.float64), torch.zeros(5))
    with pytest.raises(ValueError, match="grad_out"):
        T.transform_conv_backward_(out[:, :3], x, sc, sh, w1, 1, 0, 1, torch.zeros_like(x),
                                   torch.zeros(5), torch.zeros(5))


# ----------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,layout", [((3, 5, 5, 7), "nchw"), ((1, 7, 5, 5), "nhwc")],
                         ids=["chunked-nchw", "single-nhwc"])
@interpreter_only
def test_channel_stats(shape, layout, dtype):
    gen = torch.Generator().manual_seed(4)
    N, C, H, W = shape
    # a large common offset: the one-pass formula E[x^2]-E[x]^2 would lose it in float32
    _, x = prefix_view(N, C, H, W, dtype, CPU, layout, offset=100.0, gen=gen)
    mean, invstd = T.channel_stats(x, 1e-5)
    rm, ri = R.channel_stats(x.double(), 1e-5)
    assert mean.dtype == R.stats_dtype(dtype) and invstd.dtype == R.stats_dtype(dtype)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    assert rel_err(mean, rm) < tol and rel_err(invstd, ri) < tol


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_stats_backward(dtype):
    gen = torch.Generator().manual_seed(5)
    N, C, H, W = 3, 5, 5, 7
    sdt = R.stats_dtype(dtype)
    _, x = prefix_view(N, C, H, W, dtype, CPU, "nhwc", gen=gen)
    mean, invstd = R.channel_stats(x, 1e-5)
    gm, gi = vec(C, sdt, CPU, gen), vec(C, sdt, CPU, gen)
    gbuf, gx = prefix_view(N, C, H, W, dtype, CPU, extra=2, gen=gen)
    gbuf0 = gbuf.clone()
    ref = gx.double().clone()
    R.channel_stats_backward_(x.double(), mean.double(), invstd.double(), gm.double(), gi.double(), ref)
    T.channel_stats_backward_(x, mean, invstd, gm, gi, gx)
    assert rel_err(gx, ref) < TOL[dtype]
    assert torch.equal(gbuf[:, C:], gbuf0[:, C:])
    # grad_mean None == zeros
    ref2 = gx.double().clone()
    R.channel_stats_backward_(x.double(), mean.double(), invstd.double(), torch.zeros_like(gi).double(),
                              gi.double(), ref2)
    T.channel_stats_backward_(x, mean, invstd, None, gi, gx)
    assert rel_err(gx, ref2) < TOL[dtype]


# ----------------------------------------------------------------------------- rounding

@triton.jit
def _to_bfloat16_kernel(x_ptr, cast_ptr, stored_ptr, rtz_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(cast_ptr + offs, x.to(tl.bfloat16), mask=mask)
    tl.store(stored_ptr + offs, x, mask=mask)  # the store converts to the pointer's bfloat16
    tl.store(rtz_ptr + offs, x.to(tl.bfloat16, fp_downcast_rounding="rtz"), mask=mask)


def test_split_float_parts_are_pytorchs_float32_roundings():
    """The two float32 parts of a float64 scalar (eps of float64 kernels) are what PyTorch's
    float64 -> float32 conversion gives (nearest, ties to even), and add up to the value to
    ~2**-48: random magnitudes, exact float32 ties, 1/3."""
    gen = torch.Generator().manual_seed(0)
    values = (torch.rand(300, generator=gen, dtype=torch.float64) * 10.0
              ** torch.randint(-8, 3, (300,), generator=gen)).tolist()
    values += [1.0 + 2.0 ** -24, 1.0 + 3 * 2.0 ** -24, 1e-5, 1.0 / 3.0]  # ties up and down
    for v in values:
        hi, lo = _runtime.split_float(v)
        want_hi = torch.tensor(v, dtype=torch.float64).to(torch.float32).item()
        assert hi == want_hi, v
        assert lo == torch.tensor(v - want_hi, dtype=torch.float64).to(torch.float32).item(), v
        assert abs((hi + lo) - v) <= abs(v) * 2.0 ** -45, v


def test_float32_to_bfloat16_rounds_to_nearest_even_like_pytorch():
    """Kernels round float32 -> bfloat16 as PyTorch and GPUs do (to nearest, ties to even; in
    the interpreter through ``msdnet_ops.triton._interpreter``, whose own conversion truncates):
    random values, exact ties either way, values that round up to a new power of two, overflow
    to inf, subnormals, signed zeros, inf and NaN. An explicit "rtz" still truncates (normal
    values; the interpreter's own conversion mishandles float32 subnormals, left alone)."""
    bits = torch.tensor([0x3F808000, 0x3F818000, 0x3F7FFFFF, 0x7F7FFFFF, 0x00012345, 0x80000001,
                         0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x3F80C000],
                        dtype=torch.int64).to(torch.int32)
    x = torch.cat([torch.randn(500, generator=torch.Generator().manual_seed(0)) * 100,
                   bits.view(torch.float32)])
    n = x.numel()
    device = torch.device("cuda") if torch.cuda.is_available() else CPU
    outs = [torch.empty(n, dtype=torch.bfloat16, device=device) for _ in range(3)]
    _to_bfloat16_kernel[(1,)](x.to(device), *outs, n, BLOCK=triton.next_power_of_2(n))
    outs = [o.cpu() for o in outs]
    expected = x.to(torch.bfloat16)
    for got in outs[:2]:
        nan = torch.isnan(expected)
        assert torch.isnan(got[nan]).all()
        assert torch.equal(got[~nan].view(torch.int16), expected[~nan].view(torch.int16))
    normal = torch.isfinite(x) & (x.abs() >= torch.finfo(torch.float32).tiny)
    truncated = (x[normal].view(torch.int32) >> 16).to(torch.int16)
    assert torch.equal(outs[2][normal].view(torch.int16), truncated)


# ----------------------------------------------------------------------------- affine + ReLU

@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_affine_relu_into(dtype):
    gen = torch.Generator().manual_seed(6)
    N, C, H, W = 3, 7, 5, 7
    sdt = R.stats_dtype(dtype)
    _, x = prefix_view(N, C, H, W, dtype, CPU, "nhwc", gen=gen)
    scale, shift = vec(C, sdt, CPU, gen), vec(C, sdt, CPU, gen, 0.5)
    obuf, out = slice_view(N, C, H, W, dtype, CPU)
    T.affine_relu_into(x, scale, shift, out)
    torch.testing.assert_close(out, R.affine_relu(x, scale, shift), rtol=0, atol=0)
    check_untouched(obuf, 2, C)
    torch.testing.assert_close(T.affine_relu(x, scale, shift), R.affine_relu(x, scale, shift),
                               rtol=0, atol=0)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_grad_x", [True, False], ids=["grad_x", "no-grad_x"])
def test_affine_relu_backward(dtype, with_grad_x):
    gen = torch.Generator().manual_seed(7)
    N, C, H, W = 3, 5, 5, 7
    sdt = R.stats_dtype(dtype)
    _, x = prefix_view(N, C, H, W, dtype, CPU, gen=gen)
    scale, shift = vec(C, sdt, CPU, gen), vec(C, sdt, CPU, gen, 0.5)
    x[:, 0, :2] = 0.0
    shift[0] = 0.0  # pre-activation exactly 0: derivative 0
    _, grad_z = prefix_view(N, C, H, W, dtype, CPU, "nhwc", gen=gen)
    gbuf, gx = prefix_view(N, C, H, W, dtype, CPU, extra=2, gen=gen)
    gbuf0 = gbuf.clone()
    gs, gh = vec(C, sdt, CPU, gen), vec(C, sdt, CPU, gen)
    d = torch.float64
    rx, rs, rh = gx.to(d).clone(), gs.to(d).clone(), gh.to(d).clone()
    R.affine_relu_backward_(x.to(d), scale.to(d), shift.to(d), grad_z.to(d), rx, rs, rh)
    T.affine_relu_backward_(x, scale, shift, grad_z, gx if with_grad_x else None, gs, gh)
    if with_grad_x:
        assert rel_err(gx, rx) < TOL[dtype]
        assert torch.equal(gbuf[:, C:], gbuf0[:, C:])
    else:
        assert torch.equal(gbuf, gbuf0)
    assert rel_err(gs, rs) < TOL[dtype] and rel_err(gh, rh) < TOL[dtype]


@interpreter_only
def test_gather_batch_into():
    gen = torch.Generator().manual_seed(8)
    _, src = prefix_view(5, 3, 5, 7, torch.float32, CPU, "nhwc", gen=gen)
    index = torch.tensor([4, 0, 2], dtype=torch.int64)
    obuf, out = slice_view(3, 3, 5, 7, torch.float32, CPU)
    T.gather_batch_into(src, index, out)
    torch.testing.assert_close(out, R.gather_batch(src, index), rtol=0, atol=0)
    check_untouched(obuf, 2, 3)


def test_autotuner_prunes_configs_by_problem_width():
    """The GPU autotuner's pruning hook (never reached in the interpreter, which does not
    autotune; it broke the first GPU run): called as Triton calls it, with its Config objects
    and the launch's arguments, it keeps the table's entries whose column tile suits the width."""
    from msdnet_ops.triton import _autotune as A
    from msdnet_ops.triton.conv.forward import _conv_fwd_kernel
    tuning = A.Tuning("conv_fwd", "tf32", "1x1", ("Cout", "BLOCK_N"), ("M",))
    tuner = A.autotuned(_conv_fwd_kernel, tuning)
    table = A.configs(tuning)
    for width in (12, 40, 200):
        kept = tuner.early_config_prune(tuner.configs, {"Cout": width})
        assert all(isinstance(c, triton.Config) for c in kept)
        expected = [c for c in table if c["BLOCK_N"] <= max(32, 1 << (width - 1).bit_length())]
        assert [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in kept] == expected
    assert len(tuner.early_config_prune(tuner.configs, {"Cout": 12})) < len(table)
    assert tuner.do_bench is A.bench_candidate  # the shorter per-candidate timing


# ----------------------------------------------------------------------------- host side

def test_host_integer_helpers_match_tritons():
    """``cdiv``/``next_pow2`` (plain Python: Triton's are slower ConstexprFunctions on the host)
    give Triton's answers."""
    for a in range(0, 300):
        for b in range(1, 40):
            assert _runtime.cdiv(a, b) == triton.cdiv(a, b), (a, b)
    for n in range(0, 70000):
        assert _runtime.next_pow2(n) == triton.next_power_of_2(max(n, 1)), n


def test_check_features_bounds_one_images_span(monkeypatch):
    """Kernels index within an image in int32: a view whose one image spans more elements than
    that is refused by name, whatever its layout (the limit lowered to keep tensors small)."""
    limit = 150
    monkeypatch.setattr(_runtime, "INT32_MAX", limit)
    wide = torch.zeros(2, 5, 4, 9).permute(0, 3, 1, 2)        # NHWC buffer of 9 channels
    views = [torch.zeros(1, 3, 5, 7), torch.zeros(2, 2, 6, 6), torch.zeros(1, 4, 6, 6),
             torch.zeros(2, 3, 5, 7).to(memory_format=torch.channels_last), wide, wide[:, 2:4],
             wide[:1, :1], torch.zeros(3, 2, 5, 5)[1:]]
    for v in views:
        span = sum((size - 1) * stride for size, stride in zip(v.shape[1:], v.stride()[1:]))
        if span > limit:
            with pytest.raises(ValueError, match="x: one image spans more than 2"):
                _runtime.check_features("x", v)
        else:
            _runtime.check_features("x", v)
    assert {sum((z - 1) * st for z, st in zip(v.shape[1:], v.stride()[1:])) > limit for v in views} == {True, False}


def test_launch_switches_device_only_when_needed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert isinstance(_runtime.on_device(torch.device("cuda", 0)), contextlib.nullcontext)
    assert isinstance(_runtime.on_device(torch.device("cuda")), contextlib.nullcontext)
    other = _runtime.on_device(torch.device("cuda", 1))
    assert isinstance(other, torch.cuda.device) and other.idx == 1


# ----------------------------------------------------------------------------- GPU (compiled)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled Triton kernels)")

GPU_CASES = [
    ("1x1", 1, 1, 0, 1, 4, 67, 128, 15, 15, "nchw"),
    ("3x3", 3, 1, 1, 1, 4, 128, 32, 15, 15, "nchw"),
    ("3x3-s2", 3, 2, 1, 1, 3, 48, 40, 17, 17, "nhwc"),
    ("pool2", 1, 1, 0, 2, 4, 70, 35, 15, 15, "nchw"),
]
GPU_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_transform_conv(case, dtype, monkeypatch):
    monkeypatch.setattr(_runtime, "FLOAT32_PRECISION", "ieee")
    dev = torch.device("cuda")
    d = torch.float64
    (x, scale, shift, weight, (k, s, p, pool)), obuf, out = run_forward(case, dtype, dev)
    ref = R.transform_conv(x.to(d), scale.to(d), shift.to(d), weight.to(d), s, p, pool)
    assert rel_err(out, ref) < GPU_TOL[dtype]
    check_untouched(obuf, 2, weight.shape[0])
    r = run_backward(case, dtype, dev)
    for name in ("gx", "gs", "gh", "gw"):
        got, ref = r[name]
        assert rel_err(got, ref) < GPU_TOL[dtype] * (4 if name in ("gs", "gh") else 1), name


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_memory_bound_kernels(dtype):
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(9)
    N, C, H, W = 8, 37, 29, 31
    sdt = R.stats_dtype(dtype)
    _, x = prefix_view(N, C, H, W, dtype, dev, offset=5.0, gen=gen)
    mean, invstd = T.channel_stats(x, 1e-5)
    rm, ri = R.channel_stats(x.double(), 1e-5)
    assert rel_err(mean, rm) < 1e-5 and rel_err(invstd, ri) < 1e-4
    scale, shift = vec(C, sdt, dev, gen), vec(C, sdt, dev, gen, 0.5)
    obuf, out = slice_view(N, C, H, W, dtype, dev)
    T.affine_relu_into(x - 5.0, scale, shift, out)
    torch.testing.assert_close(out, R.affine_relu(x - 5.0, scale, shift))
    check_untouched(obuf, 2, C)
    grad_z = torch.randn(N, C, H, W, dtype=dtype, device=dev)
    gx, gs, gh = torch.zeros(N, C, H, W, dtype=torch.float32, device=dev), torch.zeros(C, device=dev), torch.zeros(C, device=dev)
    rx, rs, rh = gx.double(), gs.double(), gh.double()
    T.affine_relu_backward_(x, scale, shift, grad_z, gx, gs, gh)
    R.affine_relu_backward_(x.double(), scale.double(), shift.double(), grad_z.double(), rx, rs, rh)
    assert rel_err(gx, rx) < 1e-6 and rel_err(gs, rs) < 1e-5 and rel_err(gh, rh) < 1e-5
    gm, gi = vec(C, sdt, dev, gen), vec(C, sdt, dev, gen)
    T.channel_stats_backward_(x, mean, invstd, gm, gi, gx)
    R.channel_stats_backward_(x.double(), mean.double(), invstd.double(), gm.double(), gi.double(), rx)
    assert rel_err(gx, rx) < 1e-5
