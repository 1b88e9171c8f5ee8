"""The learning-rate schedule of the paper: step decay at fractions of the run.

CIFAR (and the embedded digits): lr x0.1 at 50 % and 75 % of the epochs (150 and 225 of 300).
ImageNet: lr x0.1 every 30 of 90 epochs, i.e. at 1/3 and 2/3. The rate is constant within an
epoch, so it is a pure function of the epoch number (nothing to checkpoint).
"""
from __future__ import annotations

from typing import Sequence

from .errors import UserError

CIFAR_MILESTONES = (0.5, 0.75)
IMAGENET_MILESTONES = (1 / 3, 2 / 3)


def milestone_epochs(epochs: int, milestones: Sequence[float]) -> list[int]:
    """Epoch numbers (0-based) from which each decay applies; never epoch 0, so the first
    epoch always runs at the given rate (a 1-epoch run would otherwise start decayed)."""
    return [max(1, int(round(m * epochs))) for m in milestones]


def lr_at_epoch(epoch: int, base_lr: float, epochs: int, milestones: Sequence[float] = CIFAR_MILESTONES,
                gamma: float = 0.1) -> float:
    """Learning rate of 0-based ``epoch``: ``base_lr * gamma**(number of milestones passed)``."""
    passed = sum(1 for m in milestone_epochs(epochs, milestones) if epoch >= m)
    return base_lr * gamma ** passed


def parse_milestones(text: str) -> tuple[float, ...]:
    """``'0.5,0.75'`` -> ``(0.5, 0.75)``: fractions of the run, each in (0, 1], increasing."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--lr-milestones {text!r}: expected comma-separated fractions of the run, e.g. 0.5,0.75")
    if any(not (0 < v <= 1) for v in values) or list(values) != sorted(values):
        raise UserError(f"--lr-milestones {text!r}: expected increasing fractions in (0, 1], e.g. 0.5,0.75")
    return values
