"""The training loop: the paper's recipe, checkpoints every epoch, resume, torchrun/DDP.

Recipe (defaults): SGD with momentum 0.9 (``nesterov`` optional), weight decay 1e-4, lr 0.1
decayed x0.1 at 50 % and 75 % of the epochs (ImageNet: at 1/3 and 2/3, i.e. every 30 of 90),
loss = sum over exits of the cross-entropy (optionally weighted), batch 64 (ImageNet 256),
300 epochs (ImageNet 90; the embedded digits: see :data:`DATA_DEFAULTS`). Mixed precision on
GPUs (bfloat16, or float16 with a gradient scaler), see :func:`.precision.supports_autocast`.

A run directory holds ``run.json`` (the configuration), ``checkpoint.pt`` (rewritten
atomically after every epoch) and ``train_log.jsonl`` (one line per epoch). ``--batch-size``
is the *global* batch: under torchrun each of the W processes takes ``batch_size / W``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from . import distributed as D
from .atomic import atomic_write_json
from .checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from .data import DataBundle, load_data, parse_data_spec
from .errors import UserError
from .jsonlog import append_record, log_path, rewrite_log
from .loss import multi_exit_loss, parse_exit_weights
from .model_factory import build_model, impl_name, resolve_config
from .precision import amp_name, autocast, make_scaler, resolve_amp, supports_autocast
from .progress import Progress, progress_enabled
from .threads import ThreadTuner, make_thread_policy
from .schedule import CIFAR_MILESTONES, IMAGENET_MILESTONES, lr_at_epoch, milestone_epochs, parse_milestones

RUN_CONFIG_NAME = "run.json"

# Per data set: epochs, global batch size, lr milestones, data-loader workers.
DATA_DEFAULTS = {
    "digits": dict(epochs=20, batch_size=64, lr_milestones=CIFAR_MILESTONES, workers=0),
    "cifar10": dict(epochs=300, batch_size=64, lr_milestones=CIFAR_MILESTONES, workers=4),
    "cifar100": dict(epochs=300, batch_size=64, lr_milestones=CIFAR_MILESTONES, workers=4),
    "imagenet": dict(epochs=90, batch_size=256, lr_milestones=IMAGENET_MILESTONES, workers=8),
}
RECIPE_DEFAULTS = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False, amp="auto", seed=0,
                       augment=True, exit_weights=None, impl="auto", val_size=None)
# Options that define the run (stored in run.json, checked on --resume) ...
RECIPE_KEYS = ("data", "config", "impl", "epochs", "batch_size", "lr", "momentum", "weight_decay", "nesterov",
               "lr_milestones", "exit_weights", "amp", "seed", "augment", "val_size")


@dataclass
class TrainOptions:
    """Options of ``msdnet train``; ``None`` means "not given" (a default, or on ``--resume``
    the stored value)."""

    out: str = "runs/digits"
    data: Optional[str] = None
    config: Optional[str] = None
    impl: Optional[str] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    momentum: Optional[float] = None
    weight_decay: Optional[float] = None
    nesterov: Optional[bool] = None
    lr_milestones: Optional[str] = None
    exit_weights: Optional[str] = None
    amp: Optional[str] = None
    seed: Optional[int] = None
    augment: Optional[bool] = None
    val_size: Optional[int] = None
    # runtime only (may change between a run and its resumption)
    resume: bool = False
    overwrite: bool = False
    device: Optional[str] = None
    workers: Optional[int] = None
    threads: Optional[int] = None
    val_every: int = 1
    progress: str = "auto"
    quiet: bool = False
    limit_batches: Optional[int] = None  # at most this many batches per epoch (smoke tests)


def _given(opts: TrainOptions) -> dict:
    return {k: getattr(opts, k) for k in RECIPE_KEYS if getattr(opts, k) is not None}


def _fresh_recipe(opts: TrainOptions) -> dict:
    """The full recipe of a new run: given options over the defaults."""
    given = _given(opts)
    data_name, _ = parse_data_spec(given.get("data"))
    recipe = dict(RECIPE_DEFAULTS)
    dd = DATA_DEFAULTS[data_name]
    recipe.update(epochs=dd["epochs"], batch_size=dd["batch_size"],
                  lr_milestones=",".join(f"{m:.6g}" for m in dd["lr_milestones"]), data="digits", config=None)
    recipe.update(given)
    return recipe


def _check_resume_compatible(stored: dict, opts: TrainOptions) -> None:
    given = _given(opts)
    diff = [f"--{k.replace('_', '-')} {given[k]!r} (the run has {stored.get(k)!r})"
            for k in given if k != "config" and given[k] != stored.get(k)]
    if "config" in given and given["config"] != stored.get("config_name"):
        diff.append(f"--config {given['config']!r} (the run has {stored.get('config_name')!r})")
    if diff:
        raise UserError("--resume continues the run with its stored configuration, but these options differ: "
                        + "; ".join(diff) + ". Leave them out, or train into a new --out directory")


def _validate(recipe: dict) -> None:
    for key in ("epochs", "batch_size"):
        if not isinstance(recipe[key], int) or recipe[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be a positive integer, got {recipe[key]!r}")
    for key in ("lr", "momentum", "weight_decay"):
        if not (isinstance(recipe[key], (int, float)) and math.isfinite(recipe[key]) and recipe[key] >= 0):
            raise UserError(f"--{key.replace('_', '-')} must be a non-negative number, got {recipe[key]!r}")
    if recipe["nesterov"] and recipe["momentum"] <= 0:
        raise UserError("--nesterov needs a positive --momentum")
    parse_milestones(recipe["lr_milestones"])


def make_train_loader(data: DataBundle, per_rank_batch: int, epoch: int, seed: int, ctx: D.DistContext,
                      workers: int) -> DataLoader:
    """The loader of one epoch; its order depends only on ``(seed, epoch, rank)``."""
    if ctx.distributed:
        sampler = DistributedSampler(data.train, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=seed, drop_last=False)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(data.train, generator=torch.Generator().manual_seed(seed * 1009 + epoch))
    return DataLoader(data.train, batch_size=per_rank_batch, sampler=sampler, num_workers=workers,
                      pin_memory=ctx.device.type == "cuda", drop_last=False)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return ((seed + 1) * 1_000_003 + epoch * 1009 + rank) % (2 ** 63)


def train_one_epoch(model, loader, optimizer, scaler, ctx: D.DistContext, amp_dtype, exit_weights, n_exits: int,
                    progress: Progress, limit_batches: Optional[int] = None,
                    tuner: Optional[ThreadTuner] = None) -> dict:
    """One pass over ``loader``; returns global (all-ranks) loss and per-exit accuracy."""
    model.train()
    dev = ctx.device
    totals = torch.zeros(2 + n_exits, dtype=torch.float64)  # loss*n, n, correct per exit
    for step, (x, y) in enumerate(loader):
        if limit_batches is not None and step >= limit_batches:
            break
        if tuner is not None:
            tuner.before_step()
        t0 = time.perf_counter()
        x = x.to(dev, non_blocking=True)
        y = y.to(dev, non_blocking=True)
        with autocast(dev, amp_dtype):
            outputs = model(x)
            loss = multi_exit_loss(outputs, y, exit_weights)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            n = y.shape[0]
            row = [loss.detach().double().cpu() * n, torch.tensor(float(n), dtype=torch.float64)]
            row += [(o.argmax(1) == y).sum().double().cpu() for o in outputs]
            totals += torch.stack(row)
        if tuner is not None:
            tuner.after_step(time.perf_counter() - t0, n)
        progress.update(1, loss=float(loss.detach()))
    if ctx.distributed:
        totals = totals.to(dev) if dev.type == "cuda" else totals
        D.all_reduce_sum(totals, ctx)
        totals = totals.cpu()
    n = max(totals[1].item(), 1.0)
    return {"train_loss": totals[0].item() / n, "train_accuracy": [(c / n).item() for c in totals[2:]],
            "train_samples": int(totals[1].item())}


@torch.no_grad()
def validate(model, dataset, batch_size: int, device, amp_dtype) -> list[float]:
    """Per-exit accuracy of ``model`` on ``dataset`` (eval mode)."""
    from .evaluate import collect_probabilities

    probs, labels = collect_probabilities(model, dataset, batch_size, device, amp_dtype)
    return [float((p.argmax(1) == labels).double().mean()) for p in probs]


def _print(ctx: D.DistContext, opts: TrainOptions, msg: str) -> None:
    if ctx.is_main and not opts.quiet:
        print(msg, flush=True)


def train(opts: TrainOptions) -> dict:
    """Train (or resume) the run in ``opts.out``; returns a summary dict (rank 0's view)."""
    out = Path(opts.out)
    ctx = D.init_distributed(opts.device)
    try:
        return _train(opts, out, ctx)
    finally:
        D.cleanup_distributed()


def _train(opts: TrainOptions, out: Path, ctx: D.DistContext) -> dict:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: expected a run directory (created if missing)")
    if opts.resume and opts.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite starts it over: give one of them")
    tuner = make_thread_policy(opts.threads, ctx.device, ctx.local_world_size)
    ckpt_file = checkpoint_path(out)
    state = None
    if ckpt_file.exists() and not opts.overwrite:
        if not opts.resume:
            raise UserError(f"{out} already holds a training run ({ckpt_file.name}); pass --resume to continue it, "
                            "--overwrite to start over, or choose another --out")
        state = load_checkpoint(ckpt_file)
        stored = state["config"]
        _check_resume_compatible(stored, opts)
        recipe = {k: stored[k] for k in RECIPE_KEYS if k != "config"}
        recipe["config"] = stored.get("config_name")
    else:
        if opts.resume and ctx.is_main:
            _print(ctx, opts, f"no checkpoint in {out} yet: starting a new run")
        recipe = _fresh_recipe(opts)
    _validate(recipe)

    if recipe["batch_size"] % ctx.world_size:
        raise UserError(f"--batch-size {recipe['batch_size']} (the global batch) must be divisible by the "
                        f"{ctx.world_size} processes")
    per_rank_batch = recipe["batch_size"] // ctx.world_size
    milestones = parse_milestones(recipe["lr_milestones"])

    data = load_data(recipe["data"], val_size=recipe["val_size"], augment=recipe["augment"])
    kwargs = resolve_config(recipe["config"], data.name, data.num_classes, data.stem)
    torch.manual_seed(recipe["seed"])
    model = build_model(kwargs, recipe["impl"])
    amp_dtype = resolve_amp(recipe["amp"], ctx.device, supports_autocast(model, ctx.device))
    n_exits = int(kwargs["nBlocks"])
    exit_weights = parse_exit_weights(recipe["exit_weights"], n_exits)
    config = dict(recipe, config_name=recipe["config"] or _default_config_name(data.name), model=kwargs,
                  impl_used=impl_name(model), data_name=data.name, num_classes=data.num_classes,
                  input_size=list(data.input_size), split_seed=0, data_info=data.info)
    config.pop("config")
    if state is not None:
        model.load_state_dict(state["model"])
    model.to(ctx.device)
    train_model = D.wrap_ddp(model, ctx)

    optimizer = torch.optim.SGD(train_model.parameters(), lr=recipe["lr"], momentum=recipe["momentum"],
                                weight_decay=recipe["weight_decay"], nesterov=bool(recipe["nesterov"]))
    scaler = make_scaler(ctx.device, amp_dtype)
    history: list[dict] = []
    start_epoch = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = list(state.get("history", []))
        start_epoch = int(state["epoch"])

    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if state is None:
            _remove_stale_evaluation(out)
        atomic_write_json(out / RUN_CONFIG_NAME, config)
        rewrite_log(log_path(out), history)
    workers = opts.workers if opts.workers is not None else DATA_DEFAULTS[data.name]["workers"]
    show = progress_enabled(opts.progress) and ctx.is_main and not opts.quiet
    n_params = sum(p.numel() for p in model.parameters())
    epochs = recipe["epochs"]
    if start_epoch >= epochs:
        _print(ctx, opts, f"{out}: already trained {start_epoch}/{epochs} epochs; nothing to do")
    else:
        _print(ctx, opts,
               f"training {config['config_name']} ({impl_name(model)}, {n_params:,} parameters, {n_exits} exits) on "
               f"{data.name} ({len(data.train)} train / {len(data.val)} val / {len(data.test)} test), "
               f"{ctx.world_size} process(es) on {ctx.device}, amp {amp_name(amp_dtype)}, epochs "
               f"{start_epoch + 1}..{epochs}, batch {recipe['batch_size']}, lr {recipe['lr']} "
               f"(x0.1 from epochs {[m + 1 for m in milestone_epochs(epochs, milestones) if m < epochs]})"
               + (f", resuming from {ckpt_file}" if state is not None else ""))
    elapsed_before = history[-1]["elapsed_s"] if history else 0.0

    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        lr = lr_at_epoch(epoch, recipe["lr"], epochs, milestones)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(epoch_seed(recipe["seed"], epoch, ctx.rank))
        tuner.start_epoch(epoch)
        loader = make_train_loader(data, per_rank_batch, epoch, recipe["seed"], ctx, workers)
        total = len(loader) if opts.limit_batches is None else min(len(loader), opts.limit_batches)
        with Progress(total, f"epoch {epoch + 1}/{epochs}", show) as bar:
            stats = train_one_epoch(train_model, loader, optimizer, scaler, ctx, amp_dtype, exit_weights, n_exits,
                                    bar, opts.limit_batches, tuner)
        t_train = time.perf_counter() - t0
        if not math.isfinite(stats["train_loss"]) and amp_dtype != torch.float16:
            raise UserError(f"the training loss became {stats['train_loss']} in epoch {epoch + 1}; lower --lr "
                            f"(now {recipe['lr']}) or check the data")
        val_acc = None
        if ctx.is_main and opts.val_every and ((epoch + 1) % opts.val_every == 0 or epoch + 1 == epochs):
            val_acc = validate(model, data.val, max(per_rank_batch, 256), ctx.device, amp_dtype)
        t_epoch = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "lr": lr, **stats, "val_accuracy": val_acc, "train_time_s": round(t_train, 3),
                  "epoch_time_s": round(t_epoch, 3), "samples_per_s": round(stats["train_samples"] / t_train, 1),
                  "elapsed_s": round(elapsed_before + t_epoch, 3), "world_size": ctx.world_size,
                  "threads": torch.get_num_threads()}
        elapsed_before = record["elapsed_s"]
        history.append(record)
        if ctx.is_main:
            save_checkpoint(ckpt_file, {
                "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "config": config, "history": history,
                "torch_version": torch.__version__,
            })
            append_record(log_path(out), record)
            acc = " ".join(f"{a * 100:.1f}" for a in (val_acc or stats["train_accuracy"]))
            _print(ctx, opts, f"epoch {epoch + 1}/{epochs} lr {lr:.4g} loss {stats['train_loss']:.4f} "
                              f"{'val' if val_acc else 'train'} acc/exit % [{acc}] {t_epoch:.1f}s")
        D.barrier(ctx)
    final = history[-1] if history else {}
    return {"run_dir": str(out), "epochs": len(history), "elapsed_s": final.get("elapsed_s", 0.0),
            "val_accuracy": final.get("val_accuracy"), "config": config}


def _remove_stale_evaluation(out: Path) -> None:
    """A new run (``--overwrite``) must not leave the previous run's evaluation beside it."""
    from .evaluate import ANYTIME_PLOT, BUDGETED_PLOT, EVALUATION_NAME

    for name in (EVALUATION_NAME, ANYTIME_PLOT, BUDGETED_PLOT):
        (out / name).unlink(missing_ok=True)


def _default_config_name(data_name: str) -> str:
    from .model_factory import DEFAULT_CONFIG

    return DEFAULT_CONFIG[data_name]


def options_from_dict(d: dict) -> TrainOptions:
    names = {f.name for f in fields(TrainOptions)}
    return TrainOptions(**{k: v for k, v in d.items() if k in names})


def options_to_dict(opts: TrainOptions) -> dict:
    return asdict(opts)
