"""Training checkpoints: one file per run directory, rewritten atomically after every epoch.

The file holds only tensors, plain dicts, lists, numbers, strings, booleans and ``None``, so it
loads with ``torch.load(path, weights_only=True)`` (no pickled classes, no code execution).
Its keys:

* ``format`` -- ``"msdnet_ops.training/1"``;
* ``epoch`` -- number of completed epochs;
* ``model`` -- the model's ``state_dict`` (reference MSDNet keys, CPU tensors);
* ``optimizer``, ``scaler`` -- their ``state_dict``;
* ``config`` -- the run configuration (data spec, model configuration and constructor
  arguments, the training recipe), the same dict as ``run.json``;
* ``history`` -- one dict per completed epoch (the lines of ``train_log.jsonl``).

Random state needs no saving: every epoch seeds its shuffling and augmentation from
``(seed, epoch, rank)``, so a resumed run repeats exactly what an uninterrupted one does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write
from .errors import UserError

FORMAT = "msdnet_ops.training/1"
CHECKPOINT_NAME = "checkpoint.pt"


def checkpoint_path(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def plain_state(obj: Any, where: str = "checkpoint") -> Any:
    """``obj`` with tensors moved to the CPU and tuples turned into lists; raises ``TypeError``
    naming the offending entry when something could not load with ``weights_only=True``."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}, expected str or int")
            out[k] = plain_state(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [plain_state(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if obj is None or type(obj) in (bool, int, str):
        return obj
    if isinstance(obj, str):  # str subclasses such as torch.__version__ (TorchVersion)
        return str(obj)
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    raise TypeError(f"{where} is a {type(obj).__name__}: only tensors, dicts, lists, numbers and strings "
                    "may go into a checkpoint")


def save_checkpoint(path, state: dict) -> None:
    """Write ``state`` (see the module docstring) atomically to ``path``."""
    state = plain_state(dict(state, format=FORMAT))
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; a missing or unreadable file is a
    :class:`UserError` that names it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: expected the {CHECKPOINT_NAME} that 'msdnet train --out DIR' "
                        "writes after every epoch")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} could not be read with torch.load(weights_only=True): {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not an msdnet training checkpoint (expected format {FORMAT!r})")
    return state
