"""Runs the cells of an :class:`~msdnet_ops.models.msdnet_plan.MSDNetPlan` on feature buffers.

One run is one forward pass over one batch: it owns the buffers, remembers which cells are
done (so a later exit reuses everything an earlier exit computed), counts the multiply-adds it
really executes, and can drop samples from every live buffer (early exit). :class:`PlanRun`
holds what every run shares; :class:`GridRun` (this module) is the autograd path, used for
training and whenever gradients are wanted.
:class:`~msdnet_ops.models.msdnet_inference.InferenceRun` is the inference path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..nn.batchnorm_relu import BatchNormReLURead
from ..nn.bn_affine import deferred_running_stats, update_running_stats
from ..nn.dense_layer import (append_conv, append_conv_bn_relu, append_transform_conv,
                              recompute_in_backward, write_tensor)
from ..nn.feature_buffer import FeatureBuffer
from ..nn.functions import TransformRead
from ..nn.recomputed_stem import conv_bn_relu_max_pool
from ..dtypes import stats_dtype


def _conv_size(size: int, conv) -> int:
    return (size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1


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
        self.cell_macs = cell_macs        # per-sample multiply-adds per cell, or None: not counted
        self.macs = None if cell_macs is None else 0  # executed, summed over samples
        self.batch = x.shape[0]

    def run_cell(self, index: int):
        cell = self.plan.cells[index]
        if self.cell_macs is not None:
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

    def release(self) -> None:
        """Ends the run early (an anytime generator closed, a budgeted classification done).
        The inference run hands its buffers back for reuse; the autograd run keeps them (its
        graph holds what backward needs)."""

    def _dead_buffers(self) -> list:
        """The keys of the buffers no remaining cell reads."""
        return [key for key in self.buffers
                if self.plan.last_reader.get(key) is None
                or self.plan.last_reader[key] in self.done]

    def _drop_dead_buffers(self) -> None:
        """Lets go of every buffer no remaining cell reads (inference frees it; training's
        autograd graph holds on to it for backward)."""
        for key in self._dead_buffers():
            del self.buffers[key]


class GridRun(PlanRun):
    """The autograd path. Every scale buffer holds activated channels: each conv -> BN -> ReLU
    unit keeps its convolution's output (before the BatchNorm: backward needs it) and appends
    ``relu(bn(.))`` of it to the scale buffer once (:class:`ConvBNReLUWrite`), so consumers
    convolve buffer prefixes as they are. A bottleneck output and a classifier's intermediate
    maps have one consumer each: they stay before their BatchNorm and that consumer applies it
    as it reads."""

    def __init__(self, model, plan, x: torch.Tensor, cell_macs, sync_group=None):
        super().__init__(model, plan, x, cell_macs)
        self.dtype = x.dtype
        self.training = model.training
        self.sync_group = sync_group

    def exit_logits(self, exit_index: int) -> torch.Tensor:
        with deferred_running_stats():  # the exit's running-statistics updates, batched
            return super().exit_logits(exit_index)

    def _drop_dead_buffers(self) -> None:
        """With ``memory_efficient=True`` and a backward to come, a scale buffer no remaining
        cell reads also frees its values until then: its units keep their convolution outputs
        for backward anyway, and backward's first use writes ``relu(bn(.))`` of them again
        (exact, one elementwise pass; not where another writer, such as the ImageNet stem,
        wrote channels). Not by default: the pass and the new allocation cost ~3 % of a
        training step for ~15 % of its memory."""
        if self._recomputes("buffers"):
            for key in self._dead_buffers():
                self.buffers[key].state.forget_until_backward()
        super()._drop_dead_buffers()

    # ------------------------------------------------------------------ buffers
    def _new_buffer(self, channels: int, height: int, width: int,
                    track_stats: bool | None = None) -> FeatureBuffer:
        return FeatureBuffer(self.batch, channels, height, width, dtype=self.dtype,
                             device=self.device,
                             track_stats=self.training if track_stats is None else track_stats,
                             sync_group=self.sync_group)

    def _buffer(self, key) -> FeatureBuffer:
        """The scale buffer ``key``: activated channels, no statistics needed."""
        if key not in self.buffers:
            h, w = self.sizes[key[0]]
            self.buffers[key] = self._new_buffer(self.plan.capacity[key], h, w, False)
            if self._recomputes("buffers"):  # see _drop_dead_buffers
                self.buffers[key].state.record_rewrites()
        return self.buffers[key]

    def _output_buffer(self, conv, src: FeatureBuffer) -> FeatureBuffer:
        """A buffer for ``conv``'s output on ``src``'s spatial size (its own statistics), read
        whole by one consumer through its BatchNorm (a bottleneck output, a classifier map)."""
        h, w = (_conv_size(v, conv) for v in src.spatial)
        buffer = self._new_buffer(conv.out_channels, h, w)
        buffer.state.sole_reader = True
        return buffer

    def _vectors(self, bn, buffer: FeatureBuffer):
        """(batch_stats, weight, bias, mean, invstd) with which ``bn`` normalizes ``buffer``."""
        n = buffer.filled
        if self.training:
            return True, bn.weight, bn.bias, buffer.state.mean[:n], buffer.state.invstd[:n]
        sdt = stats_dtype(buffer.values.dtype)
        return (False, bn.weight, bn.bias, bn.running_mean.to(sdt),
                torch.rsqrt(bn.running_var.to(sdt) + bn.eps))

    def _record_stats(self, bn, buffer: FeatureBuffer) -> None:
        """``bn``'s running statistics, from the batch statistics of what it normalizes."""
        if self.training:
            update_running_stats(bn, buffer.state, 0, bn.num_features)

    def _recomputes(self, what: str) -> bool:
        """Whether the model's ``memory_efficient`` frees ``what`` ("bottlenecks", "stem",
        "buffers", "units") after forward for backward to recompute or rewrite (only when there
        is a backward)."""
        return torch.is_grad_enabled() and what in self.model.recomputed

    def _unit(self, src: FeatureBuffer, width: int, dst: FeatureBuffer, conv, bn,
              read=None) -> None:
        """A conv -> BN -> ReLU unit appending to ``dst`` (:class:`ConvBNReLUWrite`)."""
        append_conv_bn_relu(src, width, dst, conv, bn, read, self._recomputes("units"))

    def _bottleneck(self, src: FeatureBuffer, width: int, conv, bn):
        """``conv`` of ``src[:, :width]`` into a buffer of its own, read whole by one consumer
        through ``bn``: returns that buffer and how its consumer reads it, ``bn`` itself where
        the backend fuses BatchNorm+ReLU in training (the consumer computes the statistics as
        it reads, one call each way), else the vectors (:meth:`_vectors`; the statistics
        computed as the buffer is written)."""
        inner = self._output_buffer(conv, src)
        fused = self.training and BatchNormReLURead.applies(bn, inner.values, self.sync_group)
        inner.state.track_stats = self.training and not fused
        append_conv(src, width, inner, conv)
        if fused:
            return inner, bn
        self._record_stats(bn, inner)
        return inner, self._vectors(bn, inner)

    def _conv_bn_path(self, unit, src: FeatureBuffer, width: int, dst: FeatureBuffer) -> None:
        """One ConvBN path (optional bottleneck, then 3x3). With the model's
        ``memory_efficient`` the bottleneck output is freed after forward and recomputed in
        backward."""
        if not unit.bottleneck:
            self._unit(src, width, dst, unit.conv3, unit.bn3)
            return
        inner, read = self._bottleneck(src, width, unit.conv1, unit.bn1)
        self._unit(inner, inner.filled, dst, unit.conv3, unit.bn3, read=read)
        if self._recomputes("bottlenecks"):
            recompute_in_backward(inner, src, width, unit.conv1)

    # ------------------------------------------------------------------ cells
    def _run_stem(self, cell) -> None:
        dst = self._buffer(cell.writes)
        unit = cell.module
        if cell.scale == 0:  # reads the image
            if self.model.stem_kind == "imagenet":  # conv-BN-ReLU-maxpool: already activated
                write_tensor(dst, self._imagenet_stem(unit), with_stats=False)
            else:
                image = self._new_buffer(self.image.shape[1], *self.image.shape[2:], False)
                write_tensor(image, self.image, with_stats=False)
                self._unit(image, image.filled, dst, unit.conv, unit.bn)
            self.image = None  # only the scale-0 stem reads it
            return
        (key, width), = cell.reads
        self._unit(self._buffer(key), width, dst, unit.conv, unit.bn)

    def _imagenet_stem(self, stem) -> torch.Tensor:
        """The ImageNet stem's output; with ``memory_efficient`` in training, its activation
        and pool indices (and with ``"all"`` its convolution output) recomputed in backward
        (not under autocast, whose dtypes backward's recomputation would not see)."""
        if (self._recomputes("stem") and stem.bn.training
                and not torch.is_autocast_enabled(self.image.device.type)):
            return conv_bn_relu_max_pool(self.image, stem.conv, stem.bn, stem.pool,
                                         keep_conv_output=not self._recomputes("units"))
        return stem(self.image)

    def _run_path(self, cell) -> None:
        dst = self._buffer(cell.writes)
        unit = cell.module
        reads = list(cell.reads)
        if len(reads) == 2:  # the strided path from the finer scale comes first
            key, width = reads.pop(0)
            self._conv_bn_path(unit.conv_down, self._buffer(key), width, dst)
        key, width = reads[0]
        self._conv_bn_path(unit.conv_normal, self._buffer(key), width, dst)

    def _run_transition(self, cell) -> None:
        (key, width), = cell.reads
        unit = cell.module
        self._unit(self._buffer(key), width, self._buffer(cell.writes), unit.conv, unit.bn)

    def _run_classifier(self, cell) -> torch.Tensor:
        """ConvBasic(3x3/2) twice, AvgPool2d(2), Linear: each ConvBasic's output is a small
        buffer of its own, read through that ConvBasic's BN by the next step."""
        (key, width), = cell.reads
        first, second, pool = cell.module.m
        mid1, read = self._bottleneck(self._buffer(key), width, first.conv, first.bn)
        mid2 = self._output_buffer(second.conv, mid1)
        append_transform_conv(mid1, mid1.filled, mid2, second.conv, read)
        self._record_stats(second.bn, mid2)
        z = TransformRead.apply(mid2.state, mid2.filled, *self._vectors(second.bn, mid2),
                                mid2.token)
        z = pool(z)
        return cell.module.linear(z.reshape(z.shape[0], -1))

    def keep_samples(self, index: torch.Tensor) -> None:
        """Batch compaction: only the samples ``index`` go on (every live buffer gathered)."""
        if torch.is_grad_enabled() and self.training:
            raise RuntimeError("early exit (batch compaction) is an inference-only operation")
        for buffer in self.buffers.values():
            buffer.state.values = ops.eager.gather_batch(buffer.values, index)
        if self.image is not None:
            self.image = ops.eager.gather_batch(self.image, index)
        self.batch = int(index.numel())
