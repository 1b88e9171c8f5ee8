"""Named MSDNet configurations of the paper (constructor kwargs of :class:`MSDNetPlain`).

==================  =======  ========  ====  ====  ==  ==  ========  =======
name                nBlocks  stepmode  step  base  C0  k   factors   classes
==================  =======  ========  ====  ====  ==  ==  ========  =======
cifar10-anytime     10       even      2     4     16  6   1-2-4     10
cifar100-anytime    7        even      2     4     16  6   1-2-4     100
cifar10-budgeted    7        lin_grow  1     1     16  6   1-2-4     10
cifar100-budgeted   5        lin_grow  1     1     16  6   1-2-4     100
imagenet-step4      5        even      4     4     32  16  1-2-4-4   1000
imagenet-step7      5        even      7     7     32  16  1-2-4-4   1000
digits-small        4        even      1     2     8   4   1-2-4     10
==================  =======  ========  ====  ====  ==  ==  ========  =======

All use prune ``max``, reduction 0.5 and the bottleneck; ``grFactor == bnFactor`` ("factors").
CIFAR ones use the 3x3 stem (inputs 3x32x32), ImageNet ones the 7x7 stem (3x224x224).
``digits-small`` is not the paper's: a small CIFAR-stem network for the embedded 32x32 digits
data set (``msdnet train``'s default), chosen for >= 95 % accuracy at the last exit within a
few minutes of CPU training.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

__all__ = ["MSDNET_CONFIG_NAMES", "msdnet_config", "default_input_size"]

_CIFAR = dict(nChannels=16, growthRate=6, grFactor=(1, 2, 4), bnFactor=(1, 2, 4), prune="max",
              reduction=0.5, bottleneck=True, stem="cifar")
_IMAGENET = dict(nBlocks=5, nChannels=32, growthRate=16, grFactor=(1, 2, 4, 4),
                 bnFactor=(1, 2, 4, 4), stepmode="even", prune="max", reduction=0.5,
                 bottleneck=True, num_classes=1000, stem="imagenet")

_CONFIGS: Dict[str, Dict[str, Any]] = {
    "cifar10-anytime": dict(_CIFAR, nBlocks=10, stepmode="even", step=2, base=4, num_classes=10),
    "cifar100-anytime": dict(_CIFAR, nBlocks=7, stepmode="even", step=2, base=4, num_classes=100),
    "cifar10-budgeted": dict(_CIFAR, nBlocks=7, stepmode="lin_grow", step=1, base=1,
                             num_classes=10),
    "cifar100-budgeted": dict(_CIFAR, nBlocks=5, stepmode="lin_grow", step=1, base=1,
                              num_classes=100),
    "imagenet-step4": dict(_IMAGENET, step=4, base=4),
    "imagenet-step7": dict(_IMAGENET, step=7, base=7),
    "digits-small": dict(_CIFAR, nBlocks=4, nChannels=8, growthRate=4, stepmode="even", step=1, base=2,
                         num_classes=10),
}

MSDNET_CONFIG_NAMES: Tuple[str, ...] = tuple(_CONFIGS)


def msdnet_config(name: str) -> Dict[str, Any]:
    """Constructor kwargs of the named configuration (a fresh dict: safe to modify), e.g.
    ``MSDNetPlain(**msdnet_config('cifar100-anytime'))``."""
    if name not in _CONFIGS:
        raise ValueError(f"name: unknown MSDNet configuration {name!r}; expected one of "
                         f"{', '.join(MSDNET_CONFIG_NAMES)}")
    return dict(_CONFIGS[name])


def default_input_size(name_or_config) -> Tuple[int, int, int]:
    """``(3, 32, 32)`` for CIFAR configurations, ``(3, 224, 224)`` for ImageNet ones."""
    cfg = msdnet_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    return (3, 224, 224) if cfg.get("stem", "cifar") == "imagenet" else (3, 32, 32)
