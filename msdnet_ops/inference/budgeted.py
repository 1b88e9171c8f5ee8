"""Budgeted batch classification with real early exit.

A sample whose confidence at exit ``k`` reaches ``thresholds[k]`` leaves the batch there: every
live feature buffer is compacted to the samples still running, so the remaining exits cost
only what those samples need. With lazy evaluation an exit computes only the feature maps it
depends on; maps deferred by an earlier exit are computed when a later exit asks for them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .calibration import _as_thresholds


@dataclass
class BudgetedResult:
    """Outcome of :meth:`BudgetedClassifier.predict` for one batch.

    * ``predictions``/``exits``: class and exit index of every sample (``int64 [n]``, CPU);
    * ``macs``: multiply-adds really executed for the batch (summed over samples);
    * ``expected_macs``: ``n * sum_k (fraction exiting at k) * exit_macs[k]`` (the paper's
      accounting: no lazy evaluation, every earlier classifier counted);
    * ``full_macs``: what running every sample to the last exit costs (``n * exit_macs[-1]``);
    * ``wall_time``: seconds spent in :meth:`predict` (device synchronized).
    """
    predictions: torch.Tensor
    exits: torch.Tensor
    macs: int
    expected_macs: float
    full_macs: int
    wall_time: float


class BudgetedClassifier:
    """Applies calibrated thresholds (see :func:`calibrate_thresholds`) to an :class:`MSDNet`."""

    def __init__(self, model, thresholds):
        if not hasattr(model, "start") or not hasattr(model, "num_exits"):
            raise TypeError(f"model: expected an msdnet_ops.MSDNet, got {type(model).__name__}")
        self.model = model
        self.thresholds = _as_thresholds(thresholds, model.num_exits)

    def predict(self, x: torch.Tensor) -> BudgetedResult:
        model = self.model
        model.check_input(x)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self._predict(x)
        finally:
            model.train(was_training)

    def _predict(self, x: torch.Tensor) -> BudgetedResult:
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        n = x.shape[0]
        run = self.model.start(x)
        predictions = torch.empty(n, dtype=torch.int64)
        exits = torch.empty(n, dtype=torch.int64)
        alive = torch.arange(n)
        last = self.model.num_exits - 1
        try:
            for k in range(last + 1):
                logits = run.exit_logits(k)
                if not torch.isfinite(logits).all():
                    raise ValueError(f"exit {k} produced non-finite logits (NaN or inf): x "
                                     "(the input) or the model's weights hold NaN or inf")
                probs = torch.softmax(logits, dim=1)
                conf, pred = probs.max(dim=1)
                leave = (conf.to("cpu", torch.float64) >= self.thresholds[k]) if k < last \
                    else torch.ones(alive.numel(), dtype=torch.bool)
                pred = pred.cpu()
                predictions[alive[leave]] = pred[leave]
                exits[alive[leave]] = k
                stay = ~leave
                if not stay.any():
                    break
                if not stay.all():  # compaction only when someone left
                    alive = alive[stay]
                    run.keep_samples(stay.nonzero()[:, 0].to(x.device))
        finally:  # everyone left early, or an error: the buffers still held go back for reuse
            run.release()
        sync()
        wall = time.perf_counter() - t0
        exit_macs = self.model.exit_macs(tuple(x.shape[1:]))
        counts = torch.bincount(exits, minlength=last + 1).tolist()
        expected = float(sum(c * m for c, m in zip(counts, exit_macs)))
        return BudgetedResult(predictions, exits, int(run.macs), expected, n * exit_macs[-1], wall)
