"""MSDNet models: the plain-PyTorch reference structure, named configurations, cost counting."""

from .macs import (MacsReport, count_macs, count_parameters, exit_macs, exit_parameters,
                   leaf_macs)
from .msdnet_configs import MSDNET_CONFIG_NAMES, default_input_size, msdnet_config
from .msdnet_modules import (ConvBasic, ConvBN, ConvDownNormal, ConvNormal, ImageNetStemConv,
                             MSDNetBlock, MSDNetClassifier, MSDNetLayer, MSDNetStem,
                             MSDNetTransition, ScaleSpec)
from .msdnet_plain import MSDNetPlain, block_steps, layer_scales, parse_factors

__all__ = [
    "MSDNetPlain", "msdnet_config", "MSDNET_CONFIG_NAMES", "default_input_size",
    "MacsReport", "count_macs", "exit_macs", "count_parameters", "exit_parameters", "leaf_macs",
    "ConvBasic", "ConvBN", "ConvNormal", "ConvDownNormal", "ImageNetStemConv", "MSDNetStem",
    "MSDNetLayer", "MSDNetTransition", "MSDNetBlock", "MSDNetClassifier", "ScaleSpec",
    "block_steps", "layer_scales", "parse_factors",
]
