"""Model-level sections: training step time, inference throughput and peak training memory of
whole networks, and DenseNet-BC's training memory and time on the CPU.

Peak memory is measured in a fresh process per (network, variant) by
:mod:`benches.memory_probe`; times in this process, variants interleaved.
"""
from __future__ import annotations

import torch

from benches import cases, checks, harness
from benches.harness import free_memory

DENSENET_BC_NET = "densenet-bc-k12-64px"
DENSENET_BC_VARIANTS = ("plain", "memory_efficient", "ours", "ours_memory_efficient")


def train_and_infer(ctx, name, batch, image, variants, budget, dtype=torch.float32):
    """Checks the variants' logits agree, then times a training step (SGD, momentum 0.9) and
    an inference forward (eval mode, no_grad) of each, interleaved."""
    out = {"name": name, "batch": batch, "image": image or cases.MODEL_CASES[name].image,
           "dtype": str(dtype).replace("torch.", "")}
    models = {}
    for v in variants:
        m, fmt = cases.build_model(name, v, ctx.device, dtype)
        x, y = cases.model_input(name, batch, ctx.device, dtype, fmt, image=image)
        models[v] = (m, x, y)
    out["check_max_rel_err"] = checks.check_models(name, models, dtype)
    free_memory()
    timer = dict(min_reps=ctx.p["model_min_reps"], max_reps=ctx.p["model_max_reps"],
                 min_sample_s=0.0)
    steps = {v: cases.train_step_fn(m, x, y) for v, (m, x, y) in models.items()}
    st = ctx.timer(steps, budget, **timer)
    out["train"] = {v: s.to_json() for v, s in st.items()}
    out["train_vs_plain"] = {v: st["plain"].median / s.median for v, s in st.items()}
    del steps
    free_memory()
    infers = {v: cases.infer_fn(m, x) for v, (m, x, y) in models.items()}
    st = ctx.timer(infers, budget / 2, **timer)
    out["infer"] = {v: s.to_json() for v, s in st.items()}
    out["infer_img_s"] = {v: batch / s.median for v, s in st.items()}
    out["infer_vs_plain"] = {v: st["plain"].median / s.median for v, s in st.items()}
    del infers, models
    free_memory()
    return out


def _variants(ctx, name):
    msdnet = cases.MODEL_CASES[name].kind == "msdnet"
    vs = ["plain", "channels_last"]
    vs += ["ours_memory_efficient", "ours_recompute_all"] if msdnet else ["memory_efficient"]
    if ctx.args.compile or name in ctx.p["model_compile"]:
        vs += ["compile", "ours_compile"] if msdnet else ["compile"]
    return vs + ["ours"]


# variants whose peak memory equals another's (same module, other layout or compiled)
_SAME_MEMORY = ("channels_last", "compile", "ours_compile")


def section_models(ctx):
    """DenseNet-BC-100, DenseNet-121 and MSDNet (cifar100-anytime, imagenet-step4): every
    variant's step time, throughput and (fresh process, ``strict`` allocator, see
    memory_probe.py) peak training memory; for MSDNet a profile of our training step and the
    graph breaks of ``torch.compile`` of ours."""
    rows = []
    for name, batch, image in ctx.p["models"]:
        variants = _variants(ctx, name)
        r = train_and_infer(ctx, name, batch, image, variants, ctx.p["model_budget"])
        r["memory"] = {}
        if ctx.p["model_memory"]:
            for v in variants:
                if v in _SAME_MEMORY:
                    continue
                spec = dict(what="model", name=name, variant=v, batch=batch, allocator="strict")
                if image:
                    spec["image"] = image
                r["memory"][v] = ctx.probe(spec)
        if cases.MODEL_CASES[name].kind == "msdnet":
            if ctx.p["profile"]:
                r["profile"] = _profile_training(ctx, name, batch, image)
            if "ours_compile" in variants:
                r["compile_graph_breaks"] = _graph_breaks(ctx, name, image)
        rows.append(r)
    return {"rows": rows}


def _profile_training(ctx, name, batch, image):
    prof = {}
    for v in ("plain", "ours"):
        m, fmt = cases.build_model(name, v, ctx.device)
        x, y = cases.model_input(name, batch, ctx.device, ctx.dtype, fmt, image=image)
        prof[v] = profile_top(cases.train_step_fn(m, x, y), ctx.device)
        del m
    return prof


def _graph_breaks(ctx, name, image):
    """``torch._dynamo.explain`` of ours, training and inference: graphs and break reasons."""
    out = {}
    for mode in ("train", "eval"):  # a new model each: what a first call meets
        m, fmt = cases.build_model(name, "ours", ctx.device)
        x, _ = cases.model_input(name, 2, ctx.device, ctx.dtype, fmt, image=image)
        m.train(mode == "train")
        torch._dynamo.reset()
        with torch.set_grad_enabled(mode == "train"):
            ex = torch._dynamo.explain(m)(x)
        out[mode] = dict(graphs=ex.graph_count, breaks=max(ex.graph_break_count, 0),
                         reasons=sorted({str(b.reason).splitlines()[0][:160]
                                         for b in ex.break_reasons}))
    torch._dynamo.reset()
    return out


def profile_top(fn, device, k=12):
    """The ``k`` ops with the most self time in one call of ``fn`` (after one warm-up call)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()
    harness.sync(device)
    with profile(activities=acts) as prof:
        fn()
        harness.sync(device)
    ev = list(prof.key_averages())
    key = (lambda e: e.self_device_time_total) if device.type == "cuda" else \
        (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in ev) or 1
    return [dict(name=e.key, calls=e.count, self_ms=key(e) / 1e3, pct=100 * key(e) / total)
            for e in sorted(ev, key=key, reverse=True)[:k]]


def section_densenet_bc_cpu(ctx):
    """DenseNet-BC on the CPU (torchvision ``DenseNet(12, (16, 16, 16), 24, bn_size=4)``, 64x64
    input): memory a training step adds to the process at batch 64 and training step time at
    batch 32; ours vs torchvision plain and memory_efficient=True."""
    if ctx.cuda:
        return {"status": "not run: CPU figures (run benches/run.py --device cpu)"}
    p = ctx.p
    mem = {}
    for alloc in p["densenet_bc_allocators"]:
        for v in DENSENET_BC_VARIANTS:
            mem[f"{v}/{alloc}"] = ctx.probe(dict(what="model", name=DENSENET_BC_NET, variant=v,
                                                  batch=p["densenet_bc_mem_batch"], allocator=alloc))
    timing = train_and_infer(ctx, DENSENET_BC_NET, p["densenet_bc_time_batch"], None,
                             ["plain", "channels_last", *DENSENET_BC_VARIANTS[1:]],
                             p["densenet_bc_budget"])
    prof = {}
    if p["profile"]:
        for v in ("plain", "ours"):
            m, fmt = cases.build_model(DENSENET_BC_NET, v, ctx.device)
            x, y = cases.model_input(DENSENET_BC_NET, p["densenet_bc_time_batch"], ctx.device, ctx.dtype,
                                     fmt)
            prof[v] = profile_top(cases.train_step_fn(m, x, y), ctx.device)
            del m
    ratios = {}
    for alloc in p["densenet_bc_allocators"]:
        peaks = [mem[f"{v}/{alloc}"].get("peak") for v in ("plain", "memory_efficient", "ours")]
        if all(isinstance(q, (int, float)) and q > 0 for q in peaks):
            pl, me, ou = peaks
            ratios[alloc] = dict(ours_over_plain=ou / pl, me_over_plain=me / pl,
                                 ours_over_me=ou / me)
        else:
            ratios[alloc] = None
    tr = timing["train"]
    ratios["time_ours_over_plain"] = tr["ours"]["median"] / tr["plain"]["median"]
    ratios["time_ours_me_over_plain"] = (tr["ours_memory_efficient"]["median"]
                                         / tr["plain"]["median"])
    for alloc in p["densenet_bc_allocators"]:
        ome, pl = (mem[f"{v}/{alloc}"].get("peak") for v in ("ours_memory_efficient", "plain"))
        if ratios[alloc] and isinstance(ome, (int, float)):
            ratios[alloc]["ours_me_over_plain"] = ome / pl
    return {"memory": mem, "timing": timing, "profile": prof, "ratios": ratios,
            "mem_batch": p["densenet_bc_mem_batch"], "time_batch": p["densenet_bc_time_batch"]}
