"""Before/after timing of a change: the same model cases on two checkouts of msdnet_ops.

    git worktree add /tmp/before <rev>          # then build it, or copy the compiled .so
    python benches/before_after.py --before /tmp/before [--after .] [--rounds 3]

Each round runs one fresh process per checkout, alternating (before, after, before, ...), so
that drift in the machine's load hits both alike. A process imports ``msdnet_ops`` and
``benches`` from its checkout and times, interleaved, a training step (SGD) and an inference
forward of ours on DenseNet-BC-100 and MSDNet cifar100-anytime (batch 32, float32, the
checkout's own ``benches.cases`` and ``benches.harness.time_interleaved``), and the cost of one
call of three ops on a tiny tensor (``[2, 4, 3, 3]``: the Python dispatch, which a change of
the ops layer moves; the fused modules call ``ops.eager``). Reported: per case
the median over rounds of each process's median, the min-max over rounds, and the median of
the per-round ratios before/after (above 1: the change made it faster). Writes a markdown
table (``--out``; default: print only).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

CASES = ("densenet-bc100", "msdnet-cifar100-anytime")


def _child(root: str, batch: int, names) -> None:
    """Runs in a fresh process: times the cases of the checkout at ``root``; prints JSON."""
    sys.path.insert(0, root)
    import torch
    import msdnet_ops
    from msdnet_ops import ops
    from benches import cases, harness
    if not os.path.abspath(msdnet_ops.__file__).startswith(os.path.abspath(root)):
        raise SystemExit(f"msdnet_ops imported from {msdnet_ops.__file__}, not from {root}")
    fns = {}
    for case in names:
        name, _, image = case.partition("@")
        for what in ("train", "infer"):
            model, fmt = cases.build_model(name, "ours", "cpu")
            x, y = cases.model_input(name, batch, "cpu", torch.float32, fmt,
                                     image=int(image) if image else None)
            fns[f"{case} {what}"] = (cases.train_step_fn(model, x, y) if what == "train"
                                     else cases.infer_fn(model, x))
    stats = harness.time_interleaved(fns, "cpu", warmup=2, min_reps=7, max_reps=7)
    x = torch.randn(2, 4, 3, 3)
    scale, shift, out, weight = torch.ones(4), torch.zeros(4), torch.empty_like(x), torch.randn(4, 4, 1, 1)
    calls = {"op call: affine_relu_into_": lambda: ops.eager.affine_relu_into_(x, scale, shift, out),
             "op call: conv 1x1": lambda: ops.eager.conv(x, weight, 1, 0, 1),
             "op call: channel_stats": lambda: ops.eager.channel_stats(x, 1e-5)}
    stats.update(harness.time_interleaved(calls, "cpu", warmup=3, min_reps=15, max_reps=15,
                                          min_sample_s=0.01))
    print(json.dumps({k: s.median for k, s in stats.items()}))


def _run(root: str, batch: int, names) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", root, "--batch", str(batch),
           "--cases", ",".join(names)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _revision(root: str) -> str:
    done = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "?"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", help="checkout of the earlier revision (built)")
    p.add_argument("--after", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help="checkout of the later revision (default: this one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--cases", default=",".join(CASES),
                   help="comma-separated model cases, NAME or NAME@IMAGE_SIDE "
                        f"(default: {','.join(CASES)})")
    p.add_argument("--out", help="append the table, titled, to this markdown file "
                                  "(benches/RESULTS-before-after.md: RESULTS.md includes it)")
    p.add_argument("--title", default="", help="what changed between the two revisions")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args.child, args.batch, args.cases.split(","))
    if not args.before:
        p.error("--before: give the checkout of the earlier revision")
    runs = {"before": [], "after": []}
    for _ in range(args.rounds):
        for which in ("before", "after"):
            runs[which].append(_run(getattr(args, which), args.batch, args.cases.split(",")))
    lines = [f"Before/after: `python benches/before_after.py --before <checkout of "
             f"{_revision(args.before)}> --rounds {args.rounds} --cases {args.cases}` (after: "
             f"{_revision(args.after)}), batch {args.batch}, float32, CPU, "
             f"{os.cpu_count()} cores. Median over rounds of each process's median (min-max "
             "over rounds).", "",
             "| case | before | after | before/after |", "|---|---|---|---|"]
    for case in runs["before"][0]:
        unit, scale = ("us", 1e6) if case.startswith("op call") else ("ms", 1e3)
        b = [scale * r[case] for r in runs["before"]]
        a = [scale * r[case] for r in runs["after"]]
        ratio = statistics.median(x / y for x, y in zip(b, a))
        lines.append(f"| {case} | {statistics.median(b):.1f} {unit} ({min(b):.1f}-{max(b):.1f}) "
                     f"| {statistics.median(a):.1f} {unit} ({min(a):.1f}-{max(a):.1f}) "
                     f"| {ratio:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        new = not os.path.exists(args.out)
        with open(args.out, "a") as f:
            if new:
                f.write("Speed before and after changes that must not slow anything down, each "
                        "measured by `benches/before_after.py` (newest last).\n\n")
            f.write(f"### {datetime.date.today()}: {args.title or 'before/after'}\n\n"
                    f"{table}\n\n")


if __name__ == "__main__":
    main()
