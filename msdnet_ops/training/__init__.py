"""Training, evaluation and distributed execution of MSDNet (the ``msdnet`` command's engine).

One concept per module:

* :mod:`.data` -- data sets (embedded digits, CIFAR-10/100, ImageNet) and their splits;
* :mod:`.model_factory` -- the one place that chooses the model class and the configuration;
* :mod:`.recipe` -- the paper's recipe: defaults, learning-rate schedule, loss;
  :mod:`.precision` -- mixed precision;
* :mod:`.run_files` -- a run directory's files (run.json, checkpoint.pt, train_log.jsonl),
  written atomically;
* :mod:`.distributed` -- torchrun / DistributedDataParallel, synchronized batch statistics and
  the CPU threads of each process;
* :mod:`.train` -- the training loop; :mod:`.evaluate` -- anytime and budgeted evaluation;
* :mod:`.cuda_graph` -- a training step captured in a CUDA graph (``--cuda-graph``);
* :mod:`.plots`, :mod:`.progress` -- reporting.

Submodules are imported lazily by the command line.
"""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad option, missing data set): the message says
    what was given and what was expected. The command line prints it as one line and exits
    with status 2; every other exception is a bug and keeps its traceback."""


__all__ = ["UserError"]
