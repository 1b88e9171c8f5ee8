"""The ``msdnet`` command (also ``python -m msdnet_ops``).

    msdnet train --out runs/digits              # embedded digits data, small default MSDNet
    msdnet evaluate runs/digits                 # -> evaluation.json, anytime.png, budgeted.png
    msdnet train --out runs/digits --evaluate   # both in one command
    msdnet train --data cifar100:/data/cifar --config cifar100-anytime --out runs/c100
    torchrun --nproc-per-node 4 -m msdnet_ops train --data imagenet:/data/imagenet \\
        --config imagenet-step4 --out runs/in
    msdnet bench ...                            # runs benches/run.py with the given arguments

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Train and evaluate Multi-Scale Dense Networks (anytime prediction and budgeted "
                               "early exit).",
        epilog="Run 'msdnet COMMAND --help' for the options of a command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # ---- train ----------------------------------------------------------------------------------
    t = sub.add_parser(
        "train", help="train an MSDNet (embedded digits data by default)",
        description="Train an MSDNet with the paper's recipe (SGD momentum 0.9, weight decay 1e-4, lr 0.1 x0.1 at "
                    "50%% and 75%% of the epochs, loss = sum of cross-entropy over exits). Writes run.json, "
                    "checkpoint.pt (every epoch, atomically) and train_log.jsonl to --out. Works under torchrun "
                    "(DistributedDataParallel with synchronized batch statistics). Options left out take their "
                    "defaults, or with --resume the values stored in the run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--out", required=True, metavar="DIR", help="run directory (created)")
    t.add_argument("--data", metavar="SPEC", default=None,
                   help="'digits' (embedded default, no download), 'cifar10:PATH', 'cifar100:PATH' (torchvision "
                        "format) or 'imagenet:PATH' (ImageFolder with train/ and val/)")
    t.add_argument("--config", metavar="NAME", default=None,
                   help="model configuration: digits-small (default for digits), cifar10-anytime, cifar100-anytime, "
                        "cifar10-budgeted, cifar100-budgeted, imagenet-step4, imagenet-step7")
    t.add_argument("--impl", choices=("auto", "plain", "fused"), default=None,
                   help="model implementation (auto: fused when available) [default: auto]")
    t.add_argument("--epochs", type=_positive_int, default=None,
                   help="epochs [default: 20 digits, 300 CIFAR, 90 ImageNet]")
    t.add_argument("--batch-size", type=_positive_int, default=None,
                   help="global batch size, split over torchrun processes [default: 64, ImageNet 256]")
    t.add_argument("--lr", type=_positive_float, default=None, help="initial learning rate [default: 0.1]")
    t.add_argument("--momentum", type=_non_negative_float, default=None, help="SGD momentum [default: 0.9]")
    t.add_argument("--weight-decay", type=_non_negative_float, default=None, help="weight decay [default: 1e-4]")
    t.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum")
    t.add_argument("--lr-milestones", metavar="F,F", default=None,
                   help="fractions of the epochs where lr is multiplied by 0.1 [default: 0.5,0.75; ImageNet "
                        "0.3333,0.6667]")
    t.add_argument("--exit-weights", metavar="W,W,...", default=None,
                   help="loss weight of each exit (one per exit) [default: all 1]")
    t.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default=None,
                   help="mixed precision (auto: bf16 or fp16 on GPU; off on CPU and for the fused model, which "
                        "does not run under autocast) [default: auto]")
    t.add_argument("--seed", type=_non_negative_int, default=None, help="random seed [default: 0]")
    t.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="no training augmentation")
    t.add_argument("--val-size", type=_positive_int, default=None,
                   help="images held out for validation [default: digits 180, CIFAR 5000, ImageNet 50000]")
    start = t.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    start.add_argument("--overwrite", action="store_true", help="start over even if --out holds a run")
    t.add_argument("--device", default=None, help="'auto' (GPU if any), 'cpu', 'cuda', 'cuda:N' [default: auto]")
    t.add_argument("--workers", type=_non_negative_int, default=None,
                   help="data-loader worker processes [default: 0 digits, 4 CIFAR, 8 ImageNet]")
    t.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads per process [default: available cores / local processes]")
    t.add_argument("--val-every", type=_non_negative_int, default=1,
                   help="validate every N epochs (the last epoch always; 0: never)")
    t.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bars (auto: only on a terminal)")
    t.add_argument("--quiet", action="store_true", help="print nothing but errors")
    t.add_argument("--evaluate", action="store_true", help="run 'msdnet evaluate' on the run after training")
    t.add_argument("--limit-batches", type=_positive_int, default=None, help=argparse.SUPPRESS)

    # ---- evaluate -------------------------------------------------------------------------------
    e = sub.add_parser(
        "evaluate", help="anytime table and budgeted accuracy-cost curve of a trained run",
        description="Evaluate the run in DIR: per-exit accuracy with multiply-adds (anytime), and the budgeted "
                    "accuracy-cost curve (thresholds calibrated on the validation split, applied to the test "
                    "split, q swept over --q-min..--q-max). Writes DIR/evaluation.json, DIR/anytime.png, "
                    "DIR/budgeted.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("run_dir", metavar="DIR", help="run directory written by 'msdnet train --out DIR'")
    _add_evaluate_options(e)

    # ---- bench ----------------------------------------------------------------------------------
    b = sub.add_parser("bench", help="run the benchmarks (benches/run.py) with the given arguments",
                       description="Runs benches/run.py of the source tree, passing every argument through.",
                       add_help=False)
    b.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for benches/run.py")
    return parser


def _add_evaluate_options(e: argparse.ArgumentParser, prefix: str = "") -> None:
    e.add_argument("--data", metavar="SPEC", default=None,
                   help="data set to evaluate on [default: the one the run was trained on]")
    e.add_argument("--device", default=None, help="'auto', 'cpu', 'cuda', 'cuda:N' [default: auto]")
    e.add_argument("--batch-size", type=_positive_int, default=256, help="evaluation batch size")
    e.add_argument("--impl", choices=("auto", "plain", "fused"), default=None,
                   help="model implementation [default: auto]")
    e.add_argument("--q-min", type=_positive_float, default=0.05, help="smallest q of the budgeted sweep")
    e.add_argument("--q-max", type=_positive_float, default=1.95, help="largest q of the budgeted sweep")
    e.add_argument("--q-step", type=_positive_float, default=0.05, help="step of the q sweep")
    e.add_argument("--no-measure", dest="measure", action="store_false",
                   help="skip the measured (real early-exit) run of the budgeted classifier")
    e.add_argument("--threads", type=_positive_int, default=None, help="CPU threads")
    e.add_argument("--force", action="store_true",
                   help="evaluate checkpoint.pt even when its configuration differs from the run's run.json")
    e.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _cmd_train(args) -> int:
    from .training.train import TrainOptions, train

    opts = TrainOptions(
        out=args.out, data=args.data, config=args.config, impl=args.impl, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        nesterov=args.nesterov, lr_milestones=args.lr_milestones, exit_weights=args.exit_weights, amp=args.amp,
        seed=args.seed, augment=args.augment, val_size=args.val_size, resume=args.resume, overwrite=args.overwrite,
        device=args.device, workers=args.workers, threads=args.threads, val_every=args.val_every,
        progress=args.progress, quiet=args.quiet, limit_batches=args.limit_batches)
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


def bench_script() -> Path:
    """``benches/run.py`` of the source tree this package lives in."""
    return Path(__file__).resolve().parent.parent / "benches" / "run.py"


def _cmd_bench(args) -> int:
    script = bench_script()
    if not script.is_file():
        print(f"{PROG} bench: the benchmark runner is missing: expected {script} (benches/run.py of the source "
              "tree; benchmarks are not part of an installed wheel)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args.bench_args], cwd=str(script.parent.parent))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .training import UserError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "evaluate":
            return _cmd_evaluate(args)
        return _cmd_bench(args)
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
