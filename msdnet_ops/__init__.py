"""msdnet_ops: fused kernels that make dense connectivity (DenseNet, MSDNet) cheap in memory
and fast, and a Multi-Scale Dense Network with anytime prediction and budgeted early exit."""
from . import ops
from .nn import (DENSENET_NAMES, DenseBlock, DenseLayer, DenseNet, FeatureBuffer, Transition,
                 convert, densenet)

__version__ = "0.1.0"

__all__ = ["ops", "DenseLayer", "DenseBlock", "Transition", "DenseNet", "densenet",
           "DENSENET_NAMES", "FeatureBuffer", "convert"]
