"""The compiled kernels (msdnet_ops.kernels.cpu / .cuda) against msdnet_ops.reference.

CPU: float64 and float32, odd and prime sizes, non-contiguous inputs (channel slices of a
bigger buffer, channels_last, permuted, spatially strided), outputs written into strided
slices whose neighbouring channels must stay untouched, ``+=`` accumulation, every
instruction-set variant, and results independent of the thread count.
CUDA: the same checks in every dtype when a GPU is present (skipped otherwise), and a check
that the CUDA module was built when MSDNET_OPS_EXPECT_CUDA=1 (CI).
"""
from __future__ import annotations

import os
import random
import zlib

import pytest
import torch
import torch.nn.functional as F

from msdnet_ops import reference as ref
from msdnet_ops.kernels import cpu as cpu_kernels
from msdnet_ops.kernels import cuda as cuda_kernels

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

SHAPES = [(1, 5, 7, 7), (3, 7, 5, 1), (3, 5, 1, 5), (1, 7, 1, 1), (2, 3, 5, 7), (3, 11, 7, 5)]
# Above the CPU kernels' serial threshold (32768 elements): the OpenMP paths run.
BIG_SHAPES = [(2, 37, 23, 29), (2, 19, 40, 43)]
LAYOUTS = ["contiguous", "channel_slice", "channels_last", "channels_last_slice", "permuted",
           "spatial_stride"]
# (shape, layout) cases: every layout on the small shapes, the main ones on the big shapes.
CASES = [(s, lay) for s in SHAPES for lay in LAYOUTS] + \
        [(s, lay) for s in BIG_SHAPES for lay in ("channel_slice", "channels_last_slice", "spatial_stride")]
SENTINEL = 1024.0  # exactly representable in every dtype


def _seed(*key) -> int:
    """A reproducible seed per test case (str hashes are randomized per process)."""
    return zlib.crc32(repr(key).encode())


def _tol(dtype):
    """(rtol, atol) of a kernel against the float64 reference evaluated on the same values."""
    return {
        torch.float64: (1e-10, 1e-11),
        torch.float32: (2e-5, 2e-5),
        torch.float16: (2e-3, 2e-3),
        torch.bfloat16: (1.6e-2, 1.6e-2),
    }[dtype]


def _close(actual, expected, dtype, scale=1.0, what=""):
    rtol, atol = _tol(dtype)
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol,
                               atol=atol * scale, msg=lambda m: f"{what}: {m}")


def make_features(shape, layout, dtype, device="cpu", offset=0.0, gen=None):
    """A tensor of ``shape`` whose memory layout is ``layout`` (a view, never a copy of it)."""
    n, c, h, w = shape
    kw = dict(dtype=torch.float64, generator=gen)

    def rnd(*size):
        return (torch.randn(*size, **kw) * 2 + offset).to(dtype).to(device)

    if layout == "contiguous":
        return rnd(n, c, h, w)
    if layout == "channel_slice":  # a prefix/slice of a wider NCHW feature buffer
        return rnd(n, c + 5, h, w)[:, 2:2 + c]
    if layout == "channels_last":
        return rnd(n, h, w, c).permute(0, 3, 1, 2)
    if layout == "channels_last_slice":
        return rnd(n, h, w, c + 6)[..., 3:3 + c].permute(0, 3, 1, 2)
    if layout == "permuted":  # N, H, C, W storage
        return rnd(n, h, c, w).permute(0, 2, 1, 3)
    if layout == "spatial_stride":
        return rnd(n, c, 2 * h, w + 3)[:, :, ::2, 1:1 + w]
    raise ValueError(layout)


class SlicedOutput:
    """An output/gradient written through a channel slice of a bigger buffer (NCHW or
    channels_last) whose other channels hold a sentinel that must survive."""

    def __init__(self, shape, dtype, device="cpu", channels_last=False, init=None):
        n, c, h, w = shape
        if channels_last:
            self.buffer = torch.full((n, h, w, c + 4), SENTINEL, dtype=dtype, device=device)
            self.view = self.buffer[..., 1:1 + c].permute(0, 3, 1, 2)
            self.others = lambda: torch.cat([self.buffer[..., :1], self.buffer[..., 1 + c:]], dim=-1)
        else:
            self.buffer = torch.full((n, c + 4, h, w), SENTINEL, dtype=dtype, device=device)
            self.view = self.buffer[:, 1:1 + c]
            self.others = lambda: torch.cat([self.buffer[:, :1], self.buffer[:, 1 + c:]], dim=1)
        if init is not None:
            self.view.copy_(init)
        self.before = self.others().clone()

    def check_neighbours(self):
        assert torch.equal(self.others(), self.before), "a kernel wrote outside its output slice"


def _vec(c, dtype, device="cpu", gen=None, lo=None):
    v = torch.randn(c, dtype=torch.float64, generator=gen)
    if lo is not None:
        v = v.abs() + lo
    return v.to(ref.stats_dtype(dtype)).to(device)


def _strided_vec(c, dtype, device="cpu", gen=None):
    """A per-channel vector that is itself a strided view (every other element)."""
    v = torch.randn(2 * c, dtype=torch.float64, generator=gen).to(ref.stats_dtype(dtype)).to(device)
    return v[::2]


# ============================================================================ CPU

@pytest.fixture(scope="module")
def cpu():
    assert cpu_kernels.available(), (
        f"the CPU kernels are not built ({cpu_kernels.load_error()}); run "
        "`pip install --no-build-isolation .`")
    return cpu_kernels


CPU_DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape,layout", CASES)
def test_cpu_channel_stats(cpu, shape, layout, dtype):
    gen = torch.Generator().manual_seed(_seed(shape, layout))
    x = make_features(shape, layout, dtype, offset=3.0, gen=gen)
    if shape[0] * shape[2] * shape[3] < 2:
        return  # BatchNorm statistics need two values (ops.py refuses this)
    mean, invstd = cpu.channel_stats(x, 1e-5)
    assert mean.dtype == ref.stats_dtype(dtype) and invstd.dtype == ref.stats_dtype(dtype)
    rmean, rinvstd = ref.channel_stats(x.double(), 1e-5)
    _close(mean, rmean, dtype, what="mean")
    _close(invstd, rinvstd, dtype, scale=float(rinvstd.abs().max()), what="invstd")


def test_cpu_channel_stats_large_offset_float32(cpu):
    """Welford/Chan stay accurate where a naive E[x^2]-E[x]^2 in float32 would not."""
    gen = torch.Generator().manual_seed(1)
    for layout in ("channel_slice", "channels_last"):
        x = make_features((4, 9, 33, 35), layout, torch.float32, offset=1e4, gen=gen)
        mean, invstd = cpu.channel_stats(x, 1e-5)
        rmean, rinvstd = ref.channel_stats(x.double(), 1e-5)
        torch.testing.assert_close(mean.double(), rmean, rtol=1e-6, atol=0)
        torch.testing.assert_close(invstd.double(), rinvstd, rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("out_channels_last", [False, True])
@pytest.mark.parametrize("shape,layout", CASES)
def test_cpu_affine_relu(cpu, shape, layout, out_channels_last, dtype):
    gen = torch.Generator().manual_seed(_seed(shape, layout, "ar"))
    x = make_features(shape, layout, dtype, gen=gen)
    scale, shift = _vec(shape[1], dtype, gen=gen), _strided_vec(shape[1], dtype, gen=gen)
    out = SlicedOutput(shape, dtype, channels_last=out_channels_last)
    cpu.affine_relu_into(x, scale, shift, out.view)
    _close(out.view, ref.affine_relu(x.double(), scale.double(), shift.double()), dtype,
           scale=4.0, what="z")
    out.check_neighbours()


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("grad_channels_last", [False, True])
@pytest.mark.parametrize("shape,layout", CASES)
def test_cpu_affine_relu_backward(cpu, shape, layout, grad_channels_last, dtype):
    gen = torch.Generator().manual_seed(_seed(shape, layout, "arb"))
    c = shape[1]
    x = make_features(shape, layout, dtype, gen=gen)
    grad_z = make_features(shape, "channel_slice" if grad_channels_last else "channels_last",
                           dtype, gen=gen)
    scale, shift = _vec(c, dtype, gen=gen), _vec(c, dtype, gen=gen)
    init = torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)
    grad_x = SlicedOutput(shape, dtype, channels_last=grad_channels_last, init=init)
    grad_scale, grad_shift = _vec(c, dtype, gen=gen), _strided_vec(c, dtype, gen=gen)
    e_gx, e_gs, e_gh = init.double(), grad_scale.double().clone(), grad_shift.double().clone()
    ref.affine_relu_backward_(x.double(), scale.double(), shift.double(), grad_z.double(), e_gx,
                              e_gs, e_gh)
    gs0, gh0 = grad_scale.clone(), grad_shift.clone()
    cpu.affine_relu_backward_(x, scale, shift, grad_z, grad_x.view, grad_scale, grad_shift)
    n = shape[0] * shape[2] * shape[3]
    _close(grad_x.view, e_gx, dtype, scale=4.0, what="grad_x")
    _close(grad_scale, e_gs, dtype, scale=4.0 * n ** 0.5, what="grad_scale")
    _close(grad_shift, e_gh, dtype, scale=2.0 * n ** 0.5, what="grad_shift")
    assert not torch.equal(grad_scale, gs0) or not torch.equal(grad_shift, gh0)
    grad_x.check_neighbours()


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("grad_channels_last", [False, True])
@pytest.mark.parametrize("shape,layout", CASES)
def test_cpu_channel_stats_backward(cpu, shape, layout, grad_channels_last, dtype):
    gen = torch.Generator().manual_seed(_seed(shape, layout, "csb"))
    c = shape[1]
    x = make_features(shape, layout, dtype, offset=1.0, gen=gen)
    mean, invstd = _vec(c, dtype, gen=gen), _vec(c, dtype, gen=gen, lo=0.5)
    grad_mean, grad_invstd = _strided_vec(c, dtype, gen=gen), _vec(c, dtype, gen=gen)
    init = torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)
    grad_x = SlicedOutput(shape, dtype, channels_last=grad_channels_last, init=init)
    expected = init.double()
    ref.channel_stats_backward_(x.double(), mean.double(), invstd.double(), grad_mean.double(),
                                grad_invstd.double(), expected)
    cpu.channel_stats_backward_(x, mean, invstd, grad_mean, grad_invstd, grad_x.view)
    _close(grad_x.view, expected, dtype, scale=4.0, what="grad_x")
    grad_x.check_neighbours()


@pytest.mark.parametrize("dtype", CPU_DTYPES)  # bit copies: element sizes 8 and 4
@pytest.mark.parametrize("out_channels_last", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(5, 7, 5, 3), (3, 1, 1, 1), (7, 13, 1, 1), (4, 37, 19, 23)])
def test_cpu_gather_batch(cpu, shape, layout, out_channels_last, dtype):
    gen = torch.Generator().manual_seed(_seed(shape, layout, "g"))
    src = make_features(shape, layout, dtype, gen=gen)
    n = shape[0]
    for index in ([n - 1, 0, n // 2, n - 1], [n // 2], list(range(n))[::-1]):
        idx = torch.tensor(index, dtype=torch.int64)
        out = SlicedOutput((len(index),) + shape[1:], dtype, channels_last=out_channels_last)
        cpu.gather_batch_into(src, idx, out.view)
        assert torch.equal(out.view, ref.gather_batch(src, idx))
        out.check_neighbours()


def test_cpu_gather_batch_strided_index(cpu):
    src = torch.randn(6, 5, 3, 3)
    idx = torch.tensor([5, 0, 4, 1, 3, 2])[::2]  # a non-contiguous index
    out = torch.empty(3, 5, 3, 3)
    cpu.gather_batch_into(src, idx, out)
    assert torch.equal(out, src[[5, 4, 3]])


def test_cpu_accumulates(cpu):
    """Calling a ``_`` kernel twice adds twice (+=, not =)."""
    gen = torch.Generator().manual_seed(7)
    x = make_features((2, 5, 7, 7), "channel_slice", torch.float64, gen=gen)
    gz = torch.randn(2, 5, 7, 7, dtype=torch.float64, generator=gen)
    s, b = _vec(5, torch.float64, gen=gen), _vec(5, torch.float64, gen=gen)
    gx, gs, gh = torch.zeros(2, 5, 7, 7, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), \
        torch.zeros(5, dtype=torch.float64)
    cpu.affine_relu_backward_(x, s, b, gz, gx, gs, gh)
    once = (gx.clone(), gs.clone(), gh.clone())
    cpu.affine_relu_backward_(x, s, b, gz, gx, gs, gh)
    for twice, single in zip((gx, gs, gh), once):
        torch.testing.assert_close(twice, 2 * single)
    m, i = ref.channel_stats(x, 1e-5)
    g = torch.zeros_like(gx)
    cpu.channel_stats_backward_(x, m, i, gs, gh, g)
    g1 = g.clone()
    cpu.channel_stats_backward_(x, m, i, gs, gh, g)
    torch.testing.assert_close(g, 2 * g1)


@pytest.mark.parametrize("layout", ["channel_slice", "channels_last_slice", "permuted"])
def test_cpu_results_do_not_depend_on_thread_count(cpu, layout):
    gen = torch.Generator().manual_seed(3)
    shape = (2, 37, 23, 29)
    x = make_features(shape, layout, torch.float32, gen=gen)
    gz = make_features(shape, "contiguous", torch.float32, gen=gen)
    s, b = _vec(37, torch.float32, gen=gen), _vec(37, torch.float32, gen=gen)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            gx, gs, gh = torch.zeros(shape), torch.zeros(37), torch.zeros(37)
            cpu.affine_relu_backward_(x, s, b, gz, gx, gs, gh)
            results.append(cpu.channel_stats(x, 1e-5) + (gx, gs, gh))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert torch.equal(a, b_)


def test_cpu_every_instruction_set(cpu):
    """Every compiled variant this CPU runs gives the reference results."""
    import msdnet_ops._cpu_kernels as module

    gen = torch.Generator().manual_seed(11)
    current = module.current_isa()
    assert current in module.supported_isas()
    assert set(module.supported_isas()) <= set(module.compiled_isas())
    shape = (3, 37, 13, 17)
    try:
        for isa in module.supported_isas():
            module.set_isa(isa)
            for layout in ("channel_slice", "channels_last_slice", "spatial_stride"):
                x = make_features(shape, layout, torch.float32, gen=gen)
                s, b = _vec(37, torch.float32, gen=gen), _vec(37, torch.float32, gen=gen)
                mean, invstd = cpu.channel_stats(x, 1e-5)
                rmean, rinvstd = ref.channel_stats(x.double(), 1e-5)
                _close(mean, rmean, torch.float32, what=f"{isa} mean")
                _close(invstd, rinvstd, torch.float32, what=f"{isa} invstd")
                out = torch.empty(shape)
                cpu.affine_relu_into(x, s, b, out)
                _close(out, ref.affine_relu(x.double(), s.double(), b.double()), torch.float32,
                       scale=4.0, what=f"{isa} z")
                gz = torch.randn(shape, generator=gen)
                gx, gs, gh = torch.zeros(shape), torch.zeros(37), torch.zeros(37)
                cpu.affine_relu_backward_(x, s, b, gz, gx, gs, gh)
                e = (torch.zeros(shape, dtype=torch.float64), torch.zeros(37, dtype=torch.float64),
                     torch.zeros(37, dtype=torch.float64))
                ref.affine_relu_backward_(x.double(), s.double(), b.double(), gz.double(), *e)
                for got, exp in zip((gx, gs, gh), e):
                    _close(got, exp, torch.float32, scale=40.0, what=f"{isa} backward")
        with pytest.raises(ValueError):
            module.set_isa("no-such-isa")
    finally:
        module.set_isa(current)


# ---------------------------------------------------------------------------- NHWC feature buffers
# What the kernels see in training: NCHW-shaped views with channels_last strides, dense with few
# channels or a channel slice of a wider NHWC buffer. Channel counts cover whole vectors (16,
# 48, 128), partial ones (6, 12, 24), a prime (37) and one past a register block (80); sizes
# give the CPU lane traversal full and partial segments and several work units.

NHWC_CHANNELS = [6, 12, 16, 24, 37, 48, 80, 128]
NHWC_KINDS = ["dense", "prefix", "slice", "batch_step", "crop"]


def make_nhwc(shape, kind, dtype, gen, offset=0.0):
    n, c, h, w = shape

    def rnd(*size):
        return (torch.randn(*size, dtype=torch.float64, generator=gen) * 2 + offset).to(dtype)

    if kind == "dense":
        return rnd(n, h, w, c).permute(0, 3, 1, 2)
    if kind == "prefix":  # the first c channels of a wider buffer
        return rnd(n, h, w, c + 8).permute(0, 3, 1, 2)[:, :c]
    if kind == "slice":  # channels in the middle of a buffer, odd row stride
        return rnd(n, h, w, c + 7)[..., 3:3 + c].permute(0, 3, 1, 2)
    if kind == "batch_step":  # every other sample: N cannot join the pixel rows
        return rnd(2 * n, h, w, c).permute(0, 3, 1, 2)[::2]
    if kind == "crop":  # a spatial crop: H cannot join W
        return rnd(n, h + 2, w + 3, c).permute(0, 3, 1, 2)[:, :, 1:1 + h, 2:2 + w]
    raise ValueError(kind)


def _nhwc_shape(c):
    # two or more work units of the lane traversal at every channel count, odd spatial sizes
    return (3, c, 15, 17) if c < 48 else (2, c, 9, 11)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("kind", NHWC_KINDS)
@pytest.mark.parametrize("c", NHWC_CHANNELS)
def test_cpu_nhwc_channel_stats(cpu, c, kind, dtype):
    gen = torch.Generator().manual_seed(_seed(c, kind, "nstats"))
    x = make_nhwc(_nhwc_shape(c), kind, dtype, gen, offset=3.0)
    mean, invstd = cpu.channel_stats(x, 1e-5)
    rmean, rinvstd = ref.channel_stats(x.double(), 1e-5)
    _close(mean, rmean, dtype, what="mean")
    _close(invstd, rinvstd, dtype, scale=float(rinvstd.abs().max()), what="invstd")


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("kind", NHWC_KINDS)
@pytest.mark.parametrize("c", NHWC_CHANNELS)
def test_cpu_nhwc_elementwise(cpu, c, kind, dtype):
    """affine_relu, its backward and channel_stats_backward with x of `kind` and the written
    view a channel slice of another NHWC buffer (neighbours untouched), then dense."""
    gen = torch.Generator().manual_seed(_seed(c, kind, "nelem"))
    shape = _nhwc_shape(c)
    n = shape[0] * shape[2] * shape[3]
    x = make_nhwc(shape, kind, dtype, gen, offset=0.5)
    xd = x.double()
    s, b = _vec(c, dtype, gen=gen), _vec(c, dtype, gen=gen)
    for sliced in (True, False):
        out = SlicedOutput(shape, dtype, channels_last=True) if sliced else None
        z = out.view if sliced else make_nhwc(shape, "dense", dtype, gen)
        cpu.affine_relu_into(x, s, b, z)
        _close(z, ref.affine_relu(xd, s.double(), b.double()), dtype, scale=4.0, what="z")

        gz = make_nhwc(shape, "slice" if sliced else "dense", dtype, gen)
        init = torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)
        gx = SlicedOutput(shape, dtype, channels_last=True, init=init)
        gs, gh = _vec(c, dtype, gen=gen), _vec(c, dtype, gen=gen)
        e = (init.double(), gs.double().clone(), gh.double().clone())
        ref.affine_relu_backward_(xd, s.double(), b.double(), gz.double(), *e)
        cpu.affine_relu_backward_(x, s, b, gz, gx.view, gs, gh)
        _close(gx.view, e[0], dtype, scale=4.0, what="grad_x")
        _close(gs, e[1], dtype, scale=4.0 * n ** 0.5, what="grad_scale")
        _close(gh, e[2], dtype, scale=2.0 * n ** 0.5, what="grad_shift")

        m, i = _vec(c, dtype, gen=gen), _vec(c, dtype, gen=gen, lo=0.5)
        gm, gi = _vec(c, dtype, gen=gen), _vec(c, dtype, gen=gen)
        g = torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)
        g = g.contiguous(memory_format=torch.channels_last) if not sliced else \
            SlicedOutput(shape, dtype, channels_last=True, init=g)
        gv = g.view if sliced else g
        expected = gv.double().clone()
        ref.channel_stats_backward_(xd, m.double(), i.double(), gm.double(), gi.double(), expected)
        cpu.channel_stats_backward_(x, m, i, gm, gi, gv)
        _close(gv, expected, dtype, scale=4.0, what="stats grad_x")
        for written in ((out, gx, g) if sliced else (gx,)):
            written.check_neighbours()


@pytest.mark.parametrize("c", [6, 16, 24])
def test_cpu_nhwc_every_instruction_set_and_thread_count(cpu, c):
    """The lane traversal of every compiled variant gives the reference results, and the same
    bits with 1, 2 and 3 threads (the shape is above the serial threshold)."""
    import msdnet_ops._cpu_kernels as module

    gen = torch.Generator().manual_seed(_seed(c, "nisa"))
    shape = (4, c, 41, 37)
    x = make_nhwc(shape, "dense", torch.float32, gen, offset=1.0)
    gz = make_nhwc(shape, "slice", torch.float32, gen)
    s, b = _vec(c, torch.float32, gen=gen), _vec(c, torch.float32, gen=gen)
    e = (torch.zeros(shape, dtype=torch.float64), torch.zeros(c, dtype=torch.float64),
         torch.zeros(c, dtype=torch.float64))
    ref.affine_relu_backward_(x.double(), s.double(), b.double(), gz.double(), *e)
    rmean, rinvstd = ref.channel_stats(x.double(), 1e-5)
    current, threads = module.current_isa(), torch.get_num_threads()
    try:
        for isa in module.supported_isas():
            module.set_isa(isa)
            results = []
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                gx = torch.zeros(shape).contiguous(memory_format=torch.channels_last)
                gs, gh = torch.zeros(c), torch.zeros(c)
                cpu.affine_relu_backward_(x, s, b, gz, gx, gs, gh)
                results.append(cpu.channel_stats(x, 1e-5) + (gx, gs, gh))
            mean, invstd, gx, gs, gh = results[0]
            _close(mean, rmean, torch.float32, what=f"{isa} mean")
            _close(invstd, rinvstd, torch.float32, scale=float(rinvstd.max()), what=f"{isa} invstd")
            for got, exp in zip((gx, gs, gh), e):
                _close(got, exp, torch.float32, scale=40.0, what=f"{isa} backward")
            for other in results[1:]:
                for a, b_ in zip(results[0], other):
                    assert torch.equal(a, b_), f"{isa}: results depend on the thread count"
    finally:
        module.set_isa(current)
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- pointwise convolution
# 1x1 convolutions with few outputs on NHWC rows: 1 to 8 register blocks of 8 lanes (each
# kernel variant), partial and whole, up to the largest (64 outputs); rows not a multiple of
# the row blocks (6, 4, 3, 2) or of a work unit (256); row-strided input and output (buffer
# slices).

@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("rows,k,n", [(1, 1, 1), (7, 5, 6), (261, 46, 6), (513, 13, 16),
                                      (259, 3, 17), (67, 7, 30), (37, 130, 33), (45, 20, 48),
                                      (11, 4, 56), (300, 9, 64)])
def test_cpu_pointwise_conv(cpu, dtype, rows, k, n):
    gen = torch.Generator().manual_seed(_seed("pointwise", rows, k, n))
    x = torch.randn(rows, k + 5, generator=gen, dtype=dtype)[:, 2:2 + k]
    w = torch.randn(n, k, generator=gen, dtype=dtype)
    bias = torch.randn(n, generator=gen, dtype=dtype)
    x[rows // 2, k // 2] = float("nan")  # kept by the ReLU, as torch.relu keeps it
    out_buf = torch.full((rows, n + 7), 7.0, dtype=dtype)
    out = out_buf[:, 3:3 + n]
    for b, relu in ((None, False), (bias, True)):
        cpu.pointwise_conv_rows(x, w, b, relu, out)
        want = x.double() @ w.double().t() + (0 if b is None else b.double())
        want = torch.relu(want) if relu else want
        assert out[rows // 2].isnan().all()
        _close(torch.nan_to_num(out, 0.0), torch.nan_to_num(want, 0.0), dtype,
               scale=float(k), what=f"relu={relu}")
        assert (out_buf[:, :3] == 7).all() and (out_buf[:, 3 + n:] == 7).all()


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("rows,k,n", [(1, 1, 1), (7, 5, 6), (4099, 46, 6), (513, 13, 16),
                                      (259, 3, 17), (67, 7, 30), (30, 130, 32)])
def test_cpu_pointwise_conv_wgrad(cpu, dtype, rows, k, n):
    """The weight gradient of a 1x1 convolution, ``grad_out^T @ x``, on row-strided views
    (every variant: 1 to 4 register blocks, rows in several groups and a remainder)."""
    gen = torch.Generator().manual_seed(_seed("pointwise_wgrad", rows, k, n))
    x = torch.randn(rows, k + 5, generator=gen, dtype=dtype)[:, 1:1 + k]
    grad_out = torch.randn(rows, n + 3, generator=gen, dtype=dtype)[:, 2:2 + n]
    got = cpu.pointwise_conv_wgrad_rows(x, grad_out)
    assert got.shape == (n, k)
    _close(got, grad_out.double().t() @ x.double(), dtype, scale=float(rows) ** 0.5)


def test_cpu_pointwise_conv_every_instruction_set_and_thread_count(cpu):
    import msdnet_ops._cpu_kernels as module
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1031, 40, generator=gen)[:, :37]  # enough work for a thread team
    w, bias = torch.randn(24, 37, generator=gen), torch.randn(24, generator=gen)
    want = torch.relu(x.double() @ w.double().t() + bias.double())
    current, threads = module.current_isa(), torch.get_num_threads()
    try:
        for isa in module.supported_isas():
            module.set_isa(isa)
            for t in (1, 2):
                torch.set_num_threads(t)
                out = torch.empty(1031, 24)
                cpu.pointwise_conv_rows(x, w, bias, True, out)
                _close(out, want, torch.float32, scale=37.0, what=f"{isa}, {t} threads")
                grad_w = cpu.pointwise_conv_wgrad_rows(x, out)
                if t == 1 and isa == current:
                    first = grad_w
                # a fixed summation order: the same bits for every thread count
                if isa == current:
                    assert torch.equal(grad_w, first), f"{t} threads changed the weight gradient"
                _close(grad_w, out.double().t() @ x.double(), torch.float32, scale=30.0,
                       what=f"wgrad {isa}, {t} threads")
    finally:
        module.set_isa(current)
        torch.set_num_threads(threads)


def test_cpu_pointwise_conv_refuses_more_outputs_than_it_holds(cpu):
    x, w = torch.randn(4, 3), torch.randn(cpu.POINTWISE_CONV_MAX_OUTPUTS + 1, 3)
    with pytest.raises(ValueError, match="pointwise_conv: expected 1 to 64 outputs"):
        cpu.pointwise_conv_rows(x, w, None, False, torch.empty(4, w.shape[0]))
    with pytest.raises(ValueError, match="pointwise_conv_wgrad: expected 1 to 32 outputs"):
        cpu.pointwise_conv_wgrad_rows(x, torch.randn(4, cpu.POINTWISE_WGRAD_MAX_OUTPUTS + 1))


# ---------------------------------------------------------------------------- direct convolution
# k x k convolutions with few outputs on NHWC views: every tile size (2 to 24 outputs per tile,
# several tiles up to 64), rows of one and two vectors of pixels and a partial last tile,
# strides 1 to 3 (the scratch's phases), zero and wide padding, 1x1 and 5x5 kernels, maps
# smaller than the kernel, batch 1, strided input (a buffer prefix) and output (a buffer slice,
# the channels around it untouched).

@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("n,c,o,h,w,k,stride,pad", [
    (1, 1, 1, 1, 1, 3, 1, 1), (2, 6, 6, 32, 32, 3, 1, 1), (3, 12, 6, 16, 17, 3, 2, 1),
    (1, 5, 3, 7, 5, 3, 1, 0), (2, 7, 13, 9, 11, 3, 3, 1), (2, 4, 24, 6, 19, 5, 2, 2),
    (1, 3, 25, 2, 3, 3, 1, 1), (2, 9, 64, 5, 8, 1, 2, 0), (1, 2, 40, 4, 33, 3, 1, 2),
    (2, 48, 12, 8, 8, 3, 1, 1)])
def test_cpu_direct_conv(cpu, dtype, n, c, o, h, w, k, stride, pad):
    gen = torch.Generator().manual_seed(_seed("direct", n, c, o, h, w, k, stride, pad))
    x = torch.randn(n, h, w, c + 5, generator=gen, dtype=dtype).permute(0, 3, 1, 2)[:, 2:2 + c]
    weight = torch.randn(o, c, k, k, generator=gen, dtype=dtype)
    bias = torch.randn(o, generator=gen, dtype=dtype)
    x[0, c // 2, h // 2, w // 2] = float("nan")  # kept by the ReLU, as torch.relu keeps it
    plain = F.conv2d(x.double(), weight.double(), None, stride, pad)
    oh, ow = plain.shape[2:]
    out_buf = torch.full((n, oh, ow, o + 7), 7.0, dtype=dtype).permute(0, 3, 1, 2)
    out = out_buf[:, 3:3 + o]
    for b, relu in ((None, False), (bias, True)):
        cpu.direct_conv_into(x, weight, b, stride, pad, relu, out)
        want = plain + (0 if b is None else b.double().view(1, -1, 1, 1))
        want = torch.relu(want) if relu else want
        assert out.isnan().equal(want.isnan())
        _close(torch.nan_to_num(out, 0.0), torch.nan_to_num(want, 0.0), dtype,
               scale=float(c * k * k), what=f"relu={relu}")
        assert (out_buf[:, :3] == 7).all() and (out_buf[:, 3 + o:] == 7).all()


@pytest.mark.parametrize("fused", [False, True], ids=["direct", "bottleneck"])
def test_cpu_direct_conv_every_instruction_set_and_thread_count(cpu, fused):
    """The direct kernel, alone or with the bottleneck fused in front, on every instruction
    set this CPU runs, one and two threads."""
    import msdnet_ops._cpu_kernels as module
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 12, 33, 31, generator=gen).contiguous(memory_format=torch.channels_last)
    w1, b1 = torch.randn(6, 12, 1, 1, generator=gen), torch.randn(6, generator=gen)
    weight = torch.randn(10, 6 if fused else 12, 3, 3, generator=gen)
    bias = torch.randn(10, generator=gen)
    conv_in = torch.relu(F.conv2d(x.double(), w1.double(), b1.double())) if fused else x.double()

    def run(stride, out):
        if fused:
            cpu.bottleneck_direct_conv_into(x, w1, b1, weight, bias, stride, 1, True, out)
        else:
            cpu.direct_conv_into(x, weight, bias, stride, 1, True, out)
    current, threads = module.current_isa(), torch.get_num_threads()
    try:
        for stride in (1, 2):
            want = torch.relu(F.conv2d(conv_in, weight.double(), bias.double(), stride, 1))
            for isa in module.supported_isas():
                module.set_isa(isa)
                for t in (1, 2):
                    torch.set_num_threads(t)
                    out = torch.empty_like(want, dtype=torch.float32)
                    run(stride, out)
                    _close(out, want, torch.float32, scale=648.0 if fused else 108.0,
                           what=f"{isa}, {t} threads, stride {stride}")
    finally:
        module.set_isa(current)
        torch.set_num_threads(threads)


def test_cpu_direct_conv_refuses_what_it_cannot_compute(cpu):
    x = torch.randn(1, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cpu.DIRECT_CONV_MAX_OUTPUTS + 1, 3, 3, 3)
    out = torch.empty(1, w.shape[0], 4, 4).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="direct_conv: expected 1 to 64 outputs"):
        cpu.direct_conv_into(x, w, None, 1, 1, False, out)
    with pytest.raises(ValueError, match="channels-inner views and y of the convolution's shape"):
        cpu.direct_conv_into(x, w[:4], None, 1, 1, False, out[:, :4, :3])  # wrong output size
    with pytest.raises(ValueError, match="channels-inner views"):
        cpu.direct_conv_into(x.contiguous(), w[:4], None, 1, 1, False, out[:, :4])  # NCHW input


# ---------------------------------------------------------------------------- direct weight gradient
# direct_conv's weight gradient, input channels on the lanes: blocks of one and two channel
# vectors and a partial last one (1 to 97 channels), every output block size and a partial
# last block (1 to 64 outputs), taps whose columns leave the image (padding 0 to 2, strides 1
# to 3, maps smaller than the kernel), 1x1 and 5x5, batch 1, several images per unit and
# several units per image, a buffer prefix as the input and a buffer slice as the gradient.

def _wgrad_reference(x, grad_out, k, stride, pad):
    weight = torch.empty(grad_out.shape[1], x.shape[1], k, k, dtype=torch.float64)
    return torch.ops.aten.convolution_backward(
        grad_out.double(), x.double(), weight, None, [stride] * 2, [pad] * 2, [1, 1], False,
        [0, 0], 1, [False, True, False])[1]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("n,c,o,h,w,k,stride,pad", [
    (1, 1, 1, 1, 1, 3, 1, 1), (2, 6, 6, 32, 32, 3, 1, 1), (3, 12, 6, 16, 17, 3, 2, 1),
    (1, 5, 3, 7, 5, 3, 1, 0), (2, 7, 13, 9, 11, 3, 3, 1), (2, 4, 24, 6, 19, 5, 2, 2),
    (1, 3, 25, 2, 3, 3, 1, 1), (2, 9, 64, 5, 8, 1, 2, 0), (1, 2, 40, 4, 33, 3, 1, 2),
    (9, 48, 12, 8, 8, 3, 1, 1), (2, 97, 7, 6, 5, 3, 1, 1), (3, 17, 11, 3, 3, 3, 2, 1)])
def test_cpu_direct_conv_wgrad(cpu, dtype, n, c, o, h, w, k, stride, pad):
    """Against autograd's weight gradient in float64. The input is a channel prefix of a
    buffer whose other channels hold NaN: a lane that read past the prefix into a sum that
    is kept would show."""
    gen = torch.Generator().manual_seed(_seed("wgrad", n, c, o, h, w, k, stride, pad))
    buf = torch.full((n, h, w, c + 5), float("nan"), dtype=dtype)
    buf[..., 2:2 + c] = torch.randn(n, h, w, c, generator=gen, dtype=dtype)
    x = buf.permute(0, 3, 1, 2)[:, 2:2 + c]
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    grad_buf = torch.full((n, oh, ow, o + 3), float("nan"), dtype=dtype)
    grad_buf[..., 1:1 + o] = torch.randn(n, oh, ow, o, generator=gen, dtype=dtype)
    grad_out = grad_buf.permute(0, 3, 1, 2)[:, 1:1 + o]
    got = cpu.direct_conv_wgrad(x, grad_out, k, stride, pad)
    assert got.shape == (o, c, k, k) and got.is_contiguous(memory_format=torch.channels_last)
    _close(got, _wgrad_reference(x, grad_out, k, stride, pad), dtype,
           scale=float(n * oh * ow) ** 0.5)


def test_cpu_direct_conv_wgrad_reads_nothing_past_a_dense_input(cpu):
    """A dense NHWC input whose channels are not whole vectors, its last pixel at the end of
    an allocation: the last pixel of a row reads only its own channels (past them: another
    allocation, or unmapped memory)."""
    gen = torch.Generator().manual_seed(12)
    for c in (3, 6, 13):
        x = torch.randn(2, c, 7, 9, generator=gen).contiguous(memory_format=torch.channels_last)
        grad_out = torch.randn(2, 5, 7, 9, generator=gen)
        _close(cpu.direct_conv_wgrad(x, grad_out.contiguous(memory_format=torch.channels_last),
                                     3, 1, 1),
               _wgrad_reference(x, grad_out, 3, 1, 1), torch.float32, scale=11.0,
               what=f"{c} channels")


def test_cpu_direct_conv_wgrad_every_instruction_set_and_thread_count(cpu):
    """Every instruction set this CPU runs, one and two threads: close to autograd, and the
    same bits for any thread count (a fixed summation order)."""
    import msdnet_ops._cpu_kernels as module
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(10, 21, 17, 15, generator=gen).contiguous(memory_format=torch.channels_last)
    current, threads = module.current_isa(), torch.get_num_threads()
    try:
        for stride in (1, 2):
            oh, ow = (17 - 1) // stride + 1, (15 - 1) // stride + 1
            grad_out = torch.randn(10, 9, oh, ow, generator=gen).contiguous(
                memory_format=torch.channels_last)
            want = _wgrad_reference(x, grad_out, 3, stride, 1)
            for isa in module.supported_isas():
                module.set_isa(isa)
                results = []
                for t in (1, 2):
                    torch.set_num_threads(t)
                    results.append(cpu.direct_conv_wgrad(x, grad_out, 3, stride, 1))
                    _close(results[-1], want, torch.float32, scale=50.0,
                           what=f"{isa}, {t} threads, stride {stride}")
                assert torch.equal(results[0], results[1]), f"{isa}: depends on the threads"
    finally:
        module.set_isa(current)
        torch.set_num_threads(threads)


def test_cpu_direct_conv_wgrad_refuses_what_it_cannot_compute(cpu):
    x = torch.randn(1, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    g = torch.randn(1, cpu.DIRECT_WGRAD_MAX_OUTPUTS + 1, 4, 4).contiguous(
        memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="direct_wgrad: expected 1 to 64 outputs"):
        cpu.direct_conv_wgrad(x, g, 3, 1, 1)
    with pytest.raises(ValueError, match="g of the convolution's output shape"):
        cpu.direct_conv_wgrad(x, g[:, :4, :3], 3, 1, 1)  # wrong output size
    with pytest.raises(ValueError, match="channels-inner views"):
        cpu.direct_conv_wgrad(x.contiguous(), g[:, :4], 3, 1, 1)  # NCHW input


# ---------------------------------------------------------------------------- direct input gradient
# direct_conv's input gradient, each input pixel gathering the taps that reach it: strides 1
# to 3 (every phase of rows and columns), padding 0 to k-1, 1x1, 3x3 and 5x5, maps smaller
# than the kernel, tiles of one and two channel vectors and a partial last vector (1 to 64
# channels) and a partial last tile, batch 1 (units of rows) and several images, a strided
# gradient (a buffer slice) written into a buffer slice (the channels around it untouched).

@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("n,c,o,h,w,k,stride,pad", [
    (1, 1, 1, 1, 1, 3, 2, 1), (2, 6, 6, 32, 32, 3, 2, 1), (3, 12, 6, 16, 17, 3, 2, 1),
    (1, 5, 3, 7, 5, 3, 1, 0), (2, 7, 13, 9, 11, 3, 3, 1), (2, 4, 24, 6, 19, 5, 2, 2),
    (1, 3, 25, 2, 3, 3, 2, 1), (2, 9, 30, 5, 8, 1, 2, 0), (1, 64, 3, 6, 9, 3, 2, 2),
    (5, 24, 12, 16, 16, 3, 2, 1), (2, 17, 5, 9, 10, 5, 3, 4), (4, 16, 32, 8, 8, 3, 2, 1)])
def test_cpu_direct_conv_dgrad(cpu, dtype, n, c, o, h, w, k, stride, pad):
    gen = torch.Generator().manual_seed(_seed("dgrad", n, c, o, h, w, k, stride, pad))
    weight = torch.randn(o, c, k, k, generator=gen, dtype=dtype)
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    grad_buf = torch.full((n, oh, ow, o + 3), float("nan"), dtype=dtype)
    grad_buf[..., 1:1 + o] = torch.randn(n, oh, ow, o, generator=gen, dtype=dtype)
    grad_out = grad_buf.permute(0, 3, 1, 2)[:, 1:1 + o]
    out_buf = torch.full((n, h, w, c + 7), 7.0, dtype=dtype).permute(0, 3, 1, 2)
    out = out_buf[:, 3:3 + c]
    cpu.direct_conv_dgrad_into(grad_out, weight, stride, pad, out)
    want = torch.ops.aten.convolution_backward(
        grad_out.double(), torch.empty(n, c, h, w, dtype=torch.float64), weight.double(), None,
        [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], 1, [True, False, False])[0]
    _close(out, want, dtype, scale=float(o * k * k) ** 0.5)
    assert (out_buf[:, :3] == 7).all() and (out_buf[:, 3 + c:] == 7).all()


def test_cpu_direct_conv_dgrad_every_instruction_set_and_thread_count(cpu):
    import msdnet_ops._cpu_kernels as module
    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(7, 13, 3, 3, generator=gen)
    grad_out = torch.randn(3, 7, 9, 8, generator=gen).contiguous(memory_format=torch.channels_last)
    want = torch.ops.aten.convolution_backward(
        grad_out.double(), torch.empty(3, 13, 17, 15, dtype=torch.float64), weight.double(),
        None, [2, 2], [1, 1], [1, 1], False, [0, 0], 1, [True, False, False])[0]
    current, threads = module.current_isa(), torch.get_num_threads()
    try:
        for isa in module.supported_isas():
            module.set_isa(isa)
            for t in (1, 2):
                torch.set_num_threads(t)
                out = torch.empty(3, 13, 17, 15).contiguous(memory_format=torch.channels_last)
                cpu.direct_conv_dgrad_into(grad_out, weight, 2, 1, out)
                _close(out, want, torch.float32, scale=8.0, what=f"{isa}, {t} threads")
    finally:
        module.set_isa(current)
        torch.set_num_threads(threads)


def test_cpu_direct_conv_dgrad_refuses_what_it_cannot_compute(cpu):
    w = torch.randn(4, cpu.DIRECT_DGRAD_MAX_CHANNELS + 1, 3, 3)
    g = torch.randn(1, 4, 2, 2).contiguous(memory_format=torch.channels_last)
    out = torch.empty(1, w.shape[1], 4, 4).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="direct_dgrad: expected 1 to 64 input channels"):
        cpu.direct_conv_dgrad_into(g, w, 2, 1, out)
    with pytest.raises(ValueError, match="g of the convolution's output shape"):
        cpu.direct_conv_dgrad_into(g, w[:, :3], 1, 1, out[:, :3])  # stride 1: 4x4 outputs
    with pytest.raises(ValueError, match="padding below the kernel size"):
        cpu.direct_conv_dgrad_into(g, w[:, :3], 2, 3, out[:, :3, :, :])
    with pytest.raises(ValueError, match="channels-inner views"):
        cpu.direct_conv_dgrad_into(g, w[:, :3], 2, 1, out[:, :3].contiguous())  # NCHW output


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,c,mid,o,h,w,k,stride,pad", [
    (1, 5, 6, 6, 11, 13, 3, 1, 1),     # batch 1: blocks of output rows
    (5, 16, 6, 6, 9, 7, 3, 1, 1),      # whole images per unit (two threads)
    (4, 40, 6, 6, 32, 32, 3, 2, 1),    # MSDNet's finest-scale strided path
    (4, 13, 24, 12, 16, 16, 3, 1, 1),  # three vectors of bottleneck lanes
    (3, 3, 1, 64, 5, 6, 3, 1, 0),      # one bottleneck channel, the most outputs
    (6, 9, 32, 5, 7, 5, 5, 3, 2),      # the widest bottleneck, 5x5, stride 3, wide padding
    (2, 7, 9, 3, 4, 4, 1, 1, 0),       # 1x1 after the 1x1
])
def test_cpu_bottleneck_direct_conv(cpu, dtype, n, c, mid, o, h, w, k, stride, pad):
    gen = torch.Generator().manual_seed(_seed("bottleneck", n, c, mid, o, h, w, k, stride, pad))
    x = torch.randn(n, h, w, c + 5, generator=gen, dtype=dtype).permute(0, 3, 1, 2)[:, 2:2 + c]
    w1 = torch.randn(mid, c, 1, 1, generator=gen, dtype=dtype)
    b1 = torch.randn(mid, generator=gen, dtype=dtype)
    weight = torch.randn(o, mid, k, k, generator=gen, dtype=dtype)
    bias = torch.randn(o, generator=gen, dtype=dtype)
    x[0, c // 2, h // 2, w // 2] = float("nan")  # kept by both ReLUs, as torch.relu keeps it
    mid_plain = torch.relu(F.conv2d(x.double(), w1.double(), b1.double()))
    plain = F.conv2d(mid_plain, weight.double(), None, stride, pad)
    oh, ow = plain.shape[2:]
    out_buf = torch.full((n, oh, ow, o + 7), 7.0, dtype=dtype).permute(0, 3, 1, 2)
    out = out_buf[:, 3:3 + o]
    for b, relu in ((None, False), (bias, True)):
        cpu.bottleneck_direct_conv_into(x, w1, b1, weight, b, stride, pad, relu, out)
        want = plain + (0 if b is None else b.double().view(1, -1, 1, 1))
        want = torch.relu(want) if relu else want
        assert out.isnan().equal(want.isnan())
        _close(torch.nan_to_num(out, 0.0), torch.nan_to_num(want, 0.0), dtype,
               scale=float(c * mid * k * k), what=f"relu={relu}")
        assert (out_buf[:, :3] == 7).all() and (out_buf[:, 3 + o:] == 7).all()


def test_cpu_bottleneck_direct_conv_refuses_what_it_cannot_compute(cpu):
    x = torch.randn(1, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    w1, b1 = torch.randn(cpu.BOTTLENECK_MAX_MID + 1, 3, 1, 1), torch.randn(33)
    w = torch.randn(4, w1.shape[0], 3, 3)
    out = torch.empty(1, 4, 4, 4).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="bottleneck_direct_conv: expected 1 to 64 outputs, 1 to "
                                         "32 bottleneck channels"):
        cpu.bottleneck_direct_conv_into(x, w1, b1, w, None, 1, 1, False, out)
    with pytest.raises(ValueError, match="y of the convolution's shape"):
        cpu.bottleneck_direct_conv_into(x, w1[:4], b1[:4], w[:, :4], None, 1, 1, False,
                                        out[:, :, :3])


def test_cpu_rejects_half_precision(cpu):
    with pytest.raises(TypeError, match="float32 and float64"):
        cpu.channel_stats(torch.randn(2, 3, 4, 4).half(), 1e-5)


# ---------------------------------------------------------------------------- shared host-device helpers

def test_fastdivmod_matches_python_division(cpu):
    import msdnet_ops._cpu_kernels as module

    rng = random.Random(0)
    divisors = [1, 2, 3, 5, 7, 49, 784, 3136, 12544, 2**16 + 1, 2**31 - 1, 2**31, 2**32 - 1]
    divisors += [rng.randrange(1, 2**32) for _ in range(20)]
    xs = [0, 1, 2**31 - 1, 2**31, 2**32 - 1] + [rng.randrange(0, 2**32) for _ in range(200)]
    for d in divisors:
        got = module._fastdivmod(d, xs)
        assert got == [divmod(x, d) for x in xs], d


def test_pixel_indexer(cpu):
    import msdnet_ops._cpu_kernels as module

    for h, w in ((1, 1), (7, 5), (1, 784), (56, 56), (3, 1)):
        qs = list(range(0, 4 * h * w, max(1, h * w // 7))) + [4 * h * w - 1]
        got = module._pixel_index(h, w, qs)
        assert got == [[q // (h * w), (q % (h * w)) // w, q % w] for q in qs]


@pytest.mark.parametrize("split", [0, 1, 5, 17, 40])
def test_welford_chan_merge(cpu, split):
    import msdnet_ops._cpu_kernels as module

    gen = torch.Generator().manual_seed(split)
    values = (torch.randn(40, dtype=torch.float64, generator=gen) * 3 + 100).tolist()
    f32, f64 = module._welford(values, split)
    t = torch.tensor(values, dtype=torch.float64)
    var, mean = torch.var_mean(t, correction=0)
    assert f64[0] == 40 and f32[0] == 40
    assert abs(f64[1] - mean.item()) < 1e-12 and abs(f64[2] / 40 - var.item()) < 1e-10
    assert abs(f32[1] - mean.item()) < 1e-4 and abs(f32[2] / 40 - var.item()) < 1e-3 * var.item()


# ============================================================================ CUDA

@pytest.mark.skipif(os.environ.get("MSDNET_OPS_EXPECT_CUDA", "0") != "1",
                    reason="MSDNET_OPS_EXPECT_CUDA=1 not set (CI sets it where nvcc is present)")
def test_cuda_module_was_built():
    assert cuda_kernels.available(), cuda_kernels.load_error()
    import msdnet_ops._cuda_kernels as module

    assert "built for sm" in module.runtime_description()
    assert module.device_count() >= 0  # never raises, even without a driver


CUDA_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def cuda():
    assert cuda_kernels.available(), cuda_kernels.load_error()
    return cuda_kernels


@needs_cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("shape,layout", CASES)
def test_cuda_kernels(cuda, shape, layout, dtype):
    dev = "cuda"
    gen = torch.Generator().manual_seed(_seed(shape, layout, "cuda"))
    c = shape[1]
    n = shape[0] * shape[2] * shape[3]
    x = make_features(shape, layout, dtype, device=dev, offset=2.0, gen=gen)
    xd = x.double().cpu()
    # channel_stats
    if n >= 2:
        mean, invstd = cuda.channel_stats(x, 1e-5)
        rmean, rinvstd = ref.channel_stats(xd, 1e-5)
        _close(mean, rmean, torch.float64 if dtype == torch.float64 else torch.float32, what="mean")
        _close(invstd, rinvstd, torch.float64 if dtype == torch.float64 else torch.float32,
               scale=float(rinvstd.abs().max()), what="invstd")
    s, b = _vec(c, dtype, dev, gen), _strided_vec(c, dtype, dev, gen)
    # affine_relu into a slice of a buffer
    for cl in (False, True):
        out = SlicedOutput(shape, dtype, dev, channels_last=cl)
        cuda.affine_relu_into(x, s, b, out.view)
        _close(out.view, ref.affine_relu(xd, s.double().cpu(), b.double().cpu()), dtype,
               scale=4.0, what="z")
        out.check_neighbours()
    # affine_relu_backward_
    gz = make_features(shape, "channels_last", dtype, device=dev, gen=gen)
    init = torch.randn(shape, dtype=torch.float64, generator=gen).to(dtype)
    gx = SlicedOutput(shape, dtype, dev, init=init.to(dev))
    gs, gh = _vec(c, dtype, dev, gen), _strided_vec(c, dtype, dev, gen)
    e = (init.double(), gs.double().cpu().clone(), gh.double().cpu().clone())
    ref.affine_relu_backward_(xd, s.double().cpu(), b.double().cpu(), gz.double().cpu(), *e)
    cuda.affine_relu_backward_(x, s, b, gz, gx.view, gs, gh)
    sd = torch.float64 if dtype == torch.float64 else torch.float32
    _close(gx.view, e[0], dtype, scale=8.0, what="grad_x")
    _close(gs, e[1], sd, scale=4.0 * n ** 0.5, what="grad_scale")
    _close(gh, e[2], sd, scale=2.0 * n ** 0.5, what="grad_shift")
    gx.check_neighbours()
    # channel_stats_backward_
    m, i = _vec(c, dtype, dev, gen), _vec(c, dtype, dev, gen, lo=0.5)
    gm, gi = _strided_vec(c, dtype, dev, gen), _vec(c, dtype, dev, gen)
    g = SlicedOutput(shape, dtype, dev, channels_last=True, init=init.to(dev))
    expected = init.double()
    ref.channel_stats_backward_(xd, m.double().cpu(), i.double().cpu(), gm.double().cpu(),
                                gi.double().cpu(), expected)
    cuda.channel_stats_backward_(x, m, i, gm, gi, g.view)
    _close(g.view, expected, dtype, scale=8.0, what="stats grad_x")
    g.check_neighbours()
    # gather_batch
    idx = torch.tensor([shape[0] - 1, 0, shape[0] - 1], device=dev)
    out = SlicedOutput((3,) + shape[1:], dtype, dev)
    cuda.gather_batch_into(x, idx, out.view)
    assert torch.equal(out.view, ref.gather_batch(x, idx))
    out.check_neighbours()
    torch.cuda.synchronize()


@needs_cuda
def test_cuda_reductions_are_deterministic(cuda):
    x = torch.randn(8, 64, 56, 56, device="cuda")[:, 5:50]
    gz = torch.randn_like(x)
    s, b = torch.randn(45, device="cuda"), torch.randn(45, device="cuda")
    runs = []
    for _ in range(3):
        gx, gs, gh = torch.zeros_like(x), torch.zeros(45, device="cuda"), torch.zeros(45, device="cuda")
        cuda.affine_relu_backward_(x, s, b, gz, gx, gs, gh)
        runs.append(cuda.channel_stats(x, 1e-5) + (gs, gh))
    for other in runs[1:]:
        for a, b_ in zip(runs[0], other):
            assert torch.equal(a, b_)


@needs_cuda
def test_cuda_runs_on_the_current_stream(cuda):
    x = torch.randn(4, 16, 32, 32, device="cuda")
    s, b = torch.randn(16, device="cuda"), torch.randn(16, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = torch.empty_like(x)
        cuda.affine_relu_into(x, s, b, out)
    stream.synchronize()
    torch.testing.assert_close(out, ref.affine_relu(x, s, b))
