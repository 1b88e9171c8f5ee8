"""The per-epoch training log: ``train_log.jsonl``, one JSON object per completed epoch.

The same records live in the checkpoint's ``history``; on resume the log is rewritten from
there, so it always matches the checkpoint even when a run was killed between the two writes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .atomic import atomic_write_text

LOG_NAME = "train_log.jsonl"


def log_path(run_dir) -> Path:
    return Path(run_dir) / LOG_NAME


def append_record(path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def rewrite_log(path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_log(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
