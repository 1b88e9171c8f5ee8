"""MSDNet written with plain ``torch.nn`` modules and ``torch.cat`` (the reference's structure).

This is the baseline every fused implementation is checked against: same module tree, same
``state_dict`` keys as the public PyTorch reference (so its checkpoints load with
``load_state_dict``), same forward arithmetic.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..nn.dense_layer import check_like_parameters
from .msdnet_modules import (
    MSDNetBlock,
    MSDNetClassifier,
    MSDNetLayer,
    MSDNetStem,
    MSDNetTransition,
)

__all__ = ["MSDNetPlain", "layer_scales", "block_steps", "parse_factors"]

STEPMODES = ("even", "lin_grow")
PRUNES = ("max", "min")
STEMS = ("cifar", "imagenet")


def parse_factors(value, name: str) -> Tuple[int, ...]:
    """Accept ``(1, 2, 4)``, ``[1, 2, 4]`` or the reference's command-line form ``'1-2-4'``."""
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split("-")]
        except ValueError:
            raise ValueError(f"{name}: expected integers separated by '-', got {value!r}") from None
    try:
        out = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"{name}: expected a sequence of positive integers, got {value!r}") from None
    if any(int(v) != v for v in value):
        raise ValueError(f"{name}: expected integers, got {value!r}")
    if len(out) == 0 or any(v < 1 for v in out):
        raise ValueError(f"{name}: expected a non-empty sequence of positive integers, got {value!r}")
    return out


def block_steps(nBlocks: int, base: int, stepmode: str, step: int) -> List[int]:
    """Number of dense layers per block: ``[base, s_1, ..., s_{nBlocks-1}]`` with ``s_i = step``
    (``even``) or ``step*i + 1`` (``lin_grow``)."""
    if stepmode not in STEPMODES:
        raise ValueError(f"stepmode: expected one of {STEPMODES}, got {stepmode!r}")
    return [base] + [step if stepmode == "even" else step * i + 1 for i in range(1, nBlocks)]


def layer_scales(n: int, n_all: int, S: int, prune: str) -> Tuple[int, int]:
    """``(inScales, outScales)`` of global dense layer ``n`` (1-based) out of ``n_all``."""
    if prune == "max":
        interval = math.ceil(n_all / S)
        return S - max(0, n - 2) // interval, S - (n - 1) // interval
    if prune == "min":
        return min(S, n_all - n + 2), min(S, n_all - n + 1)
    raise ValueError(f"prune: expected one of {PRUNES}, got {prune!r}")


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


class MSDNetPlain(nn.Module):
    """Multi-Scale Dense Network, reference structure, plain PyTorch forward.

    Args (names as in the reference's command line):
        nBlocks: number of blocks = number of exits.
        nChannels: C0, the running width at the start (scale ``s`` gets ``C0*grFactor[s]``).
        base: dense layers in block 0.
        stepmode: ``'even'`` (``step`` layers per later block) or ``'lin_grow'``
            (``step*i + 1`` layers in block ``i``).
        step: see ``stepmode``.
        growthRate: k, channels added per layer (times ``grFactor[s]`` at scale ``s``).
        grFactor: growth factor per scale (its length is the number of scales S);
            a sequence or ``'1-2-4'``.
        bnFactor: bottleneck width factor per scale (same length as ``grFactor``).
        prune: ``'max'`` or ``'min'`` (when finest scales are dropped, where transitions go).
        reduction: transition compression (``0`` disables transitions).
        bottleneck: use the 1x1 bottleneck in every dense path.
        num_classes: classes per exit.
        stem: ``'cifar'`` (3x3 stem, classifier width 128) or ``'imagenet'`` (7x7/2 conv with
            bias + 3x3/2 max-pool stem, classifier width = block channels).

    ``forward(x)`` takes ``[N, 3, H, W]`` and returns the list of ``nBlocks`` logits
    ``[N, num_classes]``, one per exit, in order.

    Structural attributes (plain Python, for fused implementations and cost accounting):
        ``config`` (dict of the constructor arguments, normalized), ``n_scales`` (S),
        ``steps`` (layers per block), ``n_layers_all``, ``grFactor``, ``bnFactor`` (tuples),
        ``growth_rate``, ``stem_kind``, ``in_channels`` (3), ``num_exits``,
        ``block_widths`` (running width after each block), ``classifier_channels`` (input
        channels of each exit).  Sub-modules: ``blocks`` (``ModuleList`` of
        :class:`MSDNetBlock`), ``classifier`` (``ModuleList`` of :class:`MSDNetClassifier`).
        :meth:`scale_sizes` gives the spatial size of every scale for an input size, and
        :meth:`dense_layers` lists every ``(block, position, MSDNetLayer)``.

    Initialization: conv weights ~ N(0, sqrt(2 / (kh*kw*out_channels))), BN weight 1 and bias 0,
    Linear bias 0; the Linear weights and the ImageNet stem's conv bias keep PyTorch's default
    init.  (The reference's ``_init_weights`` meant to do this but only visits the direct
    children of each block, so in the reference it is effectively a no-op; we apply it to every
    module.)
    """

    in_channels = 3

    def __init__(self, nBlocks: int, nChannels: int, base: int = 4, stepmode: str = "even",
                 step: int = 2, growthRate: int = 6,
                 grFactor: Union[str, Sequence[int]] = (1, 2, 4),
                 bnFactor: Union[str, Sequence[int]] = (1, 2, 4), prune: str = "max",
                 reduction: float = 0.5, bottleneck: bool = True, num_classes: int = 10,
                 stem: str = "cifar"):
        super().__init__()
        # ---- argument checks -------------------------------------------------------------
        _check_int(nBlocks, "nBlocks", 1)
        _check_int(nChannels, "nChannels", 1)
        _check_int(base, "base", 1)
        _check_int(growthRate, "growthRate", 1)
        _check_int(num_classes, "num_classes", 1)
        if stepmode not in STEPMODES:
            raise ValueError(f"stepmode: expected one of {STEPMODES}, got {stepmode!r}")
        _check_int(step, "step", 1 if (stepmode == "even" and nBlocks > 1) else 0)
        if prune not in PRUNES:
            raise ValueError(f"prune: expected one of {PRUNES}, got {prune!r}")
        if stem not in STEMS:
            raise ValueError(f"stem: expected one of {STEMS}, got {stem!r}")
        if not isinstance(bottleneck, bool):
            raise ValueError(f"bottleneck: expected a bool, got {bottleneck!r}")
        grFactor = parse_factors(grFactor, "grFactor")
        bnFactor = parse_factors(bnFactor, "bnFactor")
        if len(grFactor) != len(bnFactor):
            raise ValueError(f"grFactor and bnFactor must have one entry per scale, got "
                             f"len(grFactor)={len(grFactor)} != len(bnFactor)={len(bnFactor)}")
        try:
            reduction = float(reduction)
        except (TypeError, ValueError):
            raise ValueError(f"reduction: expected a number in [0, 1], got {reduction!r}") from None
        if not (0.0 <= reduction <= 1.0):
            raise ValueError(f"reduction: expected a number in [0, 1], got {reduction!r}")
        S = len(grFactor)
        for s in range(1, S):
            if (growthRate * grFactor[s]) % 2:
                raise ValueError(
                    f"growthRate*grFactor[{s}] = {growthRate * grFactor[s]} must be even: scale "
                    f"{s} splits its new channels between a strided and a normal path")

        self.config: Dict[str, Any] = dict(
            nBlocks=nBlocks, nChannels=nChannels, base=base, stepmode=stepmode, step=step,
            growthRate=growthRate, grFactor=grFactor, bnFactor=bnFactor, prune=prune,
            reduction=reduction, bottleneck=bottleneck, num_classes=num_classes, stem=stem)
        self.nBlocks = nBlocks
        self.num_exits = nBlocks
        self.n_scales = S
        self.grFactor = grFactor
        self.bnFactor = bnFactor
        self.growth_rate = growthRate
        self.stem_kind = stem
        self.num_classes = num_classes
        self.steps: List[int] = block_steps(nBlocks, base, stepmode, step)
        if any(s < 1 for s in self.steps):
            raise ValueError(f"every block needs at least one dense layer, got steps {self.steps}")
        self.n_layers_all = sum(self.steps)

        # ---- build ----------------------------------------------------------------------------
        self.blocks = nn.ModuleList()
        self.classifier = nn.ModuleList()
        width = nChannels
        n = 0
        widths, cls_channels = [], []
        for b, n_steps in enumerate(self.steps):
            width_in = width
            mods: List[nn.Module] = []
            if b == 0:
                mods.append(MSDNetStem(self.in_channels, nChannels, grFactor, stem))
            for _ in range(n_steps):
                n += 1
                in_sc, out_sc = layer_scales(n, self.n_layers_all, S, prune)
                mods.append(MSDNetLayer(n, width, growthRate, grFactor, bnFactor, bottleneck,
                                        in_sc, out_sc))
                width += growthRate
                if reduction > 0 and (
                        (prune == "max" and in_sc > out_sc) or
                        (prune == "min" and n in (math.floor(self.n_layers_all / 3),
                                                  math.floor(2 * self.n_layers_all / 3)))):
                    new_width = math.floor(reduction * width)
                    if new_width < 1:
                        raise ValueError(f"reduction={reduction} leaves no channel after layer {n} "
                                         f"(width {width})")
                    mods.append(MSDNetTransition(width, new_width, grFactor, S - out_sc, out_sc))
                    width = new_width
            self.blocks.append(MSDNetBlock(b, mods, width_in, width))
            c = width * grFactor[-1]
            mid = 128 if stem == "cifar" else c
            self.classifier.append(MSDNetClassifier(b, c, mid, num_classes))
            widths.append(width)
            cls_channels.append(c)
        self.block_widths: Tuple[int, ...] = tuple(widths)
        self.classifier_channels: Tuple[int, ...] = tuple(cls_channels)
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Initialization described in the class docstring."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                with torch.no_grad():
                    m.weight.normal_(0.0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                with torch.no_grad():
                    m.weight.fill_(1.0)
                    m.bias.zero_()
            elif isinstance(m, nn.Linear):
                if m.bias is not None:
                    with torch.no_grad():
                        m.bias.zero_()

    def dense_layers(self) -> List[Tuple[int, int, MSDNetLayer]]:
        """Every dense layer as ``(block index, position in blocks[b], module)``, in order."""
        return [(b, i, blk[i]) for b, blk in enumerate(self.blocks) for i in blk.layer_indices]

    # ---- input sizes -------------------------------------------------------------------------
    def scale_sizes(self, height: int, width: int) -> List[Tuple[int, int]]:
        """Spatial size ``(H_s, W_s)`` of every scale for an input of ``height x width``."""
        def down(v: int, k: int, s: int, p: int) -> int:
            return (v + 2 * p - k) // s + 1

        h, w = int(height), int(width)
        if self.stem_kind == "imagenet":
            h, w = down(h, 7, 2, 3), down(w, 7, 2, 3)
            h, w = down(h, 3, 2, 1), down(w, 3, 2, 1)
        sizes = [(h, w)]
        for _ in range(1, self.n_scales):
            h, w = down(h, 3, 2, 1), down(w, 3, 2, 1)
            sizes.append((h, w))
        return sizes

    def _side_ok(self, v: int) -> bool:
        if v < 1:
            return False
        h = self.scale_sizes(v, v)[-1][0]
        if h < 1:
            return False
        # classifier: two 3x3/2 pad-1 convs, then AvgPool2d(2) must leave exactly 1x1
        h = (h - 1) // 2 + 1
        h = (h - 1) // 2 + 1
        return h // 2 == 1

    def input_size_range(self) -> Tuple[int, int]:
        """Smallest and largest image side (height or width, independently) the model accepts:
        the coarsest scale must end at 1x1 after the classifier's two stride-2 convs and its
        2x2 average pooling (coarsest side 5 .. 12)."""
        # the coarsest side is monotone in the input side, so the valid set is an interval
        factor = 2 ** (self.n_scales - 1) * (4 if self.stem_kind == "imagenet" else 1)
        candidates = [v for v in range(1, 12 * factor + 1) if self._side_ok(v)]
        return candidates[0], candidates[-1]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ``TypeError`` / ``ValueError`` unless ``x`` is ``[N, 3, H, W]`` with ``H`` and
        ``W`` in :meth:`input_size_range`."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x: expected a 4-D [N, {self.in_channels}, H, W] tensor, got shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected {self.in_channels} input channels (RGB), got "
                             f"{x.shape[1]} (shape {tuple(x.shape)})")
        if x.shape[0] < 1:
            raise ValueError(f"x: expected at least one sample, got shape {tuple(x.shape)}")
        check_like_parameters(x, "x", self)
        h, w = int(x.shape[2]), int(x.shape[3])
        if not (self._side_ok(h) and self._side_ok(w)):
            lo, hi = self.input_size_range()
            raise ValueError(
                f"x: image size {h}x{w} is not accepted by this MSDNet ({self.stem_kind} stem, "
                f"{self.n_scales} scales, scale sizes {self.scale_sizes(h, w)}): height and width "
                f"must each be in [{lo}, {hi}] so that the coarsest scale ({self.n_scales - 1}) "
                f"is 5..12 pixels and every classifier pools it down to 1x1")

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        self.check_input(x)
        out = []
        feats = x
        for block, cls in zip(self.blocks, self.classifier):
            feats = block(feats)
            out.append(cls(feats))
        return out
