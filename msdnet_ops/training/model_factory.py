"""The one place that decides which MSDNet class is built and with which configuration.

``impl`` selects the implementation:

* ``plain`` -- :class:`msdnet_ops.models.msdnet_plain.MSDNetPlain` (the module tree that
  mirrors the reference layer for layer);
* ``fused`` -- :class:`msdnet_ops.MSDNet` (the fused kernels; same constructor, same
  ``state_dict`` keys);
* ``auto`` (default) -- ``fused`` when the package provides it, else ``plain``.

Both take the same constructor arguments and have the same ``state_dict`` keys, so a
checkpoint trained with one evaluates with the other.

Configurations: ``digits-small`` (defined here, the default for the embedded data set) or any
name known to :func:`msdnet_ops.models.msdnet_configs.msdnet_config` (cifar10-anytime,
cifar100-anytime, cifar10-budgeted, cifar100-budgeted, imagenet-step4, imagenet-step7).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch.nn as nn

from . import UserError

IMPLS = ("auto", "plain", "fused")

# Small MSDNet for the embedded 32x32 digits (3 scales 32/16/8 as the CIFAR stem needs, so the
# classifier's two stride-2 convs and the 2x2 pooling end at 1x1). Chosen for accuracy >= 95 %
# at the last exit in well under the 10-minute CPU budget (see README / the commit message).
DIGITS_SMALL = dict(
    nBlocks=4, nChannels=8, base=2, stepmode="even", step=1, growthRate=4,
    grFactor=[1, 2, 4], bnFactor=[1, 2, 4], prune="max", reduction=0.5, bottleneck=True,
    num_classes=10, stem="cifar",
)

LOCAL_CONFIGS = {"digits-small": DIGITS_SMALL}
DEFAULT_CONFIG = {"digits": "digits-small", "cifar10": "cifar10-anytime",
                  "cifar100": "cifar100-anytime", "imagenet": "imagenet-step4"}


def config_names() -> list[str]:
    names = list(LOCAL_CONFIGS)
    names += ["cifar10-anytime", "cifar100-anytime", "cifar10-budgeted", "cifar100-budgeted",
              "imagenet-step4", "imagenet-step7"]
    return names


def resolve_config(name: Optional[str], data_name: str, num_classes: int, stem: str) -> dict:
    """Constructor keyword arguments for configuration ``name`` (default: by data set), with
    ``num_classes`` and ``stem`` set for the data."""
    if name is None:
        name = DEFAULT_CONFIG[data_name]
    if name in LOCAL_CONFIGS:
        kwargs = copy.deepcopy(LOCAL_CONFIGS[name])
    else:
        try:
            from ..models.msdnet_configs import msdnet_config
        except ImportError as e:
            raise UserError(f"configuration {name!r} needs msdnet_ops.models.msdnet_configs, which is "
                            f"not available ({e}); built-in here: {', '.join(LOCAL_CONFIGS)}") from e
        try:
            kwargs = dict(msdnet_config(name))
        except (KeyError, ValueError) as e:
            raise UserError(f"unknown configuration {name!r}: expected one of {', '.join(config_names())}") from e
    config_stem = kwargs.get("stem", stem)
    if config_stem != stem:
        raise UserError(f"configuration {name!r} has the {config_stem!r} stem but the data set needs the "
                        f"{stem!r} stem (CIFAR-sized images use 'cifar', ImageNet-sized 'imagenet')")
    kwargs["num_classes"] = int(num_classes)
    kwargs["stem"] = stem
    return kwargs


def model_class(impl: str = "auto") -> type:
    """The MSDNet class for ``impl`` ('auto', 'plain' or 'fused')."""
    if impl not in IMPLS:
        raise UserError(f"--impl {impl!r}: expected one of {', '.join(IMPLS)}")
    if impl in ("auto", "fused"):
        try:
            from .. import MSDNet  # the fused model, once the package provides it
            return MSDNet
        except ImportError as e:
            if impl == "fused":
                raise UserError(f"--impl fused: msdnet_ops.MSDNet is not available ({e})") from e
    try:
        from ..models.msdnet_plain import MSDNetPlain
    except ImportError as e:
        raise UserError(f"msdnet_ops.models.msdnet_plain.MSDNetPlain is not available ({e})") from e
    return MSDNetPlain


def build_model(kwargs: dict, impl: str = "auto") -> nn.Module:
    """A fresh model of the class chosen by ``impl`` with constructor arguments ``kwargs``."""
    return model_class(impl)(**copy.deepcopy(kwargs))


def impl_name(model: nn.Module) -> str:
    return "plain" if type(model).__name__ == "MSDNetPlain" else type(model).__name__
