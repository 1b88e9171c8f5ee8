"""The one place that decides which MSDNet class is built and with which configuration.

``impl`` selects the implementation:

* ``plain`` -- :class:`msdnet_ops.models.msdnet_plain.MSDNetPlain` (the module tree that
  mirrors the reference layer for layer);
* ``fused`` -- :class:`msdnet_ops.MSDNet` (the fused kernels; same constructor, same
  ``state_dict`` keys);
* ``auto`` (default) -- ``fused``.

Both take the same constructor arguments and have the same ``state_dict`` keys, so a
checkpoint trained with one evaluates with the other.

Configurations: any name of :data:`msdnet_ops.MSDNET_CONFIG_NAMES` (the paper's CIFAR and
ImageNet ones, and ``digits-small``, the default for the embedded digits data set).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch.nn as nn

from . import UserError
from ..models.msdnet_configs import MSDNET_CONFIG_NAMES, msdnet_config

IMPLS = ("auto", "plain", "fused")

DEFAULT_CONFIG = {"digits": "digits-small", "cifar10": "cifar10-anytime",
                  "cifar100": "cifar100-anytime", "imagenet": "imagenet-step4"}


def resolve_config(name: Optional[str], data_name: str, num_classes: int, stem: str) -> dict:
    """Constructor keyword arguments for configuration ``name`` (default: by data set), with
    ``num_classes`` and ``stem`` set for the data."""
    if name is None:
        name = DEFAULT_CONFIG[data_name]
    if name not in MSDNET_CONFIG_NAMES:
        raise UserError(f"unknown configuration {name!r}: expected one of {', '.join(MSDNET_CONFIG_NAMES)}")
    kwargs = msdnet_config(name)
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
    from .. import MSDNet, MSDNetPlain

    return MSDNetPlain if impl == "plain" else MSDNet


def build_model(kwargs: dict, impl: str = "auto") -> nn.Module:
    """A fresh model of the class chosen by ``impl`` with constructor arguments ``kwargs``."""
    return model_class(impl)(**copy.deepcopy(kwargs))


def impl_name(model: nn.Module) -> str:
    return "plain" if type(model).__name__ == "MSDNetPlain" else type(model).__name__
