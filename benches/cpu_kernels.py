"""Times the CPU kernels against the equivalent PyTorch ops.

    python benches/cpu_kernels.py [--threads N] [--isa avx2]
                                  [--cases planes|nhwc|pointwise|direct|bottleneck|im2col|all]
                                  [--against OTHER_BUILD.so] [--out table.md]

Cases: ``planes``, NCHW buffers and their prefixes, a channels_last prefix with channels_last
and with NCHW outputs (mixed), float64; ``nhwc``, the feature buffers of training: dense NHWC
tensors with few channels, and the first C channels of NHWC buffers of 2C channels (every view
of the call such a prefix), at the MSDNet shapes [32, C, S, S], S in 32, 16, 8 and C in 6, 16,
48, 128.
``pointwise``: the 1x1 convolutions of MSDNet's bottlenecks (a channel prefix of an NHWC buffer,
few outputs) by our pointwise kernel against MKL's GEMM on the same strided rows and oneDNN
(``F.conv2d`` on a dense copy of the prefix, the copy included): forward, inference (bias and
ReLU fused) and weight gradient.
``direct``: the 3x3 convolutions of MSDNet's narrow paths and DenseNet-BC's (few outputs,
NHWC) by our direct kernels against oneDNN (``F.conv2d``, ``convolution_backward``): forward,
inference (bias and ReLU fused), the input gradient (at stride 1 our forward kernel with the
flipped, transposed weights, strided ``direct_dgrad``), and the weight gradient
(``direct_wgrad``).
``bottleneck``: MSDNet's inference paths at the finest scales (a 1x1 unit on a buffer prefix,
then a 3x3 unit into a buffer slice) fused in our direct kernel, against the fastest pair of
separate calls (pointwise kernel or GEMM, then direct kernel or oneDNN).
``im2col``: the weight gradient as a GEMM on the im2col patch matrix (the "gemm" backward of
``cpu_conv.dense_conv_backward``) built for the whole batch at once against a few images at a
time (``IM2COL_CHUNK_ELEMENTS``), with the matrix's size, and oneDNN's combined backward.
Baselines: ``reference`` is :mod:`msdnet_ops.reference` (what the ``reference`` backend
runs); ``torch best`` is the fastest plain-PyTorch formulation we know for the op
(``torch.var_mean``; ``batch_norm`` in eval mode + ``relu_``; ``index_select(out=)``).
``--against``: another build of ``msdnet_ops._cpu_kernels`` (e.g. the previous commit's,
copied aside before rebuilding) in a ``before`` column, through the same wrappers.
Each cell is the minimum per-call wall time over 16 samples, the columns of a row interleaved
(in a rotating order) so that load from other processes hits them alike
(:func:`benches.harness.time_interleaved`, the timer of every benchmark).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: python benches/cpu_kernels.py
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benches import harness  # noqa: E402
from msdnet_ops import reference as ref  # noqa: E402
from msdnet_ops.kernels import cpu  # noqa: E402

MSDNET_CHANNELS = (6, 16, 48, 128)
MSDNET_SIZES = (32, 16, 8)


def _min_ms(fns):
    """Minimum per-call milliseconds of each callable, timed by the benches' one timer
    (:func:`benches.harness.time_interleaved`): rounds of all of them in a rotating order (a
    callable that runs right after another on the same data finds it in cache, so a fixed
    order would favour the later columns), each sample at least 20 ms of back-to-back calls."""
    stats = harness.time_interleaved(dict(enumerate(fns)), warmup=1, min_reps=16, max_reps=16,
                                     min_sample_s=0.02, max_inner=100_000)
    return [stats[i].min * 1e3 for i in range(len(fns))]


class _Fixed:
    """Stands in for the wrappers' LazyModule: always the given compiled module."""

    def __init__(self, module):
        self.module, self.error = module, None

    def get(self):
        return self.module

    def require(self):
        return self.module


@contextlib.contextmanager
def _module(module):
    """The wrappers in msdnet_ops.kernels.cpu call `module` inside the block."""
    saved = cpu._MODULE
    cpu._MODULE = _Fixed(module)
    try:
        yield
    finally:
        cpu._MODULE = saved


def _load_build(path):
    spec = importlib.util.spec_from_file_location("_cpu_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nhwc(n, c, h, w, width=None, dtype=torch.float32):
    """[n, c, h, w] with channels_last strides: the first c channels of a `width`-channel buffer."""
    return torch.randn(n, h, w, width or c, dtype=dtype).permute(0, 3, 1, 2)[:, :c]


def _planes_cases():
    buf = torch.randn(16, 256, 28, 28)
    cl = torch.randn(16, 28, 28, 256).permute(0, 3, 1, 2)
    empty = lambda fmt: (lambda x: torch.empty(x.shape, dtype=x.dtype).contiguous(memory_format=fmt))  # noqa: E731
    nchw, cl_out = empty(torch.contiguous_format), empty(torch.channels_last)
    return [
        ("NCHW prefix [:, :160] of a 256-channel buffer", buf[:, :160], nchw),
        ("NCHW contiguous", torch.randn(32, 64, 56, 56), nchw),
        ("channels_last prefix, channels_last outputs", cl[:, :160], cl_out),
        ("channels_last prefix, NCHW outputs (mixed)", cl[:, :160], nchw),
        ("NCHW prefix, float64", buf[:, :160].double(), nchw),
    ]


def _nhwc_cases():
    cases = []
    for s in MSDNET_SIZES:
        for c in MSDNET_CHANNELS:
            cases.append((f"NHWC dense [32, {c}, {s}, {s}]", _nhwc(32, c, s, s),
                          lambda x: _nhwc(*x.shape, dtype=x.dtype)))
            cases.append((f"NHWC prefix {c} of {2 * c} [32, {c}, {s}, {s}]",
                          _nhwc(32, c, s, s, 2 * c),
                          lambda x: _nhwc(*x.shape, width=2 * x.shape[1], dtype=x.dtype)))
    return cases


def _rows(x, like):
    """(op, ours, reference, torch best or None) for input x; `like(x)` makes the other views."""
    c, dt = x.shape[1], x.dtype
    s, b = torch.randn(c, dtype=dt), torch.randn(c, dtype=dt)
    zeros, ones = torch.zeros(c, dtype=dt), torch.ones(c, dtype=dt)
    out, gz, gx = like(x), like(x), like(x)
    gz.copy_(torch.randn(x.shape, dtype=dt))
    gx.zero_()
    gs, gh = torch.zeros(c, dtype=dt), torch.zeros(c, dtype=dt)
    mean, invstd = ref.channel_stats(x, 1e-5)
    idx = torch.arange(0, x.shape[0], 2)
    g = torch.empty((idx.numel(),) + tuple(x.shape[1:]), dtype=dt)
    return [
        ("channel_stats", lambda: cpu.channel_stats(x, 1e-5),
         lambda: ref.channel_stats(x, 1e-5),
         lambda: torch.var_mean(x, dim=(0, 2, 3), correction=0)),
        ("affine_relu", lambda: cpu.affine_relu_into(x, s, b, out),
         lambda: ref.affine_relu(x, s, b),
         lambda: torch.relu_(F.batch_norm(x, zeros, ones, s, b, False, 0.0, 0.0))),
        ("affine_relu_backward_", lambda: cpu.affine_relu_backward_(x, s, b, gz, gx, gs, gh),
         lambda: ref.affine_relu_backward_(x, s, b, gz, gx, gs, gh), None),
        ("channel_stats_backward_",
         lambda: cpu.channel_stats_backward_(x, mean, invstd, gs, gh, gx),
         lambda: ref.channel_stats_backward_(x, mean, invstd, gs, gh, gx), None),
        ("gather_batch", lambda: cpu.gather_batch_into(x, idx, g),
         lambda: ref.gather_batch(x, idx), lambda: torch.index_select(x, 0, idx, out=g)),
    ]


# (spatial size, input channels, outputs, buffer channels): MSDNet cifar100-anytime's narrow 1x1s
POINTWISE_CASES = ((32, 46, 6, 64), (32, 34, 6, 64), (16, 106, 24, 128), (16, 58, 24, 128),
                   (16, 80, 12, 128), (8, 136, 48, 260))


def _pointwise_table(batch=32):
    head = "| [N, K, S, S] -> outputs | op | ours ms | MKL GEMM ms | oneDNN ms | speedup vs best |"
    lines = ["### 1x1 convolutions of NHWC prefixes, few outputs (float32)", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for s, k, n, cap in POINTWISE_CASES:
        buf = torch.randn(batch, s, s, cap)
        x = buf.permute(0, 3, 1, 2)[:, :k]  # the prefix, and its strided [N*H*W, K] rows
        rows = buf.view(-1, cap)[:, :k]
        w, bias = torch.randn(n, k), torch.randn(n)
        w4 = w.view(n, k, 1, 1)
        out = torch.empty(rows.shape[0], n)
        g = torch.randn(rows.shape[0], n)
        g4 = g.view(batch, s, s, n).permute(0, 3, 1, 2)
        ops = [
            ("forward", lambda: cpu.pointwise_conv_rows(rows, w, None, False, out),
             lambda: torch.mm(rows, w.t(), out=out),
             lambda: F.conv2d(x.contiguous(memory_format=torch.channels_last), w4)),
            ("inference (bias, ReLU)", lambda: cpu.pointwise_conv_rows(rows, w, bias, True, out),
             lambda: torch.relu_(torch.addmm(bias, rows, w.t(), out=out)),
             lambda: torch.relu_(F.conv2d(x.contiguous(memory_format=torch.channels_last), w4,
                                          bias))),
            ("weight gradient", lambda: cpu.pointwise_conv_wgrad_rows(rows, g),
             lambda: torch.mm(g.t(), rows),
             lambda: torch.ops.aten.convolution_backward(
                 g4, x.contiguous(memory_format=torch.channels_last), w4, None, [1, 1], [0, 0],
                 [1, 1], False, [0, 0], 1, [False, True, False])),
        ]
        for op, ours, gemm, onednn in ops:
            if op == "weight gradient" and n > cpu.POINTWISE_WGRAD_MAX_OUTPUTS:
                continue  # not a candidate there
            o, m, d = _min_ms([ours, gemm, onednn])
            lines.append(f"| [{batch}, {k}, {s}, {s}] -> {n} | {op} | {o:.3f} | {m:.3f} | "
                         f"{d:.3f} | {min(m, d) / o:.2f}x |")
    return lines + [""]


# (spatial size, input channels, outputs, stride): MSDNet cifar100-anytime's narrow 3x3s, and
# DenseNet-BC's (48 -> 12) at its first block's size
DIRECT_CASES = ((32, 6, 6, 1), (16, 12, 6, 1), (32, 6, 6, 2), (16, 24, 12, 1), (16, 24, 12, 2),
                (8, 48, 12, 1), (8, 96, 24, 1), (32, 48, 12, 1))


def _direct_table(batch=32):
    head = "| [N, C, S, S] -> outputs, stride | op | ours ms | oneDNN ms | speedup |"
    lines = ["### 3x3 convolutions with few outputs, NHWC (float32)", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    nhwc = torch.channels_last
    for s, c, n, stride in DIRECT_CASES:
        x = torch.randn(batch, c, s, s).contiguous(memory_format=nhwc)
        w = torch.randn(n, c, 3, 3).contiguous(memory_format=nhwc)
        bias = torch.randn(n)
        out = torch.empty(batch, n, (s - 1) // stride + 1, (s - 1) // stride + 1,
                          memory_format=nhwc)
        g = torch.randn_like(out)
        dx = torch.empty_like(x)
        flipped = w.transpose(0, 1).flip(2, 3)
        ops = [
            ("forward", lambda: cpu.direct_conv_into(x, w, None, stride, 1, False, out),
             lambda: F.conv2d(x, w, None, stride, 1)),
            ("inference (bias, ReLU)",
             lambda: cpu.direct_conv_into(x, w, bias, stride, 1, True, out),
             lambda: torch.relu_(F.conv2d(x, w, bias, stride, 1))),
            ("input gradient",
             (lambda: cpu.direct_conv_into(g, flipped, None, 1, 1, False, dx)) if stride == 1
             else (lambda: cpu.direct_conv_dgrad_into(g, w, stride, 1, dx)),
             lambda: torch.ops.aten.convolution_backward(
                 g, x, w, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1,
                 [True, False, False])),
            ("weight gradient", lambda: cpu.direct_conv_wgrad(x, g, 3, stride, 1),
             lambda: torch.ops.aten.convolution_backward(
                 g, x, w, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1,
                 [False, True, False])),
        ]
        for op, ours, onednn in ops:
            if op == "input gradient" and c > cpu.DIRECT_CONV_MAX_OUTPUTS:
                continue  # not a candidate there
            o, d = _min_ms([ours, onednn])
            lines.append(f"| [{batch}, {c}, {s}, {s}] -> {n}, {stride} | {op} | {o:.3f} | "
                         f"{d:.3f} | {d / o:.2f}x |")
    return lines + [""]


# (spatial size, buffer channels, prefix read, bottleneck width, outputs, stride): MSDNet
# cifar100-anytime's inference paths at the two finest scales
BOTTLENECK_CASES = ((32, 52, 16, 6, 6, 1), (32, 52, 40, 6, 6, 1), (32, 52, 40, 6, 6, 2),
                    (16, 116, 44, 12, 12, 1), (16, 116, 56, 24, 12, 2))


def _bottleneck_table(batch=32):
    """The fused 1x1 + k x k inference path against the two calls it replaces: our pointwise
    kernel or MKL's GEMM (whichever is faster) into a dense temporary, then our direct kernel
    or oneDNN (whichever is faster) into the buffer slice."""
    from msdnet_ops.kernels import cpu_conv
    head = ("| [N, C of C_cap, S, S] -> bottleneck -> outputs, stride | fused ms | "
            "best separate ms | speedup |")
    lines = ["### Inference path: 1x1 bottleneck + 3x3 fused (float32)", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    nhwc = torch.channels_last
    for s, cap, c, mid, n, stride in BOTTLENECK_CASES:
        x = _nhwc(batch, c, s, s, width=cap)
        w1, b1 = torch.randn(mid, c, 1, 1), torch.randn(mid)
        w, bias = torch.randn(n, mid, 3, 3).contiguous(memory_format=nhwc), torch.randn(n)
        o = (s - 1) // stride + 1
        out = torch.empty(batch, n + 8, o, o, memory_format=nhwc)[:, 4:4 + n]
        seps = [lambda a=a, b=b: b(a(x, w1, b1, 1, 0), w, bias, stride, 1, out)
                for a in (cpu_conv._infer_direct, cpu_conv._infer_gemm)
                for b in (cpu_conv._infer_direct, cpu_conv._infer_onednn)]
        times = _min_ms([lambda: cpu.bottleneck_direct_conv_into(x, w1, b1, w, bias, stride, 1,
                                                                 True, out)] + seps)
        fused, best = times[0], min(times[1:])
        lines.append(f"| [{batch}, {c} of {cap}, {s}, {s}] -> {mid} -> {n}, {stride} | "
                     f"{fused:.3f} | {best:.3f} | {best / fused:.2f}x |")
    return lines + [""]


# (spatial size, input channels, outputs, stride): 3x3 convolutions whose backward the per-shape
# choice may give to the im2col GEMM (MSDNet's classifiers, its coarser paths)
IM2COL_CASES = ((8, 128, 128, 2), (4, 128, 128, 1), (16, 24, 12, 1), (16, 96, 24, 2),
                (8, 200, 24, 1))


def _im2col_table(batch=32):
    """The split backward (oneDNN's input gradient + the im2col GEMM) with the patch matrix
    built whole and in parts of at most ``IM2COL_CHUNK_ELEMENTS``, and oneDNN's backward."""
    from msdnet_ops.kernels import cpu_conv
    chunk = cpu_conv.IM2COL_CHUNK_ELEMENTS
    head = ("| [N, C, S, S] -> outputs, stride | patch matrix MiB | whole ms | in parts ms | "
            "whole/parts | oneDNN ms |")
    lines = [f"### Weight gradient as an im2col GEMM: whole batch vs parts of at most {chunk} "
             "elements (float32)", "", head, "|" + "---|" * (head.count("|") - 1)]
    nhwc = torch.channels_last
    for s, c, n, stride in IM2COL_CASES:
        z = torch.randn(batch, c, s, s).contiguous(memory_format=nhwc)
        w = torch.randn(n, c, 3, 3).contiguous(memory_format=nhwc)
        o = (s - 1) // stride + 1
        g = torch.randn(batch, n, o, o).contiguous(memory_format=nhwc)

        def split(parts):
            cpu_conv.IM2COL_CHUNK_ELEMENTS = parts
            try:
                return (cpu_conv._dense_dgrad_onednn(g, z, w, stride, 1),
                        cpu_conv._dense_wgrad_gemm(g, z, w, stride, 1))
            finally:
                cpu_conv.IM2COL_CHUNK_ELEMENTS = chunk
        times = _min_ms([lambda: split(1 << 62), lambda: split(chunk),
                         lambda: cpu_conv._dense_bwd_onednn(g, z, w, stride, 1)])
        mib = batch * o * o * 9 * c * 4 / 2**20
        lines.append(f"| [{batch}, {c}, {s}, {s}] -> {n}, {stride} | {mib:.1f} | "
                     f"{times[0]:.3f} | {times[1]:.3f} | {times[0] / times[1]:.2f}x | "
                     f"{times[2]:.3f} |")
    return lines + [""]


def _table(title, cases, current, before):
    head = "| case | op | ours ms |" + (" before ms | before/ours |" if before else "") + \
           " reference ms | torch best ms | speedup vs best torch |"
    lines = [f"### {title}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for name, x, like in cases:
        for op, ours, reference, best in _rows(x, like):
            fns = [lambda f=ours: _call(current, f)]
            if before:
                fns.append(lambda f=ours: _call(before, f))
            fns.append(reference)
            if best is not None:
                fns.append(best)
            times = _min_ms(fns)
            o, r = times[0], times[1 + bool(before)]
            t = times[-1] if best is not None else float("nan")
            fastest = min(r, t) if best is not None else r
            cells = [name, op, f"{o:.3f}"]
            if before:
                cells += [f"{times[1]:.3f}", f"{times[1] / o:.2f}x"]
            cells += [f"{r:.3f}", f"{t:.3f}", f"{fastest / o:.1f}x"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _call(module, f):
    with _module(module):
        return f()


def run(out_path=None, cases="all", before=None, before_name=""):
    """The tables; `before`: another build's module (a column), named `before_name`."""
    import msdnet_ops._cpu_kernels as current

    lines = [f"threads={torch.get_num_threads()} isa={cpu.isa()} torch={torch.__version__}"
             + (f" before={before_name}" if before else ""), ""]
    if cases in ("planes", "all"):
        lines += _table("planes (NCHW), mixed layouts, float64", _planes_cases(), current, before)
    if cases in ("nhwc", "all"):
        lines += _table("NHWC feature buffers (float32)", _nhwc_cases(), current, before)
    if cases in ("pointwise", "all"):
        lines += _pointwise_table()
    if cases in ("direct", "all"):
        lines += _direct_table()
    if cases in ("bottleneck", "all"):
        lines += _bottleneck_table()
    if cases in ("im2col", "all"):
        lines += _im2col_table()
    text = "\n".join(lines)
    print(text)
    if out_path:
        with open(out_path, "w") as f:
            f.write(text + "\n")
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--isa", default=None, help="baseline, avx2 or avx512")
    parser.add_argument("--cases", choices=("planes", "nhwc", "pointwise", "direct", "bottleneck",
                                            "im2col", "all"),
                        default="all")
    parser.add_argument("--against", default=None, metavar="SO",
                        help="another build of msdnet_ops._cpu_kernels to time alongside")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if not cpu.available():
        raise SystemExit(f"CPU kernels not built: {cpu.load_error()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    before = _load_build(args.against) if args.against else None
    if args.isa:
        import msdnet_ops._cpu_kernels as module
        for m in (module, before):
            if m is not None:
                m.set_isa(args.isa)
    run(args.out, args.cases, before, args.against)


if __name__ == "__main__":
    main()
