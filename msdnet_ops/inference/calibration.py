"""Threshold calibration for budgeted batch classification (MSDNet's dynamic evaluation).

Confidence of a sample at exit ``k`` is its largest softmax probability there.  On a held-out
validation split with ``K`` exits and ``n`` samples, given exit proportions ``P`` (normalized,
e.g. :func:`exit_proportions` ``P_k ∝ q^k``), walk the exits in order ``k = 0 .. K-2``:

1. ``m_k = floor(n * P_k)`` (``n`` is the *whole* split, not the samples still running);
2. among the samples that have not exited yet, sorted by confidence at ``k`` (descending), the
   threshold ``T_k`` is the confidence of the ``m_k``-th one, counting **from 1** (so the
   ``m_k`` most confident remaining samples reach it).  If ``m_k == 0``, or fewer than ``m_k``
   samples remain, nobody is selected and ``T_k = +inf``;
3. every remaining sample with confidence ``>= T_k`` exits at ``k`` (ties at ``T_k`` all
   exit, so more than ``m_k`` may leave).

The last exit accepts everything: ``T_{K-1} = -inf``.  This is exactly the reference's
``dynamic_eval_find_threshold`` (its ``count == out_n`` with ``count`` starting at 1; its
``1e8`` / ``-1e8`` sentinels are ``+inf`` / ``-inf`` here, identical for probabilities).

At test time :func:`assign_exits` sends every sample to the first exit ``k`` with confidence
``>= T_k`` (the last exit if none), and :func:`expected_cost` is
``sum_k (fraction exiting at k) * cost of reaching exit k``.

``floor(n * P_k)`` is computed in float64; a proportion such as 0.29 of 100 samples is
28.999999999999996 and gives 28, as in the reference (which works in float32).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

__all__ = ["exit_proportions", "confidences", "calibrate_thresholds", "assign_exits",
           "exit_predictions", "exit_counts", "expected_cost"]

TensorLike = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_probs(probs: TensorLike, name: str = "probs") -> torch.Tensor:
    if isinstance(probs, (list, tuple)):
        if len(probs) == 0:
            raise ValueError(f"{name}: expected K >= 1 exits, got an empty sequence")
        try:
            probs = torch.stack([torch.as_tensor(p) for p in probs])
        except RuntimeError as e:
            raise ValueError(f"{name}: the per-exit tensors must all be [n, classes]: {e}") from None
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"{name}: expected a [K, n, classes] tensor, got {type(probs).__name__}")
    if probs.dim() != 3:
        raise ValueError(f"{name}: expected a [K, n, classes] tensor, got shape {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise TypeError(f"{name}: expected a floating tensor of probabilities, got {probs.dtype}")
    K, n, C = probs.shape
    if K < 1 or C < 1:
        raise ValueError(f"{name}: expected K >= 1 exits and >= 1 class, got shape "
                         f"{tuple(probs.shape)}")
    if torch.isnan(probs).any():
        raise ValueError(f"{name}: contains NaN")
    return probs


def confidences(probs: TensorLike) -> torch.Tensor:
    """``[K, n]`` confidence (largest probability) of every sample at every exit."""
    probs = _as_probs(probs)
    if probs.shape[1] == 0:
        return probs.new_zeros((probs.shape[0], 0))
    return probs.max(dim=2).values


def exit_proportions(q: float, K: int) -> torch.Tensor:
    """``P_k = q^k / sum_j q^j`` for ``k = 1..K`` (float64, sums to 1).

    Computed in log space, so any finite ``q > 0`` works: ``q -> 0`` puts everything on the
    first exit, ``q -> inf`` on the last, ``q = 1`` is uniform."""
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K: expected an integer >= 1, got {K!r}")
    try:
        q = float(q)
    except (TypeError, ValueError):
        raise ValueError(f"q: expected a positive finite number, got {q!r}") from None
    if not (q > 0 and math.isfinite(q)):
        raise ValueError(f"q: expected a positive finite number, got {q!r}")
    logits = math.log(q) * torch.arange(1, K + 1, dtype=torch.float64)
    return torch.softmax(logits, dim=0)


def _as_proportions(proportions, K: int) -> torch.Tensor:
    p = torch.as_tensor(proportions, dtype=torch.float64).detach().cpu()
    if p.dim() != 1 or p.shape[0] != K:
        raise ValueError(f"proportions: expected one value per exit, shape ({K},), got shape "
                         f"{tuple(p.shape)}")
    if not torch.isfinite(p).all():
        raise ValueError(f"proportions: expected finite values, got {p.tolist()}")
    if (p < 0).any():
        raise ValueError(f"proportions: expected non-negative values, got {p.tolist()}")
    total = p.sum()
    if total <= 0:
        raise ValueError("proportions: expected at least one positive value, got all zeros")
    return p / total


def calibrate_thresholds(probs: TensorLike, proportions) -> torch.Tensor:
    """Thresholds ``T`` (``[K]``, float64) from validation probabilities ``probs``
    (``[K, n, classes]``, or a sequence of K ``[n, classes]`` tensors) and exit proportions
    (``[K]``, non-negative, not all zero, normalized here).  See the module docstring for the
    exact rule; ``T[-1] = -inf``, ``T[k] = +inf`` where exit ``k`` takes nobody."""
    probs = _as_probs(probs)
    K, n, _ = probs.shape
    if n < 1:
        raise ValueError("probs: expected at least one validation sample, got n = 0")
    p = _as_proportions(proportions, K)
    conf = confidences(probs).detach().to("cpu", torch.float64)
    thresholds = torch.full((K,), math.inf, dtype=torch.float64)
    remaining = torch.ones(n, dtype=torch.bool)
    for k in range(K - 1):
        m = math.floor(n * p[k].item())
        left = conf[k][remaining]
        if 1 <= m <= left.numel():
            thresholds[k] = torch.sort(left, descending=True).values[m - 1]
        remaining &= ~(conf[k] >= thresholds[k])
    thresholds[K - 1] = -math.inf
    return thresholds


def _as_thresholds(thresholds, K: int) -> torch.Tensor:
    t = torch.as_tensor(thresholds, dtype=torch.float64).detach().cpu()
    if t.dim() != 1 or t.shape[0] != K:
        raise ValueError(f"thresholds: expected one threshold per exit, shape ({K},), got shape "
                         f"{tuple(t.shape)}")
    if torch.isnan(t).any():
        raise ValueError("thresholds: contains NaN")
    return t


def assign_exits(probs: TensorLike, thresholds) -> torch.Tensor:
    """Exit index (``int64``, ``[n]``) of every sample: the first ``k`` whose confidence is
    ``>= thresholds[k]``; the last exit takes every sample still running, whatever
    ``thresholds[-1]`` says."""
    probs = _as_probs(probs)
    K, n, _ = probs.shape
    t = _as_thresholds(thresholds, K)
    conf = confidences(probs).detach().to("cpu", torch.float64)
    passed = conf >= t[:, None]
    passed[K - 1] = True
    # first True along the exit axis
    return passed.to(torch.int8).argmax(dim=0).to(torch.int64)


def exit_predictions(probs: TensorLike, exit_indices: torch.Tensor) -> torch.Tensor:
    """Predicted class of every sample at its exit (``argmax`` of ``probs[exit, i]``)."""
    probs = _as_probs(probs)
    K, n, _ = probs.shape
    idx = _as_exit_indices(exit_indices, K, n)
    rows = probs[idx.to(probs.device), torch.arange(n, device=probs.device)]
    return rows.argmax(dim=1).cpu()


def _as_exit_indices(exit_indices, K: int, n: int = None) -> torch.Tensor:
    idx = torch.as_tensor(exit_indices).detach().cpu()
    if idx.dim() != 1:
        raise ValueError(f"exit_indices: expected a 1-D tensor, got shape {tuple(idx.shape)}")
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise TypeError(f"exit_indices: expected integers, got {idx.dtype}")
    if n is not None and idx.shape[0] != n:
        raise ValueError(f"exit_indices: expected {n} entries (one per sample), got {idx.shape[0]}")
    if idx.numel() and (idx.min() < 0 or idx.max() >= K):
        raise ValueError(f"exit_indices: expected values in [0, {K - 1}], got range "
                         f"[{idx.min().item()}, {idx.max().item()}]")
    return idx.to(torch.int64)


def exit_counts(exit_indices, K: int) -> torch.Tensor:
    """Number of samples leaving at each of the ``K`` exits."""
    idx = _as_exit_indices(exit_indices, K)
    return torch.bincount(idx, minlength=K)


def expected_cost(exit_indices, exit_costs) -> float:
    """``sum_k (fraction of samples exiting at k) * exit_costs[k]``, i.e. the mean cost per
    sample; ``exit_costs[k]`` is the cumulative cost of reaching exit ``k`` (e.g.
    ``count_macs(model).exit_macs``)."""
    costs = torch.as_tensor(exit_costs, dtype=torch.float64).detach().cpu()
    if costs.dim() != 1 or costs.shape[0] < 1:
        raise ValueError(f"exit_costs: expected one cost per exit (1-D, non-empty), got shape "
                         f"{tuple(costs.shape)}")
    if not torch.isfinite(costs).all() or (costs < 0).any():
        raise ValueError(f"exit_costs: expected finite non-negative costs, got {costs.tolist()}")
    K = costs.shape[0]
    idx = _as_exit_indices(exit_indices, K)
    if idx.numel() == 0:
        raise ValueError("exit_indices: expected at least one sample")
    counts = torch.bincount(idx, minlength=K).to(torch.float64)
    return float((counts / idx.numel() * costs).sum())
