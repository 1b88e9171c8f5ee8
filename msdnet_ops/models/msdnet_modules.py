"""Building blocks of MSDNet, built from standard ``torch.nn`` modules.

The module tree (and therefore every ``state_dict`` key) is the one of the public PyTorch
reference of the paper (Huang et al., ICLR 2018).  Besides the parameters, every module keeps
the *structural facts* a fused implementation needs as plain Python attributes (ints, strings,
tuples, frozen dataclasses); none of them is a registered sub-module, so they never show up in
``state_dict``.  Sub-modules that are convenient to reach by a name (``conv``, ``bn``, ...) are
exposed through read-only properties for the same reason.

Conventions used throughout:

* scales are numbered ``0 .. S-1`` from the finest (full resolution) to the coarsest;
* a list of feature maps passed between modules always holds consecutive scales and ends with
  the coarsest one, so entry ``j`` of a list that starts at scale ``first`` is scale
  ``first + j``;
* every unit is *post-activation*: conv -> BN -> ReLU.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "ConvBasic",
    "ConvBN",
    "ConvNormal",
    "ConvDownNormal",
    "ImageNetStemConv",
    "MSDNetStem",
    "ScaleSpec",
    "MSDNetLayer",
    "MSDNetTransition",
    "MSDNetBlock",
    "MSDNetClassifier",
]


class ConvBasic(nn.Module):
    """``Conv2d(bias=False) -> BatchNorm2d -> ReLU`` held in ``self.net`` (keys ``net.0``, ``net.1``).

    Used for the stem (scales >= 1, and scale 0 of the CIFAR stem), the transitions (1x1) and the
    two convolutions of every classifier.

    Attributes: ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``
    (ints).  Properties ``conv`` (``net[0]``) and ``bn`` (``net[1]``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, padding: int = 1):
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = int(kernel_size)
        self.stride = int(stride)
        self.padding = int(padding)
        self.net = nn.Sequential(
            nn.Conv2d(self.in_channels, self.out_channels, kernel_size=self.kernel_size,
                      stride=self.stride, padding=self.padding, bias=False),
            nn.BatchNorm2d(self.out_channels),
            nn.ReLU(inplace=True),
        )

    @property
    def conv(self) -> nn.Conv2d:
        return self.net[0]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self.net[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvBN(nn.Module):
    """One path of a dense layer: optional bottleneck, then a 3x3 conv, all post-activation.

    With ``bottleneck``: ``net = [conv1x1(in->inner), BN, ReLU, conv3x3(inner->out), BN, ReLU]``
    (keys ``net.{0,1,3,4}``) where ``inner = min(in, width*out)``; without: ``net = [conv3x3,
    BN, ReLU]`` (keys ``net.{0,1}``).  The 3x3 conv has padding 1 and stride 1 (``kind ==
    'normal'``) or 2 (``kind == 'down'``).

    Attributes: ``in_channels``, ``out_channels``, ``kind`` (``'normal'`` | ``'down'``),
    ``stride`` (1 | 2), ``bottleneck`` (bool), ``bn_width`` (the bottleneck factor),
    ``inner_channels`` (bottleneck width, or ``None`` without bottleneck).  Properties
    ``conv1``/``bn1`` (``None`` without bottleneck) and ``conv3``/``bn3``.
    """

    KINDS = ("normal", "down")

    def __init__(self, in_channels: int, out_channels: int, kind: str, bottleneck: bool,
                 bn_width: int):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"ConvBN: kind must be one of {self.KINDS}, got {kind!r}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kind = kind
        self.stride = 1 if kind == "normal" else 2
        self.bottleneck = bool(bottleneck)
        self.bn_width = int(bn_width)
        layers: List[nn.Module] = []
        inner = self.in_channels
        if self.bottleneck:
            inner = min(self.in_channels, self.bn_width * self.out_channels)
            layers += [nn.Conv2d(self.in_channels, inner, kernel_size=1, stride=1, padding=0,
                                 bias=False),
                       nn.BatchNorm2d(inner),
                       nn.ReLU(inplace=True)]
        self.inner_channels: Optional[int] = inner if self.bottleneck else None
        layers += [nn.Conv2d(inner, self.out_channels, kernel_size=3, stride=self.stride,
                             padding=1, bias=False),
                   nn.BatchNorm2d(self.out_channels),
                   nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)

    @property
    def conv1(self) -> Optional[nn.Conv2d]:
        return self.net[0] if self.bottleneck else None

    @property
    def bn1(self) -> Optional[nn.BatchNorm2d]:
        return self.net[1] if self.bottleneck else None

    @property
    def conv3(self) -> nn.Conv2d:
        return self.net[3] if self.bottleneck else self.net[0]

    @property
    def bn3(self) -> nn.BatchNorm2d:
        return self.net[4] if self.bottleneck else self.net[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvNormal(nn.Module):
    """Output of a dense layer at its finest kept scale when nothing is discarded.

    ``forward([x_s]) = cat([x_s, conv_normal(x_s)], dim=1)``.  Attributes ``in_channels``
    (channels of ``x_s``), ``new_channels`` (channels added), ``out_channels``.
    """

    def __init__(self, in_channels: int, new_channels: int, bottleneck: bool, bn_width: int):
        super().__init__()
        self.in_channels = int(in_channels)
        self.new_channels = int(new_channels)
        self.out_channels = self.in_channels + self.new_channels
        self.conv_normal = ConvBN(self.in_channels, self.new_channels, "normal", bottleneck,
                                  bn_width)

    def forward(self, x) -> torch.Tensor:
        if not isinstance(x, (list, tuple)):
            x = [x]
        return torch.cat([x[0], self.conv_normal(x[0])], dim=1)


class ConvDownNormal(nn.Module):
    """Two-path output of a dense layer at scale ``s`` fed by scales ``s-1`` and ``s``.

    ``forward([x_{s-1}, x_s]) = cat([x_s, conv_down(x_{s-1}), conv_normal(x_s)], dim=1)``; each
    path adds ``new_channels // 2`` channels (the reference's integer halving).  Attributes
    ``finer_channels`` (channels of ``x_{s-1}``), ``in_channels`` (channels of ``x_s``),
    ``new_channels`` (``2 * (new // 2)``, what is really added), ``out_channels``.
    """

    def __init__(self, finer_channels: int, in_channels: int, new_channels: int,
                 bottleneck: bool, bn_width_finer: int, bn_width: int):
        super().__init__()
        half = int(new_channels) // 2
        self.finer_channels = int(finer_channels)
        self.in_channels = int(in_channels)
        self.new_channels = 2 * half
        self.out_channels = self.in_channels + self.new_channels
        self.conv_down = ConvBN(self.finer_channels, half, "down", bottleneck, bn_width_finer)
        self.conv_normal = ConvBN(self.in_channels, half, "normal", bottleneck, bn_width)

    def forward(self, x) -> torch.Tensor:
        return torch.cat([x[1], self.conv_down(x[0]), self.conv_normal(x[1])], dim=1)


class _PlainSlicing:
    """Slicing a ``Sequential`` subclass rebuilds ``self.__class__`` from an OrderedDict, which
    our constructors do not take: return a plain ``nn.Sequential`` for slices instead."""

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)


class ImageNetStemConv(_PlainSlicing, nn.Sequential):
    """ImageNet scale-0 stem: ``Conv2d(7x7, stride 2, pad 3, bias=True) -> BN -> ReLU ->
    MaxPool2d(3, 2, 1)`` (keys ``0`` and ``1``; it is a bare ``Sequential`` in the reference).

    Attributes: ``in_channels``, ``out_channels``; properties ``conv``, ``bn``, ``pool``.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=7, stride=2, padding=3, bias=True),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)

    @property
    def conv(self) -> nn.Conv2d:
        return self[0]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self[1]

    @property
    def pool(self) -> nn.MaxPool2d:
        return self[3]


class MSDNetStem(nn.Module):
    """First layer of block 0: builds all ``S`` scales from the image (``layers.{s}``).

    Scale 0 is ``ConvBasic(3, C0*grFactor[0], 3, 1, 1)`` (``stem == 'cifar'``) or an
    :class:`ImageNetStemConv` (``stem == 'imagenet'``); scale ``s >= 1`` is
    ``ConvBasic(channels[s-1], C0*grFactor[s], 3, 2, 1)`` fed by scale ``s-1``.  ``forward(x)``
    returns the list of the ``S`` feature maps, finest first.

    Attributes: ``kind`` (``'cifar'`` | ``'imagenet'``), ``in_channels`` (3), ``n_scales``,
    ``out_channels`` (tuple, per scale).
    """

    def __init__(self, in_channels: int, base_channels: int, grFactor: Sequence[int],
                 kind: str):
        super().__init__()
        self.kind = kind
        self.in_channels = int(in_channels)
        self.n_scales = len(grFactor)
        self.out_channels: Tuple[int, ...] = tuple(base_channels * g for g in grFactor)
        self.layers = nn.ModuleList()
        if kind == "cifar":
            self.layers.append(ConvBasic(in_channels, self.out_channels[0], 3, 1, 1))
        elif kind == "imagenet":
            self.layers.append(ImageNetStemConv(in_channels, self.out_channels[0]))
        else:
            raise ValueError(f"MSDNetStem: kind must be 'cifar' or 'imagenet', got {kind!r}")
        for s in range(1, self.n_scales):
            self.layers.append(ConvBasic(self.out_channels[s - 1], self.out_channels[s], 3, 2, 1))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


@dataclass(frozen=True)
class ScaleSpec:
    """What a dense layer computes at one kept scale.

    * ``position``: index ``j`` in ``layer.layers`` (and in the layer's output list);
    * ``scale``: the absolute scale ``s = offset + j``;
    * ``two_path``: ``True`` for a :class:`ConvDownNormal` (inputs ``x_{s-1}`` and ``x_s``),
      ``False`` for a :class:`ConvNormal` (input ``x_s`` only);
    * ``in_channels``: channels of ``x_s`` (the identity part, copied first);
    * ``finer_channels``: channels of ``x_{s-1}`` (``0`` when not two-path);
    * ``normal``: ``(in, inner or None, out)`` of the ``conv_normal`` path (reads ``x_s``);
    * ``down``: ``(in, inner or None, out)`` of the ``conv_down`` path (reads ``x_{s-1}``,
      stride 2), ``None`` when not two-path;
    * ``out_channels``: ``in_channels + normal out + down out``.  Output channel order is
      ``[x_s, down, normal]`` (two-path) or ``[x_s, normal]``.
    * ``input_positions``: positions in the layer's *input* list of the maps this scale reads
      (``(j_finer, j_s)`` or ``(j_s,)``).
    """

    position: int
    scale: int
    two_path: bool
    in_channels: int
    finer_channels: int
    normal: Tuple[int, Optional[int], int]
    down: Optional[Tuple[int, Optional[int], int]]
    out_channels: int
    input_positions: Tuple[int, ...]


class MSDNetLayer(nn.Module):
    """One dense layer of the MSDNet grid (``layers.{j}``, one module per kept scale).

    It maps ``in_scales`` input maps (scales ``in_offset .. S-1``) to ``out_scales`` output maps
    (scales ``offset .. S-1``, ``offset = S - out_scales``).  ``discard = in_scales -
    out_scales`` (0 or 1) finest scales are dropped; when a scale is dropped the new finest
    scale takes the two-path form too (its strided path reads the dropped scale).

    Attributes (all plain): ``index`` (global 1-based layer number ``n``), ``n_scales`` (S),
    ``in_scales``, ``out_scales``, ``discard``, ``offset`` (first kept scale), ``in_offset``
    (first input scale, ``S - in_scales``), ``width_in`` (running width ``n`` before the layer:
    scale ``s`` has ``width_in * grFactor[s]`` channels), ``growth_rate`` (k), ``width_out``
    (``width_in + k``), ``specs`` (tuple of :class:`ScaleSpec`, one per kept scale, in the
    order of ``self.layers``), ``in_channels`` / ``out_channels`` (tuples indexed by position
    in the input / output list).
    """

    def __init__(self, index: int, width_in: int, growth_rate: int, grFactor: Sequence[int],
                 bnFactor: Sequence[int], bottleneck: bool, in_scales: int, out_scales: int):
        super().__init__()
        S = len(grFactor)
        if not (1 <= out_scales <= in_scales <= S and in_scales - out_scales <= 1):
            raise ValueError(f"MSDNetLayer: invalid scales in={in_scales} out={out_scales} "
                             f"for S={S}")
        self.index = int(index)
        self.n_scales = S
        self.in_scales = int(in_scales)
        self.out_scales = int(out_scales)
        self.discard = self.in_scales - self.out_scales
        self.offset = S - self.out_scales
        self.in_offset = S - self.in_scales
        self.width_in = int(width_in)
        self.growth_rate = int(growth_rate)
        self.width_out = self.width_in + self.growth_rate
        self.in_channels: Tuple[int, ...] = tuple(
            self.width_in * grFactor[s] for s in range(self.in_offset, S))

        self.layers = nn.ModuleList()
        specs = []
        for j, s in enumerate(range(self.offset, S)):
            two_path = not (j == 0 and self.discard == 0)
            c_s = self.width_in * grFactor[s]
            new = self.growth_rate * grFactor[s]
            p_s = s - self.in_offset  # position of scale s in the input list
            if two_path:
                c_f = self.width_in * grFactor[s - 1]
                m = ConvDownNormal(c_f, c_s, new, bottleneck, bnFactor[s - 1], bnFactor[s])
                normal = (c_s, m.conv_normal.inner_channels, m.conv_normal.out_channels)
                down = (c_f, m.conv_down.inner_channels, m.conv_down.out_channels)
                positions: Tuple[int, ...] = (p_s - 1, p_s)
            else:
                c_f = 0
                m = ConvNormal(c_s, new, bottleneck, bnFactor[s])
                normal = (c_s, m.conv_normal.inner_channels, m.conv_normal.out_channels)
                down = None
                positions = (p_s,)
            self.layers.append(m)
            specs.append(ScaleSpec(position=j, scale=s, two_path=two_path, in_channels=c_s,
                                   finer_channels=c_f, normal=normal, down=down,
                                   out_channels=m.out_channels, input_positions=positions))
        self.specs: Tuple[ScaleSpec, ...] = tuple(specs)
        self.out_channels: Tuple[int, ...] = tuple(sp.out_channels for sp in specs)

    def forward(self, x: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        out = []
        for spec, m in zip(self.specs, self.layers):
            if spec.two_path:
                i, j = spec.input_positions
                out.append(m([x[i], x[j]]))
            else:
                out.append(m([x[spec.input_positions[0]]]))
        return out


class MSDNetTransition(nn.Module):
    """Channel reduction after a dense layer: one 1x1 :class:`ConvBasic` per kept scale
    (``m.{j}``), applied map by map (the reference's ``ParallelModule``).

    Attributes: ``offset`` (first scale), ``n_scales_kept``, ``scales`` (tuple of absolute
    scales), ``width_in`` / ``width_out`` (running width before/after, ``width_out =
    floor(reduction * width_in)``), ``in_channels`` / ``out_channels`` (tuples per position).
    """

    def __init__(self, width_in: int, width_out: int, grFactor: Sequence[int], offset: int,
                 n_scales_kept: int):
        super().__init__()
        self.width_in = int(width_in)
        self.width_out = int(width_out)
        self.offset = int(offset)
        self.n_scales_kept = int(n_scales_kept)
        self.scales: Tuple[int, ...] = tuple(range(offset, offset + n_scales_kept))
        self.in_channels: Tuple[int, ...] = tuple(self.width_in * grFactor[s] for s in self.scales)
        self.out_channels: Tuple[int, ...] = tuple(self.width_out * grFactor[s]
                                                   for s in self.scales)
        self.m = nn.ModuleList(ConvBasic(ci, co, kernel_size=1, stride=1, padding=0)
                               for ci, co in zip(self.in_channels, self.out_channels))

    def forward(self, x: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return [m(t) for m, t in zip(self.m, x)]


class MSDNetBlock(_PlainSlicing, nn.Sequential):
    """The modules between two exits (``blocks.{b}``): a ``Sequential`` whose element 0 is the
    stem in block 0, then dense layers, each possibly followed by a transition.

    Attributes: ``index`` (b), ``kinds`` (tuple with ``'stem'``, ``'layer'`` or
    ``'transition'`` for every element, in order), ``stem_index`` (0 or ``None``),
    ``layer_indices`` / ``transition_indices`` (positions in the Sequential), ``width_in`` /
    ``width_out`` (running width entering / leaving the block), ``out_scales`` (maps output,
    the last one is the coarsest scale the classifier reads), ``out_channels`` (per output map).
    Properties ``stem``, ``layers``, ``transitions`` return the modules.
    """

    def __init__(self, index: int, modules: Sequence[nn.Module], width_in: int, width_out: int):
        super().__init__(*modules)
        self.index = int(index)
        kinds = []
        for m in modules:
            if isinstance(m, MSDNetStem):
                kinds.append("stem")
            elif isinstance(m, MSDNetLayer):
                kinds.append("layer")
            elif isinstance(m, MSDNetTransition):
                kinds.append("transition")
            else:
                raise TypeError(f"MSDNetBlock: unexpected module {type(m).__name__}")
        self.kinds: Tuple[str, ...] = tuple(kinds)
        self.stem_index: Optional[int] = 0 if kinds and kinds[0] == "stem" else None
        self.layer_indices: Tuple[int, ...] = tuple(i for i, k in enumerate(kinds) if k == "layer")
        self.transition_indices: Tuple[int, ...] = tuple(
            i for i, k in enumerate(kinds) if k == "transition")
        self.width_in = int(width_in)
        self.width_out = int(width_out)
        last = modules[-1]
        if isinstance(last, MSDNetStem):
            self.out_channels: Tuple[int, ...] = last.out_channels
        else:
            self.out_channels = tuple(last.out_channels)
        self.out_scales = len(self.out_channels)

    @property
    def stem(self) -> Optional[MSDNetStem]:
        return None if self.stem_index is None else self[self.stem_index]

    @property
    def layers(self) -> List[MSDNetLayer]:
        return [self[i] for i in self.layer_indices]

    @property
    def transitions(self) -> List[MSDNetTransition]:
        return [self[i] for i in self.transition_indices]


class MSDNetClassifier(nn.Module):
    """Exit after a block: ``linear(flatten(m(x[-1])))`` on the coarsest scale.

    ``m`` is ``Sequential(ConvBasic(c, mid, 3, 2, 1), ConvBasic(mid, mid, 3, 2, 1),
    AvgPool2d(2))`` (keys ``m.{0|1}.net.{0,1}``) and ``linear`` is ``Linear(mid, classes)``;
    ``mid = 128`` (CIFAR) or ``mid = c`` (ImageNet).  The head expects the pooled map to be
    1x1, i.e. a coarsest-scale side between 5 and 12.

    Attributes: ``index`` (b), ``in_channels`` (c), ``mid_channels``, ``num_classes``.
    """

    def __init__(self, index: int, in_channels: int, mid_channels: int, num_classes: int):
        super().__init__()
        self.index = int(index)
        self.in_channels = int(in_channels)
        self.mid_channels = int(mid_channels)
        self.num_classes = int(num_classes)
        self.m = nn.Sequential(
            ConvBasic(self.in_channels, self.mid_channels, kernel_size=3, stride=2, padding=1),
            ConvBasic(self.mid_channels, self.mid_channels, kernel_size=3, stride=2, padding=1),
            nn.AvgPool2d(2),
        )
        self.linear = nn.Linear(self.mid_channels, self.num_classes)

    def forward(self, x: Sequence[torch.Tensor]) -> torch.Tensor:
        res = self.m(x[-1])
        return self.linear(res.reshape(res.size(0), -1))
