"""The training loss of MSDNet: a (weighted) sum of the cross-entropy of every exit."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .errors import UserError


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
