"""Multi-process training under ``torchrun`` with DistributedDataParallel.

* :func:`init_distributed` reads torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and starts the process group: NCCL on
  GPUs, gloo on the CPU. Without torchrun it returns a single-process context.
* :func:`prepare_model_for_ddp` gives the model SyncBatchNorm semantics (batch statistics over
  the global batch): a model that synchronizes its own shared statistics exposes
  ``enable_sync_stats(group)`` (the fused ``msdnet_ops.MSDNet``: one all-reduce per feature
  buffer write, not per BN module) and gets that call; any other model has its BatchNorm
  layers converted -- to :class:`torch.nn.SyncBatchNorm` on GPUs, to :class:`SyncBatchNorm`
  here on the CPU (torch's refuses CPU tensors). Both keep the parameter and buffer names, so
  ``state_dict`` keys do not change.
* Only rank 0 logs and writes checkpoints (:attr:`DistContext.is_main`).
* :func:`threads_per_process`: each process's share of the cores (the ``--threads`` default).

With the global batch split evenly over the ranks, one step equals a single process on the
combined batch: DDP averages the per-rank gradients of the per-rank mean losses, and the
synchronized batch statistics make every BN see the global batch (tested with gloo, 2 CPU
processes, in ``python_tests/test_distributed.py``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import UserError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def threads_per_process(local_world_size: int = 1) -> int:
    """The default CPU thread count of one process: an equal share of the cores this process
    may run on (its affinity mask, which containers and ``taskset`` narrow), split between the
    processes torchrun started on this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


def choose_device(device: Optional[str], local_rank: int = 0) -> torch.device:
    """``None``/``'auto'``: the GPU of this local rank when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {device!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device!r}: no CUDA GPU is available here")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: Optional[str] = None, backend: Optional[str] = None) -> DistContext:
    """Start the process group when launched by torchrun (``WORLD_SIZE > 1``)."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    dev = choose_device(device, local_rank)
    if world_size <= 1:
        return DistContext(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank,
                       local_world_size=local_world_size, device=dev, distributed=True)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op in a single process); returns it."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------------------------------------
# Synchronized batch normalization that also runs on the CPU (gloo)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm with statistics over every rank's batch.

    Forward: one ``all_gather`` of each rank's (mean, M2, count) per channel, merged exactly
    (Chan et al.). Backward: one ``all_reduce`` of (sum dy, sum dy*xhat) per channel; the
    input gradient uses the global sums, the weight/bias gradients stay local (DDP averages
    them), so the result equals the gradient of the global mean loss.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        sd = _stats_dtype(x.dtype)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.to(sd)
        count = x.numel() // c if c else 0
        if count > 0:
            mean_local = xf.mean(dims)
            m2_local = ((xf - mean_local.view(1, -1, *([1] * (x.dim() - 2)))) ** 2).sum(dims)
        else:
            mean_local = xf.new_zeros(c)
            m2_local = xf.new_zeros(c)
        packed = torch.cat([mean_local, m2_local, xf.new_tensor([float(count)])])
        world = dist.get_world_size(group)
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed, group=group)
        g = torch.stack(gathered)
        counts = g[:, 2 * c]
        means = g[:, :c]
        m2s = g[:, c:2 * c]
        n = counts.sum()
        if n.item() < 2:
            raise ValueError("SyncBatchNorm: expected more than 1 value per channel in the global batch")
        mean = (counts[:, None] * means).sum(0) / n
        m2 = m2s.sum(0) + (counts[:, None] * (means - mean) ** 2).sum(0)
        var = m2 / n
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_((m2 / (n - 1)).to(running_var.dtype), alpha=momentum)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xhat = (xf - mean.view(shape)) * invstd.view(shape)
        y = xhat
        if weight is not None:
            y = y * weight.to(sd).view(shape) + bias.to(sd).view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.group = group
        ctx.total = n
        ctx.input_dtype = x.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xhat, weight, invstd = ctx.saved_tensors
        sd = xhat.dtype
        c = xhat.shape[1]
        dims = [0] + list(range(2, xhat.dim()))
        shape = (1, -1) + (1,) * (xhat.dim() - 2)
        dy = grad_out.to(sd)
        sum_dy = dy.sum(dims)
        sum_dy_xhat = (dy * xhat).sum(dims)
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            packed = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=ctx.group)
            g_dy, g_dy_xhat = packed[:c], packed[c:]
            scale = invstd if weight is None else invstd * weight.to(sd)
            grad_x = (dy - (g_dy / ctx.total).view(shape) - xhat * (g_dy_xhat / ctx.total).view(shape)) \
                * scale.view(shape)
            grad_x = grad_x.to(ctx.input_dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for ``nn.BatchNorm{1,2,3}d`` whose training-mode statistics span all ranks of
    ``process_group``; works with gloo on the CPU. Same parameters and buffers as BatchNorm.
    Outside a process group of more than one rank (or in eval mode) it is plain batch norm."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input):
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or self.running_mean is None
        if not (self.training and self._world() > 1):
            return F.batch_norm(input,
                                self.running_mean if not self.training or self.track_running_stats else None,
                                self.running_var if not self.training or self.track_running_stats else None,
                                self.weight, self.bias, use_batch_stats, momentum, self.eps)
        rm = self.running_mean if self.track_running_stats else None
        rv = self.running_var if self.track_running_stats else None
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, rm, rv, self.eps, momentum,
                                            self.process_group)

    @classmethod
    def convert(cls, module: nn.Module, process_group=None) -> nn.Module:
        """Replace every BatchNorm in ``module`` (recursively) by this class, sharing the
        parameters and buffers; like :meth:`torch.nn.SyncBatchNorm.convert_sync_batchnorm`."""
        out = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, (cls, nn.SyncBatchNorm)):
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert(child, process_group))
        return out


def prepare_model_for_ddp(model: nn.Module, group=None) -> nn.Module:
    """Give ``model`` synchronized batch statistics across the ranks of ``group``; returns the
    model to wrap in DDP (the same object when the model synchronizes itself)."""
    if hasattr(model, "enable_sync_stats"):
        model.enable_sync_stats(group)
        return model
    on_gpu = any(p.is_cuda for p in model.parameters())
    if on_gpu:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, group)
    return SyncBatchNorm.convert(model, group)


def unused_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters no exit of an MSDNet depends on (empty for other models).

    With ``prune='max'`` a grid can hold cells that no classifier reads (the finest scale of
    the last layers before a transition, for example): their parameters never receive a
    gradient, which DistributedDataParallel must be told about."""
    plan = getattr(model, "plan", None)
    if plan is None:
        from ..models.msdnet_plain import MSDNetPlain

        if not isinstance(model, MSDNetPlain):
            return []
        from ..models.msdnet_plan import build_plan

        plan = build_plan(model)
    dead = [cell.name + "." for cell in plan.cells if cell.index not in plan.live]
    return [name for name, _ in model.named_parameters() if name.startswith(tuple(dead))] if dead else []


def wrap_ddp(model: nn.Module, ctx: DistContext, group=None) -> nn.Module:
    """``prepare_model_for_ddp`` then :class:`DistributedDataParallel` (identity in one process).

    ``find_unused_parameters`` is turned on only for a model with parameters that no output
    depends on (:func:`unused_parameter_names`); without it DDP would wait for their gradients
    and fail at the next step."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = prepare_model_for_ddp(model, group)
    find_unused = bool(unused_parameter_names(model))
    if ctx.device.type == "cuda":
        return DDP(model, device_ids=[ctx.device.index], output_device=ctx.device.index, process_group=group,
                   find_unused_parameters=find_unused)
    return DDP(model, process_group=group, find_unused_parameters=find_unused)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (the model itself otherwise)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model
