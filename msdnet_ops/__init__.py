"""msdnet_ops: fused kernels that make dense connectivity (DenseNet, MSDNet) cheap in memory
and fast, and a Multi-Scale Dense Network with anytime prediction and budgeted early exit."""
from . import ops
from .inference.anytime import anytime_predict
from .inference.budgeted import BudgetedClassifier, BudgetedResult
from .inference.calibration import calibrate_thresholds, exit_proportions
from .models.msdnet import MSDNet
from .models.msdnet_configs import MSDNET_CONFIG_NAMES, msdnet_config
from .models.msdnet_plain import MSDNetPlain
from .training.cuda_graph import CudaGraphTrainStep
from .nn import (DENSENET_NAMES, DenseBlock, DenseLayer, DenseNet, FeatureBuffer, Transition,
                 convert, densenet)

__version__ = "0.1.0"

__all__ = ["ops", "DenseLayer", "DenseBlock", "Transition", "DenseNet", "densenet",
           "DENSENET_NAMES", "FeatureBuffer", "convert", "MSDNet", "MSDNetPlain",
           "msdnet_config", "MSDNET_CONFIG_NAMES", "calibrate_thresholds", "exit_proportions",
           "BudgetedClassifier", "BudgetedResult", "anytime_predict", "CudaGraphTrainStep"]
