"""Modules on feature buffers: drop-in replacements for torchvision's DenseNet pieces."""
from .convert import convert
from .dense_block import DenseBlock, Transition
from .dense_layer import DenseLayer
from .densenet import DENSENET_NAMES, DenseNet, densenet
from .feature_buffer import FeatureBuffer

__all__ = ["DenseLayer", "DenseBlock", "Transition", "DenseNet", "densenet", "DENSENET_NAMES",
           "FeatureBuffer", "convert"]
