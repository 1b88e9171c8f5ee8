"""Atomic file writes: write a temporary file beside the target, flush it to disk, rename.

A reader (or a run killed half-way) sees either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


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


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), binary=False)
