"""Writes the results of ``run.py`` as markdown (``RESULTS.md``) and the memory-vs-depth plot.

Conventions of every table: a time is the median with the interquartile range in brackets;
``x1.25`` next to a variant is its speedup over plain PyTorch in the same run (plain median /
variant median: above 1 is faster); memory ratios are variant / plain (below 1 is smaller).
"""
from __future__ import annotations

import os

MIB = 2**20
VARIANT_ORDER = ("plain", "channels_last", "memory_efficient", "compile", "ours")


# --------------------------------------------------------------------------- formatting

def fmt_s(seconds) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def fmt_stat(st) -> str:
    """``median (q1–q3)`` of a :class:`harness.Stat` as JSON."""
    if not st:
        return "-"
    return f"{fmt_s(st['median'])} ({fmt_s(st['q1'])}–{fmt_s(st['q3'])})"


def fmt_x(v) -> str:
    """A speedup."""
    return "-" if v is None else f"x{v:.2f}"


def fmt_ratio(v) -> str:
    """A ratio to a baseline (memory, time)."""
    return "-" if v is None else f"{v:.2f}"


def fmt_mib(nbytes) -> str:
    return "-" if not isinstance(nbytes, (int, float)) else f"{nbytes / MIB:.1f}"


def fmt_err(v) -> str:
    return "-" if v is None else (f"{v:.1e}" if isinstance(v, float) else str(v))


def table(headers, rows) -> list:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def ordered(variants) -> list:
    return sorted(variants, key=lambda v: VARIANT_ORDER.index(v) if v in VARIANT_ORDER else 99)


def mem_peak(probe) -> str:
    """Peak of a memory probe result, in MiB, or why there is none."""
    if not probe:
        return "-"
    if probe.get("oom"):
        return "out of memory"
    if "peak" not in probe:
        return "error: " + str(probe.get("error", "?"))[-80:].replace("|", "/").replace("\n", " ")
    return fmt_mib(probe["peak"])


def ratio(a, b):
    ok = all(isinstance(v, (int, float)) for v in (a, b)) and b
    return a / b if ok else None


# --------------------------------------------------------------------------- sections

def _header(meta) -> list:
    m, v = meta["machine"], meta["versions"]
    dev = m["device"] + (f" ({m['gpu']}, {m['gpu_mem_gib']} GiB, CUDA {m['cuda']}, cuDNN "
                         f"{m['cudnn']}, TF32 conv {m['cudnn_tf32']})" if "gpu" in m else "")
    rows = [("device", dev), ("CPU model", m["cpu_model"]),
            ("CPU cores / torch threads", f"{m['cpu_count']} / {m['torch_threads']}"),
            ("memory", f"{m.get('mem_total_gib', '?')} GiB"),
            ("msdnet_ops CPU kernels", m["cpu_kernels"]), ("MSDNET_OPS_BACKEND", m["backend_env"]),
            ("torch", v["torch"]), ("triton", v["triton"]), ("torchvision", v["torchvision"]),
            ("python", v["python"]),
            ("msdnet_ops", f"{v['msdnet_ops']} (git {v.get('git_commit', '?')}"
                           f"{', uncommitted changes' if v.get('git_dirty') else ''})"),
            ("platform", m["platform"]),
            ("load average (1, 5, 15 min)",
             f"before {meta['load_before']}, after {meta.get('load_after')}"),
            ("date", meta["date"]), ("command", f"`{meta['command']}`"),
            ("mode", meta["mode"] + (" (tiny shapes, 1-2 repeats: the numbers are meaningless)"
                                     if meta["mode"] == "quick" else "")),
            ("total time", f"{meta.get('total_seconds', '?')} s")]
    return (["# msdnet_ops benchmarks", ""] + table(("", ""), rows) + [
        "How to read: times are medians over interleaved repeats (variants take turns, so load "
        "drift hits them alike), warm-up excluded, interquartile range in brackets. `xN` is the "
        "speedup over plain PyTorch measured in the same run (above 1: faster). Memory ratios "
        "are variant / plain. Every case was checked first: ours and each baseline compute the "
        "same outputs (loose tolerance, `check` column: largest relative error).", "",
        "Variants: **plain** torch.cat + BatchNorm2d + ReLU + Conv2d (torchvision / "
        "MSDNetPlain); **channels_last** the same in NHWC; **memory_efficient** torchvision "
        "`memory_efficient=True` (checkpointing); **compile** `torch.compile` of plain; "
        "**ours** msdnet_ops; **ours_memory_efficient** ours with `memory_efficient=True` "
        "(bottlenecks recomputed; MSDNet: the ImageNet stem's activation too); "
        "**ours_recompute_all** MSDNet with `memory_efficient=\"all\"` (every convolution "
        "output recomputed in backward).", ""])


def _densenet_bc_cpu(sec) -> list:
    out = [f"Memory a training step adds to the process at batch {sec['mem_batch']} (64x64 "
           "input, fresh process per variant, peak RSS minus RSS before the step; `strict`: "
           "glibc returns every freed block over 64 KiB to the OS, so this is the step's own "
           "peak; `default`: the first two steps with glibc as it comes, what a user sees). "
           "See memory_probe.py.", ""]
    allocs = [a for a in ("strict", "default") if any(k.endswith("/" + a) for k in sec["memory"])]
    rows = []
    for v in ("plain", "memory_efficient", "ours", "ours_memory_efficient"):
        row = [v]
        for a in allocs:
            r, base = sec["memory"].get(f"{v}/{a}", {}), sec["memory"].get(f"plain/{a}", {})
            row += [mem_peak(r), fmt_ratio(ratio(r.get("peak"), base.get("peak")))]
        rows.append(row)
    out += table(["variant"] + [h for a in allocs for h in (f"peak MiB ({a})", f"/ plain ({a})")],
                 rows)
    t = sec["timing"]
    out += [f"Training step (SGD momentum 0.9) at batch {sec['time_batch']}: "
            f"ours / plain time = **{sec['ratios']['time_ours_over_plain']:.2f}**, "
            f"ours_memory_efficient / plain = "
            f"**{sec['ratios'].get('time_ours_me_over_plain', float('nan')):.2f}**.", ""]
    out += _model_time_table(t)
    for v, top in sec.get("profile", {}).items():
        out += [f"Profile of one {v} training step (top ops by self CPU time):", ""]
        out += table(("op", "calls", "self ms", "%"),
                     [(e["name"], e["calls"], f"{e['self_ms']:.1f}", f"{e['pct']:.1f}")
                      for e in top[:8]])
    return out


def _ops(sec, title_dtype=False) -> list:
    rows = []
    for r in sec["rows"]:
        bw = (f"{r['ours_gbps']:.1f} / {r['plain_gbps']:.1f} ({100 * r['ours_frac_copy']:.0f}%"
              + (f", {100 * r['ours_frac_peak']:.0f}% of peak" if r.get("ours_frac_peak") else "")
              + ")") if "ours_gbps" in r else "-"
        rows.append((r["shape"], r["tensor"], r["op"], fmt_stat(r["ours"]), fmt_stat(r["plain"]),
                     fmt_x(r["speedup"]), bw, fmt_err(r.get("check_max_rel_err"))))
    return ["Plain = the same math composed of PyTorch ops (`msdnet_ops.reference`). GB/s: "
            "fewest bytes the op must move / time, ours / plain (ours as % of a contiguous "
            "copy of the same bytes).", ""] + table(
        ("shape", "tensor", "op", "ours", "plain", "speedup", "GB/s ours / plain", "check"), rows)


def _layers(rows) -> list:
    variants = ordered({v for r in rows for v in r["times"]})
    out_rows = []
    for r in rows:
        cells = [f"{fmt_stat(r['times'][v])} {fmt_x(r['vs_plain'][v])}" if v in r["times"]
                 else "-" for v in variants]
        out_rows.append([r["shape"], r["mode"], r["batch"], r["dtype"]] + cells
                        + [fmt_err(r.get("check_max_rel_err"))])
    return table(["layer", "pass", "batch", "dtype"] + variants + ["check"], out_rows)


def _model_time_table(r) -> list:
    mem = r.get("memory", {})
    headers = ["variant", "training step", "vs plain", "inference img/s", "vs plain"]
    if mem:
        headers += ["peak training MiB", "/ plain"]
    rows = []
    for v in ordered(r["train"]):
        row = [v, fmt_stat(r["train"][v]), fmt_x(r["train_vs_plain"][v]),
               f"{r['infer_img_s'][v]:.1f}", fmt_x(r["infer_vs_plain"][v])]
        if mem:
            peak = mem.get(v, {}).get("peak")
            row += [mem_peak(mem.get(v)),
                    fmt_ratio(ratio(peak, mem.get("plain", {}).get("peak")))]
        rows.append(row)
    return table(headers, rows) + [
        f"check (largest relative error of the logits vs plain): "
        f"{fmt_err(r.get('check_max_rel_err'))}", ""]


def _profile_table(title, top, k=10) -> list:
    return [title, ""] + table(("op", "calls", "self ms", "%"),
                               [(e["name"], e["calls"], f"{e['self_ms']:.1f}", f"{e['pct']:.1f}")
                                for e in top[:k]])


def _models(sec) -> list:
    out = []
    for r in sec["rows"]:
        out += [f"### {r['name']}: batch {r['batch']}, {r['image']}x{r['image']}, {r['dtype']}",
                ""] + _model_time_table(r)
        for v, top in r.get("profile", {}).items():
            out += _profile_table(f"Profile of one {v} training step (top ops by self time; "
                                  "our kernels and Python count as the autograd nodes' self "
                                  "time):", top)
        gb = r.get("compile_graph_breaks")
        if gb:
            out += ["`torch.compile` of ours (`torch._dynamo.explain`): " + "; ".join(
                f"{mode}: {g['graphs']} graph(s), {g['breaks']} break(s)"
                + (f" ({', '.join(g['reasons'])})" if g["reasons"] else "")
                for mode, g in gb.items())
                + ". Inference traces whole; the training forward runs eagerly inside the "
                "compiled model (its autograd nodes share Python-side buffer state, which "
                "torch.compile cannot trace).", ""]
    return out


# --------------------------------------------------------------------------- goals

def _model_row(results, name):
    for r in results["sections"].get("models", {}).get("rows", []):
        if r["name"] == name:
            return r
    return None


def _goal(what, measured, op, target):
    met = measured is not None and (measured >= target if op == ">=" else measured <= target)
    if measured is None:
        gap = "not measured"
    elif met:
        gap = "met"
    else:
        miss = abs(measured - target) / target * 100
        gap = f"missed by {miss:.0f} %" if miss >= 1 else f"missed by {miss:.1f} %"
    # a miss that two decimals would round onto the target shows a third
    digits = 3 if not met and measured is not None and round(measured, 2) == target else 2
    return [what, "-" if measured is None else f"{measured:.{digits}f}", f"{op} {target}",
            "yes" if met else "**no**", gap]


def _model_goals(r, label, train_plain, train_cl, infer_plain, infer_cl, memory, mem_variant="ours"):
    tr, inf = r["train_vs_plain"], r["infer_vs_plain"]
    rows = [_goal(f"{label}: training step speed / plain", tr.get("ours"), ">=", train_plain),
            _goal(f"{label}: training step speed / channels_last",
                  ratio(tr.get("ours"), tr.get("channels_last")), ">=", train_cl)]
    if infer_plain is not None:
        rows += [_goal(f"{label}: inference speed / plain", inf.get("ours"), ">=", infer_plain),
                 _goal(f"{label}: inference speed / channels_last",
                       ratio(inf.get("ours"), inf.get("channels_last")), ">=", infer_cl)]
    mem = r.get("memory", {})
    plain_peak = mem.get("plain", {}).get("peak")
    for v in (mem_variant,) + tuple(v for v in ("ours_memory_efficient", "ours_recompute_all")
                                    if v in mem):
        rows.append(_goal(f"{label}: peak training memory / plain ({v})",
                          ratio(mem.get(v, {}).get("peak"), plain_peak), "<=", memory))
    return rows


def goals(results) -> list:
    """The goals of the MSDNet / DenseNet speed work, checked against this run's figures."""
    rows = []
    for name, label in (("msdnet-cifar100-anytime", "MSDNet cifar100-anytime"),
                        ("msdnet-imagenet-step4", "MSDNet imagenet-step4")):
        r = _model_row(results, name)
        if r:
            rows += _model_goals(r, f"{label} ({r['image']}px, batch {r['batch']})",
                                 1.3, 1.15, 1.3, 1.0, 0.30)
    r = _model_row(results, "densenet-bc100")
    if r:
        rows += _model_goals(r, f"DenseNet-BC-100 (batch {r['batch']})", 1.5, 1.0, None, None,
                             0.25)
    a = results["sections"].get("anytime", {})
    if a.get("status") == "ok":
        exits = a["anytime"]["exits"]
        worst = max(e["time_frac"] / e["macs_frac"] for e in exits)
        plain = [e["plain_time_frac"] / e["macs_frac"] for e in exits if "plain_time_frac" in e]
        rows.append(_goal("MSDNet anytime: worst (time to exit k / full) / (MACs to exit k / "
                          "full)" + (f"; plain's full forward, timed at its exits: "
                                     f"{max(plain):.2f}" if plain else ""), worst, "<=", 1.15))
        slowest = max(b["wall_over_plain_full"] for b in a["budgeted"]["rows"])
        rows.append(_goal("MSDNet budgeted: slowest budget's time / plain full forward",
                          slowest, "<=", 1.0))
    if not rows:
        return []
    return ["## Goals (this run)", "",
            "Speeds are ratios of medians measured side by side in this run (above 1: faster "
            "than the baseline); memory is the peak of a training step in a fresh process.",
            ""] + table(("goal", "measured", "target", "met", ""), rows)


def _segment_rate(exits, i, batch) -> str:
    """GMAC/s of the part of the anytime pass between exit ``i - 1`` and exit ``i``."""
    macs = exits[i]["macs"] - (exits[i - 1]["macs"] if i else 0)
    seconds = exits[i]["time"]["median"] - (exits[i - 1]["time"]["median"] if i else 0.0)
    return f"{macs * batch / seconds / 1e9:.1f}" if seconds > 0 else "-"


def _anytime(sec) -> list:
    a, b = sec["anytime"], sec["budgeted"]
    out = [f"Batch {a['batch']}: exit 1 through `MSDNet.anytime` costs "
           f"**{a['exit1_over_full']:.2f}** of a full forward of ours "
           f"({a['exit1_over_plain_full']:.2f} of plain's), for "
           f"{a['macs_exit1_over_full']:.2f} of its multiply-adds.", ""]
    times = [(k, fmt_stat(v), fmt_stat(a["batch1_times"][k]) if "batch1_times" in a else "-")
             for k, v in a["times"].items()]
    out += table(("", f"time (batch {a['batch']})", "time (batch 1: one image's latency)"),
                 times)
    out += ["Cumulative time to each exit in one anytime pass, relative to the same passes' "
            "last exit (the whole network; medians over the passes); "
            "`plain time / full`: the same fraction of plain's full forward (its classifiers' "
            "outputs, timed by hooks): how this network's time spreads over its exits when "
            "nothing is skipped. `GMAC/s since the last exit`: the multiply-adds the pass adds "
            "for this exit over the time it adds (medians): where the time goes per exit "
            "(`python benches/step_breakdown.py --cells` splits it by cell).", ""]
    out += table(("exit", "MACs / sample", "MACs / full", "time", "time / full",
                  "plain time / full", "GMAC/s since the last exit"),
                 [(e["exit"], f"{e['macs'] / 1e6:.1f} M", f"{e['macs_frac']:.2f}",
                   fmt_stat(e["time"]), f"{e['time_frac']:.2f}",
                   f"{e['plain_time_frac']:.2f}" if "plain_time_frac" in e else "-",
                   _segment_rate(a["exits"], i, a["batch"]))
                  for i, e in enumerate(a["exits"])])
    out += [f"Budgeted batch classification (`BudgetedClassifier`, batch {b['batch']}, "
            "thresholds from `calibrate_thresholds` on the same batch; untrained weights, so "
            "only speed is meaningful). `time`: the classification (`BudgetedResult.wall_time`); "
            "`predict() call`: the whole call, which also counts the multiply-adds afterwards. "
            "Wall / full: `time` relative to the `full network` row, next to the expected-MACs "
            f"ratio. Plain full forward: {fmt_stat(b['plain_full'])}.", ""]
    out += table(("budget", "samples per exit", "expected MACs / full", "executed MACs / full",
                  "time", "wall / full", "wall / plain full", "img/s", "predict() call",
                  "check"),
                 [(r["budget"], r["exit_counts"], f"{r['expected_macs_frac']:.2f}",
                   f"{r['executed_macs_frac']:.2f}", fmt_stat(r["time"]),
                   f"**{r['wall_frac']:.2f}**", f"{r['wall_over_plain_full']:.2f}",
                   f"{r['img_s']:.0f}", fmt_stat(r["call_time"]),
                   f"{100 * r['check_prediction_agreement']:.0f}% agree")
                  for r in b["rows"]])
    return out


def _depth(sec) -> list:
    variants = ("plain", "memory_efficient", "ours")
    rows = [[r["layers"]] + ["error" if r.get(v + "_error") else fmt_mib(r.get(v)) for v in variants]
            + [fmt_ratio(ratio(r.get("ours"), r.get("plain")))] for r in sec["rows"]]
    out = [f"One dense block (24 input channels, growth 12, bottleneck 48), batch {sec['batch']}, "
           f"{sec['hw']}x{sec['hw']}: peak memory of a training step (fresh process per point).",
           ""] + table(("layers", "plain MiB", "memory_efficient MiB", "ours MiB", "ours / plain"),
                       rows)
    fits = [(v, f"{f['bytes_per_layer_linear'] / 1024:.0f} KiB", f"{f['quad_share']:.2f}")
            for v, f in sec["fits"].items() if f]
    if fits:
        out += ["Growth with depth (least squares): slope of a straight-line fit, and the share "
                "of the quadratic term at the largest depth (0: linear).", ""]
        out += table(("variant", "per layer", "quadratic share"), fits)
    if sec.get("png"):
        out += [f"![memory vs depth]({sec['png']})", ""]
    return out


def _gpu(sec) -> list:
    out = []
    bw = sec.get("bandwidth", {})
    out += ["### Bandwidth of the memory-bound kernels", ""]
    if bw.get("status") == "ok":
        out += [f"Prefix of {bw['prefix_mib']:.0f} MiB; nominal peak "
                f"{bw['peak_gbps'] or '?'} GB/s.", ""] + _ops(bw)
    else:
        out += [f"_{bw.get('status')}_", ""]
    lp = sec.get("low_precision", {})
    for name, part in lp.items():
        if name == "status":
            continue
        out += [f"### {name}", ""] + _layers(part["layers"])
        for r in part["models"]:
            out += [f"{r['name']}, batch {r['batch']}:", ""] + _model_time_table(r)
    if lp.get("status", "ok") != "ok":
        out += [f"low precision: _{lp['status']}_", ""]
    md = sec.get("max_depth")
    if md:
        out += ["### Deepest trainable DenseNet-BC", ""]
        if md.get("status") == "ok":
            out += [f"CIFAR DenseNet-BC (k=12), batch {md['batch']}, memory capped at "
                    f"{md['mem_gib']} GiB; depth = 6 x layers per block + 4 (searched up to "
                    f"{md['cap_layers_per_block']} layers per block).", ""]
            out += table(("variant", "layers per block", "depth", "first out of memory"),
                         [(v, d["layers_per_block"] if not d["capped"]
                           else f">= {d['layers_per_block']}", d["depth"] or "-",
                           d["first_oom"] or "-") for v, d in md["variants"].items()])
        else:
            out += [f"_{md.get('status')}_", ""]
    return out


SECTION_TITLES = [
    ("densenet_bc_cpu", "DenseNet-BC (k=12, 16-16-16, 64x64) training on the CPU", _densenet_bc_cpu),
    ("ops", "Ops", _ops),
    ("layers", "DenseNet layers (DenseNet-BC-100, DenseNet-121)", lambda s: _layers(s["rows"])),
    ("msd_layers", "MSDNet layers (cifar100-anytime)", lambda s: _layers(s["rows"])),
    ("models", "Models", _models),
    ("anytime", "MSDNet anytime prediction and budgeted inference", _anytime),
    ("depth", "Memory vs depth", _depth),
    ("gpu", "GPU only: bandwidth, low precision, max depth", _gpu),
]


def markdown(results) -> str:
    lines = _header(results["meta"]) + goals(results)
    for key, title, render in SECTION_TITLES:
        sec = results["sections"].get(key)
        if sec is None:
            continue
        lines += [f"## {title}", ""]
        status = sec.get("status", "?")
        if status == "ok":
            try:
                lines += render(sec)
            except Exception as e:  # a report bug must not lose the other sections
                lines += [f"_report error: {type(e).__name__}: {e} (see results.json)_", ""]
        else:
            lines += [f"_{status}_", ""]
        if "seconds" in sec:
            lines += [f"<sub>{sec['seconds']} s, load average after: {sec.get('load_after')}"
                      "</sub>", ""]
    return "\n".join(lines + _before_after())


def _before_after() -> list:
    """The before/after comparisons of ``before_after.py`` (separate runs, their own dates)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS-before-after.md")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return ["## Before/after of changes (separate runs of benches/before_after.py)", "",
                f.read().rstrip(), ""]


# --------------------------------------------------------------------------- plot

def plot_depth(rows, fits, png, meta) -> bool:
    """Peak training-step memory vs layers per variant (points, and the quadratic fits);
    returns False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"plain": ("tab:red", "o"), "memory_efficient": ("tab:orange", "s"),
              "ours": ("tab:blue", "^")}
    for v, (color, marker) in styles.items():
        pts = [(r["layers"], r[v] / MIB) for r in rows if isinstance(r.get(v), (int, float))]
        if not pts:
            continue
        ax.plot(*zip(*pts), marker=marker, linestyle="none", color=color, label=v)
        f = fits.get(v)
        if f:
            L = np.linspace(min(p[0] for p in pts), max(p[0] for p in pts), 100)
            ax.plot(L, (f["a"] + f["b"] * L + f["c"] * L * L) / MIB, color=color, alpha=0.6)
    ax.set_xlabel("layers in the dense block")
    ax.set_ylabel("peak training-step memory (MiB)")
    ax.set_title(f"Dense block, k=12, batch {meta['batch']}, {meta['hw']}x{meta['hw']}, "
                 f"{meta['device']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return True
