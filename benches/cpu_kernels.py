"""Times the CPU kernels against the equivalent PyTorch ops.

    python benches/cpu_kernels.py [--threads N] [--isa avx2] [--out table.md]

Baselines: ``reference`` is :mod:`msdnet_ops.reference` (what the ``reference`` backend
runs); ``torch best`` is the fastest plain-PyTorch formulation we know for the op
(``torch.var_mean``; ``batch_norm`` in eval mode + ``relu_``; ``index_select(out=)``).
Each cell is the median over repeats, with the interquartile spread in brackets.
"""
from __future__ import annotations

import argparse
import statistics
import timeit

import torch
import torch.nn.functional as F

from msdnet_ops import reference as ref
from msdnet_ops.kernels import cpu


def _time_ms(fn, min_time=0.05, repeats=9):
    fn()
    once = max(timeit.timeit(fn, number=1), 1e-7)
    number = max(1, int(min_time / once))
    runs = sorted(t / number * 1e3 for t in timeit.repeat(fn, number=number, repeat=repeats))
    q = statistics.quantiles(runs, n=4)
    return statistics.median(runs), q[2] - q[0]


def _cases():
    buf = torch.randn(16, 256, 28, 28)
    cl = torch.randn(16, 28, 28, 256).permute(0, 3, 1, 2)
    return [
        ("NCHW prefix [:, :160] of a 256-channel buffer", buf[:, :160], None),
        ("NCHW contiguous", torch.randn(32, 64, 56, 56), None),
        ("channels_last prefix, channels_last outputs", cl[:, :160], torch.channels_last),
        ("channels_last prefix, NCHW outputs (mixed)", cl[:, :160], torch.contiguous_format),
        ("NCHW prefix, float64", buf[:, :160].double(), None),
    ]


def run(out_path=None):
    lines = [f"threads={torch.get_num_threads()} isa={cpu.isa()} torch={torch.__version__}", ""]
    for name, x, fmt in _cases():
        c, dt = x.shape[1], x.dtype
        mf = fmt if fmt is not None else torch.contiguous_format
        s, b = torch.randn(c, dtype=dt), torch.randn(c, dtype=dt)
        zeros, ones = torch.zeros(c, dtype=dt), torch.ones(c, dtype=dt)
        out = torch.empty(x.shape, dtype=dt).contiguous(memory_format=mf)
        gz = torch.randn(x.shape, dtype=dt).contiguous(memory_format=mf)
        gx = torch.zeros(x.shape, dtype=dt).contiguous(memory_format=mf)
        gs, gh = torch.zeros(c, dtype=dt), torch.zeros(c, dtype=dt)
        mean, invstd = ref.channel_stats(x, 1e-5)
        idx = torch.arange(0, x.shape[0], 2)
        g = torch.empty((idx.numel(),) + tuple(x.shape[1:]), dtype=dt)
        rows = [
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
        lines += [f"### {name}: {tuple(x.shape)} strides {x.stride()} {dt}", "",
                  "| op | ours ms | reference ms | torch best ms | speedup vs best torch |",
                  "|---|---|---|---|---|"]
        for op, ours, reference, best in rows:
            o, os_ = _time_ms(ours)
            r, rs = _time_ms(reference)
            t, ts = _time_ms(best) if best is not None else (float("nan"), float("nan"))
            fastest = min(r, t) if best is not None else r
            lines.append(f"| {op} | {o:.3f} [{os_:.3f}] | {r:.3f} [{rs:.3f}] | "
                         f"{t:.3f} [{ts:.3f}] | {fastest / o:.1f}x |")
        lines.append("")
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
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if not cpu.available():
        raise SystemExit(f"CPU kernels not built: {cpu.load_error()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.isa:
        import msdnet_ops._cpu_kernels as module
        module.set_isa(args.isa)
    torch.manual_seed(0)
    run(args.out)


if __name__ == "__main__":
    main()
