"""Memory vs depth: peak memory of a training step of one dense block (growth 12, bottleneck
48, 24 input channels) of growing depth, ours vs torchvision plain vs memory_efficient=True,
each point in a fresh process (:mod:`benches.memory_probe`, ``strict`` allocator on the CPU).

Plain stores every layer's concatenated input: quadratic in depth. memory_efficient
recomputes those: linear, plus the recomputed concatenation. Ours stores one buffer: linear.
"""
from __future__ import annotations

import os

from benches import cases, checks, report

VARIANTS = ("plain", "memory_efficient", "ours")


def section_depth(ctx):
    p = ctx.p
    _check(ctx, p["depth_layers"][0], p["depth_batch"], p["depth_hw"])
    rows = []
    for layers in p["depth_layers"]:
        row = {"layers": layers}
        for v in VARIANTS:
            r = ctx.probe(dict(what="block", variant=v, layers=layers, batch=p["depth_batch"],
                               hw=p["depth_hw"], allocator="strict"))
            row[v] = r.get("peak")
            if "error" in r:
                row[v + "_error"] = r["error"][-300:]
        rows.append(row)
    fits = {v: quadratic_fit([(r["layers"], r[v]) for r in rows
                              if isinstance(r.get(v), (int, float))]) for v in VARIANTS}
    png = os.path.join(ctx.out_dir, f"memory_vs_depth{ctx.suffix}.png")
    plotted = report.plot_depth(rows, fits, png, dict(batch=p["depth_batch"], hw=p["depth_hw"],
                                                      device=str(ctx.device)))
    return {"rows": rows, "fits": fits, "png": os.path.basename(png) if plotted else None,
            "batch": p["depth_batch"], "hw": p["depth_hw"]}


def _check(ctx, layers, batch, hw):
    """The smallest block's output, ours and memory_efficient vs plain (in this process)."""
    x = cases.randn((batch, 24, hw, hw), ctx.device, ctx.dtype, 1)
    plain = cases.build_dense_block("plain", layers, ctx.device, ctx.dtype)
    for v in ("memory_efficient", "ours"):
        checks.check_block(cases.build_dense_block(v, layers, ctx.device, ctx.dtype), plain, x)


def quadratic_fit(pts):
    """Least-squares ``a + b L + c L^2`` over (layers, bytes) points; ``quad_share``: share of
    the quadratic term in the value at the largest depth (0 for linear growth);
    ``bytes_per_layer_linear``: slope of a straight-line fit."""
    if len(pts) < 3:
        return None
    import numpy as np
    L = np.array([q[0] for q in pts], dtype=float)
    y = np.array([q[1] for q in pts], dtype=float)
    c, b, a = np.polyfit(L, y, 2)
    lin_b, lin_a = np.polyfit(L, y, 1)
    resid = y - (lin_a + lin_b * L)
    Lm = L.max()
    return dict(a=float(a), b=float(b), c=float(c),
                quad_share=float(c * Lm * Lm / max(a + b * Lm + c * Lm * Lm, 1)),
                linear_fit_max_rel_resid=float(np.abs(resid).max() / max(y.max(), 1)),
                bytes_per_layer_linear=float(lin_b))
