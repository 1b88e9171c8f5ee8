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
import zipfile
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
    """Load a checkpoint with ``weights_only=True``. A missing, empty, damaged or foreign file
    is a :class:`UserError` that names it and says what was expected."""
    path = Path(path)
    expected = f"expected the {CHECKPOINT_NAME} that 'msdnet train --out DIR' writes after every epoch"
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: {expected}")
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes): {expected}")
    # torch.save writes a zip archive; anything else (random bytes, a truncated copy: the zip
    # directory sits at the end) is not worth handing to torch.load, whose message is about
    # weights_only, not about the file.
    if not zipfile.is_zipfile(path):
        raise UserError(f"checkpoint {path} ({size} bytes) is not a file written by torch.save: it is damaged, "
                        f"truncated or something else; {expected}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is a PyTorch file that does not load as tensors and plain "
                        f"containers ({type(e).__name__}; it holds pickled Python objects or is damaged); "
                        f"{expected}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        what = ("a dict without the 'format' key (a bare state_dict?)" if isinstance(state, dict)
                else f"a {type(state).__name__}")
        raise UserError(f"checkpoint {path} holds {what}, not an msdnet training checkpoint (a dict with "
                        f"format {FORMAT!r}); {expected}")
    return state


# --------------------------------------------------------------------------- a run directory

def check_run_dir(run_dir: Path) -> None:
    """``run_dir`` must be the folder a training run wrote (not its checkpoint file)."""
    if run_dir.is_file():
        hint = f" (give the folder that holds it: {run_dir.parent})" if run_dir.name == CHECKPOINT_NAME else ""
        raise UserError(f"{run_dir} is a file, not a run folder{hint}: expected the --out DIR of 'msdnet train', "
                        f"which holds {CHECKPOINT_NAME} and {RUN_CONFIG_NAME}")
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist: expected the --out DIR of 'msdnet train'")


def read_run_config(run_dir: Path):
    """The dict in ``run_dir/run.json``, or ``None`` when there is none."""
    path = run_dir / RUN_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}): expected the {RUN_CONFIG_NAME} that "
                        "'msdnet train' writes") from None


def check_checkpoint_matches_run(state: dict, run_config, run_dir: Path) -> None:
    """Refuse a checkpoint whose configuration is not the run's (``run.json``), e.g. one copied
    in from another run: evaluating it would describe another network than the folder's."""
    if run_config is None or run_config == state["config"]:
        return
    ckpt_config = state["config"]
    keys = sorted(k for k in set(run_config) | set(ckpt_config) if run_config.get(k) != ckpt_config.get(k))
    shown = ", ".join(f"{k} (checkpoint {ckpt_config.get(k)!r}, {RUN_CONFIG_NAME} {run_config.get(k)!r})"
                      if k == "config_name" else k for k in keys)
    raise UserError(f"{checkpoint_path(run_dir)} does not belong to the run in {run_dir}: its configuration "
                    f"differs from {RUN_CONFIG_NAME} in {shown}. Put the run's own checkpoint back, or pass "
                    f"--force to evaluate the checkpoint with its own configuration")
