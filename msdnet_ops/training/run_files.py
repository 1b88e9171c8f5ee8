"""The files of a run directory, all written atomically (a temporary file beside the target,
flushed to disk, then renamed): a reader, or a run killed half-way, sees the old file or the
new one, never a torn one.

* ``run.json`` -- the run's configuration (data spec, model configuration and constructor
  arguments, the training recipe);
* ``checkpoint.pt`` -- rewritten after every epoch; it holds only tensors, plain dicts, lists,
  numbers, strings, booleans and ``None``, so it loads with ``torch.load(path,
  weights_only=True)`` (no pickled classes, no code execution). Its keys: ``format``
  (:data:`FORMAT`), ``epoch`` (completed epochs), ``model`` (the ``state_dict``, reference
  MSDNet keys, CPU tensors), ``optimizer`` and ``scaler`` (their ``state_dict``), ``config``
  (the same dict as ``run.json``) and ``history`` (the lines of ``train_log.jsonl``);
* ``train_log.jsonl`` -- one JSON object per completed epoch. The checkpoint's ``history``
  holds the same records; on resume the log is rewritten from there, so it always matches the
  checkpoint even when a run was killed between the two writes.

Random state needs no saving: every epoch seeds its shuffling and augmentation from
``(seed, epoch, rank)``, so a resumed run repeats exactly what an uninterrupted one does.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from . import UserError

FORMAT = "msdnet_ops.training/1"
CHECKPOINT_NAME = "checkpoint.pt"
RUN_CONFIG_NAME = "run.json"
LOG_NAME = "train_log.jsonl"


def checkpoint_path(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINT_NAME


def log_path(run_dir) -> Path:
    return Path(run_dir) / LOG_NAME


# --------------------------------------------------------------------------- atomic writes

def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[object], None], binary: bool = True) -> None:
    """Call ``write(file)`` on a temporary file, then rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_json(path, obj) -> None:
    atomic_write(path, lambda f: (json.dump(obj, f, indent=2), f.write("\n")), binary=False)


# --------------------------------------------------------------------------- train_log.jsonl

def append_record(path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rewrite_log(path, records: Iterable[dict]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text), binary=False)


# --------------------------------------------------------------------------- checkpoint.pt

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
