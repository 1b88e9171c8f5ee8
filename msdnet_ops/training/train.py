"""The training loop: the paper's recipe (:mod:`.recipe`), a checkpoint every epoch, resume,
torchrun/DDP.

Mixed precision on GPUs (bfloat16, or float16 with a gradient scaler), see
:func:`.precision.supports_autocast`. A run directory holds ``run.json`` (the configuration),
``checkpoint.pt`` (rewritten atomically after every epoch) and ``train_log.jsonl`` (one line
per epoch), see :mod:`.run_files`. ``--batch-size`` is the *global* batch: under torchrun each
of the W processes takes ``batch_size / W``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from . import UserError
from . import distributed as D
from .cuda_graph import CudaGraphTrainStep
from .data import DataBundle, load_data, parse_data_spec
from .model_factory import build_model, impl_name, resolve_config
from .precision import amp_name, autocast, make_scaler, resolve_amp, supports_autocast
from .progress import Progress, progress_enabled
from .recipe import (DATA_DEFAULTS, RECIPE_KEYS, check_resume_compatible, fresh_recipe, lr_at_epoch,
                     milestone_epochs, multi_exit_loss, parse_exit_weights, parse_milestones, validate_recipe)
from .run_files import (RUN_CONFIG_NAME, append_record, atomic_write_json, checkpoint_path, load_checkpoint,
                        log_path, rewrite_log, save_checkpoint)


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
    cuda_graph: bool = False  # each training step captured in a CUDA graph and replayed
    limit_batches: Optional[int] = None  # at most this many batches per epoch (smoke tests)


def _given(opts: TrainOptions) -> dict:
    return {k: getattr(opts, k) for k in RECIPE_KEYS if getattr(opts, k) is not None}


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
                    graph_step: Optional[CudaGraphTrainStep] = None) -> dict:
    """One pass over ``loader``; returns global (all-ranks) loss and per-exit accuracy.
    ``graph_step``: the same step (with ``exit_weights`` and ``amp_dtype``) captured in a CUDA
    graph, which then runs it."""
    model.train()
    dev = ctx.device
    totals = torch.zeros(2 + n_exits, dtype=torch.float64)  # loss*n, n, correct per exit
    for step, (x, y) in enumerate(loader):
        if limit_batches is not None and step >= limit_batches:
            break
        x = x.to(dev, non_blocking=True)
        y = y.to(dev, non_blocking=True)
        if graph_step is not None:
            loss, outputs = graph_step(x, y)
        else:
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
    from .evaluate import collect_probabilities, exit_accuracies

    return exit_accuracies(*collect_probabilities(model, dataset, batch_size, device, amp_dtype))


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


@dataclass
class _Run:
    """Everything one training run works with, built once by :func:`_set_up`."""

    recipe: dict
    config: dict  # what run.json and the checkpoint store
    data: DataBundle
    model: torch.nn.Module
    train_model: torch.nn.Module  # the model, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype]
    exit_weights: Optional[list]
    per_rank_batch: int
    milestones: tuple
    graph_step: Optional[CudaGraphTrainStep] = None  # --cuda-graph
    start_epoch: int = 0
    history: list = field(default_factory=list)


def _train(opts: TrainOptions, out: Path, ctx: D.DistContext) -> dict:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: expected a run directory (created if missing)")
    if opts.resume and opts.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite starts it over: give one of them")
    torch.set_num_threads(opts.threads or D.threads_per_process(ctx.local_world_size))
    if opts.cuda_graph:
        _check_cuda_graph(ctx)  # before loading data and building the model
    state, recipe = _recipe_and_state(opts, out, ctx)
    run = _set_up(recipe, state, ctx)
    if opts.cuda_graph:
        run.graph_step = _graph_step(run)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if state is None:
            _remove_stale_evaluation(out)
        atomic_write_json(out / RUN_CONFIG_NAME, run.config)
        rewrite_log(log_path(out), run.history)
    _announce(run, opts, out, ctx, resuming=state is not None)
    workers = opts.workers if opts.workers is not None else DATA_DEFAULTS[run.data.name]["workers"]
    for epoch in range(run.start_epoch, recipe["epochs"]):
        run.history.append(_train_epoch(run, epoch, opts, ctx, workers))
        if ctx.is_main:
            _save_epoch(run, out, opts, ctx)
        D.barrier(ctx)
    final = run.history[-1] if run.history else {}
    return {"run_dir": str(out), "epochs": len(run.history), "elapsed_s": final.get("elapsed_s", 0.0),
            "val_accuracy": final.get("val_accuracy"), "config": run.config}


def _recipe_and_state(opts: TrainOptions, out: Path, ctx: D.DistContext):
    """``(checkpoint or None, recipe)``: a run to resume from its checkpoint, or a new one."""
    ckpt_file = checkpoint_path(out)
    if ckpt_file.exists() and not opts.overwrite:
        if not opts.resume:
            raise UserError(f"{out} already holds a training run ({ckpt_file.name}); pass --resume to continue it, "
                            "--overwrite to start over, or choose another --out")
        state = load_checkpoint(ckpt_file)
        stored = state["config"]
        check_resume_compatible(stored, _given(opts))
        recipe = {k: stored[k] for k in RECIPE_KEYS if k != "config"}
        recipe["config"] = stored.get("config_name")
    else:
        if opts.resume:
            _print(ctx, opts, f"no checkpoint in {out} yet: starting a new run")
        state = None
        given = _given(opts)
        recipe = fresh_recipe(given, parse_data_spec(given.get("data"))[0])
    validate_recipe(recipe)
    if recipe["batch_size"] % ctx.world_size:
        raise UserError(f"--batch-size {recipe['batch_size']} (the global batch) must be divisible by the "
                        f"{ctx.world_size} processes")
    return state, recipe


def _set_up(recipe: dict, state: Optional[dict], ctx: D.DistContext) -> _Run:
    """Data, model, optimizer and scaler of the run; restored from ``state`` when resuming."""
    data = load_data(recipe["data"], val_size=recipe["val_size"], augment=recipe["augment"])
    kwargs = resolve_config(recipe["config"], data.name, data.num_classes, data.stem)
    torch.manual_seed(recipe["seed"])
    model = build_model(kwargs, recipe["impl"])
    amp_dtype = resolve_amp(recipe["amp"], ctx.device, supports_autocast(model, ctx.device))
    exit_weights = parse_exit_weights(recipe["exit_weights"], int(kwargs["nBlocks"]))
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
    run = _Run(recipe=recipe, config=config, data=data, model=model, train_model=train_model, optimizer=optimizer,
               scaler=scaler, amp_dtype=amp_dtype, exit_weights=exit_weights,
               per_rank_batch=recipe["batch_size"] // ctx.world_size,
               milestones=parse_milestones(recipe["lr_milestones"]))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        run.history = list(state.get("history", []))
        run.start_epoch = int(state["epoch"])
    return run


def _check_cuda_graph(ctx: D.DistContext) -> None:
    if ctx.device.type != "cuda":
        raise UserError(f"--cuda-graph needs a CUDA device, got --device {ctx.device}")
    if ctx.distributed:
        raise UserError("--cuda-graph does not run under torchrun (the gradient all-reduce is not captured)")


def _graph_step(run: _Run) -> CudaGraphTrainStep:
    """``--cuda-graph``: the run's training step, captured (after a few eager steps) once per
    learning rate."""
    if run.amp_dtype == torch.float16:
        raise UserError("--cuda-graph does not run with --amp fp16 (its gradient scaler reads the host); "
                        "use --amp bf16 or --amp off")
    weights = run.exit_weights
    return CudaGraphTrainStep(run.train_model, run.optimizer,
                              lambda outputs, y: multi_exit_loss(outputs, y, weights),
                              autocast_dtype=run.amp_dtype)


def _announce(run: _Run, opts: TrainOptions, out: Path, ctx: D.DistContext, resuming: bool) -> None:
    epochs, data, model = run.recipe["epochs"], run.data, run.model
    if run.start_epoch >= epochs:
        _print(ctx, opts, f"{out}: already trained {run.start_epoch}/{epochs} epochs; nothing to do")
        return
    n_params = sum(p.numel() for p in model.parameters())
    decays = [m + 1 for m in milestone_epochs(epochs, run.milestones) if m < epochs]
    _print(ctx, opts,
           f"training {run.config['config_name']} ({impl_name(model)}, {n_params:,} parameters, "
           f"{run.config['model']['nBlocks']} exits) on {data.name} ({len(data.train)} train / {len(data.val)} val / "
           f"{len(data.test)} test), {ctx.world_size} process(es) on {ctx.device}, amp {amp_name(run.amp_dtype)}, "
           f"epochs {run.start_epoch + 1}..{epochs}, batch {run.recipe['batch_size']}, lr {run.recipe['lr']} "
           f"(x0.1 from epochs {decays})" + (f", resuming from {checkpoint_path(out)}" if resuming else ""))


def _train_epoch(run: _Run, epoch: int, opts: TrainOptions, ctx: D.DistContext, workers: int) -> dict:
    """Train one epoch, validate when due; returns the epoch's log record."""
    recipe, epochs = run.recipe, run.recipe["epochs"]
    t0 = time.perf_counter()
    lr = lr_at_epoch(epoch, recipe["lr"], epochs, run.milestones)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    torch.manual_seed(epoch_seed(recipe["seed"], epoch, ctx.rank))
    loader = make_train_loader(run.data, run.per_rank_batch, epoch, recipe["seed"], ctx, workers)
    total = len(loader) if opts.limit_batches is None else min(len(loader), opts.limit_batches)
    show = progress_enabled(opts.progress) and ctx.is_main and not opts.quiet
    with Progress(total, f"epoch {epoch + 1}/{epochs}", show) as bar:
        stats = train_one_epoch(run.train_model, loader, run.optimizer, run.scaler, ctx, run.amp_dtype,
                                run.exit_weights, int(run.config["model"]["nBlocks"]), bar, opts.limit_batches,
                                run.graph_step)
    t_train = time.perf_counter() - t0
    if not math.isfinite(stats["train_loss"]) and run.amp_dtype != torch.float16:
        raise UserError(f"the training loss became {stats['train_loss']} in epoch {epoch + 1}; lower --lr "
                        f"(now {recipe['lr']}) or check the data")
    val_acc = None
    if ctx.is_main and opts.val_every and ((epoch + 1) % opts.val_every == 0 or epoch + 1 == epochs):
        val_acc = validate(run.model, run.data.val, max(run.per_rank_batch, 256), ctx.device, run.amp_dtype)
    t_epoch = time.perf_counter() - t0
    elapsed_before = run.history[-1]["elapsed_s"] if run.history else 0.0
    return {"epoch": epoch + 1, "lr": lr, **stats, "val_accuracy": val_acc, "train_time_s": round(t_train, 3),
            "epoch_time_s": round(t_epoch, 3), "samples_per_s": round(stats["train_samples"] / t_train, 1),
            "elapsed_s": round(elapsed_before + t_epoch, 3), "world_size": ctx.world_size,
            "threads": torch.get_num_threads()}


def _save_epoch(run: _Run, out: Path, opts: TrainOptions, ctx: D.DistContext) -> None:
    """Checkpoint and log the epoch just trained (the last of ``run.history``), print its line."""
    record = run.history[-1]
    save_checkpoint(checkpoint_path(out), {
        "epoch": record["epoch"], "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(), "config": run.config, "history": run.history,
        "torch_version": torch.__version__,
    })
    append_record(log_path(out), record)
    val_acc = record["val_accuracy"]
    acc = " ".join(f"{a * 100:.1f}" for a in (val_acc or record["train_accuracy"]))
    _print(ctx, opts, f"epoch {record['epoch']}/{run.recipe['epochs']} lr {record['lr']:.4g} "
                      f"loss {record['train_loss']:.4f} {'val' if val_acc else 'train'} acc/exit % [{acc}] "
                      f"{record['epoch_time_s']:.1f}s")


def _remove_stale_evaluation(out: Path) -> None:
    """A new run (``--overwrite``) must not leave the previous run's evaluation beside it."""
    from .evaluate import ANYTIME_PLOT, BUDGETED_PLOT, EVALUATION_NAME

    for name in (EVALUATION_NAME, ANYTIME_PLOT, BUDGETED_PLOT):
        (out / name).unlink(missing_ok=True)


def _default_config_name(data_name: str) -> str:
    from .model_factory import DEFAULT_CONFIG

    return DEFAULT_CONFIG[data_name]
