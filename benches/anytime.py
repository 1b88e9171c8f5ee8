"""MSDNet anytime prediction and budgeted batch classification (eval mode, no_grad).

* anytime: the cost of exit 1 through ``MSDNet.anytime`` (computes only what exit 1 needs)
  against a full forward, next to the multiply-add ratio; cumulative time to every exit; the
  same three times for one image (batch 1: the latency of a single prediction, where the
  per-cell Python cost weighs most).
* budgeted: :class:`msdnet_ops.BudgetedClassifier` with thresholds from
  :func:`msdnet_ops.calibrate_thresholds` for several exit distributions (most samples leaving
  at exit 1, :func:`msdnet_ops.exit_proportions` for q = 0.5, 1, 2, everything to the end):
  wall time relative to the full network next to the expected-MACs ratio.
"""
from __future__ import annotations

import statistics
import time

import torch

import msdnet_ops
from benches import cases, checks, harness

NET = "msdnet-cifar100-anytime"


def _exit1_and_full(ctx, ours, plain, x, budget):
    """Exit 1 through ``ours.anytime``, ours' and plain's full forward on ``x``, interleaved."""
    def exit1():
        with torch.no_grad():
            gen = ours.anytime(x)
            out = next(gen)
            gen.close()
            return out

    def full(model):
        def run():
            with torch.no_grad():
                return model(x)
        return run

    return ctx.timer({"ours exit 1 (anytime)": exit1, "ours full forward": full(ours),
                      "plain full forward": full(plain)}, budget,
                     ctx.p["model_min_reps"], ctx.p["model_max_reps"] + 4, 0.0)


def _anytime(ctx, ours, plain, x):
    K = ours.num_exits
    macs = ours.exit_macs(tuple(x.shape[1:]))
    st = _exit1_and_full(ctx, ours, plain, x, ctx.p["anytime_budget"])
    # cumulative time to each exit through one anytime pass (the first pass is a warm-up)
    per_exit = [[] for _ in range(K)]
    for r in range(max(ctx.p["model_min_reps"], 3) + 1):
        harness.sync(ctx.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for k, _logits in enumerate(ours.anytime(x)):
                harness.sync(ctx.device)
                if r:
                    per_exit[k].append(time.perf_counter() - t0)
    plain_per_exit = _plain_cumulative(ctx, plain, x)
    full_s = st["ours full forward"].median
    # each exit's share of the same passes' total (the last exit: the whole network), as for
    # plain: the full forward timed above ran between plain's passes (colder caches), ~4 %
    # slower than a pass here, which would flatter every exit's share
    pass_s = statistics.median(per_exit[-1])
    exits = [dict(exit=k + 1, macs=macs[k], macs_frac=macs[k] / macs[-1],
                  time=harness.Stat.of(per_exit[k]).to_json(),
                  time_frac=statistics.median(per_exit[k]) / pass_s,
                  plain_time_frac=(statistics.median(plain_per_exit[k])
                                   / statistics.median(plain_per_exit[-1])))
             for k in range(K)]
    e1 = st["ours exit 1 (anytime)"].median
    one = _exit1_and_full(ctx, ours, plain, x[:1], ctx.p["anytime_budget"] / 4)
    return dict(batch=x.shape[0], times={k: v.to_json() for k, v in st.items()},
                exit1_over_full=e1 / full_s,
                exit1_over_plain_full=e1 / st["plain full forward"].median,
                macs_exit1_over_full=macs[0] / macs[-1], exits=exits,
                batch1_times={k: v.to_json() for k, v in one.items()})


def _plain_cumulative(ctx, plain, x):
    """Per exit, the times from the start of plain's full forward to its classifier's output
    (forward hooks; plain computes the exits in order in one pass): how a network's time is
    spread over its exits when nothing is skipped, beside ours through ``anytime``."""
    stamps = []

    def stamp(*_):  # returns None: the classifier's output stays as it is
        harness.sync(ctx.device)
        stamps.append(time.perf_counter())
    hooks = [cls.register_forward_hook(stamp) for cls in plain.classifier]
    per_exit = [[] for _ in hooks]
    try:
        for r in range(max(ctx.p["model_min_reps"], 3) + 1):
            stamps.clear()
            harness.sync(ctx.device)
            t0 = time.perf_counter()
            with torch.no_grad():
                plain(x)
            if r:  # the first pass is a warm-up
                for k, t in enumerate(stamps):
                    per_exit[k].append(t - t0)
    finally:
        for h in hooks:
            h.remove()
    return per_exit


def budgets(K):
    """(label, share of samples leaving at each exit)."""
    rest = [(1 - 0.9) / (K - 1)] * (K - 1)
    return [("all leave at exit 1", [1.0] + [0.0] * (K - 1)),
            ("90% at exit 1", [0.9] + rest),
            ("q=0.5 (front-loaded)", msdnet_ops.exit_proportions(0.5, K).tolist()),
            ("q=1 (uniform)", msdnet_ops.exit_proportions(1.0, K).tolist()),
            ("q=2 (back-loaded)", msdnet_ops.exit_proportions(2.0, K).tolist()),
            ("full network", [0.0] * (K - 1) + [1.0])]


def _budgeted(ctx, ours, plain, xb):
    K = ours.num_exits
    with torch.no_grad():
        probs = torch.stack([torch.softmax(o.float(), 1) for o in plain(xb)]).cpu()
    fns, info, inner = {}, {}, {}
    for label, prop in budgets(K):
        # calibrated on the benchmark batch itself (untrained model: only speed matters), so
        # the intended exit proportions hold
        clf = msdnet_ops.BudgetedClassifier(ours, msdnet_ops.calibrate_thresholds(probs, prop))
        res = clf.predict(xb)
        agree = checks.check_budgeted(label, res, probs)
        inner[label] = []

        def predict(c=clf, seen=inner[label]):
            seen.append(c.predict(xb).wall_time)
        fns[label] = predict
        info[label] = dict(proportions=[round(v, 4) for v in prop],
                           exit_counts=torch.bincount(res.exits, minlength=K).tolist(),
                           expected_macs_frac=res.expected_macs / res.full_macs,
                           executed_macs_frac=res.macs / res.full_macs,
                           check_prediction_agreement=agree)

    def full_plain():
        with torch.no_grad():
            return plain(xb)
    fns["plain full forward"] = full_plain
    st = ctx.timer(fns, ctx.p["anytime_budget"] * 2, ctx.p["model_min_reps"],
                   ctx.p["model_max_reps"], 0.0)
    # predict() also counts the multiply-adds after its clock stops; its own wall_time (the
    # classification) is what the ratios use. The last n values are the timed calls.
    cls = {label: harness.Stat.of(inner[label][-st[label].n:]) for label in inner}
    full, plain_full = cls["full network"].median, st["plain full forward"].median
    rows = [dict(budget=label, **info[label], call_time=st[label].to_json(),
                 time=cls[label].to_json(), wall_frac=cls[label].median / full,
                 wall_over_plain_full=cls[label].median / plain_full,
                 img_s=xb.shape[0] / cls[label].median) for label, _ in budgets(K)]
    return dict(batch=xb.shape[0], rows=rows, plain_full=st["plain full forward"].to_json())


def section_anytime(ctx):
    ours, _ = cases.build_msdnet(NET, "ours", ctx.device)
    plain, _ = cases.build_msdnet(NET, "plain", ctx.device)
    ours.eval()
    plain.eval()
    fmt = torch.contiguous_format
    x, _ = cases.model_input(NET, ctx.p["anytime_batch"], ctx.device, ctx.dtype, fmt)
    xb, _ = cases.model_input(NET, ctx.p["budget_batch"], ctx.device, ctx.dtype, fmt, seed=5)
    err = checks.check_eval(NET, ours, plain, x)
    return {"anytime": _anytime(ctx, ours, plain, x), "budgeted": _budgeted(ctx, ours, plain, xb),
            "exit_macs": ours.exit_macs(tuple(x.shape[1:])), "check_max_rel_err": err}
