"""Property tests (hypothesis) of every public op in ``msdnet_ops.ops`` on every backend.

The truth is computed in float64 with plain PyTorch (``torch.nn.functional`` and autograd), from
the values the op really received (its inputs upcast), never with the code under test.

Each example draws:

* sizes: batch 1 included, odd and prime channel counts, spatial sizes down to what the
  convolution geometry allows;
* where each tensor lives (:class:`Layout`): a channel slice at any offset of a wider buffer,
  stored NCHW or NHWC (channels_last, what the library uses), every column or every other one
  (non-contiguous rows); per-channel vectors as strided slices of longer vectors;
* the dtype: float32 and float64 everywhere, bfloat16 and float16 where the backend runs them
  (reference, triton; the CPU kernels reject them, see ``test_bad_input.py``);
* the geometry: 1x1 and 3x3, stride 1/2, padding 0/1, pool 1/2 (pool 2 before a 1x1 stride-1
  convolution without padding, as the Transition uses it).

Input buffers are NaN outside the op's view (a kernel reading past its view fails), output and
gradient buffers hold random values outside the written slice, which must not change;
``_backward_`` ops must add to (``+=``) the random values their gradient slices start with.

Triton kernels run in the interpreter on CPU tensors (about 0.1-0.5 s a launch), so they get
few examples. ``MSDNET_OPS_PROPERTY_EXAMPLES=<factor>`` multiplies every example count (and
``MSDNET_OPS_PROPERTY_RANDOM=1`` draws new examples instead of the fixed, derandomized ones)
to search harder by hand.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import backend_params
from msdnet_ops import ops

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
NAN = float("nan")

# dtypes each backend runs (the CPU kernels raise a TypeError for bfloat16/float16; Triton has
# no float64 GEMMs on GPUs, its interpreter runs float64 on CPU tensors)
TRITON_DTYPES = (F32, BF16, F16) if torch.cuda.is_available() else (F32, F64, BF16, F16)
BACKEND_DTYPES = {"reference": (F32, F64, BF16, F16), "cpu": (F32, F64), "triton": TRITON_DTYPES,
                  "cuda": (F32, F64, BF16, F16)}
_FACTOR = float(os.environ.get("MSDNET_OPS_PROPERTY_EXAMPLES", "1"))
EXAMPLES = {"reference": 20, "cpu": 20, "triton": 4, "cuda": 20}
# error allowed against the float64 truth, relative to the result's largest magnitude (>= 1)
TOLERANCE = {F64: 1e-10, F32: 2e-5, BF16: 2e-2, F16: 3e-3}

BATCHES = (1, 2, 3, 5)
CHANNELS = (1, 2, 3, 5, 7, 11)
SPATIAL = (1, 2, 3, 5, 7)


def stats_dtype(dtype):
    """dtype of per-channel vectors for features of ``dtype`` (reference.py's convention)."""
    return F64 if dtype == F64 else F32


# ----------------------------------------------------------------------------- backends

def backends_and_cpu_convolutions():
    """Every backend; the CPU one twice for convolutions: oneDNN and the in-place GEMMs (which
    apply to 1x1 stride-1 convolutions of NHWC-strided tensors), each forced, since the
    automatic choice between them depends on timing."""
    params = []
    for p in backend_params():
        if p == "cpu":
            params += [pytest.param("cpu", "onednn", id="cpu-onednn"),
                       pytest.param("cpu", "gemm", id="cpu-gemm"),
                       pytest.param("cpu", "direct", id="cpu-direct")]
        else:
            name, marks = (p, ()) if isinstance(p, str) else (p.values[0], p.marks)
            params.append(pytest.param(name, None, marks=marks, id=name))
    return params


@pytest.fixture
def select(use_backend, monkeypatch):
    """``select(backend, cpu_conv=None)``: runs the rest of the test on ``backend`` (and the
    CPU convolution ``cpu_conv`` forced); returns the device."""
    def choose(backend, cpu_conv=None):
        if cpu_conv is not None:
            monkeypatch.setenv("MSDNET_OPS_CPU_CONV", cpu_conv)
        return use_backend(backend)
    return choose


def for_examples(backend, strategy, check):
    """Runs ``check(example)`` on examples drawn from ``strategy`` (few for interpreted Triton)."""
    @settings(max_examples=max(1, int(EXAMPLES[backend] * _FACTOR)), deadline=None,
              database=None, derandomize=os.environ.get("MSDNET_OPS_PROPERTY_RANDOM") != "1",
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(strategy)
    def run(example):
        check(example)
    run()


# ----------------------------------------------------------------------------- layouts

@dataclasses.dataclass(frozen=True)
class Layout:
    """Where an ``[N, C, H, W]`` tensor lives: channels ``offset .. offset+C`` of a buffer with
    ``extra`` channels more, NHWC (``channels_last``) or NCHW in memory, every ``step``-th
    column of a ``step`` times wider buffer (step 2: rows are not contiguous)."""
    channels_last: bool
    offset: int
    extra: int
    step: int


@dataclasses.dataclass(frozen=True)
class VectorLayout:
    """Where a per-channel vector lives: every ``step``-th entry from ``offset`` of a longer one."""
    offset: int
    step: int


def layouts():
    return st.builds(Layout, st.booleans(), st.integers(0, 3), st.integers(0, 2),
                     st.sampled_from((1, 2)))


def vector_layouts():
    return st.builds(VectorLayout, st.integers(0, 2), st.sampled_from((1, 2)))




DENSE_NCHW = Layout(channels_last=False, offset=0, extra=0, step=1)


@dataclasses.dataclass
class Placed:
    """A view of a bigger buffer and the index that cuts it out of the buffer."""
    buffer: torch.Tensor
    index: tuple

    @property
    def view(self) -> torch.Tensor:
        return self.buffer[self.index]

    def snapshot(self) -> torch.Tensor:
        return self.buffer.clone()

    def assert_only_view_changed(self, before: torch.Tensor, what: str) -> None:
        """Every buffer element outside the view is bit for bit what it was."""
        after = self.buffer.clone()
        after[self.index] = before[self.index]
        assert_identical(after, before, f"{what}: outside the written slice")


def assert_identical(got, want, what):
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{what} changed: {m}")


def place(values: torch.Tensor, layout: Layout, outside: float | None = None,
          gen: torch.Generator | None = None) -> Placed:
    """``values`` (any dtype, CPU) copied into a view laid out as ``layout``; the rest of the
    buffer holds ``outside`` (NaN for inputs), or random values from ``gen`` when it is None."""
    n, c, h, w = values.shape
    shape = (n, layout.offset + c + layout.extra, h, w * layout.step)
    if outside is None:
        buffer = torch.randn(shape, dtype=F64, generator=gen).to(values.dtype)
    else:
        buffer = torch.full(shape, outside, dtype=values.dtype)
    if layout.channels_last:
        buffer = buffer.contiguous(memory_format=torch.channels_last)
    index = (slice(None), slice(layout.offset, layout.offset + c), slice(None),
             slice(None, None, layout.step))
    buffer[index] = values
    return Placed(buffer, index)


def place_vector(values: torch.Tensor, layout: VectorLayout, outside: float | None = None,
                 gen: torch.Generator | None = None) -> Placed:
    c = values.shape[0]
    length = layout.offset + c * layout.step + 1
    if outside is None:
        buffer = torch.randn(length, dtype=F64, generator=gen).to(values.dtype)
    else:
        buffer = torch.full((length,), outside, dtype=values.dtype)
    index = (slice(layout.offset, layout.offset + c * layout.step, layout.step),)
    buffer[index] = values
    return Placed(buffer, index)


def to_device(placed: Placed, device) -> Placed:
    return Placed(placed.buffer.to(device), placed.index)


def assert_dense_in_layout_of(out: torch.Tensor, x: torch.Tensor, what: str) -> None:
    """``out`` is a new dense tensor in ``x``'s layout family (NHWC for NHWC-strided x)."""
    nhwc = x.stride(1) == 1 and x.shape[1] > 1
    fmt = torch.channels_last if nhwc else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), \
        f"{what}: expected a dense {fmt} tensor like x (strides {x.stride()}), got {out.stride()}"


# ----------------------------------------------------------------------------- truth (float64)

def per_channel(v):
    return v.view(1, -1, 1, 1)


def true_stats(x, eps):
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    return mean, 1 / torch.sqrt(var + eps)


def true_affine_relu(x, scale, shift):
    return torch.relu(x * per_channel(scale) + per_channel(shift))


def true_conv(x, weight, geometry):
    if geometry.pool != 1:
        x = F.avg_pool2d(x, geometry.pool)
    return F.conv2d(x, weight, None, geometry.stride, geometry.padding)


def true_transform_conv(x, scale, shift, weight, geometry):
    return true_conv(true_affine_relu(x, scale, shift), weight, geometry)


def true_grads(fn, inputs, grad_output):
    """Gradients of ``(fn(*inputs) * grad_output).sum()`` with respect to ``inputs``
    (float64 autograd; ReLU's derivative at 0 is 0 there, as the ops define it)."""
    leaves = [t.detach().to("cpu", F64).requires_grad_() for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    grads = grad_output if isinstance(grad_output, tuple) else (grad_output,)
    return torch.autograd.grad(outs, leaves, [g.to("cpu", F64) for g in grads])


def assert_near(got, want, dtype, what):
    """``got`` within ``TOLERANCE[dtype]`` of the float64 ``want``, relative to its magnitude."""
    tol = TOLERANCE[dtype]
    want = want.to(F64).cpu()
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.detach().to(F64).cpu(), want, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what} ({dtype}): {m}")


# ----------------------------------------------------------------------------- examples

@dataclasses.dataclass(frozen=True)
class Geometry:
    k: int
    stride: int
    padding: int
    pool: int

    def fits(self, side: int) -> bool:
        """Whether an input side of ``side`` pixels leaves at least one output pixel."""
        return side // self.pool >= 1 and side // self.pool + 2 * self.padding >= self.k

    def args(self):
        return self.stride, self.padding, self.pool


GEOMETRIES = tuple(Geometry(k, s, p, 1) for k in (1, 3) for s in (1, 2) for p in (0, 1)) + \
    (Geometry(1, 1, 0, 2),)


@dataclasses.dataclass(frozen=True)
class Example:
    """Everything one property check needs; tensors come from ``seed``."""
    n: int
    c: int
    h: int
    w: int
    dtype: torch.dtype
    x_layout: Layout
    out_layout: Layout      # where outputs / accumulated gradients are written
    grad_layout: Layout     # where an incoming gradient (grad_out, grad_z) lives
    vector_layout: VectorLayout       # per-channel inputs
    grad_vector_layout: VectorLayout  # per-channel gradients accumulated into
    geometry: Geometry | None
    c_out: int
    weight_channels_last: bool
    eps: float
    seed: int

    def generator(self):
        return torch.Generator().manual_seed(self.seed)


@st.composite
def examples(draw, backend, convolution=False, needs_two_values=False):
    """An :class:`Example` for ``backend``; with ``convolution`` a geometry the sizes fit."""
    geometry = draw(st.sampled_from(GEOMETRIES)) if convolution else None
    n, c = draw(st.sampled_from(BATCHES)), draw(st.sampled_from(CHANNELS))
    sides = [s for s in SPATIAL if geometry is None or geometry.fits(s)]
    h, w = draw(st.sampled_from(sides)), draw(st.sampled_from(sides))
    if needs_two_values and n * h * w < 2:
        w = 2
    return Example(n, c, h, w, draw(st.sampled_from(BACKEND_DTYPES[backend])), draw(layouts()),
                   draw(layouts()), draw(layouts()), draw(vector_layouts()),
                   draw(vector_layouts()), geometry,
                   draw(st.sampled_from(CHANNELS)), draw(st.booleans()),
                   draw(st.sampled_from((1e-5, 1e-3, 0.5))), draw(st.integers(0, 2**31 - 1)))


def random(shape, gen, dtype, low=None, high=None):
    """Standard normal values (uniform in [low, high) when given), rounded to ``dtype``."""
    if low is None:
        return torch.randn(shape, dtype=F64, generator=gen).to(dtype)
    return (torch.rand(shape, dtype=F64, generator=gen) * (high - low) + low).to(dtype)


class Inputs:
    """The tensors of one example, on ``device``, placed as the example says."""

    def __init__(self, ex: Example, device, activated=False):
        gen = ex.generator()
        self.ex, self.device = ex, device
        sdt = stats_dtype(ex.dtype)
        shape = (ex.n, ex.c, ex.h, ex.w)
        # activated channels (what conv reads) are positive; exact zeros: see the test below
        values = random(shape, gen, ex.dtype, 0.05, 2.0) if activated else \
            random(shape, gen, ex.dtype)
        self.x_placed = to_device(place(values, ex.x_layout, outside=NAN), device)
        self.x = self.x_placed.view
        self.scale_placed = to_device(place_vector(random(ex.c, gen, sdt), ex.vector_layout,
                                                   NAN), device)
        self.shift_placed = to_device(place_vector(random(ex.c, gen, sdt), ex.vector_layout,
                                                   NAN), device)
        self.scale, self.shift = self.scale_placed.view, self.shift_placed.view
        self.weight = None
        if ex.geometry is not None:
            k = ex.geometry.k
            w = random((ex.c_out, ex.c, k, k), gen, ex.dtype) / (ex.c * k * k) ** 0.5
            fmt = torch.channels_last if ex.weight_channels_last else torch.contiguous_format
            self.weight = w.contiguous(memory_format=fmt).to(device)
        self.gen = gen

    def output_shape(self):
        ex, g = self.ex, self.ex.geometry
        h, w = ex.h // g.pool, ex.w // g.pool
        return (ex.n, ex.c_out, (h + 2 * g.padding - g.k) // g.stride + 1,
                (w + 2 * g.padding - g.k) // g.stride + 1)

    def incoming_gradient(self, shape) -> torch.Tensor:
        """A random gradient placed as ``grad_layout`` says (it must be read, not written)."""
        values = random(shape, self.gen, self.ex.dtype)
        return to_device(place(values, self.ex.grad_layout, NAN), self.device).view

    def output_slice(self, shape) -> Placed:
        """A slice of a random buffer to write or accumulate into (``out_layout``)."""
        return to_device(place(random(shape, self.gen, self.ex.dtype), self.ex.out_layout,
                               gen=self.gen), self.device)

    def gradient_vector(self) -> Placed:
        """A per-channel gradient to accumulate into: random values, strided slice."""
        sdt = stats_dtype(self.ex.dtype)
        return to_device(place_vector(random(self.ex.c, self.gen, sdt),
                                      self.ex.grad_vector_layout, gen=self.gen), self.device)

    def leaves(self, *tensors):
        """Autograd leaves that keep each tensor's storage and strides."""
        return [t.detach().requires_grad_() for t in tensors]


class Unchanged:
    """Remembers tensors an op only reads; :meth:`check` says none of them changed."""

    def __init__(self, **tensors):
        self.before = {name: t.clone() for name, t in tensors.items()}
        self.tensors = tensors

    def check(self):
        for name, t in self.tensors.items():
            assert_identical(t, self.before[name], f"input {name}")


class Accumulator:
    """A gradient slice or vector the op must add to: checks ``after == before + want`` and
    that nothing outside the slice moved."""

    def __init__(self, placed: Placed, name: str):
        self.placed, self.name = placed, name
        self.buffer_before = placed.snapshot()
        self.before = placed.view.to("cpu", F64, copy=True)

    @property
    def view(self):
        return self.placed.view

    def check(self, want, dtype):
        assert_near(self.placed.view, self.before + want.to(F64).cpu(), dtype,
                    f"{self.name} (+= its gradient)")
        self.placed.assert_only_view_changed(self.buffer_before, self.name)


def check_writes_slice(inp: Inputs, shape, write, want, **inputs):
    """``write(out)`` (an ``_into_`` op) fills a slice of a random buffer with ``want``, returns
    None, and changes nothing else: not the rest of the buffer, not ``inputs``."""
    out = inp.output_slice(shape)
    before = out.snapshot()
    unchanged = Unchanged(**inputs)
    assert write(out.view) is None
    unchanged.check()
    assert_near(out.view, want, inp.ex.dtype, "out")
    out.assert_only_view_changed(before, "out")


def check_functional(inp: Inputs, name, op, truth, inputs, out_shape, grad_dtypes):
    """``op(*inputs)``: a new dense tensor in x's layout equal to ``truth``, and its autograd
    gradients (of a random ``grad_out``) equal to ``truth``'s, within ``grad_dtypes``'s
    tolerances."""
    leaves = [t.detach().requires_grad_() for t in inputs]  # storage and strides kept
    out = op(*leaves)
    assert out.dtype == inp.ex.dtype and tuple(out.shape) == tuple(out_shape)
    assert_dense_in_layout_of(out, inputs[0], name)
    assert_near(out, truth(*(t.to(F64) for t in inputs)), inp.ex.dtype, name)
    grad_out = inp.incoming_gradient(out.shape)
    got = torch.autograd.grad(out, leaves, grad_out)
    want = true_grads(truth, inputs, grad_out)
    for i, (a, b, dtype) in enumerate(zip(got, want, grad_dtypes)):
        assert_near(a, b, dtype, f"{name}: autograd gradient of input {i}")


def check_weight_gradient(grad_weight, weight, want, dtype):
    """The returned weight gradient: ``weight``'s dtype, shape and strides, and ``want``."""
    assert (grad_weight.dtype, grad_weight.shape, grad_weight.stride()) == \
        (weight.dtype, weight.shape, weight.stride()), "grad_weight: not laid out like weight"
    assert_near(grad_weight, want, dtype, "grad_weight")


# ----------------------------------------------------------------------------- channel statistics

@pytest.mark.parametrize("backend", backend_params())
def test_channel_stats(backend, select):
    device = select(backend)

    def check(ex):
        inp = Inputs(ex, device)
        x = inp.x
        unchanged = Unchanged(x_buffer=inp.x_placed.buffer)
        (xl,) = inp.leaves(x)
        mean, invstd = ops.channel_stats(xl, ex.eps)
        unchanged.check()
        sdt = stats_dtype(ex.dtype)
        assert mean.dtype == invstd.dtype == sdt and mean.shape == invstd.shape == (ex.c,)
        want_mean, want_invstd = true_stats(x.to(F64), ex.eps)
        assert_near(mean, want_mean, sdt, "mean")
        assert_near(invstd, want_invstd, sdt, "invstd")
        grad_mean, grad_invstd = random(ex.c, inp.gen, sdt), random(ex.c, inp.gen, sdt)
        (got,) = torch.autograd.grad((mean, invstd), (xl,), (grad_mean.to(device),
                                                             grad_invstd.to(device)))
        (want,) = true_grads(lambda t: true_stats(t, ex.eps), (x,), (grad_mean, grad_invstd))
        assert_near(got, want, ex.dtype, "autograd grad_x")

    for_examples(backend, examples(backend, needs_two_values=True), check)


@pytest.mark.parametrize("backend", backend_params())
def test_channel_stats_backward_(backend, select):
    device = select(backend)

    def check(ex):
        inp = Inputs(ex, device)
        x, sdt = inp.x, stats_dtype(ex.dtype)
        mean, invstd = (t.to(sdt) for t in true_stats(x.to(F64), ex.eps))
        vectors = [to_device(place_vector(v.cpu(), ex.vector_layout, NAN), device).view
                   for v in (mean, invstd, random(ex.c, inp.gen, sdt), random(ex.c, inp.gen, sdt))]
        grad_x = Accumulator(inp.output_slice(x.shape), "grad_x")
        unchanged = Unchanged(x=x, mean=vectors[0], invstd=vectors[1], grad_mean=vectors[2],
                              grad_invstd=vectors[3])
        assert ops.channel_stats_backward_(x, *vectors, grad_x.view) is None
        unchanged.check()
        (want,) = true_grads(lambda t: true_stats(t, ex.eps), (x,), (vectors[2], vectors[3]))
        grad_x.check(want, ex.dtype)

    for_examples(backend, examples(backend, needs_two_values=True), check)


# ----------------------------------------------------------------------------- affine + ReLU

@pytest.mark.parametrize("backend", backend_params())
def test_affine_relu(backend, select):
    device = select(backend)

    def check(ex):
        inp = Inputs(ex, device)
        sdt = stats_dtype(ex.dtype)
        check_functional(inp, "affine_relu", ops.affine_relu, true_affine_relu,
                         (inp.x, inp.scale, inp.shift), inp.x.shape, (ex.dtype, sdt, sdt))

    for_examples(backend, examples(backend), check)


@pytest.mark.parametrize("backend", backend_params())
def test_affine_relu_into_(backend, select):
    device = select(backend)

    def check(ex):
        inp = Inputs(ex, device)
        x, scale, shift = inp.x, inp.scale, inp.shift
        check_writes_slice(inp, x.shape, lambda out: ops.affine_relu_into_(x, scale, shift, out),
                           true_affine_relu(x.to(F64), scale.to(F64), shift.to(F64)),
                           x_buffer=inp.x_placed.buffer, scale=scale, shift=shift)

    for_examples(backend, examples(backend), check)


@pytest.mark.parametrize("backend", backend_params())
def test_affine_relu_backward_(backend, select):
    device = select(backend)

    def check(ex):
        inp = Inputs(ex, device)
        x, scale, shift = inp.x, inp.scale, inp.shift
        grad_z = inp.incoming_gradient(x.shape)
        grad_x = Accumulator(inp.output_slice(x.shape), "grad_x")
        grad_scale = Accumulator(inp.gradient_vector(), "grad_scale")
        grad_shift = Accumulator(inp.gradient_vector(), "grad_shift")
        unchanged = Unchanged(x=x, scale=scale, shift=shift, grad_z=grad_z)
        assert ops.affine_relu_backward_(x, scale, shift, grad_z, grad_x.view, grad_scale.view,
                                         grad_shift.view) is None
        unchanged.check()
        want = true_grads(true_affine_relu, (x, scale, shift), grad_z)
        grad_x.check(want[0], ex.dtype)
        grad_scale.check(want[1], stats_dtype(ex.dtype))
        grad_shift.check(want[2], stats_dtype(ex.dtype))

    for_examples(backend, examples(backend), check)


# ----------------------------------------------------------------------------- transform-conv

@pytest.mark.parametrize("backend,cpu_conv", backends_and_cpu_convolutions())
def test_transform_conv(backend, cpu_conv, select):
    device = select(backend, cpu_conv)

    def check(ex):
        inp = Inputs(ex, device)
        g = ex.geometry
        # every gradient goes through the convolution's input gradient, in x's dtype
        check_functional(inp, "transform_conv", lambda *t: ops.transform_conv(*t, *g.args()),
                         lambda *t: true_transform_conv(*t, g),
                         (inp.x, inp.scale, inp.shift, inp.weight), inp.output_shape(),
                         (ex.dtype,) * 4)

    for_examples(backend, examples(backend, convolution=True), check)


@pytest.mark.parametrize("backend,cpu_conv", backends_and_cpu_convolutions())
def test_transform_conv_into_(backend, cpu_conv, select):
    device = select(backend, cpu_conv)

    def check(ex):
        inp = Inputs(ex, device)
        g, x, scale, shift, weight = ex.geometry, inp.x, inp.scale, inp.shift, inp.weight
        check_writes_slice(
            inp, inp.output_shape(),
            lambda out: ops.transform_conv_into_(x, scale, shift, weight, *g.args(), out),
            true_transform_conv(x.to(F64), scale.to(F64), shift.to(F64), weight.to(F64), g),
            x_buffer=inp.x_placed.buffer, scale=scale, shift=shift, weight=weight)

    for_examples(backend, examples(backend, convolution=True), check)


def check_transform_conv_backward(inp: Inputs):
    """Runs ``transform_conv_backward_`` on ``inp`` and checks it against the truth."""
    ex, g = inp.ex, inp.ex.geometry
    x, scale, shift, weight = inp.x, inp.scale, inp.shift, inp.weight
    grad_out = inp.incoming_gradient(inp.output_shape())
    grad_x = Accumulator(inp.output_slice(x.shape), "grad_x")
    grad_scale = Accumulator(inp.gradient_vector(), "grad_scale")
    grad_shift = Accumulator(inp.gradient_vector(), "grad_shift")
    unchanged = Unchanged(grad_out=grad_out, x=x, scale=scale, shift=shift, weight=weight)
    grad_weight = ops.transform_conv_backward_(grad_out, x, scale, shift, weight, *g.args(),
                                               grad_x.view, grad_scale.view, grad_shift.view)
    unchanged.check()
    want = true_grads(lambda *t: true_transform_conv(*t, g), (x, scale, shift, weight), grad_out)
    # the vector gradients go through the convolution's input gradient, in x's dtype
    grad_x.check(want[0], ex.dtype)
    grad_scale.check(want[1], ex.dtype)
    grad_shift.check(want[2], ex.dtype)
    check_weight_gradient(grad_weight, weight, want[3], ex.dtype)


@pytest.mark.parametrize("backend,cpu_conv", backends_and_cpu_convolutions())
def test_transform_conv_backward_(backend, cpu_conv, select):
    device = select(backend, cpu_conv)
    for_examples(backend, examples(backend, convolution=True),
                 lambda ex: check_transform_conv_backward(Inputs(ex, device)))


@pytest.mark.parametrize("backend,cpu_conv", backends_and_cpu_convolutions())
def test_transform_conv_backward_into_strided_vectors(backend, cpu_conv, select):
    """grad_scale and grad_shift may be strided views (the checks accept any stride)."""
    device = select(backend, cpu_conv)
    ex = Example(1, 2, 1, 2, F32, DENSE_NCHW, DENSE_NCHW, DENSE_NCHW, VectorLayout(0, 1),
                 VectorLayout(0, 2), Geometry(1, 1, 0, 1), 1, False, 1e-5, 0)
    check_transform_conv_backward(Inputs(ex, device))


# ----------------------------------------------------------------------------- conv (activated x)

@pytest.mark.parametrize("backend,cpu_conv", backends_and_cpu_convolutions())
def test_conv(backend, cpu_conv, select):
    device = select(backend, cpu_conv)

    def check(ex):
        inp = Inputs(ex, device, activated=True)
        g = ex.geometry
        check_functional(inp, "conv", lambda *t: ops.conv(*t, *g.args()),
                         lambda *t: true_conv(*t, g), (inp.x, inp.weight), inp.output_shape(),
                         (ex.dtype,) * 2)

    for_examples(backend, examples(backend, convolution=True), check)


@pytest.mark.parametrize("backend,cpu_conv", backends_and_cpu_convolutions())
def test_conv_into_(backend, cpu_conv, select):
    device = select(backend, cpu_conv)

    def check(ex):
        inp = Inputs(ex, device, activated=True)
        g, x, weight = ex.geometry, inp.x, inp.weight
        check_writes_slice(inp, inp.output_shape(),
                           lambda out: ops.conv_into_(x, weight, *g.args(), out),
                           true_conv(x.to(F64), weight.to(F64), g),
                           x_buffer=inp.x_placed.buffer, weight=weight)

    for_examples(backend, examples(backend, convolution=True), check)


def check_conv_backward(inp: Inputs):
    """Runs ``conv_backward_`` on ``inp`` and checks it against the truth."""
    ex, g, x, weight = inp.ex, inp.ex.geometry, inp.x, inp.weight
    grad_out = inp.incoming_gradient(inp.output_shape())
    grad_x = Accumulator(inp.output_slice(x.shape), "grad_x")
    unchanged = Unchanged(grad_out=grad_out, x=x, weight=weight)
    grad_weight = ops.conv_backward_(grad_out, x, weight, *g.args(), grad_x.view)
    unchanged.check()
    want = true_grads(lambda *t: true_conv(*t, g), (x, weight), grad_out)
    grad_x.check(want[0], ex.dtype)
    check_weight_gradient(grad_weight, weight, want[1], ex.dtype)


@pytest.mark.parametrize("backend,cpu_conv", backends_and_cpu_convolutions())
def test_conv_backward_(backend, cpu_conv, select):
    device = select(backend, cpu_conv)
    for_examples(backend, examples(backend, convolution=True),
                 lambda ex: check_conv_backward(Inputs(ex, device, activated=True)))


@pytest.mark.parametrize("backend,cpu_conv", backends_and_cpu_convolutions())
def test_conv_backward_at_exact_zeros(backend, cpu_conv, select):
    """Activated channels are ReLU outputs: many are exactly 0, and the convolution's input
    gradient there is not 0."""
    device = select(backend, cpu_conv)
    ex = Example(2, 3, 3, 3, F32, DENSE_NCHW, DENSE_NCHW, DENSE_NCHW, VectorLayout(0, 1),
                 VectorLayout(0, 1), Geometry(1, 1, 0, 1), 2, False, 1e-5, 0)
    inp = Inputs(ex, device, activated=True)
    inp.x_placed.buffer[:, :, 1] = 0  # a row of exact zeros in every channel
    check_conv_backward(inp)


# ----------------------------------------------------------------------------- into the read buffer

SAME_SIZE_GEOMETRIES = tuple(g for g in GEOMETRIES if g.stride == 1 and g.padding == (g.k - 1) // 2
                             and g.pool == 1)


@st.composite
def same_buffer_examples(draw, backend):
    """An example whose output has x's spatial size, to be written after x in x's own buffer."""
    ex = draw(examples(backend, convolution=True))
    return dataclasses.replace(ex, geometry=draw(st.sampled_from(SAME_SIZE_GEOMETRIES)))


@pytest.mark.parametrize("backend,cpu_conv", backends_and_cpu_convolutions())
def test_into_ops_append_to_the_buffer_they_read(backend, cpu_conv, select):
    """A dense layer reads a prefix of its buffer and writes the next channels of the same one:
    ``affine_relu_into_``, ``transform_conv_into_`` and ``conv_into_`` there."""
    device = select(backend, cpu_conv)

    def check(ex):
        inp = Inputs(ex, device)
        g, x, scale, shift = ex.geometry, inp.x, inp.scale, inp.shift
        x64 = x.to(F64)
        z = true_affine_relu(x64, scale.to(F64), shift.to(F64))
        w64 = inp.weight.to(F64)
        wants = (z, true_conv(z, w64, g), true_conv(x64.abs(), w64, g))
        width = 2 * ex.c + 2 * ex.c_out
        buf = torch.randn(ex.n, width, ex.h, ex.w, dtype=F64, generator=inp.gen).to(ex.dtype)
        if ex.x_layout.channels_last:
            buf = buf.contiguous(memory_format=torch.channels_last)
        buf = buf.to(device)
        buf[:, :ex.c] = x
        buf[:, ex.c:2 * ex.c] = x.abs()  # activated channels for conv_into_
        prefix, activated = buf[:, :ex.c], buf[:, ex.c:2 * ex.c]
        slot1 = buf[:, 2 * ex.c:2 * ex.c + ex.c_out]
        slot2 = buf[:, 2 * ex.c + ex.c_out:]
        before = buf.clone()
        ops.transform_conv_into_(prefix, scale, shift, inp.weight, *g.args(), slot1)
        assert_near(slot1, wants[1], ex.dtype, "transform_conv_into_")
        ops.conv_into_(activated, inp.weight, *g.args(), slot2)
        assert_near(slot2, wants[2], ex.dtype, "conv_into_")
        ops.affine_relu_into_(prefix, scale, shift, activated)
        assert_near(activated, wants[0], ex.dtype, "affine_relu_into_")
        assert_identical(buf[:, :ex.c], before[:, :ex.c], "the prefix read")

    for_examples(backend, same_buffer_examples(backend), check)


# ----------------------------------------------------------------------------- batch compaction

@pytest.mark.parametrize("backend", backend_params())
def test_gather_batch(backend, select):
    device = select(backend)

    def check(case):
        ex, rows = case
        inp = Inputs(ex, device)
        src = inp.x
        index = torch.tensor(rows, dtype=torch.int64, device=device)
        unchanged = Unchanged(src_buffer=inp.x_placed.buffer)
        out = ops.gather_batch(src, index)
        unchanged.check()
        assert out.dtype == ex.dtype and tuple(out.shape) == (len(rows), ex.c, ex.h, ex.w)
        if rows:
            assert_dense_in_layout_of(out, src, "gather_batch")
        assert_identical(out.cpu(), src.cpu()[list(rows)], "gathered rows (a copy: exact)")

    @st.composite
    def cases(draw):
        ex = draw(examples(backend))
        return ex, draw(st.lists(st.integers(0, ex.n - 1), max_size=7))

    for_examples(backend, cases(), check)


# ----------------------------------------------------------------------------- NaN

def nan_cases():
    """(backend, cpu_conv, op) for every backend and the ops that read x through a ReLU or a
    convolution."""
    for p in backends_and_cpu_convolutions():
        for op in ("affine_relu", "transform_conv", "conv"):
            yield pytest.param(*p.values, op, marks=list(p.marks), id=f"{p.id}-{op}")


@pytest.mark.parametrize("backend,cpu_conv,op", list(nan_cases()))
def test_nan_in_x_reaches_the_output(backend, cpu_conv, op, select):
    """As ``torch.relu``, which the reference uses: a NaN input gives NaN outputs where it is
    read (anomaly detection and a GradScaler's skipped steps rely on that)."""
    device = select(backend, cpu_conv)
    x = torch.rand(1, 2, 3, 3, device=device) + 0.5
    x[0, 1, 1, 2] = NAN
    scale, shift = torch.ones(2, device=device), torch.zeros(2, device=device)
    weight = torch.ones(2, 2, 1, 1, device=device)
    out = {"affine_relu": lambda: ops.affine_relu(x, scale, shift)[:, 1:],
           "transform_conv": lambda: ops.transform_conv(x, scale, shift, weight, 1, 0, 1),
           "conv": lambda: ops.conv(x, weight, 1, 0, 1)}[op]()
    assert out[0, :, 1, 2].isnan().all(), f"{op}: NaN lost: {out[0, :, 1, 2].tolist()}"


def test_cpu_conv_choice_times_the_implementations_in_turns_and_keeps_the_faster(monkeypatch):
    """The per-shape CPU choice (oneDNN or GEMM) runs its trials alternately, so that a burst
    of load cannot hit one implementation's runs only, and keeps the faster one, once."""
    import time
    from msdnet_ops.kernels import cpu_conv
    monkeypatch.delenv("MSDNET_OPS_CPU_CONV", raising=False)
    calls = []

    def impl(name, seconds):
        def run():
            calls.append(name)
            time.sleep(seconds)
        return run
    table = {"onednn": impl("onednn", 0.004), "gemm": impl("gemm", 0.0),
             "direct": impl("direct", 0.002)}
    both = ("onednn", "gemm")
    chooser = cpu_conv._Chooser()
    assert chooser.pick(table, "key", both, lambda call: call) == "gemm"
    assert calls == ["onednn", "gemm"] * cpu_conv.TRIAL_ROUNDS  # candidates only
    table["gemm"] = impl("gemm", 0.01)  # remembered: not timed again
    assert chooser.pick(table, "key", both, lambda call: call) == "gemm"
    assert len(calls) == 2 * cpu_conv.TRIAL_ROUNDS
    assert chooser.pick(table, "other key", both, lambda call: call) == "onednn"
    calls.clear()
    assert chooser.pick(table, "fourth key", ("onednn", "gemm", "direct"),
                        lambda call: call) == "direct"
    assert calls == ["onednn", "gemm", "direct"] * cpu_conv.TRIAL_ROUNDS
    calls.clear()
    assert chooser.pick(table, "third key", ("onednn",), lambda call: call) == "onednn"
    assert calls == []  # a single candidate is not timed
    monkeypatch.setenv("MSDNET_OPS_CPU_CONV", "direct")  # forced where it applies only
    assert chooser.pick(table, "fifth key", ("onednn", "gemm", "direct"), None) == "direct"
    assert chooser.pick(table, "sixth key", both, None) == "onednn"
