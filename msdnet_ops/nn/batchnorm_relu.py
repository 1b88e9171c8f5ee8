"""A post-activation unit's epilogue: ``relu(bn(y))`` of the unit's convolution output ``y``,
written where the unit appends to its feature buffer, and the backward of it; and the same
BatchNorm+ReLU as a unit's read of its bottleneck."""
from __future__ import annotations

import torch

from .. import ops
from ..dtypes import stats_dtype
from .bn_affine import AffineParams, bn_vectors, update_running_stats, uses_batch_stats
from .feature_buffer import BufferState


def _write_fused(y: BufferState, bn, bn_weight, bn_bias, out: torch.Tensor) -> tuple:
    """``relu(bn(y))`` with ``y``'s batch statistics written into ``out`` by one op
    (:func:`msdnet_ops.ops.batchnorm_relu_into_`); sets ``y``'s statistics and returns
    ``(stats, rows, weight)``, what the one-op backward takes."""
    values = y.values
    stats = values.new_empty((2, values.shape[1]), dtype=stats_dtype(values.dtype))
    rows = torch.empty_like(stats)
    weight = None if bn_weight is None else bn_weight.detach()
    ops.eager.batchnorm_relu_into_(values, bn.eps, weight,
                                   None if bn_bias is None else bn_bias.detach(), stats, rows, out)
    y.mean, y.invstd = stats[0], stats[1]
    return stats, rows, weight


class BatchNormReLU:
    """``relu(bn(y))`` of ``y`` (a :class:`BufferState` of its own) written into ``out``, and
    what the backward needs. With batch statistics and no all-reduce (every training step
    except SyncBatchNorm's) one op each way (:func:`msdnet_ops.ops.batchnorm_relu_into_`: on
    the CPU one C++ call, where the separate steps' Python glue cost more than their
    arithmetic; on Triton a launch fewer than the steps each way); otherwise the steps one by
    one: the statistics (all-reduced), the BatchNorm's vectors (batch or running statistics),
    the transform; so too where the backend has no fused kernels for it (the CUDA extension's).
    ``bn``'s running statistics are updated here from the batch statistics."""

    def __init__(self, y: BufferState, bn, bn_weight, bn_bias, out: torch.Tensor):
        channels = y.values.shape[1]
        self.fused = (y.track_stats and y.sync_group is None
                      and ops.fuses_batchnorm_relu(y.values))
        self.has_weight, self.has_bias = bn_weight is not None, bn_bias is not None
        if self.fused:
            self.stats, self.rows, self.weight = _write_fused(y, bn, bn_weight, bn_bias, out)
            self.scale, self.shift = self.rows[0], self.rows[1]
            batch_stats = True
        else:
            y.compute_stats(0, channels)  # when bn normalizes with batch statistics
            batch_stats, mean, invstd = bn_vectors(bn, y, 0, channels)
            self.affine = AffineParams(bn_weight, bn_bias, mean, invstd, batch_stats)
            self.scale, self.shift = self.affine.scale, self.affine.shift
            self.write(y.values, out)
        if batch_stats:
            update_running_stats(bn, y, 0, channels)

    def write(self, y_values: torch.Tensor, out: torch.Tensor) -> None:
        """Writes ``relu(bn(y))`` into ``out`` again (exact: the same transform)."""
        ops.eager.affine_relu_into_(y_values, self.scale, self.shift, out)

    def backward(self, y: BufferState, grad_z: torch.Tensor):
        """``(grad_y, grad_weight, grad_bias)`` for ``grad_z``, the gradient w.r.t. ``out``:
        ``grad_y`` is complete (the statistics' part included); this unit is the sole consumer
        of ``y`` and of its statistics, so their gradients are written, not added."""
        if self.fused:
            grad_y = torch.empty_like(y.values)
            grad_params = torch.empty_like(self.stats)
            ops.eager.batchnorm_relu_backward_(y.values, grad_z, self.stats, self.rows,
                                               self.weight, grad_y, grad_params)
            grad_weight, grad_bias = grad_params[0], grad_params[1]
        else:
            channels = y.values.shape[1]
            y.ensure_grads(uninitialised=True, stats_uninitialised=True)
            grads = self.affine.zero_grads()
            ops.eager.affine_relu_backward_(y.values, self.scale, self.shift, grad_z, y.grad,
                                            grads[0], grads[1], False)
            grad_weight, grad_bias = self.affine.backward(grads, y, channels, accumulate=False)
            grad_y = y.finalize(0, channels)
        return (grad_y, grad_weight if self.has_weight else None,
                grad_bias if self.has_bias else None)


def _batch_vectors(y: BufferState, bn, bn_weight, bn_bias) -> tuple:
    """``y``'s batch statistics and ``bn``'s ``(scale, shift)`` from them, two ops; sets ``y``'s
    statistics and returns ``(stats, rows, weight)`` as :func:`_write_fused` does."""
    values = y.values
    stats = values.new_empty((2, values.shape[1]), dtype=stats_dtype(values.dtype))
    ops.eager.channel_stats_into_(values, bn.eps, stats[0], stats[1])
    weight = None if bn_weight is None else bn_weight.detach()
    rows = ops.eager.bn_scale_shift(stats[0], stats[1], weight,
                                    None if bn_bias is None else bn_bias.detach())
    y.mean, y.invstd = stats[0], stats[1]
    return stats, rows, weight


class BatchNormReLURead:
    """A unit's read of its sole input ``src`` (a bottleneck's output, before its BatchNorm):
    ``relu(bn(src))`` with ``src``'s batch statistics, computed here: on the CPU with the
    statistics in one op (:func:`msdnet_ops.ops.batchnorm_relu_into_`) into a transient dense
    tensor that the unit's convolution reads; where the convolution applies the transform in
    its prologue (Triton, :func:`msdnet_ops.ops.transform_in_conv_prologue`), the statistics
    and the BatchNorm's vectors only. Backward is one op
    (:func:`msdnet_ops.ops.batchnorm_relu_conv_backward_`), which writes ``src``'s whole
    gradient (so ``src`` keeps no statistics of its own). Where the backend fuses the
    BatchNorm+ReLU (:func:`applies`); elsewhere the unit reads through :class:`AffineParams`,
    the statistics computed by ``src``'s writer. ``bn``'s running statistics are updated here."""

    def __init__(self, src: BufferState, bn, bn_weight, bn_bias):
        self.has_weight, self.has_bias = bn_weight is not None, bn_bias is not None
        self.prologue = ops.transform_in_conv_prologue(src.values)
        if self.prologue:
            self.activated = None
            self.stats, self.rows, self.weight = _batch_vectors(src, bn, bn_weight, bn_bias)
        else:
            self.activated = torch.empty_like(src.values)
            self.stats, self.rows, self.weight = _write_fused(src, bn, bn_weight, bn_bias,
                                                              self.activated)
        update_running_stats(bn, src, 0, src.values.shape[1])

    @staticmethod
    def applies(bn, like: torch.Tensor, sync_group=None) -> bool:
        """Whether ``bn`` reads features like ``like`` this way: batch statistics, no
        all-reduce (``sync_group``), and a backend that fuses the BatchNorm+ReLU."""
        return uses_batch_stats(bn) and sync_group is None and ops.fuses_batchnorm_relu(like)

    def conv(self, src: BufferState, weight, stride: int, padding: int,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution of ``relu(bn(src))`` written into ``out``, or a new tensor: of the
        tensor written in forward the first time, of the transform applied again after that
        (a recomputed unit's backward); or with the transform in its prologue."""
        if self.prologue:
            scale, shift = self.rows[0], self.rows[1]
            if out is None:
                return ops.eager.transform_conv(src.values, scale, shift, weight, stride,
                                                padding, 1)
            return ops.eager.transform_conv_into_(src.values, scale, shift, weight, stride,
                                                  padding, 1, out)
        z, self.activated = self.activated, None
        if z is None:
            z = ops.eager.affine_relu(src.values, self.rows[0], self.rows[1])
        if out is None:
            return ops.eager.conv(z, weight, stride, padding, 1)
        return ops.eager.conv_into_(z, weight, stride, padding, 1, out)

    def conv_backward(self, grad_out, src: BufferState, weight, stride: int, padding: int):
        """``(grad of the conv weight, grad of bn's weight, grad of bn's bias)``; writes
        ``src``'s gradient, whole."""
        src.restore_values()  # a recomputed (memory_efficient) bottleneck
        src.ensure_grads(uninitialised=True)
        grad_params = torch.empty_like(self.stats)
        grad_weight = ops.eager.batchnorm_relu_conv_backward_(
            grad_out, src.values, self.stats, self.rows, self.weight, weight, stride, padding,
            src.grad, grad_params)
        return (grad_weight, grad_params[0] if self.has_weight else None,
                grad_params[1] if self.has_bias else None)
