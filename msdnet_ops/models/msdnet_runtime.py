"""Runs the cells of an :class:`~msdnet_ops.models.msdnet_plan.MSDNetPlan` on feature buffers.

One run is one forward pass over one batch: it owns the buffers, remembers which cells are
done (so a later exit reuses everything an earlier exit computed), counts the multiply-adds it
really executes, and can drop samples from every live buffer (early exit). :class:`PlanRun`
holds what every run shares; :class:`GridRun` (this module) is the autograd path, used for
training and whenever gradients are wanted: buffers hold each channel before its BatchNorm and
consumers apply the producer's BN+ReLU on the fly (so backward needs no second copy).
:class:`~msdnet_ops.models.msdnet_inference.InferenceRun` is the inference path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..nn.bn_affine import update_running_stats
from ..nn.dense_layer import append_transform_conv, recompute_in_backward, write_tensor
from ..nn.feature_buffer import FeatureBuffer
from ..nn.functions import TransformRead
from ..reference import stats_dtype


class PlanRun:
    """Bookkeeping shared by the training and the inference runs: which cells are done, the
    multiply-adds executed, the live buffers; subclasses run the cells (``_run_<kind>``) and
    compact their buffers (:meth:`keep_samples`)."""

    def __init__(self, model, plan, x: torch.Tensor, cell_macs):
        self.model, self.plan, self.image = model, plan, x
        self.device = x.device
        self.sizes = dict(enumerate(model.scale_sizes(x.shape[2], x.shape[3])))
        self.buffers: dict = {}
        self.done: set = set()
        self.cell_macs = cell_macs
        self.macs = 0                     # multiply-adds executed, summed over samples
        self.batch = x.shape[0]

    def run_cell(self, index: int):
        cell = self.plan.cells[index]
        self.macs += self.cell_macs[index] * self.batch
        self.done.add(index)
        runner = {"stem": self._run_stem, "path": self._run_path,
                  "transition": self._run_transition, "classifier": self._run_classifier}[cell.kind]
        return runner(cell)

    def exit_logits(self, exit_index: int) -> torch.Tensor:
        """Runs what exit ``exit_index`` still needs, and its classifier."""
        target = self.plan.exit_cells[exit_index]
        out = None
        for index in self.plan.closure(target, self.done):
            out = self.run_cell(index)
        self._drop_dead_buffers()
        return out

    def _drop_dead_buffers(self) -> None:
        """Frees every buffer no remaining cell reads (inference only; training keeps them
        for backward through the autograd graph anyway)."""
        for key in list(self.buffers):
            last = self.plan.last_reader.get(key)
            if last is None or last in self.done:
                del self.buffers[key]


class GridRun(PlanRun):
    def __init__(self, model, plan, x: torch.Tensor, cell_macs, sync_group=None):
        super().__init__(model, plan, x, cell_macs)
        self.dtype = x.dtype
        self.training = model.training
        self.sync_group = sync_group
        self._buffer_vectors: dict = {}

    # ------------------------------------------------------------------ buffers
    def _new_buffer(self, channels: int, height: int, width: int) -> FeatureBuffer:
        return FeatureBuffer(self.batch, channels, height, width, dtype=self.dtype,
                             device=self.device, track_stats=self.training,
                             sync_group=self.sync_group)

    def _buffer(self, key) -> FeatureBuffer:
        if key not in self.buffers:
            h, w = self.sizes[key[0]]
            self.buffers[key] = self._new_buffer(self.plan.capacity[key], h, w)
        return self.buffers[key]

    def _vectors(self, key, width: int):
        """Per-channel (batch_stats, weight, bias, mean, invstd) with which consumers read
        channels [0, width) of buffer ``key``: each channel through its producer's BN.
        Slices of per-buffer vectors built once per run (a concatenation per consumer made
        O(L^2) small autograd nodes)."""
        if key not in self._buffer_vectors:
            self._buffer_vectors[key] = self._producer_vectors(key)
        weight, bias, mean, invstd = self._buffer_vectors[key]
        if self.training:  # the buffer's batch statistics (identity channels keep 0 and 1)
            state = self._buffer(key).state
            mean, invstd = state.mean, state.invstd
        return self.training, weight[:width], bias[:width], mean[:width], invstd[:width]

    def _producer_vectors(self, key):
        """(weight, bias, running mean, running invstd) of the channels of buffer ``key`` that
        the cells some exit needs read, from the BN of the cell that produced each (identity
        where there is none). Unread channels stay out, so their BN parameters get no gradient,
        as in the plain model."""
        state = self._buffer(key).state
        sdt = stats_dtype(state.values.dtype)
        width = self.plan.read_width.get(key, 0)
        parts = []
        for seg in self.plan.segments[key]:
            if seg.start >= width:
                break
            n, bn = min(seg.stop, width) - seg.start, seg.bn
            if bn is None:            # already activated: identity transform
                one = state.values.new_ones(n, dtype=sdt)
                zero = one.new_zeros(n)
                parts.append((one, zero, zero, one))
            else:
                parts.append((bn.weight[:n], bn.bias[:n], bn.running_mean[:n].to(sdt),
                               torch.rsqrt(bn.running_var[:n].to(sdt) + bn.eps)))
        return tuple(torch.cat(column) for column in zip(*parts))

    def _record_stats(self, bn, buffer: FeatureBuffer, start: int) -> None:
        """Producer BN's running statistics, from the batch statistics of what it normalizes."""
        if self.training:
            stop = start + bn.num_features
            update_running_stats(bn, buffer.state.mean[start:stop],
                                 buffer.state.unbiased_var(start, stop))

    def _conv_bn(self, src: FeatureBuffer, key, width: int, conv, dst: FeatureBuffer) -> int:
        """``conv`` of the transformed prefix of ``src`` appended to ``dst``."""
        batch_stats, w, b, mean, invstd = self._vectors(key, width)
        return append_transform_conv(src, width, dst, conv, batch_stats, w, b, mean, invstd)

    def _conv_bn_path(self, unit, key, width: int, dst: FeatureBuffer) -> None:
        """One ConvBN path (optional bottleneck, then 3x3) reading buffer ``key``. With the
        model's ``memory_efficient`` the bottleneck output is freed after forward and
        recomputed in backward."""
        src = self._buffer(key)
        if unit.bottleneck:
            h, w = src.spatial
            inner = self._new_buffer(unit.inner_channels, h, w)
            self._conv_bn(src, key, width, unit.conv1, inner)
            self._record_stats(unit.bn1, inner, 0)
            append_transform_conv(inner, inner.filled, dst, unit.conv3,
                                  *self._plain_vectors(unit.bn1, inner))
            if self.model.memory_efficient and torch.is_grad_enabled():
                recompute_in_backward(inner, src, width, unit.conv1, *self._vectors(key, width))
        else:
            self._conv_bn(src, key, width, unit.conv3, dst)

    def _plain_vectors(self, bn, buffer: FeatureBuffer):
        """(batch_stats, weight, bias, mean, invstd) of a buffer written by one producer."""
        n = buffer.filled
        if self.training:
            return True, bn.weight, bn.bias, buffer.state.mean[:n], buffer.state.invstd[:n]
        sdt = stats_dtype(buffer.values.dtype)
        return (False, bn.weight, bn.bias, bn.running_mean.to(sdt),
                torch.rsqrt(bn.running_var.to(sdt) + bn.eps))

    # ------------------------------------------------------------------ cells
    def _run_stem(self, cell) -> None:
        dst = self._buffer(cell.writes)
        unit = cell.module
        if cell.scale == 0:  # reads the image
            if self.model.stem_kind == "imagenet":
                write_tensor(dst, unit(self.image), with_stats=False)  # conv-BN-ReLU-maxpool
            else:
                conv = unit.conv
                y = F.conv2d(self.image, conv.weight, None, conv.stride, conv.padding)
                write_tensor(dst, y)
                self._record_stats(unit.bn, dst, 0)
            self.image = None  # only the scale-0 stem reads it
            return
        (key, width), = cell.reads
        start = self._conv_bn(self._buffer(key), key, width, unit.conv, dst)
        self._record_stats(unit.bn, dst, start)

    def _run_path(self, cell) -> None:
        dst = self._buffer(cell.writes)
        unit = cell.module
        reads = list(cell.reads)
        if len(reads) == 2:
            key, width = reads.pop(0)
            start = dst.filled
            self._conv_bn_path(unit.conv_down, key, width, dst)
            self._record_stats(unit.conv_down.bn3, dst, start)
        key, width = reads[0]
        start = dst.filled
        self._conv_bn_path(unit.conv_normal, key, width, dst)
        self._record_stats(unit.conv_normal.bn3, dst, start)

    def _run_transition(self, cell) -> None:
        (key, width), = cell.reads
        dst = self._buffer(cell.writes)
        start = self._conv_bn(self._buffer(key), key, width, cell.module.conv, dst)
        self._record_stats(cell.module.bn, dst, start)

    def _run_classifier(self, cell) -> torch.Tensor:
        """ConvBasic(3x3/2) twice, AvgPool2d(2), Linear: each ConvBasic's output is a small
        buffer of its own, read through that ConvBasic's BN by the next step."""
        (key, width), = cell.reads
        first, second, pool = cell.module.m
        mid1 = self._half_size_buffer(self._buffer(key), first.out_channels)
        self._conv_bn(self._buffer(key), key, width, first.conv, mid1)
        self._record_stats(first.bn, mid1, 0)
        mid2 = self._half_size_buffer(mid1, second.out_channels)
        append_transform_conv(mid1, mid1.filled, mid2, second.conv, *self._plain_vectors(first.bn, mid1))
        self._record_stats(second.bn, mid2, 0)
        z = TransformRead.apply(mid2.state, mid2.filled, *self._plain_vectors(second.bn, mid2),
                                mid2.token)
        z = pool(z)
        return cell.module.linear(z.reshape(z.shape[0], -1))

    def _half_size_buffer(self, src: FeatureBuffer, channels: int) -> FeatureBuffer:
        h, w = src.spatial
        return self._new_buffer(channels, (h - 1) // 2 + 1, (w - 1) // 2 + 1)

    def keep_samples(self, index: torch.Tensor) -> None:
        """Batch compaction: only the samples ``index`` go on (every live buffer gathered)."""
        if torch.is_grad_enabled() and self.training:
            raise RuntimeError("early exit (batch compaction) is an inference-only operation")
        for buffer in self.buffers.values():
            buffer.state.values = ops.eager.gather_batch(buffer.values, index)
        if self.image is not None:
            self.image = ops.eager.gather_batch(self.image, index)
        self.batch = int(index.numel())
