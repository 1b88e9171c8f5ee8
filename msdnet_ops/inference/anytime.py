"""Anytime prediction: run exits in order until a budget is spent, answer with the last one."""
from __future__ import annotations

import time

import torch


def anytime_predict(model, x: torch.Tensor, max_macs: float | None = None,
                    deadline_s: float | None = None):
    """Returns ``(logits, exit_index)`` of the last exit reached before the budget is gone:
    ``max_macs`` (multiply-adds per sample really executed; the next exit is started only if
    its cost fits) and/or ``deadline_s`` (wall seconds; checked after each exit). Exit 0 is
    always computed. Deferred feature maps (lazy evaluation) make early exits cheap."""
    if not (hasattr(model, "start") and hasattr(model, "num_exits")):
        raise TypeError(f"model: expected an msdnet_ops.MSDNet, got {type(model).__name__}")
    model.check_input(x)
    if max_macs is not None and not max_macs > 0:
        raise ValueError(f"max_macs: expected a positive number, got {max_macs}")
    if deadline_s is not None and not deadline_s > 0:
        raise ValueError(f"deadline_s: expected a positive number of seconds, got {deadline_s}")
    start = time.perf_counter()
    with torch.no_grad():
        run = model.start(x)
        logits, reached = run.exit_logits(0), 0
        for k in range(1, model.num_exits):
            if deadline_s is not None and time.perf_counter() - start >= deadline_s:
                break
            if max_macs is not None:
                todo = run.plan.closure(run.plan.exit_cells[k], run.done)
                if (run.macs + sum(run.cell_macs[i] for i in todo) * run.batch) / run.batch > max_macs:
                    break
            logits, reached = run.exit_logits(k), k
    return logits, reached
