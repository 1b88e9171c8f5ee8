"""BatchNorm as a per-channel affine transform of raw buffer values, and back.

A consumer of buffer channels reads ``relu(scale * x + shift)`` with
``scale = g * invstd`` and ``shift = h - g * mean * invstd``; ``mean``/``invstd`` are the
buffer's shared batch statistics (training) or the BatchNorm's running statistics (eval).
The backward maps the kernels' ``grad_scale``/``grad_shift`` to the BatchNorm parameter
gradients and, in training, to the gradients of the shared statistics.
"""
from __future__ import annotations

import torch


class AffineParams:
    """scale/shift for one consumer of channels [0, c), with what backward needs."""

    def __init__(self, weight, bias, mean, invstd, batch_stats: bool):
        dt = mean.dtype
        mean, invstd = mean.detach(), invstd.detach()
        self.weight = torch.ones_like(mean) if weight is None else weight.detach().to(dt)
        bias = torch.zeros_like(mean) if bias is None else bias.detach().to(dt)
        self.mean, self.invstd, self.batch_stats = mean, invstd, batch_stats
        self.scale = (self.weight * invstd).contiguous()
        self.shift = (bias - self.weight * mean * invstd).contiguous()

    def backward(self, grad_scale, grad_shift, state, channels: int):
        """Returns (grad_weight, grad_bias); in training adds the statistics gradients to the
        buffer's ``grad_mean``/``grad_invstd`` (applied once per channel at finalize)."""
        centred = grad_scale - grad_shift * self.mean
        if self.batch_stats:
            state.grad_invstd[:channels] += self.weight * centred
            state.grad_mean[:channels] -= grad_shift * self.weight * self.invstd
        return self.invstd * centred, grad_shift


def update_running_stats(bn: torch.nn.BatchNorm2d, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
    """Exactly what ``nn.BatchNorm2d`` does to its buffers in a training-mode forward."""
    if not (bn.training and bn.track_running_stats):
        return
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
        else:
            factor = bn.momentum
        bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
        bn.running_var.mul_(1 - factor).add_(unbiased_var.to(bn.running_var.dtype), alpha=factor)


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
