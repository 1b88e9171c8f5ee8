"""The ``msdnet`` command (also ``python -m msdnet_ops``).

    msdnet train --out runs/digits              # embedded digits data, small default MSDNet
    msdnet evaluate runs/digits                 # -> evaluation.json, anytime.png, budgeted.png
    msdnet train --out runs/digits --evaluate   # both in one command
    msdnet train --data cifar100:/data/cifar --config cifar100-anytime --out runs/c100
    torchrun --nproc-per-node 4 -m msdnet_ops train --data imagenet:/data/imagenet \\
        --config imagenet-step4 --out runs/in
    msdnet bench --quick                        # the benchmarks (benches/run.py) -> ./bench-results

User mistakes (missing data, bad option, existing run without --resume) are reported in one
line and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

PROG = "msdnet"


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = minimum - 1
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        return v
    return parse


_positive_int = _int_at_least(1, "positive")
_non_negative_int = _int_at_least(0, "non-negative")


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not (v >= 0) or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative finite number, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    v = _non_negative_float(text)
    if v == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _per_data_set(key: str, fmt=str) -> str:
    """'20 for digits, 300 for cifar10/cifar100, 90 for imagenet' from the data-set defaults."""
    from .training.recipe import DATA_DEFAULTS

    groups: dict = {}
    for data_name, defaults in DATA_DEFAULTS.items():
        groups.setdefault(fmt(defaults[key]), []).append(data_name)
    return ", ".join(f"{value} for {'/'.join(names)}" for value, names in groups.items())


def build_parser() -> argparse.ArgumentParser:
    from .models.msdnet_configs import MSDNET_CONFIG_NAMES
    from .training.distributed import threads_per_process
    from .training.evaluate import EvaluateOptions
    from .training.model_factory import DEFAULT_CONFIG
    from .training.recipe import RECIPE_DEFAULTS as R

    parser = argparse.ArgumentParser(
        prog=PROG, description="Train and evaluate Multi-Scale Dense Networks (anytime prediction and budgeted "
                               "early exit).",
        epilog="Run 'msdnet COMMAND --help' for the options of a command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    cores = threads_per_process()

    # ---- train ----------------------------------------------------------------------------------
    t = sub.add_parser(
        "train", help="train an MSDNet (embedded digits data by default)",
        description="Train an MSDNet with the paper's recipe: SGD with momentum, learning rate divided by 10 at "
                    "50% and 75% of the epochs, loss = sum of the exits' cross-entropies. Writes run.json, "
                    "checkpoint.pt (after every epoch, atomically) and train_log.jsonl into --out. Works under "
                    "torchrun (DistributedDataParallel with synchronized batch statistics). With --resume, options "
                    "left out keep the values stored in the run.")
    t.add_argument("--out", required=True, metavar="DIR", help="run folder (created if missing)")
    t.add_argument("--data", metavar="SPEC",
                   help="'digits' (scikit-learn's digits, embedded, no download), 'cifar10:PATH', 'cifar100:PATH' "
                        "(torchvision's format) or 'imagenet:PATH' (ImageFolder with train/ and val/) "
                        "(default: digits)")
    t.add_argument("--config", metavar="NAME",
                   help=f"model configuration: {', '.join(MSDNET_CONFIG_NAMES)} (default: "
                        + ", ".join(f"{c} for {d}" for d, c in DEFAULT_CONFIG.items()) + ")")
    t.add_argument("--impl", choices=("auto", "plain", "fused"),
                   help="fused: msdnet_ops.MSDNet (the fused kernels); plain: MSDNetPlain (torch.nn modules, "
                        f"the reference's structure); auto: fused (default: {R['impl']})")
    t.add_argument("--epochs", type=_positive_int, metavar="N", help=f"epochs (default: {_per_data_set('epochs')})")
    t.add_argument("--batch-size", type=_positive_int, metavar="N",
                   help=f"global batch size, split evenly over torchrun processes "
                        f"(default: {_per_data_set('batch_size')})")
    t.add_argument("--lr", type=_positive_float, help=f"initial learning rate (default: {R['lr']})")
    t.add_argument("--momentum", type=_non_negative_float, help=f"SGD momentum (default: {R['momentum']})")
    t.add_argument("--weight-decay", type=_non_negative_float, help=f"weight decay (default: {R['weight_decay']})")
    t.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum (default: off)")
    t.add_argument("--lr-milestones", metavar="F,F",
                   help="fractions of the epochs after which the learning rate is divided by 10 (default: "
                        + _per_data_set("lr_milestones", lambda ms: ",".join(f"{m:.4g}" for m in ms)) + ")")
    t.add_argument("--exit-weights", metavar="W,W,...",
                   help="loss weight of each exit, one per exit (default: 1 for every exit)")
    t.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision; auto: bf16 (fp16 where bf16 is unsupported) on GPUs, off on the CPU. "
                        "On the CPU the fused model runs float32 only: half precision there needs --impl plain "
                        f"(default: {R['amp']})")
    t.add_argument("--seed", type=_non_negative_int, metavar="N", help=f"random seed (default: {R['seed']})")
    t.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="train without augmentation (default: random shifts for digits, random crops and "
                        "flips for CIFAR and ImageNet)")
    t.add_argument("--val-size", type=_positive_int, metavar="N",
                   help="images held out of the training set for validation (default: 180 for digits, 5000 for "
                        "CIFAR, 50000 for ImageNet but at most a tenth of train/)")
    start = t.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    start.add_argument("--overwrite", action="store_true", help="start over even if --out holds a run")
    t.add_argument("--device", help="'auto' (a GPU when there is one), 'cpu', 'cuda' or 'cuda:N' (default: auto)")
    t.add_argument("--workers", type=_non_negative_int, metavar="N",
                   help=f"data-loader worker processes (default: {_per_data_set('workers')})")
    t.add_argument("--threads", type=_positive_int, metavar="N",
                   help="CPU threads of each process (default: the cores this process may run on, divided by "
                        f"the torchrun processes on this machine; {cores} here without torchrun)")
    t.add_argument("--val-every", type=_non_negative_int, default=1, metavar="N",
                   help="validate every N epochs and after the last one; 0: never (default: 1)")
    t.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bars; auto: only when the output is a terminal (default: auto)")
    t.add_argument("--quiet", action="store_true", help="print nothing but errors")
    t.add_argument("--cuda-graph", action="store_true",
                   help="capture each training step in a CUDA graph and replay it: no per-kernel host cost, "
                        "which bounds small-image training on fast GPUs (CUDA only; not with torchrun or "
                        "--amp fp16; a batch of another size runs eagerly)")
    t.add_argument("--evaluate", action="store_true", help="run 'msdnet evaluate' on the run after training")
    t.add_argument("--limit-batches", type=_positive_int, help=argparse.SUPPRESS)

    # ---- evaluate -------------------------------------------------------------------------------
    d = EvaluateOptions(run_dir="")
    e = sub.add_parser(
        "evaluate", help="anytime table and budgeted accuracy-cost curve of a trained run",
        description="Evaluate the run in DIR. Anytime: the accuracy of every exit and the multiply-adds per "
                    "image to reach it. Budgeted: for each q of a sweep, thresholds are calibrated on the "
                    "validation split so that the share of images leaving at exit k is proportional to q^k "
                    "(q < 1: most images leave early and cheaply; q > 1: most go on to the later, more accurate "
                    "exits), then applied to the test split, giving accuracy against expected multiply-adds; "
                    "a real early-exit run on the test split measures what they cost. Writes "
                    "DIR/evaluation.json, DIR/anytime.png and DIR/budgeted.png.")
    e.add_argument("run_dir", metavar="DIR", help="run folder written by 'msdnet train --out DIR'")
    e.add_argument("--data", metavar="SPEC", help="data set to evaluate on (default: the run's)")
    e.add_argument("--device", help="'auto', 'cpu', 'cuda' or 'cuda:N' (default: auto)")
    e.add_argument("--batch-size", type=_positive_int, metavar="N", default=d.batch_size,
                   help=f"evaluation batch size (default: {d.batch_size})")
    e.add_argument("--impl", choices=("auto", "plain", "fused"),
                   help="model implementation, as for 'msdnet train' (default: auto)")
    e.add_argument("--q-min", type=_positive_float, metavar="Q", default=d.q_min,
                   help=f"smallest q of the sweep (default: {d.q_min})")
    e.add_argument("--q-max", type=_positive_float, metavar="Q", default=d.q_max,
                   help=f"largest q of the sweep (default: {d.q_max})")
    e.add_argument("--q-step", type=_positive_float, metavar="Q", default=d.q_step,
                   help=f"step between the q values (default: {d.q_step})")
    e.add_argument("--no-measure", dest="measure", action="store_false",
                   help="skip the real early-exit run that measures multiply-adds and wall time (expected "
                        "costs are still reported)")
    e.add_argument("--threads", type=_positive_int, metavar="N",
                   help=f"CPU threads (default: the cores this process may run on, {cores} here)")
    e.add_argument("--force", action="store_true",
                   help="evaluate checkpoint.pt even when its configuration differs from the run's run.json")
    e.add_argument("--quiet", action="store_true", help="print nothing but errors")

    # ---- bench ----------------------------------------------------------------------------------
    sub.add_parser("bench", add_help=False,
                   help=f"run the benchmarks; every argument goes to the runner ('{PROG} bench --help' lists them)")
    return parser


def _cmd_train(args) -> int:
    from .training.train import TrainOptions, train

    opts = TrainOptions(
        out=args.out, data=args.data, config=args.config, impl=args.impl, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        nesterov=args.nesterov, lr_milestones=args.lr_milestones, exit_weights=args.exit_weights, amp=args.amp,
        seed=args.seed, augment=args.augment, val_size=args.val_size, resume=args.resume, overwrite=args.overwrite,
        device=args.device, workers=args.workers, threads=args.threads, val_every=args.val_every,
        progress=args.progress, quiet=args.quiet, cuda_graph=args.cuda_graph, limit_batches=args.limit_batches)
    summary = train(opts)
    if args.evaluate and int(os.environ.get("RANK", "0")) == 0:
        from .training.evaluate import EvaluateOptions, evaluate_run, format_summary

        result = evaluate_run(EvaluateOptions(run_dir=args.out, device=args.device, threads=args.threads))
        if not args.quiet:
            print(format_summary(result))
            print(f"wrote {Path(args.out) / 'evaluation.json'} and the plots beside it")
    elif not args.quiet and int(os.environ.get("RANK", "0")) == 0:
        print(f"run saved in {summary['run_dir']} ({summary['epochs']} epochs, {summary['elapsed_s']:.1f} s); "
              f"evaluate with: {PROG} evaluate {summary['run_dir']}")
    return 0


def _cmd_evaluate(args) -> int:
    from .training.evaluate import EvaluateOptions, evaluate_run, format_summary

    result = evaluate_run(EvaluateOptions(
        run_dir=args.run_dir, data=args.data, device=args.device, batch_size=args.batch_size, impl=args.impl,
        q_min=args.q_min, q_max=args.q_max, q_step=args.q_step, measure=args.measure, threads=args.threads,
        quiet=args.quiet, force=args.force))
    if not args.quiet:
        print(format_summary(result))
        print(f"wrote {Path(args.run_dir) / 'evaluation.json'}, anytime.png, budgeted.png")
    return 0


BENCH_OUT = "bench-results"


def bench_script() -> Path:
    """The benchmark runner: inside the installed package (setup.py ships benches/ as
    msdnet_ops/_benchmarks/benches/), else benches/run.py of the source checkout this package
    is imported from (an editable install, or the repository root)."""
    package = Path(__file__).resolve().parent
    installed = package / "_benchmarks" / "benches" / "run.py"
    return installed if installed.is_file() else package.parent / "benches" / "run.py"


def _cmd_bench(bench_args: Sequence[str]) -> int:
    """Run the benchmark runner with ``bench_args`` in this directory; results go to
    ./bench-results unless --out says otherwise (never into the installed package)."""
    script = bench_script()
    if not script.is_file():
        print(f"{PROG} bench: error: the benchmark runner {script} is missing: reinstall msdnet_ops",
              file=sys.stderr)
        return 2
    asks_help = any(a in ("-h", "--help") for a in bench_args)
    gives_out = any(a == "--out" or a.startswith("--out=") for a in bench_args)
    args = list(bench_args) if asks_help or gives_out else [*bench_args, "--out", BENCH_OUT]
    status = subprocess.call([sys.executable, str(script), *args])
    if asks_help:
        print(f"\n'{PROG} bench' runs {script} with these options; without --out it writes into ./{BENCH_OUT}.")
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .training import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after 'bench' belongs to the runner, --help included
        return _cmd_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _cmd_train(args)
        return _cmd_evaluate(args)
    except UserError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "train":
            print(f"\n{PROG} train: interrupted; the last completed epoch is saved, continue with "
                  f"'{PROG} train --out {args.out} --resume'", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
