"""Microbenchmark sections: single ops, single DenseNet layers, single MSDNet layers.

Every case is checked first (:mod:`benches.checks`), then its variants are timed interleaved
in one run; ``vs_plain`` = plain median / variant median (> 1: faster than plain).
"""
from __future__ import annotations

import torch

from benches import cases, checks
from benches.harness import free_memory


def section_ops(ctx):
    """Per-op: ours vs the plain-PyTorch composition of the same math
    (``msdnet_ops.reference``), and the achieved bandwidth of the memory-bound ops against a
    contiguous copy of the same bytes."""
    p, rows = ctx.p, []
    for shape in cases.op_shapes(p["op_batch_cifar"], p["op_batch_imagenet"]):
        rows += op_rows(ctx, cases.OpBench(shape, ctx.device, ctx.dtype), cases.OP_NAMES,
                        p["op_budget"])
        free_memory()
    return {"rows": rows}


def op_rows(ctx, bench, op_names, budget):
    """Checks then times ``op_names`` of one :class:`cases.OpBench`."""
    s = bench.shape
    copy_bw = copy_bandwidth(ctx, bench.prefix_bytes, budget)
    rows = []
    for op in op_names:
        err = checks.check_op(bench, op, bench.x.dtype)
        ours, plain = bench.ops[op]
        st = ctx.timer({"ours": ours, "plain": plain}, budget)
        row = dict(shape=s.name, tensor=f"{s.batch}x{s.c}x{s.hw}x{s.hw} (of {s.c + s.growth} ch)",
                   dtype=str(bench.x.dtype).replace("torch.", ""), op=op,
                   ours=st["ours"].to_json(), plain=st["plain"].to_json(),
                   speedup=st["plain"].median / st["ours"].median, check_max_rel_err=err)
        nbytes = bench.bytes_moved(op)
        if nbytes:
            row.update(bytes=nbytes, ours_gbps=nbytes / st["ours"].median / 1e9,
                       plain_gbps=nbytes / st["plain"].median / 1e9, copy_gbps=copy_bw / 1e9,
                       ours_frac_copy=nbytes / st["ours"].median / copy_bw)
        rows.append(row)
    return rows


def copy_bandwidth(ctx, nbytes: int, budget: float) -> float:
    """Bytes per second (read + write) of ``dst.copy_(src)`` over ``nbytes``-byte tensors."""
    src = torch.empty(max(1, nbytes // 4), device=ctx.device).normal_()
    dst = torch.empty_like(src)
    st = ctx.timer({"copy": lambda: dst.copy_(src)}, budget)["copy"]
    return 2 * src.numel() * 4 / st.median


def layer_rows(ctx, bench_class, shapes, variants, budget, dtype):
    """Checks then times forward and forward+backward of every variant for every shape."""
    rows = []
    for shape in shapes:
        bench = bench_class(shape, ctx.device, dtype)
        vs = [v for v in variants if v != "compile" or ctx.compile_layer(shape.name)]
        fns = {v: bench.callables(v) for v in vs}
        err = checks.check_layer(bench, vs, dtype)
        for mode, idx in (("fwd", 0), ("fwd+bwd", 1)):
            st = ctx.timer({v: fns[v][idx] for v in vs}, budget)
            rows.append(dict(shape=shape.name, family=getattr(shape, "family", "MSDNet"),
                             mode=mode, batch=shape.batch,
                             dtype=str(dtype).replace("torch.", ""),
                             times={v: st[v].to_json() for v in vs},
                             vs_plain={v: st["plain"].median / st[v].median for v in vs},
                             check_max_rel_err=err))
        del bench, fns
        free_memory()
    return rows


def section_layers(ctx):
    """Dense layers of DenseNet-BC-100 and DenseNet-121: ours vs plain, channels_last,
    torchvision memory_efficient=True and torch.compile."""
    p = ctx.p
    shapes = cases.densenet_layer_shapes(p["layer_batch_cifar"], p["layer_batch_imagenet"])
    rows = layer_rows(ctx, cases.LayerBench, shapes, cases.LAYER_VARIANTS, p["layer_budget"],
                      ctx.dtype)
    return {"rows": rows, "compiled": [s.name for s in shapes if ctx.compile_layer(s.name)]}


def section_msd_layers(ctx):
    """MSDNet (cifar100-anytime) dense layers: ours vs plain, channels_last, torch.compile."""
    p = ctx.p
    shapes = cases.msdnet_layer_shapes(p["msd_layer_batch"])
    rows = layer_rows(ctx, cases.MSDLayerBench, shapes, ("plain", "channels_last", "compile",
                                                         "ours"), p["layer_budget"], ctx.dtype)
    return {"rows": rows, "compiled": [s.name for s in shapes if ctx.compile_layer(s.name)]}
