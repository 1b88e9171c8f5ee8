"""MSDNet on the fused ops: feature buffers per scale, lazy anytime prediction."""
from __future__ import annotations

from typing import Iterator, List

import torch

from ..layout import conv_weights_channels_last_
from .buffer_pool import BufferPool
from .macs import count_macs
from .msdnet_inference import FoldedWeights, InferenceRun, can_run_activated
from .msdnet_plain import MSDNetPlain
from .msdnet_plan import build_plan
from .msdnet_runtime import GridRun


# ``MSDNet(memory_efficient=...)``: each accepted value -> what a training step frees after
# forward and recomputes in backward
RECOMPUTED = {False: (), True: ("bottlenecks", "stem", "buffers"),
              "all": ("bottlenecks", "stem", "units")}


class MSDNet(MSDNetPlain):
    """Multi-Scale Dense Network (Huang et al., ICLR 2018) running on feature buffers.

    Same constructor, module tree and ``state_dict`` keys as :class:`MSDNetPlain` (the public
    reference's structure). Each scale of the grid is a feature buffer that dense layers append
    to; the strided path writes the coarser scale's slice. Each channel is stored once,
    activated (after its conv -> BN -> ReLU), and consumers convolve buffer prefixes as they
    are. For training (and whenever autograd is on) each unit also keeps its convolution's
    output for backward (:mod:`~msdnet_ops.models.msdnet_runtime`); in eval mode without
    autograd the BatchNorms are folded into the convolutions and nothing is kept
    (:mod:`~msdnet_ops.models.msdnet_inference`).

    Cells no exit reads (possible in small custom configurations; the paper's have none) are
    never run, so their BatchNorms' running statistics stay as they are where the reference
    would update them; no output depends on them.

    ``memory_efficient=True`` frees every bottleneck output after the forward pass and
    recomputes it in backward (one more 1x1 convolution per path; exact), and the ImageNet
    stem keeps only its convolution output (its ReLU output and max-pool indices recomputed);
    and each scale buffer is freed from the last forward cell reading it until backward, which
    writes its activated channels again from the units' kept convolution outputs (one
    elementwise pass per unit). ``memory_efficient="all"`` also frees every unit's
    convolution output (the values before its BatchNorm, which BatchNorm's backward needs)
    and the stem's (but keeps the scale buffers): backward recomputes every convolution of
    the forward pass once, and a training step keeps little more than the activated scale
    buffers (exact as well: the same convolutions of the same inputs).

    * ``forward(x)``: list of the logits of every exit (like the reference).
    * ``anytime(x)``: yields each exit's logits in order, computing only what that exit needs;
      stopping the iteration stops the compute.
    * ``exit_macs(input_size)``: cumulative multiply-adds per exit (the paper's accounting).
    * ``load_reference_state_dict(sd)`` / ``reference_state_dict()``: checkpoints of the
      public PyTorch reference (``module.`` prefixes of DataParallel are accepted).
    """

    # under torch.autocast the feature buffers hold the autocast dtype (nn.feature_buffer)
    supports_autocast = True

    def __init__(self, *args, memory_efficient: bool | str = False, **kwargs):
        if memory_efficient not in tuple(RECOMPUTED):  # a tuple: unhashable values compare too
            raise ValueError(f"memory_efficient: expected False, True or 'all', got "
                             f"{memory_efficient!r}")
        super().__init__(*args, **kwargs)
        self.memory_efficient = "all" if memory_efficient == "all" else bool(memory_efficient)
        conv_weights_channels_last_(self)  # the buffers are NHWC (msdnet_ops.layout)
        self.plan = build_plan(self)
        self.sync_group = None
        self._macs_cache: dict = {}
        self._folded = FoldedWeights(self.modules())
        # the CPU inference runs' scale buffers, kept for the next run (two batch shapes' worth)
        self._buffer_pool = BufferPool(2 * len(self.plan.capacity))
        # checked at every forward (eval mode without autograd runs the inference path):
        # listed once, as the plan fixes the module tree at construction
        self._batchnorms = [m for m in self.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    @property
    def recomputed(self) -> tuple:
        """What a training step frees after forward and recomputes in backward."""
        return RECOMPUTED[self.memory_efficient]

    # ---------------------------------------------------------------- cost accounting
    def exit_macs(self, input_size=(3, 32, 32)) -> List[int]:
        """Cumulative per-sample multiply-adds to reach each exit (earlier classifiers
        included, no lazy evaluation): the figures of the paper."""
        key = ("exits",) + tuple(int(v) for v in input_size)
        if key not in self._macs_cache:  # counting runs a meta-device forward: ~80 ms
            self._macs_cache[key] = list(count_macs(self, input_size).exit_macs)
        return list(self._macs_cache[key])

    def cell_macs(self, input_size) -> list:
        """Per-sample multiply-adds of every cell of the plan, for ``input_size``."""
        key = tuple(int(v) for v in input_size)
        if key not in self._macs_cache:
            per_module = count_macs(self, key).module_macs
            self._macs_cache[key] = [
                sum(v for name, v in per_module.items()
                    if name == cell.name or name.startswith(cell.name + "."))
                for cell in self.plan.cells]
        return self._macs_cache[key]

    # ---------------------------------------------------------------- forward
    def enable_sync_stats(self, group=None) -> None:
        """Synchronize the shared batch statistics across the ranks of ``group`` (one
        all-reduce per buffer write: SyncBatchNorm semantics under DistributedDataParallel)."""
        self.sync_group = group if group is not None else torch.distributed.group.WORLD

    def start(self, x: torch.Tensor):
        """A forward pass over the batch ``x`` whose exits are computed on request: on
        activated buffers with folded BatchNorms in eval mode without autograd
        (:class:`InferenceRun`), else on the autograd path (:class:`GridRun`)."""
        self.check_input(x)
        return self._start(x, can_run_activated(self, self._batchnorms))

    def _start(self, x: torch.Tensor, inference: bool, count_macs: bool = True):
        # forward() returns only the logits, so its runs count no multiply-adds: counting runs
        # a hooked meta-device forward the first time a size is seen, which would break
        # torch.compile's graph (and, through the resumed frames, recompile it per call site)
        macs = self.cell_macs(tuple(x.shape[1:])) if count_macs else None
        if inference:
            return InferenceRun(self, self.plan, x, macs, self._folded, self._buffer_pool)
        return GridRun(self, self.plan, x, macs, self.sync_group)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        self.check_input(x)
        if x.device.type == "meta":  # shape-only passes (MAC counting) use the plain graph
            return super().forward(x)
        if can_run_activated(self, self._batchnorms):  # plain tensor code: compiles whole
            return self._all_exits(x, True)
        return self._all_exits_autograd(x, False)

    def _all_exits(self, x: torch.Tensor, inference: bool) -> List[torch.Tensor]:
        run = self._start(x, inference, count_macs=False)
        return [run.exit_logits(k) for k in range(self.num_exits)]

    # The autograd path's nodes share Python-side buffer state, which torch.compile cannot
    # trace (every node would break the graph): under torch.compile it runs eagerly, as one
    # opaque call.
    _all_exits_autograd = torch._dynamo.disable(_all_exits)

    def anytime(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yields the logits of exit 0, 1, ... in order; each exit computes only the feature
        maps it depends on (the rest are deferred until a later exit needs them)."""
        run = self.start(x)
        try:
            for k in range(self.num_exits):
                yield run.exit_logits(k)
        finally:  # closed early (or done): the buffers still held go back for reuse
            run.release()

    def release_inference_buffers(self) -> None:
        """Frees what inference keeps from one forward pass to the next: the CPU feature
        buffers (one set per batch shape, at most two shapes; see ``models/buffer_pool.py``)
        and the convolutions with their BatchNorms folded in. The folded ones are made again
        by the next pass anyway when a convolution or BatchNorm tensor changed through
        PyTorch's version counter (optimizer steps, ``load_state_dict``, in-place ops under
        ``no_grad``, replaced tensors, ``.to()``); a write through ``.data`` (e.g.
        ``p.data.mul_(...)``) bumps no counter: call this after one."""
        self._buffer_pool.clear()
        self._folded.clear()

    # ---------------------------------------------------------------- checkpoints
    def load_reference_state_dict(self, state_dict, strict: bool = True):
        """Loads a checkpoint saved by the public PyTorch reference of MSDNet (same keys; a
        ``module.`` prefix from (Distributed)DataParallel and a ``{'state_dict': ...}``
        wrapper are removed)."""
        if "state_dict" in state_dict and isinstance(state_dict["state_dict"], dict):
            state_dict = state_dict["state_dict"]
        cleaned = {(k[len("module."):] if k.startswith("module.") else k): v
                   for k, v in state_dict.items()}
        return self.load_state_dict(cleaned, strict=strict)

    def reference_state_dict(self) -> dict:
        """A state dict the public reference implementation loads (the same keys)."""
        return self.state_dict()
