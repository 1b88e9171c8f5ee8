"""BatchNorm as a per-channel affine transform of raw buffer values, and back.

A consumer of buffer channels reads ``relu(scale * x + shift)`` with
``scale = g * invstd`` and ``shift = h - g * mean * invstd``; ``mean``/``invstd`` are the
buffer's shared batch statistics (training) or the BatchNorm's running statistics (eval).
The backward maps the kernels' ``grad_scale``/``grad_shift`` to the BatchNorm parameter
gradients and, in training, to the gradients of the shared statistics.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from .. import ops


class AffineParams:
    """scale/shift for one consumer of channels [0, c), with what backward needs."""

    def __init__(self, weight, bias, mean, invstd, batch_stats: bool):
        self.mean, self.invstd = mean.detach(), invstd.detach()
        self.weight = None if weight is None else weight.detach()
        self.batch_stats = batch_stats
        rows = ops.eager.bn_scale_shift(self.mean, self.invstd, self.weight,
                                        None if bias is None else bias.detach())
        self.scale, self.shift = rows[0], rows[1]  # (indexing: unpacking a tensor costs more)

    def zero_grads(self):
        """Zeroed rows ``(grad_scale, grad_shift)`` for the kernels to accumulate into (one
        allocation, the form :meth:`backward` takes)."""
        return self.scale.new_zeros((2,) + self.scale.shape)

    def backward(self, grads, state, channels: int, accumulate: bool = True):
        """Returns (grad_weight, grad_bias) for ``grads`` from :meth:`zero_grads`; in training
        adds the statistics gradients to the buffer's ``grad_mean``/``grad_invstd`` (applied
        once per channel at finalize), or writes them (``accumulate=False``: this consumer is
        the only one of the statistics)."""
        stats_grads = ((state.grad_mean[:channels], state.grad_invstd[:channels])
                       if self.batch_stats else (None, None))
        grad_weight = ops.eager.bn_scale_shift_backward_(grads, self.mean, self.invstd,
                                                         self.weight, *stats_grads, accumulate)
        return grad_weight, grads[1]


class _Deferred(threading.local):
    def __init__(self):
        self.depth = 0
        self.pending: list = []
        self.modules: set = set()  # id() of the modules in ``pending`` (alive: pending holds them)


def _apply_pending() -> None:
    pending, _deferred.pending = _deferred.pending, []
    _deferred.modules.clear()
    _apply_running_stats(pending)


_deferred = _Deferred()


@contextlib.contextmanager
def deferred_running_stats():
    """Inside, :func:`update_running_stats` only records its update; leaving the outermost
    block applies them all with a few ``torch._foreach_*`` calls (the same arithmetic as one
    update per BatchNorm, without ~5 small tensor operations per BatchNorm)."""
    _deferred.depth += 1
    try:
        yield
    finally:
        _deferred.depth -= 1
        if _deferred.depth == 0 and _deferred.pending:
            _apply_pending()


def _apply_running_stats(updates) -> None:
    with torch.no_grad():
        # the unbiased batch variances from the shared statistics, all at once:
        # (invstd^-2 - eps) * n / (n - 1), the arithmetic of one update at a time
        variances = torch._foreach_pow([u[2] for u in updates], -2)
        torch._foreach_sub_(variances, [u[3] for u in updates])
        torch._foreach_mul_(variances, [u[4] for u in updates])
        # one launch for all the counters (a module appears at most once in ``updates``)
        torch._foreach_add_([u[0].num_batches_tracked for u in updates], 1)
        groups: dict = {}
        for (bn, mean, *_), var in zip(updates, variances):
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            group = groups.setdefault(factor, ([], [], [], []))
            for store, value in zip(group, (bn.running_mean, bn.running_var, mean, var)):
                store.append(value)
        for factor, (means, vars_, new_means, new_vars) in groups.items():
            torch._foreach_mul_(means + vars_, 1 - factor)
            torch._foreach_add_(means + vars_, [v if v.dtype == r.dtype else v.to(r.dtype)
                                                for v, r in zip(new_means + new_vars,
                                                                means + vars_)],
                                alpha=factor)


def update_running_stats(bn: torch.nn.BatchNorm2d, state, start: int, stop: int) -> None:
    """Exactly what ``nn.BatchNorm2d`` does to its buffers in a training-mode forward, from the
    batch statistics of channels [start, stop) of the buffer ``state`` (recorded and applied
    later inside :func:`deferred_running_stats`)."""
    if not (bn.training and bn.track_running_stats):
        return
    n = state.global_count  # SyncBatchNorm: the all-reduced count
    update = (bn, state.mean[start:stop], state.invstd[start:stop], state.eps, n / max(n - 1, 1))
    if not _deferred.depth:
        return _apply_running_stats([update])
    if id(bn) in _deferred.modules:  # a second use: in order
        _apply_pending()
    _deferred.pending.append(update)
    _deferred.modules.add(id(bn))


def uses_batch_stats(bn: torch.nn.BatchNorm2d) -> bool:
    return bn.training or not bn.track_running_stats


def bn_vectors(bn: torch.nn.BatchNorm2d, state, start: int, stop: int):
    """(batch_stats, mean, invstd) with which ``bn`` normalizes buffer channels [start, stop):
    the buffer's batch statistics in training, ``bn``'s running statistics otherwise."""
    if uses_batch_stats(bn):
        if not state.track_stats:
            raise RuntimeError(f"{bn} is in training mode but the feature buffer it reads has no "
                               "batch statistics (it was created in eval mode)")
        return True, state.mean[start:stop], state.invstd[start:stop]
    dt = state.values.dtype if state.values.dtype == torch.float64 else torch.float32
    return (False, bn.running_mean.detach().to(dt),
            torch.rsqrt(bn.running_var.detach().to(dt) + bn.eps))
