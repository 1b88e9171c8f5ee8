"""CPU convolutions of feature-buffer prefixes: oneDNN, or for 1x1 convolutions MKL GEMMs or
our pointwise kernel, which read and write the strided buffer rows in place, or for narrow
k x k convolutions our direct kernel; chosen per shape by timing the candidates once.

oneDNN takes dense inputs only, so a buffer prefix is first copied into a reused scratch, and
its input gradient is a new tensor added into the shared gradient buffer afterwards. A 1x1
convolution of an NHWC prefix is a GEMM on a ``[N*H*W, C]`` matrix with row stride ``C_cap``:
``out = X @ W^T`` (written straight into a buffer slice), ``grad_X += grad_out @ W`` (straight
into the shared gradient) and ``grad_W = grad_out^T @ X``: no copy, no extra pass. MSDNet's
1x1s have few outputs (6 to 24), where MKL's GEMM runs far below the memory bandwidth; for up
to 64 outputs (32 for ``grad_W``) our pointwise kernel (``csrc/cpu/pointwise_conv.cpp``,
"direct": outputs as vector lanes, the input read once) is a third candidate for ``out``, the
inference convolution (bias and ReLU fused) and ``grad_W`` (measured on the 2-core development
CPU at 32768 rows, 46 -> 6 channels: 0.28 vs 1.05 ms for ``out``, 0.28 vs 0.73 ms for
``grad_W``). Which is faster depends on the shape and the machine, so the first call of each
shape times the candidates that apply (the best of five runs each, taking turns) and remembers
the fastest (as ``cudnn.benchmark`` does).
A 1x1 convolution's backward is two independent choices: its input gradient (oneDNN needs no
copy of the input for it, only the input's shape) and its weight gradient (oneDNN needs the
dense copy, a GEMM or our kernel reads the rows).
Split this way it is faster than oneDNN's combined backward (measured on the 2-core development
CPU: 0.45 vs 0.96 ms at 32x32, 46 -> 6 channels, 4.1 vs 7.2 ms at 40x40, 112 -> 16). The
other convolutions' backward (on a dense copy) is a per-shape choice too: oneDNN's combined
call, or its input gradient alone plus the weight gradient as an im2col GEMM ("gemm"; measured
on an AVX2 2-core CPU, 3x3 stride 2 at 8x8 to 128 channels: 8.3 vs 10.0 ms from 236 channels,
1.3 vs 2.2 ms from 128 at 4x4; slower for narrow outputs, e.g. 1.05 vs 0.90 ms for 48 -> 12
at 8x8), or (stride 1, at most 64 input channels) our direct kernel's input gradient plus
oneDNN's weight gradient ("direct").
Other unpooled convolutions with at most 64 outputs (MSDNet's 3x3s at the finest scales) have
our direct kernel (``csrc/cpu/direct_conv.cpp``: output pixels as the vector lanes, the input
rows transposed into a planar scratch) as a candidate beside oneDNN, writing straight into a
buffer slice, with the bias and ReLU fused in inference (measured on the 2-core development
CPU at batch 32-64: 1.2-1.6x oneDNN's speed for 6 -> 6 channels at 32x32 and 12 -> 6 at
16x16, slower at stride 2 and at 24 -> 12 channels; the choice is per shape). In inference a
path's 1x1 unit and k x k unit are one call (:func:`bottleneck_conv_bias_relu`): the direct
kernel computes the bottleneck's output into its scratch (never stored), or the two calls.
``MSDNET_OPS_CPU_CONV`` = ``auto`` (default) |
``onednn`` | ``gemm`` | ``direct`` forces a choice where it applies (oneDNN elsewhere); all
compute the same convolution, with different summation orders.
"""
from __future__ import annotations

import threading
import time

import torch
import torch.nn.functional as F

from .. import environment
from ..layout import dense, empty_nhwc, memory_format_of
from ..validation import conv_output_shape
from . import cpu as _kernels


class _Scratch(threading.local):
    """Reused per-thread dense temporaries, where a fresh prefix-sized tensor per call costs
    more in page faults than filling it. Grow-only: it keeps the largest prefix of the network,
    which a training step's peak holds anyway. One flat tensor per (slot, dtype)."""

    def __init__(self):
        self.flat = {}

    def get(self, slot: str, shape, like: torch.Tensor) -> torch.Tensor:
        """A dense tensor of ``shape`` in ``like``'s layout (contents undefined)."""
        n, c, h, w = shape
        key = (slot, like.dtype)
        flat = self.flat.get(key)
        if flat is None or flat.numel() < n * c * h * w:
            flat = self.flat[key] = torch.empty(n * c * h * w, dtype=like.dtype, device=like.device)
        flat = flat[:n * c * h * w]
        if memory_format_of(like) == torch.channels_last:
            return flat.view(n, h, w, c).permute(0, 3, 1, 2)
        return flat.view(shape)


scratch = _Scratch()


def dense_input(x: torch.Tensor, pool: int):
    """``x`` (or its copy in the scratch when it is a strided buffer prefix), and its pooled
    values."""
    z = x if x.is_contiguous(memory_format=memory_format_of(x)) else \
        scratch.get("z", x.shape, x).copy_(x)
    return z, (F.avg_pool2d(z, pool) if pool != 1 else z)


def aten_conv(z, weight, stride: int, padding: int):
    return F.conv2d(z, weight, None, stride, padding)


def aten_conv_bias(z, weight, bias, stride: int, padding: int):
    return F.conv2d(z, weight, bias, stride, padding)


def _aten_backward(grad_out, z, weight, stride: int, padding: int, mask):
    return torch.ops.aten.convolution_backward(
        grad_out, z, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], 1, mask)


def _dense_bwd_onednn(grad_out, z, weight, stride: int, padding: int):
    """oneDNN's combined backward (what runs where both halves' choice is oneDNN)."""
    grad_z, grad_weight, _ = _aten_backward(grad_out, z, weight, stride, padding,
                                            [True, True, False])
    return grad_z, grad_weight


# the split backward applies where the whole batch's im2col matrix has at most this many
# elements; it builds that matrix a few whole images at a time, each part at most
# IM2COL_CHUNK_ELEMENTS: the transient stays ~2 MiB instead of adding up to 16 MiB to a
# training step's peak memory, at the same speed (benches/cpu_kernels.py --cases im2col)
IM2COL_MAX_ELEMENTS = 1 << 22
IM2COL_CHUNK_ELEMENTS = 1 << 19


def im2col_rows(z, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """The ``[N*OH*OW, k*k*C]`` patch matrix of ``z`` (any strides), columns ordered (ky, kx,
    c): a row times a channels_last weight's ``[C_out, k*k*C]`` view is one output pixel."""
    x = z.permute(0, 2, 3, 1)
    if padding:
        x = F.pad(x, (0, 0, padding, padding, padding, padding))
    patches = x.unfold(1, kernel, stride).unfold(2, kernel, stride)  # n, oh, ow, c, ky, kx
    n, oh, ow = patches.shape[:3]
    return patches.permute(0, 1, 2, 4, 5, 3).reshape(n * oh * ow, -1)


# The two halves of a dense convolution's backward, chosen apart per shape:
# the input gradient (grad_z) ...
def _dense_dgrad_onednn(grad_out, z, weight, stride: int, padding: int):
    return _aten_backward(grad_out, z, weight, stride, padding, [True, False, False])[0]


def _dense_dgrad_direct(grad_out, z, weight, stride: int, padding: int):
    """Our kernels. At stride 1 the input gradient is a convolution of ``grad_out`` with the
    flipped, transposed weights and padding ``k - 1 - padding``: with few input channels, our
    direct kernel's shape (the 3x3 convolutions of MSDNet's narrow bottlenecks). Strided, each
    input pixel gathers the taps that reach it (``direct_dgrad``: 1.5-2x oneDNN for MSDNet's
    narrow stride-2 paths, benches/cpu_kernels.py --cases direct)."""
    k = weight.shape[2]
    grad_z = empty_nhwc(tuple(z.shape), dtype=z.dtype, device=z.device)
    if stride == 1:
        _kernels.direct_conv_into(grad_out, weight.transpose(0, 1).flip(2, 3), None, 1,
                                  k - 1 - padding, False, grad_z)
    else:
        _kernels.direct_conv_dgrad_into(grad_out, weight, stride, padding, grad_z)
    return grad_z


# ... and the weight gradient
def _dense_wgrad_onednn(grad_out, z, weight, stride: int, padding: int):
    return _aten_backward(grad_out, z, weight, stride, padding, [False, True, False])[1]


def _dense_wgrad_gemm(grad_out, z, weight, stride: int, padding: int):
    """One GEMM on the patch matrix: ``grad_W = grad_out_rows^T @ im2col(z)`` (measured
    1.2-1.7x oneDNN for the classifiers' 3x3 convolutions to 128 channels)."""
    c_out, c_in, k, _ = weight.shape
    n, _, oh, ow = grad_out.shape
    g = grad_out.permute(0, 2, 3, 1).reshape(n, oh * ow, c_out)
    images = max(1, IM2COL_CHUNK_ELEMENTS // (oh * ow * k * k * c_in))
    grad_w = torch.zeros(c_out, k * k * c_in, dtype=grad_out.dtype, device=grad_out.device)
    for start in range(0, n, images):
        grad_w.addmm_(g[start:start + images].reshape(-1, c_out).t(),
                      im2col_rows(z[start:start + images], k, stride, padding))
    return grad_w.view(c_out, k, k, c_in).permute(0, 3, 1, 2)


def _dense_wgrad_direct(grad_out, z, weight, stride: int, padding: int):
    """Our direct weight-gradient kernel (input channels on the vector lanes, read in place):
    1.1-2.5x oneDNN's on MSDNet's and DenseNet-BC's narrow 3x3s, slower for the 3-channel
    stem (benches/cpu_kernels.py --cases direct)."""
    return _kernels.direct_conv_wgrad(z, grad_out, weight.shape[2], stride, padding)


_DENSE_DGRAD = {"onednn": _dense_dgrad_onednn, "direct": _dense_dgrad_direct}
_DENSE_WGRAD = {"onednn": _dense_wgrad_onednn, "gemm": _dense_wgrad_gemm,
                "direct": _dense_wgrad_direct}


def _direct_dgrad_applies(grad_out, z, weight, stride: int, padding: int) -> bool:
    """Our kernels as the input gradient: a square kernel, padding below its size, few input
    channels (64: the direct kernel's outputs at stride 1, direct_dgrad's channels strided),
    channels-inner views."""
    most = _kernels.DIRECT_CONV_MAX_OUTPUTS if stride == 1 else _kernels.DIRECT_DGRAD_MAX_CHANNELS
    return (weight.shape[2] == weight.shape[3] and padding < weight.shape[2]
            and weight.shape[1] <= most and _kernels.available()
            and _channels_inner(grad_out) and _channels_inner(z))


def _direct_wgrad_applies(grad_out, z, weight) -> bool:
    """Our direct weight-gradient kernel: a square kernel, few outputs, channels-inner views."""
    return (weight.shape[2] == weight.shape[3]
            and weight.shape[0] <= _kernels.DIRECT_WGRAD_MAX_OUTPUTS and _kernels.available()
            and _channels_inner(grad_out) and _channels_inner(z))


def _split_applies(grad_out, z, weight) -> bool:
    c_out, c_in, k, k2 = weight.shape
    return (z.device.type == "cpu" and k == k2
            and grad_out.shape[0] * grad_out.shape[2] * grad_out.shape[3] * k * k * c_in
            <= IM2COL_MAX_ELEMENTS)


def dense_conv_backward(grad_out, z, weight, stride: int, padding: int):
    """(grad_z, grad_weight) of ``conv2d(z, weight, None, stride, padding)`` for a dense ``z``:
    the input gradient (oneDNN, or our direct kernels) and the weight gradient (oneDNN, an
    im2col GEMM, or our direct kernel) chosen apart per shape by timing; where both are
    oneDNN's, its combined call."""
    grad_out = dense(grad_out)  # a buffer's channel slice: the engines take dense tensors

    def trial(impl):
        return lambda: impl(grad_out, z, weight, stride, padding)
    dgrads = ("onednn",)
    if _direct_dgrad_applies(grad_out, z, weight, stride, padding):
        dgrads += ("direct",)
    wgrads = ("onednn",)
    if _split_applies(grad_out, z, weight):
        wgrads += ("gemm",)
    if _direct_wgrad_applies(grad_out, z, weight):
        wgrads += ("direct",)
    dgrad = _chooser.pick(_DENSE_DGRAD, _key("dense dgrad", z, weight, stride, padding, 1),
                          dgrads, trial)
    wgrad = _chooser.pick(_DENSE_WGRAD, _key("dense wgrad", z, weight, stride, padding, 1),
                          wgrads, trial)
    if dgrad == wgrad == "onednn":
        return _dense_bwd_onednn(grad_out, z, weight, stride, padding)
    return (_DENSE_DGRAD[dgrad](grad_out, z, weight, stride, padding),
            _DENSE_WGRAD[wgrad](grad_out, z, weight, stride, padding))


def unpool_grad(grad_zp, z, pool: int):
    if pool == 1:
        return grad_zp
    return torch.ops.aten.avg_pool2d_backward(grad_zp, z, [pool] * 2, [pool] * 2, [0, 0],
                                              False, True, None)


def rows(t: torch.Tensor):
    """An NHWC-strided ``[N, C, H, W]`` tensor as a ``[N*H*W, C]`` matrix view (row stride
    ``C_cap``), or None when its strides do not allow it."""
    n, c, h, w = t.shape
    sn, sc, sh, sw = t.stride()
    if sc != 1 and c > 1:
        return None
    if sh != w * sw or sn != h * sh or sw < c:
        return None
    return t.as_strided((n * h * w, c), (sw, 1))


def _gemm_applies(x, weight, stride, padding, pool, *others) -> bool:
    return (weight.shape[2] == 1 and stride == 1 and padding == 0 and pool == 1
            and all(rows(t) is not None for t in (x,) + others))


def _channels_inner(t: torch.Tensor) -> bool:
    return t.shape[1] == 1 or t.stride(1) == 1


def _direct_applies(x, weight, pool, *others) -> bool:
    """Our direct convolution kernel: a square kernel with few outputs, unpooled, reading and
    writing channels-inner (NHWC-strided) views."""
    return (pool == 1 and weight.shape[2] == weight.shape[3] and _kernels.available()
            and weight.shape[0] <= _kernels.DIRECT_CONV_MAX_OUTPUTS
            and all(_channels_inner(t) for t in (x,) + others))


def _forward_candidates(x, weight, stride, padding, pool, out=None) -> tuple:
    """The forward implementations that apply: oneDNN always; for a 1x1 convolution of (and
    into) row-strided views the GEMM, and with few outputs our pointwise kernel ("direct");
    for other unpooled convolutions with few outputs our direct kernel."""
    outs = () if out is None else (out,)
    if not _gemm_applies(x, weight, stride, padding, pool, *outs):
        return ("onednn", "direct") if _direct_applies(x, weight, pool, *outs) else ("onednn",)
    if weight.shape[0] <= _kernels.POINTWISE_CONV_MAX_OUTPUTS and _kernels.available():
        return ("onednn", "gemm", "direct")
    return ("onednn", "gemm")


# --------------------------------------------------------------------------- implementations

def _fwd_onednn(x, weight, stride, padding, pool, out=None):
    y = aten_conv(dense_input(x, pool)[1], weight, stride, padding)
    return y if out is None else out.copy_(y)


def _new_nhwc_rows(x, weight):
    """A new NHWC output of a 1x1 convolution of ``x``, and its row matrix."""
    n, _, h, w = x.shape
    y = torch.empty(n * h * w, weight.shape[0], dtype=x.dtype, device=x.device)
    return y.view(n, h, w, -1).permute(0, 3, 1, 2), y


def _fwd_gemm(x, weight, stride, padding, pool, out=None):
    y, y_rows = _new_nhwc_rows(x, weight) if out is None else (out, rows(out))
    torch.mm(rows(x), weight.view(weight.shape[0], -1).t(), out=y_rows)
    return y


def _pointwise(x, weight, bias, relu: bool, out=None):
    """Our pointwise kernel: ``act(conv1x1(x) + bias)`` into ``out`` or a new NHWC tensor."""
    y, y_rows = _new_nhwc_rows(x, weight) if out is None else (out, rows(out))
    _kernels.pointwise_conv_rows(rows(x), weight.view(weight.shape[0], -1), bias, relu, y_rows)
    return y


def _direct(x, weight, bias, stride, padding, relu: bool, out=None):
    """Our kernels: the pointwise one for a 1x1 convolution of (and into) row-strided views,
    else the direct k x k one; into ``out`` or a new NHWC tensor."""
    outs = () if out is None else (out,)
    if _gemm_applies(x, weight, stride, padding, 1, *outs):
        return _pointwise(x, weight, bias, relu, out)
    if out is None:
        out = empty_nhwc(conv_output_shape(x, weight, stride, padding, 1), dtype=x.dtype,
                         device=x.device)
    _kernels.direct_conv_into(x, weight, bias, stride, padding, relu, out)
    return out


def _fwd_direct(x, weight, stride, padding, pool, out=None):
    return _direct(x, weight, None, stride, padding, False, out)


def _bwd_onednn(grad_out, x, weight, stride, padding, pool, grad_x):
    z, zp = dense_input(x, pool)
    grad_zp, grad_weight = dense_conv_backward(grad_out, zp, weight, stride, padding)
    grad_x.add_(unpool_grad(grad_zp, z, pool))
    return grad_weight


def _shape_only(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised dense tensor shaped like ``x``: what oneDNN's input-gradient pass
    takes in place of the input, whose values it never reads (``x`` itself, a strided
    prefix, would be copied)."""
    return scratch.get("shape", x.shape, x)


def _dgrad_onednn(grad_out, x, weight, grad_x) -> None:
    grad_x.add_(_aten_backward(grad_out, _shape_only(x), weight, 1, 0, [True, False, False])[0])


def _dgrad_gemm(grad_out, x, weight, grad_x) -> None:
    rows(grad_x).addmm_(rows(grad_out), weight.view(weight.shape[0], -1))


def _wgrad_onednn(grad_out, x, weight) -> torch.Tensor:
    return _aten_backward(grad_out, dense_input(x, 1)[0], weight, 1, 0, [False, True, False])[1]


def _wgrad_gemm(grad_out, x, weight) -> torch.Tensor:
    return torch.mm(rows(grad_out).t(), rows(x)).view(weight.shape)


def _wgrad_direct(grad_out, x, weight) -> torch.Tensor:
    return _kernels.pointwise_conv_wgrad_rows(rows(x), rows(grad_out)).view(weight.shape)


def relu_into(y, out=None):
    """``relu(y)`` in place, or written into ``out`` (one pass: the ReLU and the copy into a
    buffer slice together). NaN stays NaN, as torch.relu keeps it (a non-finite input must
    give non-finite logits, as in the plain model); oneDNN's fused ReLU would turn it into 0,
    so the ReLU runs apart."""
    return torch.relu_(y) if out is None else torch.clamp_min(y, 0, out=out)


def _infer_onednn(x, weight, bias, stride, padding, out=None):
    return relu_into(aten_conv_bias(dense_input(x, 1)[0], weight, bias, stride, padding), out)


def _infer_gemm(x, weight, bias, stride, padding, out=None):
    y, y_rows = _new_nhwc_rows(x, weight)
    torch.addmm(bias, rows(x), weight.view(weight.shape[0], -1).t(), out=y_rows)
    return relu_into(y, out)


def _infer_direct(x, weight, bias, stride, padding, out=None):
    return _direct(x, weight, bias, stride, padding, True, out)


_FORWARD = {"onednn": _fwd_onednn, "gemm": _fwd_gemm, "direct": _fwd_direct}
_INFERENCE = {"onednn": _infer_onednn, "gemm": _infer_gemm, "direct": _infer_direct}
# the two halves of a 1x1 convolution's backward (other convolutions: _bwd_onednn)
_DGRAD = {"onednn": _dgrad_onednn, "gemm": _dgrad_gemm}
_WGRAD = {"onednn": _wgrad_onednn, "gemm": _wgrad_gemm, "direct": _wgrad_direct}


CHOICES = ("auto", "onednn", "gemm", "direct")


_forced: dict = {}  # the stored MSDNET_OPS_CPU_CONV value -> its validated choice


def forced_choice() -> str:
    """``MSDNET_OPS_CPU_CONV``, validated: one of :data:`CHOICES`."""
    stored = environment.raw("MSDNET_OPS_CPU_CONV")
    forced = _forced.get(stored)
    if forced is None:
        forced = environment.setting("MSDNET_OPS_CPU_CONV", "auto")
        if forced not in CHOICES:
            raise ValueError(f"MSDNET_OPS_CPU_CONV={forced!r}: expected {', '.join(CHOICES)}")
        _forced[stored] = forced
    return forced


class _Chooser:
    """Per-shape choice between the implementations, timed once on the first call."""

    def __init__(self):
        self.choice: dict = {}
        # re-entrant: a fused candidate's trial runs calls that make their own first choices
        self.lock = threading.RLock()

    def pick(self, table: dict, key, candidates: tuple, trial) -> str:
        """The fastest of ``candidates`` (names in ``table`` that apply to this shape; oneDNN
        first, applying to every shape); ``trial(impl)`` returns a call of ``impl`` on this
        shape (scratch outputs) to time. A forced choice is taken where it applies, oneDNN
        elsewhere."""
        forced = forced_choice()
        if len(candidates) == 1:
            return candidates[0]
        if forced != "auto":
            return forced if forced in candidates else candidates[0]
        name = self.choice.get(key)
        if name is None:
            with self.lock:
                timings = _best_of_interleaved({n: trial(table[n]) for n in candidates})
                name = self.choice[key] = min(timings, key=timings.get)
        return name


_chooser = _Chooser()

TRIAL_ROUNDS = 5


def _best_of_interleaved(calls: dict, rounds: int = TRIAL_ROUNDS) -> dict:
    """The fastest of ``rounds`` timed runs of each call, the calls taking turns (one run each
    per round), so that a burst of load from another process hits all of them alike rather
    than deciding the choice."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _key(kind, x, weight, stride, padding, pool):
    return (kind, tuple(x.shape), tuple(x.stride()), tuple(weight.shape), stride, padding, pool,
            x.dtype, torch.get_num_threads())


def conv(x, weight, stride, padding, pool, out=None) -> torch.Tensor:
    """``conv2d(avg_pool(x, pool), weight, stride, padding)`` written into ``out`` (a strided
    buffer view), or a new dense NHWC tensor without it; ``x`` may be a strided view."""
    def trial(impl):
        return lambda: impl(x, weight, stride, padding, pool)
    name = _chooser.pick(_FORWARD, _key("fwd", x, weight, stride, padding, pool),
                         _forward_candidates(x, weight, stride, padding, pool, out), trial)
    return _FORWARD[name](x, weight, stride, padding, pool, out)


def _inference_choice(x, weight, bias, stride: int, padding: int, out) -> str:
    def trial(impl):
        return lambda: impl(x, weight, bias, stride, padding)
    return _chooser.pick(_INFERENCE, _key("infer", x, weight, stride, padding, 1),
                         _forward_candidates(x, weight, stride, padding, 1, out), trial)


def conv_bias_relu(x, weight, bias, stride: int, padding: int, out=None) -> torch.Tensor:
    """``relu(conv2d(x, weight, bias, stride, padding))`` (inference with a folded BatchNorm),
    a new dense NHWC tensor, or written into ``out``."""
    name = _inference_choice(x, weight, bias, stride, padding, out)
    return _INFERENCE[name](x, weight, bias, stride, padding, out)


def prepared_conv_bias_relu(x, weight, bias, stride: int, padding: int, out=None):
    """What :func:`conv_bias_relu` runs for these arguments, as ``run(x, out)`` (returning the
    output) for tensors of the same shapes, strides and dtype (``out`` None again where it is
    None here): chosen once, our kernels' weights laid out once (an inference unit runs on
    every forward pass; at batch 1 the per-call choice and layout cost about as much as the
    convolution)."""
    name = _inference_choice(x, weight, bias, stride, padding, out)
    if name == "direct" and out is not None:
        if _gemm_applies(x, weight, stride, padding, 1, out):
            rows_run = _kernels.prepared_pointwise_conv_rows(weight.view(weight.shape[0], -1),
                                                             bias, True)

            def pointwise(x, out):
                rows_run(rows(x), rows(out))
                return out
            return pointwise
        return _kernels.prepared_direct_conv(weight, bias, stride, padding, True)
    impl = _INFERENCE[name]
    return lambda x, out: impl(x, weight, bias, stride, padding, out)


def _bottleneck_fused_applies(x, w1, weight, out) -> bool:
    return (w1.shape[0] <= _kernels.BOTTLENECK_MAX_MID
            and _direct_applies(x, weight, 1, *(() if out is None else (out,))))


def _bottleneck_separate(x, w1, b1, weight, bias, stride, padding, out=None):
    return conv_bias_relu(conv_bias_relu(x, w1, b1, 1, 0), weight, bias, stride, padding, out)


def _bottleneck_fused(x, w1, b1, weight, bias, stride, padding, out=None):
    if out is None:
        out = empty_nhwc(conv_output_shape(x, weight, stride, padding, 1), dtype=x.dtype,
                         device=x.device)
    _kernels.bottleneck_direct_conv_into(x, w1, b1, weight, bias, stride, padding, True, out)
    return out


# "direct": our direct kernel with the 1x1 unit computed into its scratch
_BOTTLENECK = {"separate": _bottleneck_separate, "direct": _bottleneck_fused}


def _bottleneck_choice(x, w1, b1, weight, bias, stride: int, padding: int, out) -> str:
    def trial(impl):
        return lambda: impl(x, w1, b1, weight, bias, stride, padding)
    candidates = ("separate", "direct") if _bottleneck_fused_applies(x, w1, weight, out) \
        else ("separate",)
    key = ("bottleneck",) + _key("infer", x, weight, stride, padding, 1) + (tuple(w1.shape),)
    return _chooser.pick(_BOTTLENECK, key, candidates, trial)


def bottleneck_conv_bias_relu(x, w1, b1, weight, bias, stride: int, padding: int,
                              out=None) -> torch.Tensor:
    """``relu(conv2d(relu(conv2d(x, w1, b1)), weight, bias, stride, padding))`` (a 1x1 unit
    then a k x k one, inference), new or written into ``out``: the two convolutions apart
    (each its own choice), or where our direct kernel applies and the bottleneck is narrow,
    fused (its output never stored), chosen per shape."""
    name = _bottleneck_choice(x, w1, b1, weight, bias, stride, padding, out)
    return _BOTTLENECK[name](x, w1, b1, weight, bias, stride, padding, out)


def prepared_bottleneck_conv_bias_relu(x, w1, b1, weight, bias, stride: int, padding: int,
                                       out=None):
    """What :func:`bottleneck_conv_bias_relu` runs for these arguments, as ``run(x, out)`` for
    tensors of the same shapes, strides and dtype (see :func:`prepared_conv_bias_relu`)."""
    if _bottleneck_choice(x, w1, b1, weight, bias, stride, padding, out) == "direct":
        if out is None:  # (a new output each call)
            return lambda x, out: _bottleneck_fused(x, w1, b1, weight, bias, stride, padding,
                                                    out)
        return _kernels.prepared_bottleneck_direct_conv(w1, b1, weight, bias, stride, padding,
                                                        True)
    first = prepared_conv_bias_relu(x, w1, b1, 1, 0)
    # the second reads the first's new (dense NHWC) outputs: prepared on one of them
    second = prepared_conv_bias_relu(first(x, None), weight, bias, stride, padding, out)
    return lambda x, out: second(first(x, None), out)


def prepared_key() -> tuple:
    """What a prepared call depends on beyond its arguments' shapes: the forced choice and
    the thread count (the per-shape choices are made per thread count)."""
    return forced_choice(), torch.get_num_threads()


def conv_backward_(grad_out, x, weight, stride, padding, pool, grad_x) -> torch.Tensor:
    """Accumulates the input gradient into ``grad_x`` (``+=``); returns ``grad_weight``."""
    grad_out = dense(grad_out)  # a buffer's channel slice: the engines take dense tensors
    if not _gemm_applies(x, weight, stride, padding, pool, grad_out, grad_x):
        forced_choice()  # a bad setting is refused even where only oneDNN applies
        return _bwd_onednn(grad_out, x, weight, stride, padding, pool, grad_x)

    def dgrad_trial(impl):
        scratch_grad = torch.zeros_like(grad_x)
        return lambda: impl(grad_out, x, weight, scratch_grad)

    def wgrad_trial(impl):
        return lambda: impl(grad_out, x, weight)
    # the input gradient: MKL's GEMM beats our kernel in its accumulating form (measured 0.34
    # vs 0.71 ms at 32768 rows, 6 -> 46 channels), so it is no candidate there
    both = ("onednn", "gemm")
    few = weight.shape[0] <= _kernels.POINTWISE_WGRAD_MAX_OUTPUTS and _kernels.available()
    dgrad = _chooser.pick(_DGRAD, _key("dgrad", x, weight, 1, 0, 1), both, dgrad_trial)
    wgrad = _chooser.pick(_WGRAD, _key("wgrad", x, weight, 1, 0, 1),
                          both + ("direct",) if few else both, wgrad_trial)
    _DGRAD[dgrad](grad_out, x, weight, grad_x)
    return _WGRAD[wgrad](grad_out, x, weight)
