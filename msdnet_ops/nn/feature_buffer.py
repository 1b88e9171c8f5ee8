"""The feature buffer: one preallocated tensor holding every channel a dense block produces.

A layer reads a channel *prefix* (a zero-copy strided view) and writes its new channels into
the next free *slice*; nothing is ever concatenated. Alongside the values the buffer keeps the
batch statistics (mean, invstd) of every channel, computed once, when the channel is written,
and, during backward, the shared gradient: ``grad`` (every consumer's direct gradient,
``sum_l scale_l * dpre_l``) and the per-channel ``grad_mean``/``grad_invstd`` that are turned
into the BatchNorm-statistics part of the gradient once per channel by :meth:`finalize`.

Layout: ``[N, H, W, C_cap]`` in memory, an NCHW tensor with channels_last strides
(:mod:`msdnet_ops.layout`); ``values[:, :c]`` is a prefix, a matrix of ``N*H*W`` rows with
row stride ``C_cap``. The block output *is* the concatenation torchvision's DenseNet
produces (no copy to hand it on); kernels read prefixes through their strides.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .. import backends, ops
from ..layout import empty_nhwc
from ..dtypes import stats_dtype


class BufferState:
    """What autograd nodes hold on to: values, statistics, shared gradients. It holds no
    autograd token (that lives in :class:`FeatureBuffer`), so no reference cycle keeps it alive."""

    def __init__(self, values: torch.Tensor, track_stats: bool, eps: float, sync_group=None):
        self.values = values
        self.eps = eps
        self.track_stats = track_stats
        self.sync_group = sync_group
        self.mean = None    # (channels,) once a first write computed statistics
        self.invstd = None
        self.count = values.shape[0] * values.shape[2] * values.shape[3]
        self.global_count = self.count  # over all ranks, once synchronized statistics say so
        # read by one consumer only, all channels at once, through a transform (a bottleneck
        # output, a classifier's map): that consumer writes the gradient rather than adding
        self.sole_reader = False
        self.grad = None
        self.grad_mean = None
        self.grad_invstd = None
        # how to write every channel again from what backward keeps anyway (one callable per
        # write, ``rewrite(values)``): None unless :meth:`record_rewrites` asked for it, and
        # once a write cannot be repeated
        self._rewrites: list | None = None
        self._recompute = None

    # ---- forward
    def compute_stats(self, start: int, stop: int) -> None:
        """Statistics of channels [start, stop), once, right after they are written."""
        if not self.track_stats:
            return
        x = self.values[:, start:stop]
        channels = self.values.shape[1]
        whole = start == 0 and stop == channels  # the only write (a unit's or a bottleneck's)
        if self.mean is None and not whole:
            self.mean = x.new_zeros(channels, dtype=stats_dtype(x.dtype))
            self.invstd = torch.ones_like(self.mean)
        if self.sync_group is None and not whole:  # straight into the buffer's vectors
            ops.eager.channel_stats_into_(x, self.eps, self.mean[start:stop],
                                          self.invstd[start:stop])
            return
        mean, invstd = ops.eager.channel_stats(x, self.eps)
        if self.sync_group is not None:
            mean, invstd = self._all_reduce_stats(mean, invstd)
        if whole:
            self.mean, self.invstd = mean, invstd
            return
        self.mean[start:stop] = mean
        self.invstd[start:stop] = invstd

    def _all_reduce_stats(self, mean, invstd):
        """SyncBatchNorm semantics: one all-reduce per buffer write (sum, sum of squares, count)."""
        var = invstd.pow(-2) - self.eps
        n = float(self.count)
        packed = torch.stack([mean * n, (var + mean * mean) * n,
                              torch.full_like(mean, n)])
        dist.all_reduce(packed, group=self.sync_group)
        total = packed[2]
        g_mean = packed[0] / total
        g_var = (packed[1] / total - g_mean * g_mean).clamp_min(0)
        self.global_count = int(total[0].item()) if total.numel() else self.count
        return g_mean, torch.rsqrt(g_var + self.eps)

    # ---- freed after forward, recomputed or rewritten in backward
    def forget_values(self, recompute) -> None:
        """Frees the values after the forward pass; :meth:`restore_values` gets them back from
        ``recompute()`` (the same call that computed them, so the same values) when backward
        first needs them. Statistics are kept."""
        self._recompute = recompute
        self.values = None

    def restore_values(self) -> None:
        if self.values is None:
            self.values = self._recompute()
            self._recompute = None  # what it held on to (e.g. units' outputs) may go now

    def record_rewrites(self) -> None:
        """From now on, remember how each write can be repeated (:meth:`forget_until_backward`;
        only worth it when a backward will come: the record keeps what it needs alive)."""
        self._rewrites = []

    def record_rewrite(self, rewrite) -> None:
        """How the write that just happened can be repeated from state backward keeps anyway
        (``rewrite(values)`` writes those channels of ``values`` again, exactly), or ``None``:
        it cannot."""
        if rewrite is None:
            self._rewrites = None
        elif self._rewrites is not None:
            self._rewrites.append(rewrite)

    def forget_until_backward(self) -> bool:
        """After the last forward reader: frees the values when every write can be repeated
        (:meth:`record_rewrite`); backward's first use writes them again (one elementwise pass,
        exact). Returns whether they were freed."""
        if not self._rewrites or self.values is None:
            return False
        rewrites, like = self._rewrites, self.values
        shape, dtype, device = tuple(like.shape), like.dtype, like.device
        self._rewrites = None

        def rewrite_all() -> torch.Tensor:
            values = empty_nhwc(shape, dtype=dtype, device=device)
            for rewrite in rewrites:
                rewrite(values)
            return values

        self.forget_values(rewrite_all)
        return True

    # ---- backward
    def sole_gradient(self, channels: int) -> bool:
        """Whether a transform-reading consumer of ``channels`` channels writes the whole
        gradient (it is the :attr:`sole_reader`) rather than adding to it."""
        self.restore_values()
        return self.sole_reader and channels == self.values.shape[1]

    def ensure_grads(self, uninitialised: bool = False, stats_uninitialised: bool = False) -> None:
        """Allocates the shared gradient (zeros) the first time a consumer needs it.
        ``uninitialised``: the caller's first kernel writes every value rather than adding to
        it (a sole consumer), so no zero fill; ``stats_uninitialised``: the same for the
        statistics' gradients (a sole consumer normalizing with these batch statistics)."""
        if self.grad is None:
            self.restore_values()  # the gradient takes the values' shape and layout
            self.grad = (torch.empty_like if uninitialised else torch.zeros_like)(self.values)
            if self.track_stats:  # one allocation for the two vectors
                rows = (self.values.new_empty if stats_uninitialised else self.values.new_zeros)(
                    (2, self.values.shape[1]), dtype=stats_dtype(self.values.dtype))
                self.grad_mean, self.grad_invstd = rows[0], rows[1]

    def finalize(self, start: int, stop: int, with_stats: bool = True) -> torch.Tensor:
        """The complete gradient w.r.t. the values of channels [start, stop): their consumers
        are all done (autograd order guarantees it), so add the statistics part once
        (``with_stats=False`` for channels consumers read without normalizing)."""
        self.ensure_grads()
        grad = self.grad[:, start:stop]
        if self.track_stats and with_stats:
            grad_mean = self.grad_mean[start:stop]
            grad_invstd = self.grad_invstd[start:stop]
            if self.sync_group is not None:
                reduced = torch.stack([grad_mean, grad_invstd])
                dist.all_reduce(reduced, group=self.sync_group)
                # each rank's n is its local count; the all-reduced sums over ranks divided by
                # the global count equal SyncBatchNorm's gradient
                scale = self.count / self.global_count
                grad_mean, grad_invstd = reduced[0] * scale, reduced[1] * scale
            ops.eager.channel_stats_backward_(self.values[:, start:stop], self.mean[start:stop],
                                              self.invstd[start:stop], grad_mean.contiguous(),
                                              grad_invstd.contiguous(), grad)
        return grad

    def release_grads(self) -> None:
        self.grad = self.grad_mean = self.grad_invstd = None


def feature_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a feature buffer holds. Under autocast, float32 features are stored in the
    autocast dtype (what an autocast convolution would output; statistics and kernel
    accumulation stay in float32) where the backend has low-precision kernels (Triton, CUDA);
    elsewhere (the CPU kernels) they stay float32: a float32 compute path inside the autocast
    region, as autocast itself runs BatchNorm."""
    if torch.is_autocast_enabled(device.type):
        low = torch.get_autocast_dtype(device.type)
        if dtype in (torch.float32, low):  # float32 inputs, or what an autocast layer made
            return low if backends.runs_dtype(device, low) else torch.float32
    return dtype


class FeatureBuffer:
    """A handle on a :class:`BufferState` plus the autograd token of its last writer.

    ``capacity`` channels are allocated up front; :meth:`reserve` hands out the next free slice
    and refuses to go past the end.
    """

    def __init__(self, batch: int, capacity: int, height: int, width: int, *, dtype, device,
                 track_stats: bool, eps: float = 1e-5, sync_group=None):
        if capacity <= 0 or batch <= 0 or height <= 0 or width <= 0:
            raise ValueError(f"FeatureBuffer: expected positive sizes, got batch={batch}, "
                             f"capacity={capacity}, height={height}, width={width}")
        device = torch.device(device)
        values = empty_nhwc((batch, capacity, height, width), device=device,
                            dtype=feature_dtype(dtype, device))
        self.state = BufferState(values, track_stats, eps, sync_group)
        self.filled = 0
        self.token = None

    @property
    def values(self) -> torch.Tensor:
        return self.state.values

    @property
    def capacity(self) -> int:
        return self.state.values.shape[1]

    @property
    def spatial(self) -> tuple[int, int]:
        return tuple(self.state.values.shape[2:])

    def reserve(self, channels: int) -> int:
        """Claims the next ``channels`` channels; returns the first one's index."""
        if channels <= 0:
            raise ValueError(f"channels: expected a positive count, got {channels}")
        if self.filled + channels > self.capacity:
            raise ValueError(f"FeatureBuffer: writing {channels} channels at {self.filled} would "
                             f"go past its capacity of {self.capacity} channels")
        start = self.filled
        self.filled += channels
        return start

    def prefix(self, channels: int) -> torch.Tensor:
        if not 0 < channels <= self.filled:
            raise ValueError(f"prefix: expected 1..{self.filled} written channels, got {channels}")
        return self.values[:, :channels]
