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

from typing import NamedTuple

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


class FoldedUnit(NamedTuple):
    """A conv -> BN -> ReLU unit with its BatchNorm folded into the convolution."""
    weight: torch.Tensor
    bias: torch.Tensor
    stride: int
    padding: int
    out_channels: int
    # its calls prepared by the ops (or, for a path's bottleneck, the path's) per input and
    # output geometry: they live and go with the unit, so a run never finds one made from
    # other weights
    prepared: dict

    # geometries kept at most (a budgeted run's samples left after an early exit come in many
    # batch sizes); past it they are all prepared again
    MAX_PREPARED = 64

    def prepared_call(self, key, make):
        """The call ``make()`` prepared for ``key``, made once."""
        call = self.prepared.get(key)
        if call is None:
            if len(self.prepared) >= self.MAX_PREPARED:
                self.prepared.clear()
            call = self.prepared[key] = make()
        return call


class FoldedWeights:
    """The folded units of a model's (conv, BN) pairs, built on first use per dtype and device
    and kept while none of the model's convolution and BatchNorm tensors changes:
    :meth:`validate`, once per forward pass, compares each one's storage address and version
    counter with those the units were folded from (one pass over the tensors per forward pass,
    not one per unit; a unit looked up later in a pass is folded from the tensors as they are
    then). Under torch.compile every lookup folds inside the graph (the stamps compare storage
    addresses, which dynamo cannot trace)."""

    def __init__(self, modules):
        self._modules = [m for m in modules
                         if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]
        self._units: dict = {}
        self._stamp = None

    def validate(self) -> None:
        """Forgets every folded unit if a convolution or BatchNorm tensor of the model was
        replaced or changed in place since the last call."""
        if torch.compiler.is_compiling():
            return
        tensors = [t for m in self._modules for d in (m._parameters, m._buffers)
                   for t in d.values() if t is not None]
        stamp = ([t.data_ptr() for t in tensors], [t._version for t in tensors])
        if stamp != self._stamp:
            self.clear()
            self._stamp = stamp

    def clear(self) -> None:
        """Forgets every folded unit, and with them their prepared calls (the next pass folds
        and prepares them again)."""
        self._units.clear()
        self._stamp = None

    def unit(self, conv, bn, dtype, device) -> FoldedUnit:
        return self._kept(conv, dtype, device, lambda: self._fold(conv, bn, dtype))

    def path(self, convbn, dtype, device) -> tuple:
        """``(bottleneck unit or None, 3x3 unit)`` of an MSDNet ConvBN path (its modules looked
        up once: their properties cost more than a small convolution's Python call)."""
        return self._kept(convbn, dtype, device, lambda: self._path(convbn, dtype, device))

    def _kept(self, module, dtype, device, make):
        """What ``make()`` built for ``module`` in ``dtype`` on ``device``, built once."""
        if torch.compiler.is_compiling():
            return make()
        key = (id(module), dtype, device)
        value = self._units.get(key)
        if value is None:
            value = self._units[key] = make()
        return value

    def _path(self, convbn, dtype, device) -> tuple:
        first = self.unit(convbn.conv1, convbn.bn1, dtype, device) if convbn.bottleneck else None
        return first, self.unit(convbn.conv3, convbn.bn3, dtype, device)

    def __getstate__(self):  # copies and pickles fold again: the units are derived data
        return {"_modules": self._modules, "_units": {}, "_stamp": None}

    @staticmethod
    def _fold(conv, bn, dtype) -> FoldedUnit:
        weight, bias = fold_batchnorm(conv, bn, dtype)
        return FoldedUnit(weight, bias, conv.stride[0], conv.padding[0], conv.out_channels, {})


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
        # buffer key -> the dense copy of its first channels (a stem's output, kept as computed
        # beside the buffer): readers of exactly those channels convolve it, with no prefix
        # copy for oneDNN and no strided reads of a wide buffer
        self.dense: dict = {}
        self.released = False
        folded.validate()
        # the units' calls prepared once per geometry (ops.prepared_conv_bias_relu), or None:
        # every call through the eager ops
        self.preparation = ops.preparation_key(self.device, self.dtype)

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
        """Drops buffer ``key`` (and its dense stem copy: compaction gathers the buffer alone);
        one from the pool goes back to it."""
        self.dense.pop(key, None)
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
        dense = self.dense.get(key)
        if dense is not None and dense.shape[1] == width:
            return dense
        return self._buffer(key)[:, :width]

    def _append_dense(self, key, y: torch.Tensor) -> None:
        """A stem's output ``y`` (dense) copied into buffer ``key``'s first channels, and kept
        for the readers of exactly those."""
        self._slice(key, y.shape[1]).copy_(y)
        self.dense[key] = y

    def _slice(self, key, channels: int) -> torch.Tensor:
        """The next ``channels`` free channels of buffer ``key``, claimed for a writer."""
        values = self._buffer(key)
        start = self.filled[key]
        self.filled[key] = start + channels
        return values[:, start:start + channels]

    def _unit(self, conv, bn) -> FoldedUnit:
        return self.folded.unit(conv, bn, self.dtype, self.device)

    def _conv_bn_relu(self, x: torch.Tensor, unit: FoldedUnit, out=None) -> torch.Tensor:
        """A unit's output, written into ``out`` or new (unchecked: the run builds every
        argument itself)."""
        if self.preparation is None:
            return ops.eager.conv_bias_relu(x, unit.weight, unit.bias, unit.stride,
                                            unit.padding, out)
        return self._prepared(unit, x, out, lambda: ops.prepared_conv_bias_relu(
            x, unit.weight, unit.bias, unit.stride, unit.padding, out))(x, out)

    def _prepared(self, unit: FoldedUnit, x: torch.Tensor, out, make):
        """The call ``make()`` prepares for ``unit`` (the first of a path) on tensors like
        ``x`` and ``out``, kept with the unit."""
        key = (x.shape, x.stride(), None if out is None else out.stride(), self.preparation)
        return unit.prepared_call(key, make)

    def _append_conv_bn_relu(self, key, x: torch.Tensor, unit: FoldedUnit) -> None:
        """A unit's output written straight into the next free channels of buffer ``key``."""
        self._conv_bn_relu(x, unit, self._slice(key, unit.out_channels))

    def _append_conv_bn_path(self, key, convbn, x: torch.Tensor) -> None:
        """One ConvBN path (optional bottleneck, then 3x3) of a dense layer, appended."""
        first, second = self.folded.path(convbn, self.dtype, self.device)
        out = self._slice(key, second.out_channels)
        if first is None:
            self._conv_bn_relu(x, second, out)
        elif self.preparation is None:
            ops.eager.bottleneck_conv_bias_relu(x, first.weight, first.bias, second.weight,
                                                second.bias, second.stride, second.padding, out)
        else:
            self._prepared(first, x, out, lambda: ops.prepared_bottleneck_conv_bias_relu(
                x, first.weight, first.bias, second.weight, second.bias, second.stride,
                second.padding, out))(x, out)

    # ------------------------------------------------------------------ cells
    def _run_stem(self, cell) -> None:
        unit = cell.module
        if cell.scale == 0:  # reads the image (in NHWC: the convolution's output follows it)
            image = self.image.to(self.dtype, memory_format=torch.channels_last)
            self.image = None  # only the scale-0 stem reads it
            y = self._conv_bn_relu(image, self._unit(unit.conv, unit.bn))
            if self.model.stem_kind == "imagenet":
                y = F.max_pool2d(y, 3, 2, 1)
        else:
            (key, width), = cell.reads
            y = self._conv_bn_relu(self._prefix(key, width), self._unit(unit.conv, unit.bn))
        self._append_dense(cell.writes, y)

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
        self._append_conv_bn_relu(cell.writes, self._prefix(key, width),
                                  self._unit(unit.conv, unit.bn))

    def _run_classifier(self, cell) -> torch.Tensor:
        (key, width), = cell.reads
        first, second, pool = cell.module.m
        y = self._conv_bn_relu(self._prefix(key, width), self._unit(first.conv, first.bn))
        y = pool(self._conv_bn_relu(y, self._unit(second.conv, second.bn)))
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
