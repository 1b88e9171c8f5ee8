"""DenseNet: torchvision's ``DenseNet`` (same constructor and state_dict keys) on feature
buffers, plus the CIFAR form of the DenseNet paper and the named configurations."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .bn_affine import bn_vectors, deferred_running_stats, update_running_stats
from .dense_block import DenseBlock, Transition
from .dense_layer import check_input_tensor, write_tensor
from .functions import TransformRead


class DenseNet(nn.Module):
    """Densely connected network (Huang et al. 2017).

    Arguments as ``torchvision.models.DenseNet`` plus ``stem`` (``'imagenet'``: 7x7/2 conv,
    BN, ReLU, 3x3/2 max-pool; ``'cifar'``: one 3x3 conv, as in the paper's CIFAR networks) and
    ``compression`` (transition width factor; torchvision uses 0.5, the original non-BC
    DenseNet 1.0). ``bn_size=0`` removes the bottleneck (DenseNet without "B").

    Forward keeps one feature buffer per block: a transition writes straight into the next
    block's buffer prefix, and the final BatchNorm reads the last buffer with the statistics
    computed when its channels were written.
    """

    # under torch.autocast the feature buffers hold the autocast dtype (see feature_buffer)
    supports_autocast = True

    def __init__(self, growth_rate: int = 32, block_config=(6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0,
                 num_classes: int = 1000, memory_efficient: bool = False, stem: str = "imagenet",
                 compression: float = 0.5, in_channels: int = 3) -> None:
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem: expected 'imagenet' or 'cifar', got {stem!r}")
        if not 0 < compression <= 1:
            raise ValueError(f"compression: expected a value in (0, 1], got {compression}")
        for value, name in ((num_init_features, "num_init_features"), (num_classes, "num_classes"),
                            (in_channels, "in_channels")):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        block_config = tuple(block_config)
        if not block_config or not all(isinstance(n, int) and n >= 1 for n in block_config):
            raise ValueError(f"block_config: expected one positive number of layers per block, "
                             f"got {block_config!r}")
        self.stem = stem
        self.in_channels = in_channels
        if stem == "imagenet":
            self.features = nn.Sequential(OrderedDict([
                ("conv0", nn.Conv2d(in_channels, num_init_features, 7, 2, 3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]))
        else:
            self.features = nn.Sequential(OrderedDict([
                ("conv0", nn.Conv2d(in_channels, num_init_features, 3, 1, 1, bias=False)),
            ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate,
                               memory_efficient)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = block.num_output_features
            if i != len(block_config) - 1:
                out = int(num_features * compression)
                if out < 1:
                    raise ValueError(f"compression: {compression} leaves no channel after dense "
                                     f"block {i + 1} ({num_features} channels)")
                self.features.add_module(f"transition{i + 1}", Transition(num_features, out))
                num_features = out
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)
        self.sync_group = None

    def enable_sync_stats(self, group=None) -> None:
        """Synchronize the shared batch statistics across the ranks of ``group`` (one
        all-reduce per buffer write: SyncBatchNorm semantics for DistributedDataParallel)."""
        self.sync_group = group if group is not None else torch.distributed.group.WORLD

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        for name, module in self.features.named_children():
            if name.startswith("denseblock"):
                break
            x = module(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_tensor(x, "x", self.in_channels, self)
        with deferred_running_stats():
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem(x)
        stages = [m for name, m in self.features.named_children()
                  if name.startswith(("denseblock", "transition"))]
        blocks = stages[0::2]
        transitions = stages[1::2]
        buffer = blocks[0].new_buffer(x, self.sync_group)
        write_tensor(buffer, x)
        for i, block in enumerate(blocks):
            block.append_to(buffer)
            if i < len(transitions):
                h, w = transitions[i].output_size(*buffer.spatial)
                if h == 0 or w == 0:
                    raise ValueError(f"x: input too small: block {i + 1} output is "
                                     f"{buffer.spatial}, a transition needs at least 2x2")
                nxt = blocks[i + 1].new_buffer(buffer.values[:, :, :h, :w], self.sync_group)
                transitions[i].write_into(buffer, nxt)
                buffer = nxt
        norm5 = self.features.norm5
        batch_stats, mean, invstd = bn_vectors(norm5, buffer.state, 0, buffer.filled)
        if batch_stats:
            update_running_stats(norm5, buffer.state, 0, buffer.filled)
        z = TransformRead.apply(buffer.state, buffer.filled, batch_stats, norm5.weight,
                                norm5.bias, mean, invstd, buffer.token)
        out = F.adaptive_avg_pool2d(z, (1, 1))
        return self.classifier(torch.flatten(out, 1))


# (growth_rate, block_config, num_init_features)
IMAGENET_CONFIGS = {
    "densenet121": (32, (6, 12, 24, 16), 64),
    "densenet161": (48, (6, 12, 36, 24), 96),
    "densenet169": (32, (6, 12, 32, 32), 64),
    "densenet201": (32, (6, 12, 48, 32), 64),
    "densenet264": (32, (6, 12, 64, 48), 64),
}

# (depth L, growth rate k, bottleneck+compression "BC")
CIFAR_CONFIGS = {
    "densenet40-k12": (40, 12, False),
    "densenet100-k12": (100, 12, False),
    "densenet100-k24": (100, 24, False),
    "densenet-bc100-k12": (100, 12, True),
    "densenet-bc250-k24": (250, 24, True),
    "densenet-bc190-k40": (190, 40, True),
}

DENSENET_NAMES = tuple(IMAGENET_CONFIGS) + tuple(CIFAR_CONFIGS)


def densenet(name: str, num_classes: int | None = None, **kwargs) -> DenseNet:
    """A named DenseNet: ImageNet ``densenet121/161/169/201/264`` (torchvision's) or the CIFAR
    networks of the paper (``densenet40-k12``, ``densenet100-k12``, ``densenet100-k24``,
    ``densenet-bc100-k12``, ``densenet-bc250-k24``, ``densenet-bc190-k40``; 3 blocks, 3x3
    stem; BC = bottleneck (4k) and compression 0.5; default 10 classes)."""
    if name in IMAGENET_CONFIGS:
        k, blocks, init = IMAGENET_CONFIGS[name]
        return DenseNet(k, blocks, init, num_classes=num_classes or 1000, **kwargs)
    if name in CIFAR_CONFIGS:
        depth, k, bc = CIFAR_CONFIGS[name]
        per_block = (depth - 4) // (6 if bc else 3)
        return DenseNet(k, (per_block,) * 3, 2 * k if bc else 16, bn_size=4 if bc else 0,
                        num_classes=num_classes or 10, stem="cifar",
                        compression=0.5 if bc else 1.0, **kwargs)
    raise ValueError(f"name: unknown DenseNet {name!r}; expected one of {', '.join(DENSENET_NAMES)}")
