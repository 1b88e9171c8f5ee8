"""The training recipe of the paper: defaults, the learning-rate schedule and the loss.

SGD with momentum 0.9 (``nesterov`` optional), weight decay 1e-4, lr 0.1 decayed x0.1 at 50 %
and 75 % of the epochs (ImageNet: at 1/3 and 2/3, i.e. every 30 of 90), loss = sum over exits
of the cross-entropy (optionally weighted), batch 64 (ImageNet 256), 300 epochs (ImageNet 90;
the embedded digits: 20). A *recipe* is the dict of the options that define a run (stored in
``run.json``, checked on ``--resume``): :data:`RECIPE_KEYS`.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import UserError

CIFAR_MILESTONES = (0.5, 0.75)
IMAGENET_MILESTONES = (1 / 3, 2 / 3)

# Per data set: epochs, global batch size, lr milestones, data-loader workers.
DATA_DEFAULTS = {
    "digits": dict(epochs=20, batch_size=64, lr_milestones=CIFAR_MILESTONES, workers=0),
    "cifar10": dict(epochs=300, batch_size=64, lr_milestones=CIFAR_MILESTONES, workers=4),
    "cifar100": dict(epochs=300, batch_size=64, lr_milestones=CIFAR_MILESTONES, workers=4),
    "imagenet": dict(epochs=90, batch_size=256, lr_milestones=IMAGENET_MILESTONES, workers=8),
}
RECIPE_DEFAULTS = dict(lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=False, amp="auto", seed=0,
                       augment=True, exit_weights=None, impl="auto", val_size=None)
RECIPE_KEYS = ("data", "config", "impl", "epochs", "batch_size", "lr", "momentum", "weight_decay", "nesterov",
               "lr_milestones", "exit_weights", "amp", "seed", "augment", "val_size")


# --------------------------------------------------------------------------- the recipe of a run

def fresh_recipe(given: dict, data_name: str) -> dict:
    """The full recipe of a new run: the options ``given`` over the defaults of ``data_name``."""
    recipe = dict(RECIPE_DEFAULTS)
    dd = DATA_DEFAULTS[data_name]
    recipe.update(epochs=dd["epochs"], batch_size=dd["batch_size"],
                  lr_milestones=",".join(f"{m:.6g}" for m in dd["lr_milestones"]), data="digits", config=None)
    recipe.update(given)
    return recipe


def check_resume_compatible(stored: dict, given: dict) -> None:
    """``--resume`` keeps the stored recipe: refuse options ``given`` that differ from it."""
    diff = [f"--{k.replace('_', '-')} {given[k]!r} (the run has {stored.get(k)!r})"
            for k in given if k != "config" and given[k] != stored.get(k)]
    if "config" in given and given["config"] != stored.get("config_name"):
        diff.append(f"--config {given['config']!r} (the run has {stored.get('config_name')!r})")
    if diff:
        raise UserError("--resume continues the run with its stored configuration, but these options differ: "
                        + "; ".join(diff) + ". Leave them out, or train into a new --out directory")


def validate_recipe(recipe: dict) -> None:
    for key in ("epochs", "batch_size"):
        if not isinstance(recipe[key], int) or recipe[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be a positive integer, got {recipe[key]!r}")
    for key in ("lr", "momentum", "weight_decay"):
        if not (isinstance(recipe[key], (int, float)) and math.isfinite(recipe[key]) and recipe[key] >= 0):
            raise UserError(f"--{key.replace('_', '-')} must be a non-negative number, got {recipe[key]!r}")
    if recipe["nesterov"] and recipe["momentum"] <= 0:
        raise UserError("--nesterov needs a positive --momentum")
    parse_milestones(recipe["lr_milestones"])


# --------------------------------------------------------------------------- learning-rate schedule

def milestone_epochs(epochs: int, milestones: Sequence[float]) -> list[int]:
    """Epoch numbers (0-based) from which each decay applies; never epoch 0, so the first
    epoch always runs at the given rate (a 1-epoch run would otherwise start decayed)."""
    return [max(1, int(round(m * epochs))) for m in milestones]


def lr_at_epoch(epoch: int, base_lr: float, epochs: int, milestones: Sequence[float] = CIFAR_MILESTONES,
                gamma: float = 0.1) -> float:
    """Learning rate of 0-based ``epoch``: ``base_lr * gamma**(number of milestones passed)``,
    rounded to 12 significant digits (0.1 * 0.1 is 0.010000000000000002 in binary floating
    point; the run and its log use 0.01)."""
    passed = sum(1 for m in milestone_epochs(epochs, milestones) if epoch >= m)
    return float(f"{base_lr * gamma ** passed:.12g}")


def parse_milestones(text: str) -> tuple[float, ...]:
    """``'0.5,0.75'`` -> ``(0.5, 0.75)``: fractions of the run, each in (0, 1], increasing."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"--lr-milestones {text!r}: expected comma-separated fractions of the run, e.g. 0.5,0.75")
    if any(not (0 < v <= 1) for v in values) or list(values) != sorted(values):
        raise UserError(f"--lr-milestones {text!r}: expected increasing fractions in (0, 1], e.g. 0.5,0.75")
    return values


# --------------------------------------------------------------------------- loss

def parse_exit_weights(text: Optional[str], n_exits: int) -> Optional[list[float]]:
    """``'1,1,2'`` -> ``[1.0, 1.0, 2.0]`` (one non-negative weight per exit); ``None`` -> ``None``."""
    if text is None:
        return None
    try:
        weights = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--exit-weights {text!r}: expected {n_exits} comma-separated numbers, one per exit")
    if len(weights) != n_exits:
        raise UserError(f"--exit-weights {text!r}: expected {n_exits} weights (the model has {n_exits} exits), "
                        f"got {len(weights)}")
    if any(w < 0 for w in weights) or not any(w > 0 for w in weights):
        raise UserError(f"--exit-weights {text!r}: weights must be non-negative and not all zero")
    return weights


def multi_exit_loss(outputs: Sequence[torch.Tensor], target: torch.Tensor,
                    weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """``sum_k w_k * cross_entropy(outputs[k], target)`` (``w_k = 1`` by default, as in the paper).

    Cross-entropy is computed in float32 even under autocast (half-precision logits are
    upcast; float32 and float64 logits keep their precision).
    """
    if weights is not None and len(weights) != len(outputs):
        raise ValueError(f"weights: expected {len(outputs)} values, got {len(weights)}")
    total = None
    for k, logits in enumerate(outputs):
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        term = F.cross_entropy(logits, target)
        if weights is not None:
            term = term * weights[k]
        total = term if total is None else total + term
    return total
