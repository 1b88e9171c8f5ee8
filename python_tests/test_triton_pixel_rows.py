"""The pixel-row (NHWC) paths of the Triton element-wise kernels (``msdnet_ops.triton.pixel_rows``):
which tensors they take, that NHWC views reach them (and NCHW ones the plane kernels), and
their results against ``msdnet_ops.reference`` on channel prefixes and slices of NHWC buffers,
odd sizes spanning several tiles both ways. Runs in Triton's interpreter on the CPU."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
from conftest import interpreter_only  # noqa: E402

from msdnet_ops import reference as R  # noqa: E402
from msdnet_ops import triton as T  # noqa: E402
from msdnet_ops.triton import _runtime, pixel_rows  # noqa: E402

SENTINEL = 123.0


def nhwc(N, C, H, W, dtype, gen, lo=0, extra=3, fill=None):
    """``buf[:, lo:lo+C]`` of an NHWC buffer of ``lo + C + extra`` channels (random or filled)."""
    shape = (N, H, W, lo + C + extra)
    buf = torch.full(shape, fill, dtype=torch.float64) if fill is not None else \
        torch.randn(shape, dtype=torch.float64, generator=gen)
    buf = buf.to(dtype).permute(0, 3, 1, 2)
    return buf, buf[:, lo:lo + C]


def test_row_stride_takes_equally_spaced_pixel_rows_with_unit_channels():
    x = torch.empty(2, 13, 5, 7, memory_format=torch.channels_last)
    assert pixel_rows.row_stride(x) == 13
    assert pixel_rows.row_stride(x[:, 3:9]) == 13                        # a channel slice
    assert pixel_rows.row_stride(torch.empty(2, 13, 5, 7)) is None      # NCHW: channels strided
    assert pixel_rows.row_stride(x[:, :, :, 1:]) is None                 # a column cropped
    assert pixel_rows.row_stride(x[:, :, ::2]) is None                   # every other row
    assert pixel_rows.row_stride(torch.empty(3, 1, 4, 4)) == 1           # one channel: any layout
    assert pixel_rows.row_stride(torch.empty(3, 6, 1, 1)) == 6           # 1x1 maps
    assert pixel_rows.row_stride(x[:1, :, 2:3, 4:5]) == 13               # one pixel
    overlapping = torch.empty(64).as_strided((2, 6, 2, 2), (16, 1, 8, 4))  # rows 4 apart, 6 wide
    assert pixel_rows.row_stride(overlapping) is None


def _launched(monkeypatch):
    names = []
    real = _runtime.launch

    def launch(kernel, *args, **kwargs):
        names.append(getattr(kernel, "fn", kernel).__name__)
        return real(kernel, *args, **kwargs)
    monkeypatch.setattr(_runtime, "launch", launch)
    return names


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_affine_relu_on_nhwc_rows(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    N, C, H, W = 3, 19, 5, 7   # 105 rows: 14 row tiles of 8; 19 channels: 3 channel tiles of 8
    _, x = nhwc(N, C, H, W, dtype, gen)
    sdt = R.stats_dtype(dtype)
    scale = torch.randn(C, dtype=torch.float64, generator=gen).to(sdt)
    shift = torch.randn(C, dtype=torch.float64, generator=gen).to(sdt)
    obuf, out = nhwc(N, C, H, W, dtype, gen, lo=2, fill=SENTINEL)
    launched = _launched(monkeypatch)
    T.affine_relu_into(x, scale, shift, out)
    assert launched == ["_affine_relu_rows_kernel"]
    torch.testing.assert_close(out, R.affine_relu(x, scale, shift), rtol=0, atol=0)
    assert (obuf[:, :2] == SENTINEL).all() and (obuf[:, 2 + C:] == SENTINEL).all(), "wrote outside out"
    launched.clear()
    T.affine_relu_into(x.contiguous(), scale, shift, torch.empty(x.shape, dtype=dtype))  # NCHW
    assert launched == ["_affine_relu_kernel"]


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("grads", ["both", "mean", "invstd"])
def test_finalize_on_nhwc_rows(dtype, grads, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    N, C, H, W = 2, 11, 7, 5
    _, x = nhwc(N, C, H, W, dtype, gen, extra=5)
    mean, invstd = R.channel_stats(x, 1e-5)
    sdt = R.stats_dtype(dtype)
    gm = torch.randn(C, dtype=torch.float64, generator=gen).to(sdt) if grads != "invstd" else None
    gi = torch.randn(C, dtype=torch.float64, generator=gen).to(sdt) if grads != "mean" else None
    gbuf, gx = nhwc(N, C, H, W, dtype, gen, lo=1)     # accumulated into
    gbuf0, ref = gbuf.clone(), gx.clone()
    launched = _launched(monkeypatch)
    T.channel_stats_backward_(x, mean, invstd, gm, gi, gx)
    assert launched == ["_channel_stats_backward_rows_kernel"]
    zero = torch.zeros(C, dtype=sdt)  # the reference takes no None
    R.channel_stats_backward_(x, mean, invstd, zero if gm is None else gm, zero if gi is None else gi, ref)
    tol = {torch.float16: 2e-3}.get(dtype, 1e-6 if dtype == torch.float32 else 1e-12)
    torch.testing.assert_close(gx, ref, rtol=tol, atol=tol)
    assert torch.equal(gbuf[:, :1], gbuf0[:, :1]) and torch.equal(gbuf[:, 1 + C:], gbuf0[:, 1 + C:])


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 19, 2, 3), (3, 19, 5, 7)], ids=["one-chunk", "two-chunks"])
def test_channel_stats_on_nhwc_rows(shape, dtype, monkeypatch):
    """Tiles merged with Chan's formula, chunks merged by the plane path's merge kernel; a
    large common offset (the one-pass E[x^2]-E[x]^2 would lose it in float32)."""
    gen = torch.Generator().manual_seed(2)
    N, C, H, W = shape
    buf, x = nhwc(N, C, H, W, torch.float64, gen, lo=1)
    x = (x * 0.5 + 100.0).to(dtype)
    launched = _launched(monkeypatch)
    mean, invstd = T.channel_stats(x, 1e-5)
    assert launched[0] == "_channel_stats_rows_kernel"
    assert launched[1:] == ([] if N == 1 else ["_channel_stats_merge_kernel"])
    rm, ri = R.channel_stats(x.double(), 1e-5)
    assert mean.dtype == R.stats_dtype(dtype)
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(mean.double(), rm, rtol=tol, atol=0)
    torch.testing.assert_close(invstd.double(), ri, rtol=tol, atol=0)


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_batch_on_nhwc_rows(dtype, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    N, C, H, W = 5, 13, 3, 7   # 21 pixels: 3 pixel tiles of 8; 13 channels: 2 channel tiles
    _, src = nhwc(N, C, H, W, dtype, gen, lo=2)
    index = torch.tensor([4, 0, 2, 2], dtype=torch.int64)
    obuf, out = nhwc(4, C, H, W, dtype, gen, lo=1, fill=SENTINEL)
    launched = _launched(monkeypatch)
    T.gather_batch_into(src, index, out)
    assert launched == ["_gather_batch_rows_kernel"]
    torch.testing.assert_close(out, R.gather_batch(src, index), rtol=0, atol=0)
    assert (obuf[:, :1] == SENTINEL).all() and (obuf[:, 1 + C:] == SENTINEL).all(), "wrote outside out"


@interpreter_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", ["accumulate", "write", "no-grad_x"])
def test_affine_relu_backward_on_nhwc_rows(dtype, form, monkeypatch):
    """grad_x accumulated into, written (its old values never read: NaN there) or skipped;
    grad_scale/grad_shift accumulated (chunk sums added atomically) onto non-zero values."""
    gen = torch.Generator().manual_seed(4)
    N, C, H, W = 3, 11, 5, 7   # 105 rows: 2 chunks of 8-row tiles; 11 channels: 2 tiles
    sdt = R.stats_dtype(dtype)
    _, x = nhwc(N, C, H, W, dtype, gen)
    scale = torch.randn(C, dtype=torch.float64, generator=gen).to(sdt)
    shift = torch.randn(C, dtype=torch.float64, generator=gen).to(sdt)
    x[:, 0, :2] = 0.0
    shift[0] = 0.0  # pre-activation exactly 0: derivative 0
    _, grad_z = nhwc(N, C, H, W, dtype, gen, lo=1)
    gbuf, gx = nhwc(N, C, H, W, dtype, gen, lo=2)
    if form == "write":
        gx.fill_(float("nan"))
    gbuf0 = gbuf.clone()
    gs = torch.randn(C, dtype=torch.float64, generator=gen).to(sdt)
    gh = torch.randn(C, dtype=torch.float64, generator=gen).to(sdt)
    d = torch.float64
    rx = torch.zeros(x.shape, dtype=d) if form == "write" else gx.to(d).clone()
    rs, rh = gs.to(d).clone(), gh.to(d).clone()
    R.affine_relu_backward_(x.to(d), scale.to(d), shift.to(d), grad_z.to(d), rx, rs, rh)
    launched = _launched(monkeypatch)
    T.affine_relu_backward_(x, scale, shift, grad_z, None if form == "no-grad_x" else gx, gs, gh,
                            accumulate=form != "write")
    assert launched == ["_affine_relu_backward_rows_kernel"]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    if form == "no-grad_x":
        assert torch.equal(gbuf, gbuf0)
    else:
        torch.testing.assert_close(gx.to(d), rx, rtol=tol, atol=tol)
        assert torch.equal(gbuf[:, :2], gbuf0[:, :2]) and torch.equal(gbuf[:, 2 + C:], gbuf0[:, 2 + C:])
    torch.testing.assert_close((gs.to(d), gh.to(d)), (rs, rh), rtol=tol, atol=tol)
