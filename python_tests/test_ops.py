"""The custom ops: opcheck, gradcheck in float64, parity with the references, bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from conftest import backend_params, require_float64
from msdnet_ops import ops, reference

F64 = torch.float64


def _buffer_prefix(n, c, h, w, cap_extra=3, dtype=F64, device="cpu"):
    """A channel-prefix view of a bigger buffer: non-contiguous, as the kernels see it."""
    buf = torch.randn(n, c + cap_extra, h, w, dtype=dtype, device=device)
    return buf, buf[:, :c]


def _vec(c, dtype=F64, device="cpu", lo=-1.0, hi=1.0):
    return torch.empty(c, dtype=dtype, device=device).uniform_(lo, hi)


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck_every_op(backend, use_backend):
    dev = use_backend(backend)
    require_float64(backend, dev)
    torch.manual_seed(0)
    _, x = _buffer_prefix(3, 5, 7, 5, device=dev)
    scale, shift = _vec(5, device=dev, lo=0.5, hi=1.5), _vec(5, device=dev)
    w1 = torch.randn(4, 5, 1, 1, dtype=F64, device=dev)
    w3 = torch.randn(4, 5, 3, 3, dtype=F64, device=dev)
    for t in (x, scale, shift, w1, w3):
        t.requires_grad_(t.is_leaf)
    xl = x.detach().clone().requires_grad_()
    torch.library.opcheck(ops.channel_stats, (xl, 1e-5))
    torch.library.opcheck(ops.affine_relu, (xl, scale, shift))
    torch.library.opcheck(ops.transform_conv, (xl, scale, shift, w3, 2, 1, 1))
    torch.library.opcheck(ops.transform_conv, (xl, scale, shift, w1, 1, 0, 2))
    mean, invstd = reference.channel_stats(x.detach(), 1e-5)
    xd = x.detach()
    gx = torch.zeros_like(xd)
    torch.library.opcheck(ops.channel_stats_backward_, (xd, mean, invstd, _vec(5, device=dev),
                                                        _vec(5, device=dev), gx))
    out = torch.empty(3, 4, 4, 3, dtype=F64, device=dev)
    torch.library.opcheck(ops.transform_conv_into_, (xd, scale.detach(), shift.detach(),
                                                     w3.detach(), 2, 1, 1, out))
    torch.library.opcheck(ops.transform_conv_backward_, (
        torch.randn(3, 4, 4, 3, dtype=F64, device=dev), xd, scale.detach(), shift.detach(),
        w3.detach(), 2, 1, 1, torch.zeros_like(xd), torch.zeros(5, dtype=F64, device=dev),
        torch.zeros(5, dtype=F64, device=dev)))
    torch.library.opcheck(ops.affine_relu_backward_, (
        xd, scale.detach(), shift.detach(), torch.randn_like(xd), torch.zeros_like(xd),
        torch.zeros(5, dtype=F64, device=dev), torch.zeros(5, dtype=F64, device=dev)))
    torch.library.opcheck(ops.gather_batch, (xd, torch.tensor([2, 0], device=dev)))
    stats = torch.zeros(2, 7, dtype=F64, device=dev)
    torch.library.opcheck(ops.channel_stats_into_, (xd, 1e-5, stats[0, 1:6], stats[1, 2:7]))
    w, b = _vec(5, device=dev).requires_grad_(), _vec(5, device=dev).requires_grad_()
    for weight, bias in ((w, b), (w, None), (None, None)):
        torch.library.opcheck(ops.bn_scale_shift, (mean.clone().requires_grad_(),
                                                   invstd.clone().requires_grad_(), weight, bias))
        grad = torch.randn(2, 5, dtype=F64, device=dev)
        torch.library.opcheck(ops.bn_scale_shift_backward_, (
            grad, mean, invstd, None if weight is None else weight.detach(),
            _vec(5, device=dev), _vec(5, device=dev)))
        torch.library.opcheck(ops.bn_scale_shift_backward_, (grad, mean, invstd, None, None, None))
        # (mean, invstd), (scale, shift) as the forward writes them, and an output: opcheck
        # may run each op on copies, so the backward must not depend on the forward's writes
        bn_rows = [torch.stack([mean, invstd]), torch.stack([scale, shift]).detach(),
                   torch.empty(2, 5, dtype=F64, device=dev)]
        wd, bd = (None if v is None else v.detach() for v in (weight, bias))
        torch.library.opcheck(ops.batchnorm_relu_into_, (xd, 1e-5, wd, bd, bn_rows[0],
                                                         bn_rows[1], torch.empty_like(xd)))
        torch.library.opcheck(ops.batchnorm_relu_backward_, (
            xd, torch.randn_like(xd), bn_rows[0], bn_rows[1], wd, torch.empty_like(xd),
            bn_rows[2]))
        conv_weight = torch.randn(3, 5, 1, 1, dtype=F64, device=dev)
        torch.library.opcheck(ops.batchnorm_relu_conv_backward_, (
            torch.randn(xd.shape[0], 3, *xd.shape[2:], dtype=F64, device=dev), xd, bn_rows[0],
            bn_rows[1], wd, conv_weight, 1, 0, torch.empty_like(xd), bn_rows[2]))


CONV_GEOMETRIES = [(1, 1, 1), (3, 1, 1), (3, 2, 1), (1, 2, 1), (1, 1, 2)]
# Finite differences launch the interpreted Triton kernels hundreds of times (a 3x3 case takes
# minutes), so Triton gets the 1x1 geometries here; its 3x3 backward is compared with the
# reference in test_triton_kernels.py.
GRADCHECK_CASES = [pytest.param(p.values[0], *g, marks=p.marks) if hasattr(p, "values") else (p, *g)
                   for p in backend_params() for g in CONV_GEOMETRIES
                   if g[0] == 1 or getattr(p, "values", (p,))[0] != "triton"]


@pytest.mark.parametrize("backend,k,stride,pool", GRADCHECK_CASES)
def test_gradcheck_transform_conv(backend, use_backend, k, stride, pool):
    dev = use_backend(backend)
    require_float64(backend, dev)
    torch.manual_seed(k * 10 + stride + pool)
    _, x = _buffer_prefix(2, 3, 5, 7, device=dev)
    x = x.detach().requires_grad_()
    scale = _vec(3, device=dev, lo=0.5, hi=1.5).requires_grad_()
    shift = _vec(3, device=dev, lo=-0.2, hi=0.2).requires_grad_()
    w = torch.randn(2, 3, k, k, dtype=F64, device=dev, requires_grad=True)
    pad = (k - 1) // 2
    assert gradcheck(lambda *a: ops.transform_conv(*a, stride, pad, pool), (x, scale, shift, w))


@pytest.mark.parametrize("backend", backend_params())
def test_gradcheck_stats_and_affine(backend, use_backend):
    dev = use_backend(backend)
    require_float64(backend, dev)
    torch.manual_seed(1)
    x = torch.randn(3, 5, 2, 3, dtype=F64, device=dev)[:, 1:4].detach().requires_grad_()
    assert gradcheck(lambda a: ops.channel_stats(a, 1e-5), (x,))
    scale = _vec(3, device=dev).requires_grad_()
    shift = _vec(3, device=dev).requires_grad_()
    assert gradcheck(ops.affine_relu, (x, scale, shift))
    mean = _vec(3, device=dev).requires_grad_()
    invstd = _vec(3, device=dev, lo=0.5, hi=2.0).requires_grad_()
    assert gradcheck(ops.bn_scale_shift, (mean, invstd, scale, shift))
    assert gradcheck(lambda m, i: ops.bn_scale_shift(m, i, None, None), (mean, invstd))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_channel_stats_into_writes_slices_of_a_buffers_statistics(backend, use_backend, dtype):
    """The statistics written into slices of longer vectors (a dense layer's channels of its
    buffer's statistics) are ``reference.channel_stats``'s, the values around them untouched."""
    dev = use_backend(backend)
    if dtype == F64:
        require_float64(backend, dev)
    torch.manual_seed(5)
    _, x = _buffer_prefix(3, 5, 5, 3, dtype=dtype, device=dev)
    sdt = reference.stats_dtype(dtype)
    mean, invstd = torch.full((9,), 7.0, dtype=sdt, device=dev), torch.full((9,), 7.0, dtype=sdt, device=dev)
    ops.channel_stats_into_(x, 1e-5, mean[2:7], invstd[4:9])
    want_mean, want_invstd = reference.channel_stats(x.cpu().to(F64), 1e-5)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean[2:7].cpu().to(F64), want_mean, **tol)
    torch.testing.assert_close(invstd[4:9].cpu().to(F64), want_invstd, **tol)
    assert (mean[:2] == 7).all() and (mean[7:] == 7).all() and (invstd[:4] == 7).all()


def _strided_vec(c, dtype, dev, lo=-1.0, hi=1.0):
    """Every other value of a longer vector: per-channel vectors read through their stride."""
    return torch.empty(2 * c, dtype=dtype, device=dev).uniform_(lo, hi)[::2]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("params", ["weight+bias", "weight", "none"])
def test_bn_scale_shift_is_batchnorms_transform_and_its_gradient(backend, use_backend, dtype,
                                                                  params):
    """``scale*x + shift`` is ``F.batch_norm`` with the same statistics and parameters; the
    backward's gradients (weight returned, statistics accumulated onto what was there) are
    autograd's of the plain formula. 67 channels: more than one Triton block in the
    interpreter; strided vectors."""
    dev = use_backend(backend)
    if dtype == F64:
        require_float64(backend, dev)
    torch.manual_seed(3)
    c, eps = 67, 1e-5
    mean = _strided_vec(c, dtype, dev)
    var = _strided_vec(c, dtype, dev, 0.2, 3.0)
    invstd = torch.rsqrt(var + eps)
    weight = _strided_vec(c, dtype, dev) if params != "none" else None
    bias = _strided_vec(c, dtype, dev) if params == "weight+bias" else None
    got = ops.bn_scale_shift(mean, invstd, weight, bias)
    x = torch.randn(2, c, 3, 2, dtype=dtype, device=dev)
    want = F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(x * got[0].view(1, -1, 1, 1) + got[1].view(1, -1, 1, 1), want,
                               **tol)

    leaves = [t.detach().clone().requires_grad_() for t in (mean, invstd)]
    w_leaf = torch.ones(c, dtype=dtype, device=dev) if weight is None else weight.detach().clone()
    w_leaf.requires_grad_()
    scale = w_leaf * leaves[1]
    shift = -leaves[0] * scale + (0 if bias is None else bias)
    grad = torch.randn(2, c, dtype=dtype, device=dev)
    want_mean, want_invstd, want_weight = torch.autograd.grad(
        (scale * grad[0]).sum() + (shift * grad[1]).sum(), leaves + [w_leaf])
    before_mean, before_invstd = _strided_vec(c, dtype, dev), _strided_vec(c, dtype, dev)
    grad_mean, grad_invstd = before_mean.clone(), before_invstd.clone()
    grad_weight = ops.bn_scale_shift_backward_(grad, mean, invstd, weight, grad_mean, grad_invstd)
    torch.testing.assert_close(grad_weight, want_weight, **tol)
    torch.testing.assert_close(grad_mean - before_mean, want_mean, **tol)
    torch.testing.assert_close(grad_invstd - before_invstd, want_invstd, **tol)
    again = ops.bn_scale_shift_backward_(grad, mean, invstd, weight, None, None)
    torch.testing.assert_close(again, want_weight, **tol)
    written = torch.full((2, c), float("nan"), dtype=dtype, device=dev)  # never read
    ops.bn_scale_shift_backward_(grad, mean, invstd, weight, written[0], written[1], False)
    torch.testing.assert_close(written[0], want_mean, **tol)
    torch.testing.assert_close(written[1], want_invstd, **tol)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("params,layout", [("weight+bias", "nchw"), ("weight", "nchw"),
                                           ("none", "nchw"), ("weight+bias", "nhwc"),
                                           ("none", "nhwc")])
def test_batchnorm_relu_is_batchnorm_then_relu_and_its_gradient(backend, use_backend, dtype,
                                                                 params, layout):
    """``batchnorm_relu_into_`` writes ``relu(F.batch_norm(y))`` (training mode) into a channel
    slice of another buffer, with ``y``'s batch statistics and the BatchNorm's (scale, shift);
    its backward writes autograd's gradients of that (input, weight, bias) over NaN-filled
    outputs (never read). ``y``: a channel slice of a buffer, odd sizes; a zero and a tiny
    weight (the ReLU cut where scale is 0) included. NHWC buffers (the models' layout) are
    where the Triton backend computes (scale, shift) inside its BatchNorm+ReLU kernel; NCHW
    ones take its composed path."""
    dev = use_backend(backend)
    if dtype == F64:
        require_float64(backend, dev)
    torch.manual_seed(5)
    n, c, h, w, eps = 3, 7, 5, 3, 1e-5
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    y = torch.randn(n, c + 4, h, w, dtype=dtype, device=dev).contiguous(
        memory_format=fmt)[:, 2:2 + c]
    weight = _vec(c, dtype, dev, 0.5, 1.5) if params != "none" else None
    if weight is not None:
        weight[1], weight[2] = 0.0, 1e-30
    bias = _vec(c, dtype, dev) if params == "weight+bias" else None
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (y, weight, bias)]
    want = torch.relu(F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True, 0.0, eps))
    sdt = reference.stats_dtype(dtype)
    stats, rows = (torch.full((2, c), float("nan"), dtype=sdt, device=dev) for _ in range(2))
    out_buf = torch.full((n, c + 3, h, w), 7.0, dtype=dtype, device=dev).contiguous(
        memory_format=fmt)
    ops.batchnorm_relu_into_(y, eps, weight, bias, stats, rows, out_buf[:, 1:1 + c])
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(out_buf[:, 1:1 + c], want.detach(), **tol)
    assert (out_buf[:, 0] == 7).all() and (out_buf[:, 1 + c:] == 7).all()
    var, mean = torch.var_mean(y.to(sdt), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(stats[0], mean, **tol)
    torch.testing.assert_close(stats[1], torch.rsqrt(var + eps), **tol)
    # the BatchNorm's transform, for the backward: F.batch_norm's affine part
    scale = torch.rsqrt(var + eps) * (1 if weight is None else weight.to(sdt))
    torch.testing.assert_close(rows[0], scale, **tol)
    torch.testing.assert_close(rows[1], (0 if bias is None else bias.to(sdt)) - mean * scale,
                               **tol)

    grad_z = torch.randn_like(want)
    wanted = torch.autograd.grad(want, [t for t in leaves if t is not None], grad_z)
    grad_y = torch.full_like(y, float("nan"))
    grad_params = torch.full((2, c), float("nan"), dtype=sdt, device=dev)
    ops.batchnorm_relu_backward_(y, grad_z, stats, rows, weight, grad_y, grad_params)
    torch.testing.assert_close(grad_y, wanted[0], **tol)
    if weight is not None:
        torch.testing.assert_close(grad_params[0], wanted[1], **tol)
    if bias is not None:
        torch.testing.assert_close(grad_params[1], wanted[2], **tol)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("params,stride", [("weight+bias", 1), ("weight", 2), ("none", 1)])
def test_batchnorm_relu_conv_backward_is_the_gradient_through_batchnorm_relu(
        backend, use_backend, dtype, params, stride):
    """``batchnorm_relu_conv_backward_`` gives autograd's gradients of
    ``conv2d(relu(F.batch_norm(y)), W)`` (training mode) w.r.t. ``y``, the BatchNorm's weight
    and bias and ``W``, written over NaN-filled outputs (never read); ``y`` channels_last
    (a bottleneck's output), odd sizes, a zero and a tiny BatchNorm weight."""
    dev = use_backend(backend)
    if dtype == F64:
        require_float64(backend, dev)
    torch.manual_seed(6)
    n, c, h, w, c_out, eps = 2, 5, 5, 3, 3, 1e-5
    y = torch.randn(n, c, h, w, dtype=dtype, device=dev).contiguous(
        memory_format=torch.channels_last)
    weight = _vec(c, dtype, dev, 0.5, 1.5) if params != "none" else None
    if weight is not None:
        weight[1], weight[2] = 0.0, 1e-30
    bias = _vec(c, dtype, dev) if params == "weight+bias" else None
    conv_weight = torch.randn(c_out, c, 3, 3, dtype=dtype, device=dev).contiguous(
        memory_format=torch.channels_last)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (y, conv_weight, weight, bias)]
    z = torch.relu(F.batch_norm(leaves[0], None, None, leaves[2], leaves[3], True, 0.0, eps))
    want = F.conv2d(z, leaves[1], None, stride, 1)
    grad_out = torch.randn_like(want)
    wanted = torch.autograd.grad(want, [t for t in leaves if t is not None], grad_out)

    sdt = reference.stats_dtype(dtype)
    stats, rows = (torch.empty((2, c), dtype=sdt, device=dev) for _ in range(2))
    ops.batchnorm_relu_into_(y, eps, weight, bias, stats, rows, torch.empty_like(y))
    grad_y = torch.full_like(y, float("nan"))
    grad_params = torch.full((2, c), float("nan"), dtype=sdt, device=dev)
    grad_conv_weight = ops.batchnorm_relu_conv_backward_(grad_out, y, stats, rows, weight,
                                                         conv_weight, stride, 1, grad_y,
                                                         grad_params)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else {}
    torch.testing.assert_close(grad_y, wanted[0], **tol)
    torch.testing.assert_close(grad_conv_weight, wanted[1], **tol)
    if weight is not None:
        torch.testing.assert_close(grad_params[0], wanted[2], **tol)
    if bias is not None:
        torch.testing.assert_close(grad_params[1], wanted[3], **tol)


def test_batchnorm_relu_ops_refuse_bad_rows():
    """The [2, C] rows must be dense, of the statistics' dtype, one column per channel."""
    y = torch.randn(2, 5, 3, 3)
    good = torch.empty(2, 5)
    out = torch.empty_like(y)
    with pytest.raises(ValueError, match=r"stats: expected a dense \[2, 5\] torch.float32"):
        ops.batchnorm_relu_into_(y, 1e-5, None, None, torch.empty(2, 4), good, out)
    with pytest.raises(ValueError, match="rows: expected a dense"):
        ops.batchnorm_relu_into_(y, 1e-5, None, None, good, torch.empty(5, 2).t(), out)
    with pytest.raises(ValueError, match="grad_params: expected a dense"):
        ops.batchnorm_relu_backward_(y, torch.randn_like(y), good, good.clone(), None,
                                     torch.empty_like(y), torch.empty(2, 5, dtype=F64))
    with pytest.raises(ValueError, match="eps: expected a positive number"):
        ops.batchnorm_relu_into_(y, 0.0, None, None, good, good.clone(), out)


def test_batchnorm_relu_conv_backward_names_its_bad_arguments():
    y, rows = torch.randn(2, 5, 4, 4), torch.empty(2, 5)
    conv_weight = torch.randn(3, 5, 3, 3)

    def call(**bad):
        args = dict(grad_out=torch.randn(2, 3, 4, 4), y=y, stats=rows, rows=rows.clone(),
                    weight=None, conv_weight=conv_weight, stride=1, padding=1,
                    grad_y=torch.empty_like(y), grad_params=rows.clone())
        args.update(bad)
        ops.batchnorm_relu_conv_backward_(*args.values())
    with pytest.raises(ValueError, match=r"conv_weight: expected 5 input channels \(those of y\)"):
        call(conv_weight=torch.randn(3, 4, 3, 3))
    with pytest.raises(ValueError, match=r"grad_out: expected shape \(2, 3, 2, 2\)"):
        call(stride=2)
    with pytest.raises(ValueError, match="grad_y: shares memory with y"):
        call(grad_y=y)
    with pytest.raises(ValueError, match=r"stats: expected a dense \[2, 5\]"):
        call(stats=torch.empty(2, 4))
    with pytest.raises(ValueError, match="weight: expected"):
        call(weight=torch.ones(4))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (F64, 1e-12)])
def test_ops_match_reference(backend, use_backend, dtype, tol):
    dev = use_backend(backend)
    if dtype == F64:
        require_float64(backend, dev)
    torch.manual_seed(2)
    buf, x = _buffer_prefix(1, 7, 5, 3, dtype=dtype, device=dev)
    got_mean, got_invstd = ops.channel_stats(x, 1e-5)
    want_mean, want_invstd = reference.channel_stats(x.to(F64), 1e-5)
    torch.testing.assert_close(got_mean.to(F64), want_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(got_invstd.to(F64), want_invstd, rtol=tol * 10, atol=tol)
    sdt = reference.stats_dtype(dtype)
    scale, shift = _vec(7, sdt, dev), _vec(7, sdt, dev)
    w = torch.randn(3, 7, 3, 3, dtype=dtype, device=dev)
    out_buf = torch.full((1, 9, 3, 2), 7.0, dtype=dtype, device=dev)
    ops.transform_conv_into_(x, scale, shift, w, 2, 1, 1, out_buf[:, 4:7])
    want = reference.transform_conv(x.to(F64), scale.to(F64), shift.to(F64), w.to(F64), 2, 1, 1)
    torch.testing.assert_close(out_buf[:, 4:7].to(F64), want, rtol=tol * 10, atol=tol * 10)
    assert (out_buf[:, :4] == 7).all() and (out_buf[:, 7:] == 7).all()


def test_bad_input_is_rejected_before_any_kernel(use_backend):
    use_backend("cpu")
    x = torch.randn(2, 5, 4, 4)
    s, h = torch.ones(5), torch.zeros(5)
    w = torch.randn(3, 5, 1, 1)
    with pytest.raises(TypeError, match="x: expected float32"):
        ops.channel_stats(x.to(torch.int32), 1e-5)
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        ops.channel_stats(x[0], 1e-5)
    with pytest.raises(ValueError, match=r"scale: expected one value per channel"):
        ops.affine_relu(x, torch.ones(4), h)
    with pytest.raises(TypeError, match="scale: expected dtype torch.float32"):
        ops.affine_relu(x, torch.ones(5, dtype=F64), h)
    with pytest.raises(ValueError, match="weight: expected 5 input channels"):
        ops.transform_conv(x, s, h, torch.randn(3, 4, 1, 1), 1, 0, 1)
    with pytest.raises(ValueError, match="stride: expected 1 or 2"):
        ops.transform_conv(x, s, h, w, 3, 0, 1)
    with pytest.raises(ValueError, match="out: expected shape"):
        ops.transform_conv_into_(x, s, h, w, 1, 0, 1, torch.empty(2, 2, 4, 4))
    buf = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match="out: shares memory with x"):
        ops.transform_conv_into_(buf[:, :5], s, h, w, 1, 0, 1, buf[:, 4:7])
    with pytest.raises(ValueError, match="grad_mean: expected one value per channel"):
        ops.channel_stats_backward_(x, torch.zeros(5), torch.ones(5), torch.zeros(3),
                                    torch.zeros(5), torch.zeros_like(x))
    with pytest.raises(ValueError, match="batch statistics need more than one value"):
        ops.channel_stats(torch.randn(1, 3, 1, 1), 1e-5)
    with pytest.raises(ValueError, match="index: expected values in"):
        ops.gather_batch(x, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="mean: expected unit stride"):
        ops.channel_stats_into_(x, 1e-5, torch.zeros(10)[::2], torch.zeros(5))
    with pytest.raises(TypeError, match="invstd: expected dtype torch.float32"):
        ops.channel_stats_into_(x, 1e-5, torch.zeros(5), torch.zeros(5, dtype=F64))
    with pytest.raises(ValueError, match=r"weight: expected shape \(5,\)"):
        ops.bn_scale_shift(s, s, torch.ones(4), None)
    with pytest.raises(TypeError, match="invstd: expected dtype torch.float32"):
        ops.bn_scale_shift(s, s.double(), None, None)
    with pytest.raises(TypeError, match="mean: expected 1-D float32 or float64"):
        ops.bn_scale_shift(s.half(), s.half(), None, None)
    with pytest.raises(ValueError, match=r"grad: expected a \[2, 5\]"):
        ops.bn_scale_shift_backward_(torch.zeros(5), s, s, None, None, None)
    with pytest.raises(ValueError, match="grad_mean, grad_invstd: expected both"):
        ops.bn_scale_shift_backward_(torch.zeros(2, 5), s, s, None, torch.zeros(5), None)


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda", pytest.param(
    "triton", marks=pytest.mark.triton)])
def test_every_backend_implements_every_op_function(backend):
    """The registry's contract: each backend module has all of OP_FUNCTIONS, with the
    reference's parameter names (the cuda one imports without a GPU)."""
    import inspect

    from msdnet_ops import backends

    module = backends.kernels_for(backend)
    reference_module = backends.kernels_for("reference")
    for name in backends.OP_FUNCTIONS:
        fn = getattr(module, name, None)
        assert callable(fn), f"backend {backend!r} lacks {name}"
        expected = list(inspect.signature(getattr(reference_module, name)).parameters)
        assert list(inspect.signature(fn).parameters) == expected, (backend, name)
    with pytest.raises(ValueError, match="backend: expected one of"):
        backends.kernels_for("auto")


def test_backend_selection_errors(monkeypatch):
    x = torch.randn(2, 3, 4, 4)
    monkeypatch.setenv("MSDNET_OPS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="MSDNET_OPS_BACKEND='nonsense'"):
        ops.channel_stats(x, 1e-5)
    monkeypatch.setenv("MSDNET_OPS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="CUDA tensors only"):
        ops.channel_stats(x, 1e-5)
    monkeypatch.setenv("MSDNET_OPS_BACKEND", "auto")
    with pytest.raises(TypeError, match="supported on CUDA devices only"):
        ops.channel_stats(x.to(torch.bfloat16), 1e-5)


def test_settings_are_followed_as_they_change(monkeypatch):
    """The backend, CPU convolution and transform-conv settings are remembered per stored
    value (every op reads them): a change made while the process runs still takes effect."""
    from msdnet_ops import backends, environment
    from msdnet_ops.kernels import cpu_conv
    cpu, f32 = torch.device("cpu"), torch.float32
    for value, expected in (("reference", "reference"), ("cpu", "cpu"), (" Reference ", "reference")):
        monkeypatch.setenv("MSDNET_OPS_BACKEND", value)
        assert environment.raw("MSDNET_OPS_BACKEND") is not None
        assert backends.resolve(cpu, f32) == expected
    monkeypatch.delenv("MSDNET_OPS_BACKEND")
    assert environment.raw("MSDNET_OPS_BACKEND") is None
    assert backends.resolve(cpu, f32) == "cpu"
    for value in ("gemm", "auto", "onednn"):
        monkeypatch.setenv("MSDNET_OPS_CPU_CONV", value)
        assert cpu_conv.forced_choice() == value
    monkeypatch.setenv("MSDNET_OPS_CPU_CONV", "fastest")
    for _ in range(2):  # refused every time, not remembered
        with pytest.raises(ValueError, match="MSDNET_OPS_CPU_CONV='fastest'"):
            cpu_conv.forced_choice()
    monkeypatch.setenv("MSDNET_OPS_TRANSFORM_CONV", "unfused")
    assert backends.transform_conv_policy(cpu) == "unfused"
    monkeypatch.setenv("MSDNET_OPS_TRANSFORM_CONV", "fused")
    assert backends.transform_conv_policy(cpu) == "fused"


def test_ops_compile(use_backend):
    """The ops trace through torch.compile (fake implementations, mutation annotations)."""
    use_backend("reference")
    x = torch.randn(2, 4, 5, 5)
    s, h, w = torch.rand(4) + 0.5, torch.randn(4), torch.randn(3, 4, 3, 3)

    def f(x):
        mean, invstd = ops.channel_stats(x, 1e-5)
        return ops.transform_conv(x, s * invstd, h - s * mean * invstd, w, 1, 1, 1)

    torch.testing.assert_close(torch.compile(f, backend="aot_eager", fullgraph=True)(x), f(x))


def _nhwc_prefix(n, c, h, w, cap_extra=3, dtype=F64, device="cpu"):
    """A channel-prefix view of an NHWC buffer (what the fused modules hand the kernels)."""
    buf = torch.randn(n, h, w, c + cap_extra, dtype=dtype, device=device).permute(0, 3, 1, 2)
    return buf, buf[:, :c]


@pytest.mark.parametrize("backend", backend_params(include_triton=False))
def test_opcheck_activated_conv_ops(backend, use_backend):
    """The ops of activated buffers: conv, conv_into_, conv_backward_, affine_relu_into_."""
    dev = use_backend(backend)
    torch.manual_seed(3)
    _, x = _nhwc_prefix(3, 5, 7, 5, device=dev)
    w3 = torch.randn(4, 5, 3, 3, dtype=F64, device=dev)
    xl = x.detach().clone().requires_grad_()
    torch.library.opcheck(ops.conv, (xl, w3.clone().requires_grad_(), 2, 1, 1))
    torch.library.opcheck(ops.conv, (xl, torch.randn(4, 5, 1, 1, dtype=F64, device=dev), 1, 0, 2))
    out = torch.empty(3, 4, 4, 3, dtype=F64, device=dev)
    torch.library.opcheck(ops.conv_into_, (x, w3, 2, 1, 1, out))
    torch.library.opcheck(ops.conv_backward_, (torch.randn(3, 4, 4, 3, dtype=F64, device=dev),
                                               x, w3, 2, 1, 1, torch.zeros_like(x)))
    torch.library.opcheck(ops.affine_relu_into_, (x, _vec(5, device=dev), _vec(5, device=dev),
                                                  torch.empty(3, 5, 7, 5, dtype=F64, device=dev)))


@pytest.mark.parametrize("backend", backend_params(include_triton=False))
@pytest.mark.parametrize("k,stride,pool", CONV_GEOMETRIES)
def test_gradcheck_conv(backend, use_backend, k, stride, pool):
    dev = use_backend(backend)
    torch.manual_seed(k * 10 + stride + pool)
    _, x = _nhwc_prefix(2, 3, 5, 7, device=dev)
    x = x.detach().requires_grad_()
    w = torch.randn(2, 3, k, k, dtype=F64, device=dev, requires_grad=True)
    assert gradcheck(lambda *a: ops.conv(*a, stride, (k - 1) // 2, pool), (x, w))


@pytest.mark.parametrize("choice", ["onednn", "gemm", "direct", "auto"])
@pytest.mark.parametrize("k,stride,pool", CONV_GEOMETRIES)
def test_cpu_conv_choices_match_the_reference(use_backend, monkeypatch, choice, k, stride, pool):
    """Every CPU implementation (oneDNN on a dense copy, GEMMs on the strided rows, or for the
    forward our pointwise kernel on them, or our direct kernel) writes exactly the reference's
    convolution into its slice and accumulates the reference's gradient, on NHWC buffer views;
    GEMMs on the rows and the pointwise kernel apply to 1x1 stride-1 unpooled convolutions
    only, the direct kernel to the other unpooled ones; the other convolutions' backward takes
    "gemm" as oneDNN's input gradient plus an im2col GEMM."""
    use_backend("cpu")
    monkeypatch.setenv("MSDNET_OPS_CPU_CONV", choice)
    from msdnet_ops.kernels import cpu_conv
    direct_calls, kxk_calls, im2col_calls = [], [], []
    kernel, im2col = cpu_conv._kernels.pointwise_conv_rows, cpu_conv.im2col_rows
    kxk = cpu_conv._kernels.direct_conv_into
    monkeypatch.setattr(cpu_conv._kernels, "pointwise_conv_rows",
                        lambda *a: direct_calls.append(1) or kernel(*a))
    monkeypatch.setattr(cpu_conv._kernels, "direct_conv_into",
                        lambda *a: kxk_calls.append(1) or kxk(*a))
    monkeypatch.setattr(cpu_conv, "im2col_rows", lambda *a: im2col_calls.append(1) or im2col(*a))
    torch.manual_seed(7)
    _, x = _nhwc_prefix(3, 11, 9, 7, cap_extra=5)
    w = torch.randn(5, 11, k, k, dtype=F64)
    pad = (k - 1) // 2
    out_buf = torch.full((3, 9 // pool, 7 // pool, 13), 7.0, dtype=F64).permute(0, 3, 1, 2)
    want = reference.conv(x, w, stride, pad, pool)
    out = out_buf[:, 4:9, :want.shape[2], :want.shape[3]]
    if stride == 2:  # the output map is smaller than the buffer's: a dense slice
        out_buf = torch.full((3, want.shape[2], want.shape[3], 13), 7.0, dtype=F64).permute(0, 3, 1, 2)
        out = out_buf[:, 4:9]
    ops.conv_into_(x, w, stride, pad, pool, out)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert (out_buf[:, :4] == 7).all() and (out_buf[:, 9:] == 7).all()
    if choice == "direct":  # forced where it applies: the pointwise kernel for 1x1, stride 1,
        # no pool; the direct k x k kernel for the other unpooled ones
        assert bool(direct_calls) == (k == 1 and stride == 1 and pool == 1)
        assert bool(kxk_calls) == (pool == 1 and not (k == 1 and stride == 1))
    grad_out = torch.randn_like(want).contiguous(memory_format=torch.channels_last)
    grad_buf = torch.ones(3, 9, 7, 16, dtype=F64).permute(0, 3, 1, 2)
    got_w = ops.conv_backward_(grad_out, x, w, stride, pad, pool, grad_buf[:, :11])
    want_gx = torch.ones_like(x)
    want_w = reference.conv_backward_(grad_out, x, w, stride, pad, pool, want_gx)
    torch.testing.assert_close(grad_buf[:, :11], want_gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-12)
    assert (grad_buf[:, 11:] == 1).all()
    rows_apply = k == 1 and stride == 1 and pool == 1
    if choice in ("onednn", "gemm", "direct"):  # forced: the im2col GEMM runs for "gemm" only
        assert bool(im2col_calls) == (choice == "gemm" and not rows_apply)


@pytest.mark.parametrize("images_per_part", [None, 1, 2])
@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 2, 0), (5, 2, 2),
                                              (3, 1, 0), (2, 3, 1)])
def test_cpu_dense_conv_backward_implementations_match_the_reference(monkeypatch, k, stride,
                                                                      padding, images_per_part):
    """Every implementation of the two halves of a dense convolution's backward (what the
    oneDNN-composed convolutions and transform-convolutions call): the input gradient by
    oneDNN and (NHWC) by our direct kernels (stride 1 and strided); the weight gradient by
    oneDNN, as an im2col GEMM (its patch matrix built for the whole batch, or one or two
    images at a time) and (NHWC) by our direct kernel; and oneDNN's combined call: each
    equals autograd through ``F.conv2d`` in float64, on odd sizes, batch 1 and 3, an NCHW
    and a strided (non-contiguous) input."""
    from msdnet_ops.kernels import cpu_conv
    parts, im2col = [], cpu_conv.im2col_rows
    monkeypatch.setattr(cpu_conv, "im2col_rows",
                        lambda z, *a: parts.append(z.shape[0]) or im2col(z, *a))
    torch.manual_seed(5)
    for n, nchw in ((1, True), (3, False)):
        z = torch.randn(n, 13, 11, 9, dtype=F64)
        if not nchw:  # a channel prefix of an NHWC buffer: neither layout's strides
            z = torch.randn(n, 11, 9, 17, dtype=F64).permute(0, 3, 1, 2)[:, 2:15]
        w = torch.randn(7, 13, k, k, dtype=F64).contiguous(memory_format=torch.channels_last)
        zr, wr = z.clone().requires_grad_(), w.clone().requires_grad_()
        y = F.conv2d(zr, wr, None, stride, padding)
        grad_out = torch.randn_like(y)
        want_z, want_w = torch.autograd.grad(y, (zr, wr), grad_out)
        per_image = y.shape[2] * y.shape[3] * k * k * 13  # elements of one image's patches
        monkeypatch.setattr(cpu_conv, "IM2COL_CHUNK_ELEMENTS",
                            1 << 62 if images_per_part is None else images_per_part * per_image)
        parts.clear()
        # our kernels: on NHWC views only, the input gradient with padding below the kernel
        applies = {"dgrad": cpu_conv._direct_dgrad_applies(grad_out, z, w, stride, padding),
                   "wgrad": cpu_conv._direct_wgrad_applies(grad_out, z, w)}
        assert applies == {"dgrad": padding < k and not nchw, "wgrad": not nchw}
        halves = [("dgrad", name, impl, want_z) for name, impl in cpu_conv._DENSE_DGRAD.items()]
        halves += [("wgrad", name, impl, want_w) for name, impl in cpu_conv._DENSE_WGRAD.items()]
        for half, name, impl, want in halves:
            if name == "direct" and not applies[half]:
                continue
            got = impl(grad_out, z, w, stride, padding)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{half} {name}")
        got_z, got_w = cpu_conv._dense_bwd_onednn(grad_out, z, w, stride, padding)
        torch.testing.assert_close(got_z, want_z, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-12)
        step = n if images_per_part is None else images_per_part
        assert parts == [min(step, n - i) for i in range(0, n, step)], "im2col parts"


@pytest.mark.parametrize("wgrad", ["onednn", "gemm", "direct"])
@pytest.mark.parametrize("dgrad", ["onednn", "gemm"])
def test_cpu_1x1_conv_backward_halves_match_the_reference(use_backend, dgrad, wgrad):
    """A 1x1 convolution's backward is two choices made apart (input gradient, weight gradient):
    every pairing accumulates the reference's input gradient into the strided gradient slice
    (the channels around it untouched) and returns the reference's weight gradient. The oneDNN
    input gradient is given an uninitialised stand-in for the input: filled with NaN here, any
    read of it would show."""
    use_backend("cpu")
    from msdnet_ops.kernels import cpu_conv
    torch.manual_seed(11)
    _, x = _nhwc_prefix(3, 11, 9, 7, cap_extra=5)
    w = torch.randn(5, 11, 1, 1, dtype=F64)
    cpu_conv.scratch.get("shape", x.shape, x).fill_(float("nan"))
    grad_out = torch.randn(3, 5, 9, 7, dtype=F64).contiguous(memory_format=torch.channels_last)
    grad_buf = torch.ones(3, 9, 7, 16, dtype=F64).permute(0, 3, 1, 2)
    cpu_conv._DGRAD[dgrad](grad_out, x, w, grad_buf[:, :11])
    got_w = cpu_conv._WGRAD[wgrad](grad_out, x, w)
    want_gx = torch.ones_like(x)
    want_w = reference.conv_backward_(grad_out, x, w, 1, 0, 1, want_gx)
    torch.testing.assert_close(grad_buf[:, :11], want_gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-12)
    assert (grad_buf[:, 11:] == 1).all()


def test_cpu_conv_choice_rejects_unknown_values(use_backend, monkeypatch):
    use_backend("cpu")
    monkeypatch.setenv("MSDNET_OPS_CPU_CONV", "fastest")
    _, x = _nhwc_prefix(2, 3, 4, 4)
    with pytest.raises(ValueError, match="MSDNET_OPS_CPU_CONV='fastest': expected auto"):
        ops.conv(x, torch.randn(2, 3, 1, 1, dtype=F64), 1, 0, 1)


@pytest.mark.parametrize("backend", backend_params())
def test_ops_read_nhwc_buffer_prefixes(backend, use_backend):
    dev = use_backend(backend)
    torch.manual_seed(4)
    _, x = _nhwc_prefix(2, 6, 5, 3, device=dev, dtype=torch.float32)
    scale, shift = _vec(6, torch.float32, dev), _vec(6, torch.float32, dev)
    got_mean, got_invstd = ops.channel_stats(x, 1e-5)
    want_mean, want_invstd = reference.channel_stats(x.double(), 1e-5)
    torch.testing.assert_close(got_mean.double(), want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_invstd.double(), want_invstd, rtol=1e-4, atol=1e-5)
    out_buf = torch.full((2, 5, 3, 10), 7.0, device=dev).permute(0, 3, 1, 2)
    ops.affine_relu_into_(x, scale, shift, out_buf[:, 2:8])
    torch.testing.assert_close(out_buf[:, 2:8], reference.affine_relu(x, scale, shift))
    assert (out_buf[:, :2] == 7).all() and (out_buf[:, 8:] == 7).all()
    w = torch.randn(4, 6, 3, 3, device=dev)
    out = ops.transform_conv(x, scale, shift, w, 1, 1, 1)
    torch.testing.assert_close(out, reference.transform_conv(x, scale, shift, w, 1, 1, 1),
                               rtol=1e-4, atol=1e-4)


def _plain_conv_bias_relu(x, w, b, stride, pad):
    return torch.relu(torch.nn.functional.conv2d(x, w, b, stride, pad))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("k,stride", [(1, 1), (3, 1), (3, 2), (1, 2)])
def test_conv_bias_relu_matches_plain_pytorch(backend, use_backend, monkeypatch, k, stride):
    """The inference convolution (folded BatchNorm) on a strided buffer prefix equals plain
    ``relu(conv2d(x, w, b))``: returned as a new tensor, and written into a channel slice of the
    buffer the prefix lies in (the channels around the slice untouched); a NaN input channel
    gives NaN outputs, as torch.relu keeps NaN. On the CPU every implementation (oneDNN, our
    direct kernel, and for 1x1 stride 1 the GEMM and our pointwise kernel on the rows) is
    checked."""
    dev = use_backend(backend)
    dt = torch.float32 if dev.type == "cuda" else F64
    torch.manual_seed(13)
    n, c, h, w_, cout = 3, 7, 9, 5, 4
    pad = (k - 1) // 2
    weight = torch.randn(cout, c, k, k, dtype=dt, device=dev)
    bias = torch.randn(cout, dtype=dt, device=dev)
    choices = [None]
    if backend == "cpu":
        choices = ["onednn", "gemm", "direct"] if k == 1 and stride == 1 else ["onednn", "direct"]
    for choice in choices:
        if choice:
            monkeypatch.setenv("MSDNET_OPS_CPU_CONV", choice)
        buf, x = _nhwc_prefix(n, c, h, w_, cap_extra=cout + 2, dtype=dt, device=dev)
        x[0, 2, 2, 2] = float("nan")  # a pixel every geometry here samples
        want = _plain_conv_bias_relu(x, weight, bias, stride, pad)
        got = ops.conv_bias_relu(x, weight, bias, stride, pad)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert got[0].isnan().any() and not got[1:].isnan().any()
        if stride == 1:  # the output map is the buffer's: write into the channels after x
            before = buf.clone()
            out = buf[:, c + 1:c + 1 + cout]
            returned = ops.conv_bias_relu(x, weight, bias, stride, pad, out)
            assert returned.data_ptr() == out.data_ptr()
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, equal_nan=True)
            untouched = torch.ones(buf.shape[1], dtype=torch.bool)
            untouched[c + 1:c + 1 + cout] = False
            torch.testing.assert_close(buf[:, untouched], before[:, untouched], equal_nan=True)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (1, 1)])
def test_bottleneck_conv_bias_relu_matches_plain_pytorch(backend, use_backend, monkeypatch, k,
                                                          stride):
    """A 1x1 unit then a k x k one (MSDNet's inference path) equals the two plain
    ``relu(conv2d(.))``: new, and written into a channel slice of the buffer (the channels
    around untouched); NaN kept. On the CPU both implementations: the two convolutions apart
    (forced oneDNN) and fused into our direct kernel."""
    dev = use_backend(backend)
    dt = torch.float32 if dev.type == "cuda" else F64
    torch.manual_seed(17)
    n, c, mid, h, w_, cout = 3, 7, 5, 9, 5, 4
    pad = (k - 1) // 2
    w1, b1 = torch.randn(mid, c, 1, 1, dtype=dt, device=dev), torch.randn(mid, dtype=dt, device=dev)
    weight = torch.randn(cout, mid, k, k, dtype=dt, device=dev)
    bias = torch.randn(cout, dtype=dt, device=dev)
    calls = []
    if backend == "cpu":
        from msdnet_ops.kernels import cpu as cpu_kernels
        fused = cpu_kernels.bottleneck_direct_conv_into
        monkeypatch.setattr(cpu_kernels, "bottleneck_direct_conv_into",
                            lambda *a: calls.append(1) or fused(*a))
    for choice in (["onednn", "direct"] if backend == "cpu" else [None]):
        if choice:
            monkeypatch.setenv("MSDNET_OPS_CPU_CONV", choice)
        calls.clear()
        buf, x = _nhwc_prefix(n, c, h, w_, cap_extra=cout + 2, dtype=dt, device=dev)
        x[0, 2, 2, 2] = float("nan")  # a pixel every geometry here samples
        want = _plain_conv_bias_relu(_plain_conv_bias_relu(x, w1, b1, 1, 0), weight, bias,
                                     stride, pad)
        got = ops.bottleneck_conv_bias_relu(x, w1, b1, weight, bias, stride, pad)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert got[0].isnan().any() and not got[1:].isnan().any()
        if stride == 1:
            before = buf.clone()
            out = buf[:, c + 1:c + 1 + cout]
            returned = ops.bottleneck_conv_bias_relu(x, w1, b1, weight, bias, stride, pad, out)
            assert returned.data_ptr() == out.data_ptr()
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, equal_nan=True)
            untouched = torch.ones(buf.shape[1], dtype=torch.bool)
            untouched[c + 1:c + 1 + cout] = False
            torch.testing.assert_close(buf[:, untouched], before[:, untouched], equal_nan=True)
        if choice:  # the forced choice was taken
            assert bool(calls) == (choice == "direct")


@pytest.mark.parametrize("backend", backend_params(include_triton=False))
@pytest.mark.parametrize("k,stride", [(1, 1), (3, 1), (3, 2)])
@pytest.mark.parametrize("bottleneck", [False, True])
def test_prepared_inference_convolutions_match_plain_pytorch(backend, use_backend, monkeypatch,
                                                             k, stride, bottleneck):
    """``ops.prepared_conv_bias_relu`` / ``prepared_bottleneck_conv_bias_relu``: prepared on
    one buffer prefix and output slice, then run on other buffers of the same geometry (other
    values), into the slice and new, they equal plain ``relu(conv2d(.))`` and leave the
    channels around the slice alone. On the CPU each implementation the choice can make."""
    dev = use_backend(backend)
    torch.manual_seed(19)
    n, c, mid, h, w_, cout = 3, 7, 5, 9, 5, 4
    pad = (k - 1) // 2
    w1, b1 = torch.randn(mid, c, 1, 1, dtype=F64, device=dev), torch.randn(mid, dtype=F64,
                                                                           device=dev)
    weight = torch.randn(cout, mid if bottleneck else c, k, k, dtype=F64, device=dev)
    bias = torch.randn(cout, dtype=F64, device=dev)
    ho, wo = (h + 2 * pad - k) // stride + 1, (w_ + 2 * pad - k) // stride + 1

    def slice_of(buf):
        return buf[:, 1:1 + cout]

    def new_output_buffer():
        return torch.randn(n, ho, wo, cout + 3, dtype=F64, device=dev).permute(0, 3, 1, 2)

    def plain(x):
        y = _plain_conv_bias_relu(x, w1, b1, 1, 0) if bottleneck else x
        return _plain_conv_bias_relu(y, weight, bias, stride, pad)

    def prepare(x, out):
        if bottleneck:
            return ops.prepared_bottleneck_conv_bias_relu(x, w1, b1, weight, bias, stride, pad,
                                                          out)
        return ops.prepared_conv_bias_relu(x, weight, bias, stride, pad, out)
    choices = [None]
    if backend == "cpu":
        choices = ["onednn", "direct"] + (["gemm"] if k == 1 and not bottleneck else [])
    for choice in choices:
        if choice:
            monkeypatch.setenv("MSDNET_OPS_CPU_CONV", choice)
        assert ops.preparation_key(dev, F64) is not None
        _, x = _nhwc_prefix(n, c, h, w_, dtype=F64, device=dev)
        run_into = prepare(x, slice_of(new_output_buffer()))
        run_new = prepare(x, None)
        for _ in range(2):
            _, x = _nhwc_prefix(n, c, h, w_, dtype=F64, device=dev)
            buf = new_output_buffer()
            before = buf.clone()
            returned = run_into(x, slice_of(buf))
            assert returned.data_ptr() == slice_of(buf).data_ptr()
            torch.testing.assert_close(slice_of(buf), plain(x), rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(buf[:, :1], before[:, :1])
            torch.testing.assert_close(buf[:, 1 + cout:], before[:, 1 + cout:])
            torch.testing.assert_close(run_new(x, None), plain(x), rtol=1e-10, atol=1e-10)


def test_prepared_inference_calls_are_not_used_under_autocast():
    """Autocast changes what the eager ops run (they turn it off around their kernels):
    prepared calls, which skip them, are refused there."""
    assert ops.preparation_key(torch.device("cpu"), torch.float32) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.preparation_key(torch.device("cpu"), torch.float32) is None


def test_bottleneck_conv_bias_relu_rejects_mismatched_weights(use_backend):
    use_backend("cpu")
    buf, x = _nhwc_prefix(2, 5, 6, 6, cap_extra=6)
    w1, b1 = torch.randn(4, 5, 1, 1, dtype=F64), torch.randn(4, dtype=F64)
    weight, bias = torch.randn(3, 4, 3, 3, dtype=F64), torch.randn(3, dtype=F64)
    with pytest.raises(ValueError, match=r"w1: expected a 1x1 convolution weight \[mid, 5, 1, 1\]"):
        ops.bottleneck_conv_bias_relu(x, w1[:, :4], b1, weight, bias, 1, 1)
    with pytest.raises(ValueError, match="w1: expected a 1x1"):
        ops.bottleneck_conv_bias_relu(x, torch.randn(4, 5, 3, 3, dtype=F64), b1, weight, bias, 1, 1)
    with pytest.raises(ValueError, match=r"weight: expected \[out, 4, k, k\]"):
        ops.bottleneck_conv_bias_relu(x, w1, b1, weight[:, :3], bias, 1, 1)
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 3, 6, 6\)"):
        ops.bottleneck_conv_bias_relu(x, w1, b1, weight, bias, 1, 1, buf[:, 5:9])


def test_conv_bias_relu_rejects_a_bad_out(use_backend):
    use_backend("cpu")
    buf, x = _nhwc_prefix(2, 5, 6, 6, cap_extra=6)
    weight, bias = torch.randn(3, 5, 1, 1, dtype=F64), torch.randn(3, dtype=F64)
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 3, 6, 6\)"):
        ops.conv_bias_relu(x, weight, bias, 1, 0, buf[:, 5:9])
    with pytest.raises(TypeError, match="out: expected dtype torch.float64"):
        ops.conv_bias_relu(x, weight, bias, 1, 0, buf[:, 5:8].float())
    with pytest.raises(ValueError, match="out"):  # overlaps the channels it reads
        ops.conv_bias_relu(x, weight, bias, 1, 0, buf[:, 3:6])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("layouts", ["nchw/nchw", "nhwc/nhwc", "nchw/nhwc"])
def test_affine_relu_backward_writes_without_reading_when_not_accumulating(backend, use_backend,
                                                                          layouts):
    """``accumulate=False`` (a sole consumer's gradient): ``grad_x`` becomes exactly what the
    accumulating form adds to zeros, though it held NaN before (any read of it would show),
    the channels around the strided slice stay untouched, and ``grad_scale``/``grad_shift``
    are still accumulated. Layouts of x / grad_x: NCHW, NHWC and mixed (the CPU kernels have
    a path for each)."""
    dev = use_backend(backend)
    require_float64(backend, dev)
    torch.manual_seed(17)
    x_prefix, gx_prefix = (_nhwc_prefix if lay == "nhwc" else _buffer_prefix
                           for lay in layouts.split("/"))
    _, x = x_prefix(2, 5, 7, 3, device=dev)
    scale, shift = _vec(5, device=dev, lo=-1.5, hi=1.5), _vec(5, device=dev)
    grad_z = torch.randn_like(x)
    want_gx = torch.zeros_like(x.cpu())
    want_gs, want_gh = torch.full((5,), 0.5, dtype=F64), torch.full((5,), -0.25, dtype=F64)
    reference.affine_relu_backward_(x.cpu(), scale.cpu(), shift.cpu(), grad_z.cpu(), want_gx,
                                    want_gs, want_gh)
    gx_buf, gx = gx_prefix(2, 5, 7, 3, cap_extra=4, device=dev)
    gx_buf.fill_(float("nan"))
    gx_buf[:, 5:] = 3.0
    gs = torch.full((5,), 0.5, dtype=F64, device=dev)
    gh = torch.full((5,), -0.25, dtype=F64, device=dev)
    ops.affine_relu_backward_(x, scale, shift, grad_z, gx, gs, gh, False)
    torch.testing.assert_close(gx.cpu(), want_gx, rtol=1e-12, atol=1e-12)
    assert (gx_buf[:, 5:] == 3.0).all()
    torch.testing.assert_close(gs.cpu(), want_gs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh.cpu(), want_gh, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(ops.affine_relu_backward_, (
        x, scale, shift, grad_z, torch.empty_like(x), torch.zeros(5, dtype=F64, device=dev),
        torch.zeros(5, dtype=F64, device=dev), False))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("k,stride,pool", CONV_GEOMETRIES)
def test_transform_conv_backward_writes_without_reading_when_not_accumulating(
        backend, use_backend, k, stride, pool):
    """``transform_conv_backward_(..., accumulate=False)`` (a bottleneck's sole consumer): the
    input gradient equals the reference's accumulated onto zeros though the buffer held NaN
    (odd sizes: with pooling, the pixels outside every pooling window get exact zeros), the
    channels around the strided slice untouched; the vector gradients still accumulate and the
    weight gradient is the reference's."""
    dev = use_backend(backend)
    require_float64(backend, dev)
    torch.manual_seed(23)
    _, x = _nhwc_prefix(2, 6, 7, 5, device=dev)
    scale, shift = _vec(6, device=dev, lo=-1.5, hi=1.5), _vec(6, device=dev)
    w = torch.randn(4, 6, k, k, dtype=F64, device=dev)
    pad = (k - 1) // 2
    grad_out = torch.randn_like(reference.transform_conv(x, scale, shift, w, stride, pad, pool))
    want_gx = torch.zeros_like(x)
    want_gs, want_gh = torch.full((6,), 0.5, dtype=F64, device=dev), torch.zeros(6, dtype=F64, device=dev)
    want_w = reference.transform_conv_backward_(grad_out, x, scale, shift, w, stride, pad, pool,
                                                want_gx, want_gs, want_gh)
    gx_buf, gx = _nhwc_prefix(2, 6, 7, 5, cap_extra=3, device=dev)
    gx_buf.fill_(float("nan"))
    gx_buf[:, 6:] = 3.0
    gs, gh = torch.full((6,), 0.5, dtype=F64, device=dev), torch.zeros(6, dtype=F64, device=dev)
    got_w = ops.transform_conv_backward_(grad_out, x, scale, shift, w, stride, pad, pool, gx, gs,
                                         gh, False)
    torch.testing.assert_close(gx, want_gx, rtol=1e-10, atol=1e-10)
    assert (gx_buf[:, 6:] == 3.0).all()
    for got, want in ((gs, want_gs), (gh, want_gh), (got_w, want_w)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("k,stride,pool", [(1, 1, 2), (3, 2, 1)])
def test_conv_backwards_read_a_channel_slice_of_a_gradient(backend, use_backend, layout, k,
                                                            stride, pool):
    """``grad_out`` may be a channel slice of a bigger gradient (a dense layer's share of its
    buffer's shared gradient, which DenseNet's backward passes as it is): both convolution
    backwards give the reference's gradients for the same values held densely."""
    dev = use_backend(backend)
    require_float64(backend, dev)
    torch.manual_seed(29)
    prefix = _nhwc_prefix if layout == "nhwc" else _buffer_prefix
    _, x = prefix(2, 5, 7, 5, device=dev)
    scale, shift = _vec(5, device=dev, lo=0.5, hi=1.5), _vec(5, device=dev)
    w = torch.randn(3, 5, k, k, dtype=F64, device=dev)
    pad = (k - 1) // 2
    out_shape = ops.conv(x, w, stride, pad, pool).shape
    n, _, ho, wo = out_shape
    grad_buf, _ = prefix(n, 7, ho, wo, cap_extra=0, device=dev)
    grad_out = grad_buf[:, 2:5]
    assert not grad_out.is_contiguous() and not grad_out.is_contiguous(
        memory_format=torch.channels_last)
    dense_grad = grad_out.cpu().contiguous()
    xc, sc, hc, wc = x.cpu(), scale.cpu(), shift.cpu(), w.cpu()

    want_gx, want_gs, want_gh = torch.zeros_like(xc), torch.zeros(5, dtype=F64), torch.zeros(5, dtype=F64)
    want_gw = reference.transform_conv_backward_(dense_grad, xc, sc, hc, wc, stride, pad, pool,
                                                 want_gx, want_gs, want_gh)
    gx, gs, gh = torch.zeros_like(x), torch.zeros(5, dtype=F64, device=dev), torch.zeros(5, dtype=F64, device=dev)
    gw = ops.transform_conv_backward_(grad_out, x, scale, shift, w, stride, pad, pool, gx, gs, gh)
    for got, want in ((gw, want_gw), (gx, want_gx), (gs, want_gs), (gh, want_gh)):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)

    want_gx = torch.zeros_like(xc)
    want_gw = reference.conv_backward_(dense_grad, xc, wc, stride, pad, pool, want_gx)
    gx = torch.zeros_like(x)
    gw = ops.conv_backward_(grad_out, x, w, stride, pad, pool, gx)
    torch.testing.assert_close(gw.cpu(), want_gw, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx.cpu(), want_gx, rtol=1e-10, atol=1e-10)
