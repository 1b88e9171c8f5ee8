"""MSDNet inference on *activated* feature buffers.

In eval mode without autograd every BatchNorm uses fixed running statistics, so each
conv -> BN -> ReLU unit is one convolution with the BN folded into its weights and bias, and
its output is stored once, activated (``relu(bn(conv(.)))``): every consumer of a channel
convolves the stored values as they are, with no per-consumer transform. The training path
(:class:`~msdnet_ops.models.msdnet_runtime.GridRun`) stores activated channels too, but through
autograd nodes that also keep each convolution's output before its BatchNorm (backward needs
it, see docs/ARCHITECTURE.md); here nothing is kept for backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..layout import empty_nhwc
from ..nn.bn_affine import uses_batch_stats
from ..nn.feature_buffer import feature_dtype
from .buffer_pool import BufferPool
from .msdnet_runtime import PlanRun


def fold_batchnorm(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, dtype: torch.dtype):
    """``(weight, bias)`` of ``bn(conv(x))`` as one convolution, with ``bn``'s running
    statistics (computed in float64, returned in ``dtype``)."""
    scale = bn.weight.detach().double() * torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    bias = bn.bias.detach().double() - bn.running_mean.detach().double() * scale
    if conv.bias is not None:
        bias = bias + conv.bias.detach().double() * scale
    weight = conv.weight.detach().double() * scale.view(-1, 1, 1, 1)
    return (weight.to(dtype).contiguous(memory_format=torch.channels_last), bias.to(dtype))


class FoldedWeights:
    """Folded (weight, bias) per (conv, BN) pair, recomputed only when a parameter or running
    statistic changed (their version counters) or the dtype/device differs."""

    def __init__(self):
        self._cache: dict = {}

    def get(self, conv, bn, dtype, device):
        # under torch.compile the folding joins the graph: the cache's stamps compare storage
        # addresses, which dynamo cannot trace
        if torch.compiler.is_compiling():
            return fold_batchnorm(conv, bn, dtype)
        tensors = (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var) + \
            ((conv.bias,) if conv.bias is not None else ())
        stamp = tuple((t.data_ptr(), t._version) for t in tensors) + (dtype, device)
        entry = self._cache.get(id(conv))
        if entry is None or entry[0] != stamp:
            entry = self._cache[id(conv)] = (stamp, fold_batchnorm(conv, bn, dtype))
        return entry[1]


def can_run_activated(model, batchnorms) -> bool:
    """Eval mode, no autograd, and every BatchNorm of ``batchnorms`` (the model's) normalizes
    with running statistics."""
    return (not model.training and not torch.is_grad_enabled()
            and not any(uses_batch_stats(m) for m in batchnorms))


class InferenceRun(PlanRun):
    """A forward pass without autograd: buffers are plain NHWC tensors of activated values."""

    def __init__(self, model, plan, x: torch.Tensor, cell_macs, folded: FoldedWeights,
                 pool: BufferPool):
        super().__init__(model, plan, x, cell_macs)
        self.dtype = feature_dtype(x.dtype, x.device)
        self.folded = folded
        self.filled: dict = {}
        # the buffers taken from the pool: those of the whole batch (after an early exit the
        # gathered buffers and the new ones of the samples left are not, their batch varies);
        # under torch.compile none (the pool's lock and lists stay out of the graph)
        self.pool = None if torch.compiler.is_compiling() else pool
        self.full_batch = self.batch
        self.pooled: set = set()
        self.released = False

    # ------------------------------------------------------------------ buffers
    def _buffer(self, key) -> torch.Tensor:
        if key not in self.buffers:
            h, w = self.sizes[key[0]]
            shape = (self.batch, self.plan.capacity[key], h, w)
            if self.pool is None or self.batch != self.full_batch:
                self.buffers[key] = empty_nhwc(shape, dtype=self.dtype, device=self.device)
            else:
                self.buffers[key] = self.pool.take(shape, dtype=self.dtype, device=self.device)
                self.pooled.add(key)
            self.filled[key] = 0
        return self.buffers[key]

    def exit_logits(self, exit_index: int) -> torch.Tensor:
        if self.released:
            raise RuntimeError("this MSDNet inference run was released (its anytime "
                               "generator closed); start a new one")
        return super().exit_logits(exit_index)

    def _let_go(self, key) -> None:
        """Drops buffer ``key``; one from the pool goes back to it."""
        values = self.buffers.pop(key)
        if key in self.pooled:
            self.pooled.discard(key)
            self.pool.give_back(values)

    def _drop_dead_buffers(self) -> None:
        for key in self._dead_buffers():
            self._let_go(key)

    def release(self) -> None:
        """Ends the run early: its buffers go back to the pool; no cell can run after this."""
        self.released = True
        for key in list(self.buffers):
            self._let_go(key)

    def _prefix(self, key, width: int) -> torch.Tensor:
        return self._buffer(key)[:, :width]

    def _slice(self, key, channels: int) -> torch.Tensor:
        """The next ``channels`` free channels of buffer ``key``, claimed for a writer."""
        values = self._buffer(key)
        start = self.filled[key]
        self.filled[key] = start + channels
        return values[:, start:start + channels]

    def _conv_bn_relu(self, x: torch.Tensor, unit_conv, unit_bn, out=None) -> torch.Tensor:
        weight, bias = self.folded.get(unit_conv, unit_bn, self.dtype, self.device)
        return ops.conv_bias_relu(x, weight, bias, unit_conv.stride[0], unit_conv.padding[0],
                                  out)

    def _append_conv_bn_relu(self, key, x: torch.Tensor, unit_conv, unit_bn) -> None:
        """A unit's output written straight into the next free channels of buffer ``key``."""
        self._conv_bn_relu(x, unit_conv, unit_bn, self._slice(key, unit_conv.out_channels))

    def _append_conv_bn_path(self, key, unit, x: torch.Tensor) -> None:
        """One ConvBN path (optional bottleneck, then 3x3) of a dense layer, appended."""
        if not unit.bottleneck:
            self._append_conv_bn_relu(key, x, unit.conv3, unit.bn3)
            return
        w1, b1 = self.folded.get(unit.conv1, unit.bn1, self.dtype, self.device)
        weight, bias = self.folded.get(unit.conv3, unit.bn3, self.dtype, self.device)
        ops.bottleneck_conv_bias_relu(x, w1, b1, weight, bias, unit.conv3.stride[0],
                                      unit.conv3.padding[0],
                                      self._slice(key, unit.conv3.out_channels))

    # ------------------------------------------------------------------ cells
    def _run_stem(self, cell) -> None:
        unit = cell.module
        if cell.scale == 0:  # reads the image
            image = self.image.to(self.dtype)
            self.image = None  # only the scale-0 stem reads it
            if self.model.stem_kind == "imagenet":
                y = F.max_pool2d(self._conv_bn_relu(image, unit.conv, unit.bn), 3, 2, 1)
                self._slice(cell.writes, y.shape[1]).copy_(y)
                return
            self._append_conv_bn_relu(cell.writes, image, unit.conv, unit.bn)
            return
        (key, width), = cell.reads
        self._append_conv_bn_relu(cell.writes, self._prefix(key, width), unit.conv, unit.bn)

    def _run_path(self, cell) -> None:
        unit = cell.module
        reads = list(cell.reads)
        if len(reads) == 2:  # the strided path from the finer scale comes first
            key, width = reads.pop(0)
            self._append_conv_bn_path(cell.writes, unit.conv_down, self._prefix(key, width))
        key, width = reads[0]
        self._append_conv_bn_path(cell.writes, unit.conv_normal, self._prefix(key, width))

    def _run_transition(self, cell) -> None:
        (key, width), = cell.reads
        unit = cell.module
        self._append_conv_bn_relu(cell.writes, self._prefix(key, width), unit.conv, unit.bn)

    def _run_classifier(self, cell) -> torch.Tensor:
        (key, width), = cell.reads
        first, second, pool = cell.module.m
        y = self._conv_bn_relu(self._prefix(key, width), first.conv, first.bn)
        y = pool(self._conv_bn_relu(y, second.conv, second.bn))
        return cell.module.linear(y.reshape(y.shape[0], -1))

    # ------------------------------------------------------------------ early exit
    def keep_samples(self, index: torch.Tensor) -> None:
        """Batch compaction: only the samples ``index`` go on (every live buffer gathered)."""
        for key in list(self.buffers):
            gathered = ops.eager.gather_batch(self.buffers[key], index)
            self._let_go(key)
            self.buffers[key] = gathered
        if self.image is not None:
            self.image = ops.eager.gather_batch(self.image, index)
        self.batch = int(index.numel())
