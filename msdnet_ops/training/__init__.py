"""Training, evaluation and distributed execution of MSDNet (the ``msdnet`` command's engine).

One concept per module:

* :mod:`.data` -- data sets (embedded digits, CIFAR-10/100, ImageNet) and their splits;
* :mod:`.model_factory` -- the one place that chooses the model class and the configuration;
* :mod:`.schedule`, :mod:`.loss`, :mod:`.precision` -- the training recipe pieces;
* :mod:`.checkpoint` -- atomic, ``weights_only``-loadable checkpoints;
* :mod:`.distributed` -- torchrun / DistributedDataParallel and synchronized batch statistics;
* :mod:`.train` -- the training loop; :mod:`.evaluate` -- anytime and budgeted evaluation;
* :mod:`.plots`, :mod:`.progress`, :mod:`.jsonlog` -- reporting.

Submodules are imported lazily by the command line so ``msdnet --help`` stays fast.
"""
from .errors import DataError, UserError

__all__ = ["DataError", "UserError"]
