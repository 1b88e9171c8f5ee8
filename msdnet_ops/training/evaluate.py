"""Evaluation of a trained run: the anytime table and the budgeted accuracy-cost curve.

``evaluate_run(DIR)`` loads ``DIR/checkpoint.pt`` (``weights_only=True``) and the data set it
was trained on, then

* runs every exit on the validation and test splits (softmax probabilities per exit);
* **anytime**: accuracy of each exit on both splits, with the cumulative multiply-adds per
  image to reach it (:func:`msdnet_ops.models.macs.exit_macs`);
* **budgeted batch classification**: for each ``q`` of a sweep (default 0.05 .. 1.95, step
  0.05, as in the paper), exit proportions ``P_k ~ q^k``, thresholds calibrated on the
  validation split and applied to the test split; accuracy and *expected* multiply-adds
  (``sum_k fraction_k * cost_k``). When the package provides ``msdnet_ops.BudgetedClassifier``
  (lazy early exit for real), the same thresholds are also run through it on the test split
  and its *measured* multiply-adds and wall time are reported beside the expected ones;
* checks that the budgeted curve is at least as accurate as each single exit at no more cost;

and writes ``DIR/evaluation.json``, ``DIR/anytime.png`` (table and accuracy per exit) and
``DIR/budgeted.png`` (accuracy vs. multiply-adds: budgeted curve, expected and measured, and
the single exits).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader

from .atomic import atomic_write_json
from .checkpoint import checkpoint_path, load_checkpoint
from .data import load_data
from .errors import UserError
from .precision import autocast
from .threads import idle_aware_threads

EVALUATION_NAME = "evaluation.json"
ANYTIME_PLOT = "anytime.png"
BUDGETED_PLOT = "budgeted.png"
DEFAULT_QS = tuple(round(0.05 * i, 2) for i in range(1, 40))  # 0.05 .. 1.95


@dataclass
class EvaluateOptions:
    run_dir: str
    data: Optional[str] = None  # override the stored data spec (e.g. the data set moved)
    device: Optional[str] = None
    batch_size: int = 256
    impl: Optional[str] = None  # default: the fused model when available, else the stored one
    q_min: float = 0.05
    q_max: float = 1.95
    q_step: float = 0.05
    measure: bool = True  # run BudgetedClassifier when available
    threads: Optional[int] = None
    quiet: bool = False


@torch.no_grad()
def collect_probabilities(model, dataset, batch_size: int, device, amp_dtype=None, workers: int = 0):
    """Softmax probabilities of every exit, ``[K, n, classes]`` float32 on the CPU, and the
    labels ``[n]`` (model in eval mode; restores its previous mode)."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    probs, labels = [], []
    try:
        for x, y in loader:
            with autocast(torch.device(device), amp_dtype):
                outs = model(x.to(device, non_blocking=True))
            probs.append(torch.stack([torch.softmax(o.float(), dim=1) for o in outs]).cpu())
            labels.append(y)
    finally:
        model.train(was_training)
    if not probs:
        raise UserError("evaluation split is empty")
    return torch.cat(probs, dim=1), torch.cat(labels)


def exit_accuracies(probs: torch.Tensor, labels: torch.Tensor) -> list[float]:
    return [float((p.argmax(1) == labels).double().mean()) for p in probs]


def q_sweep(q_min: float, q_max: float, q_step: float) -> list[float]:
    if not (0 < q_min <= q_max) or q_step <= 0:
        raise UserError(f"q sweep {q_min}..{q_max} step {q_step}: expected 0 < q-min <= q-max and q-step > 0")
    n = int(math.floor((q_max - q_min) / q_step + 1e-9)) + 1
    return [round(q_min + i * q_step, 10) for i in range(n)]


def budgeted_curve(val_probs, test_probs, test_labels, exit_costs: Sequence[float], qs: Sequence[float]) -> list[dict]:
    """Thresholds calibrated on the validation probabilities for each ``q``, applied to the
    test probabilities: accuracy, expected cost, exit fractions."""
    from ..inference.calibration import (assign_exits, calibrate_thresholds, exit_counts, exit_predictions,
                                         exit_proportions, expected_cost)

    K = test_probs.shape[0]
    n = test_probs.shape[1]
    points = []
    for q in qs:
        props = exit_proportions(q, K)
        thresholds = calibrate_thresholds(val_probs, props)
        exits = assign_exits(test_probs, thresholds)
        preds = exit_predictions(test_probs, exits)
        acc = float((preds == test_labels).double().mean())
        points.append({
            "q": q,
            "proportions": [float(p) for p in props],
            "thresholds": [float(t) if math.isfinite(t) else ("inf" if t > 0 else "-inf") for t in thresholds.tolist()],
            "test_accuracy": acc,
            "expected_macs": expected_cost(exits, exit_costs),
            "exit_fractions": [float(c) / n for c in exit_counts(exits, K)],
            "_thresholds": thresholds,
        })
    return points


def dominance_check(points: list[dict], exit_costs: Sequence[float], exit_accs: Sequence[float],
                    key: str = "expected_macs") -> dict:
    """For every exit k: the best budgeted accuracy at a cost <= cost_k (None when the curve
    starts above cost_k) and whether it is >= the exit's own accuracy."""
    per_exit = []
    ok = True
    compared = 0
    for k, (c, a) in enumerate(zip(exit_costs, exit_accs)):
        cands = [p["test_accuracy"] for p in points if p.get(key) is not None and p[key] <= c * (1 + 1e-9)]
        best = max(cands) if cands else None
        good = None if best is None else best >= a - 1e-12
        if good is not None:
            compared += 1
            ok = ok and good
        per_exit.append({"exit": k + 1, "macs": c, "exit_accuracy": a, "best_budgeted_accuracy_at_or_below": best,
                         "budgeted_at_least_as_accurate": good})
    return {"budgeted_at_least_as_accurate_as_every_exit": ok and compared > 0, "exits_compared": compared,
            "per_exit": per_exit}


def _budgeted_classifier():
    try:
        from .. import BudgetedClassifier
    except ImportError:
        return None
    return BudgetedClassifier


def _as_float(v) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.double().sum()) if v.numel() > 1 else float(v)
    if isinstance(v, (list, tuple)):
        return float(sum(v))
    return float(v)


def measure_budgeted(model, thresholds, dataset, labels, batch_size: int, device) -> dict:
    """Run ``msdnet_ops.BudgetedClassifier(model, thresholds).predict`` on ``dataset``:
    accuracy, measured multiply-adds per image, wall time per image, exit fractions."""
    Budgeted = _budgeted_classifier()
    clf = Budgeted(model, thresholds)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    correct = 0
    macs = 0.0
    wall = 0.0
    n = 0
    exits_all = []
    for x, y in loader:
        result = clf.predict(x.to(device))
        if hasattr(result, "predictions"):  # msdnet_ops.BudgetedResult
            preds, measured, seconds = result.predictions, result.macs, result.wall_time
            exits = result.exits
        else:
            preds, exits, measured, seconds = result[0], result[1], result[2], result[3]
        preds = torch.as_tensor(preds).cpu()
        correct += int((preds == y).sum())
        macs += _as_float(measured)
        wall += _as_float(seconds)
        exits_all.append(torch.as_tensor(exits).cpu())
        n += y.shape[0]
    exits = torch.cat(exits_all)
    K = len(thresholds)
    return {"measured_accuracy": correct / n, "measured_macs": macs / n, "measured_wall_s_per_image": wall / n,
            "measured_wall_s": wall,
            "measured_exit_fractions": [float((exits == k).sum()) / n for k in range(K)]}


def evaluate_run(opts: EvaluateOptions) -> dict:
    """Evaluate the run in ``opts.run_dir``; writes the JSON and the plots; returns the dict."""
    from . import distributed as D
    from .model_factory import build_model, impl_name
    from ..models.macs import exit_macs

    t_start = time.perf_counter()
    run_dir = Path(opts.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist: expected the --out DIR of 'msdnet train'")
    state = load_checkpoint(checkpoint_path(run_dir))
    config = state["config"]
    torch.set_num_threads(opts.threads or idle_aware_threads(1))
    device = D.choose_device(opts.device)

    data = load_data(opts.data or config["data"], val_size=config.get("val_size"), augment=False)
    if data.num_classes != config["num_classes"]:
        raise UserError(f"data set {data.spec} has {data.num_classes} classes but the run was trained with "
                        f"{config['num_classes']}")
    kwargs = config["model"]
    impl = opts.impl or "auto"
    model = build_model(kwargs, impl)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    input_size = tuple(config.get("input_size", data.input_size))
    # Costs are counted on the plain module tree (same structure and multiply-adds as any
    # implementation; exit_macs hooks its leaf modules).
    costs = [int(c) for c in exit_macs(build_model(kwargs, "plain"), input_size)]

    t0 = time.perf_counter()
    val_probs, val_labels = collect_probabilities(model, data.val, opts.batch_size, device)
    test_probs, test_labels = collect_probabilities(model, data.test, opts.batch_size, device)
    t_infer = time.perf_counter() - t0
    val_acc = exit_accuracies(val_probs, val_labels)
    test_acc = exit_accuracies(test_probs, test_labels)
    K = len(costs)
    exits = [{"exit": k + 1, "macs": costs[k], "val_accuracy": val_acc[k], "test_accuracy": test_acc[k]}
             for k in range(K)]

    qs = q_sweep(opts.q_min, opts.q_max, opts.q_step)
    points = budgeted_curve(val_probs, test_probs, test_labels, costs, qs)
    Budgeted = _budgeted_classifier() if opts.measure else None
    measured_note = None
    if Budgeted is not None:
        try:
            # real early exit needs the fused model (it can start a run and drop samples)
            lazy = model if hasattr(model, "start") else build_model(kwargs, "fused")
            if lazy is not model:
                lazy.load_state_dict(state["model"])
                lazy.to(device).eval()
            for p in points:
                p.update(measure_budgeted(lazy, p["_thresholds"], data.test, test_labels, opts.batch_size, device))
        except Exception as e:  # report, keep the expected curve
            measured_note = f"BudgetedClassifier failed: {type(e).__name__}: {e}"
            for p in points:
                for k in ("measured_accuracy", "measured_macs", "measured_wall_s_per_image", "measured_wall_s",
                          "measured_exit_fractions"):
                    p.pop(k, None)
    else:
        measured_note = ("measured multiply-adds need msdnet_ops.BudgetedClassifier (lazy early exit), which this "
                         "installation does not provide" if opts.measure else "measurement turned off (--no-measure)")
    for p in points:
        p.pop("_thresholds")
        p.setdefault("measured_macs", None)
        p.setdefault("measured_accuracy", None)
        p.setdefault("measured_wall_s_per_image", None)

    checks = dominance_check(points, costs, test_acc)
    checks["last_exit_test_accuracy"] = test_acc[-1]
    history = state.get("history", [])
    result = {
        "run_dir": str(run_dir),
        "checkpoint_epoch": int(state["epoch"]),
        "epochs": config.get("epochs"),
        "data": data.spec,
        "data_sizes": {"val": int(val_labels.numel()), "test": int(test_labels.numel())},
        "config_name": config.get("config_name"),
        "model": kwargs,
        "impl": impl_name(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "input_size": list(input_size),
        "exits": exits,
        "budgeted": {"qs": qs, "calibrated_on": "val", "applied_to": "test", "points": points,
                     "measured_available": Budgeted is not None and measured_note is None,
                     "note": measured_note},
        "checks": checks,
        "timing": {"train_s": history[-1]["elapsed_s"] if history else None, "inference_s": round(t_infer, 3)},
        "device": str(device),
    }
    from .plots import plot_anytime, plot_budgeted

    plot_anytime(run_dir / ANYTIME_PLOT, exits, title=f"{result['config_name']} on {data.name}: anytime prediction")
    plot_budgeted(run_dir / BUDGETED_PLOT, points, exits,
                  title=f"{result['config_name']} on {data.name}: budgeted batch classification")
    result["timing"]["evaluate_s"] = round(time.perf_counter() - t_start, 3)
    result["files"] = [EVALUATION_NAME, ANYTIME_PLOT, BUDGETED_PLOT]
    atomic_write_json(run_dir / EVALUATION_NAME, result)
    return result


def format_summary(result: dict) -> str:
    """A short text table of the evaluation (printed by the command line)."""
    lines = [f"{result['config_name']} ({result['impl']}, {result['parameters']:,} parameters) "
             f"after {result['checkpoint_epoch']} epochs on {result['data']}",
             "exit   MMACs   val acc %   test acc %"]
    for e in result["exits"]:
        lines.append(f"{e['exit']:>4} {e['macs'] / 1e6:>7.2f} {e['val_accuracy'] * 100:>11.2f} "
                     f"{e['test_accuracy'] * 100:>12.2f}")
    pts = result["budgeted"]["points"]
    best = max(pts, key=lambda p: (p["test_accuracy"], -p["expected_macs"]))
    lines.append(f"budgeted (q {pts[0]['q']}..{pts[-1]['q']}): test acc {min(p['test_accuracy'] for p in pts) * 100:.2f}"
                 f"..{max(p['test_accuracy'] for p in pts) * 100:.2f} % at "
                 f"{min(p['expected_macs'] for p in pts) / 1e6:.2f}..{max(p['expected_macs'] for p in pts) / 1e6:.2f} "
                 f"expected MMACs/image; best {best['test_accuracy'] * 100:.2f} % at {best['expected_macs'] / 1e6:.2f} "
                 f"MMACs (q {best['q']})")
    if result["budgeted"]["note"]:
        lines.append(f"note: {result['budgeted']['note']}")
    c = result["checks"]
    lines.append(f"budgeted curve at least as accurate as every exit at no more cost: "
                 f"{c['budgeted_at_least_as_accurate_as_every_exit']} ({c['exits_compared']} exits compared)")
    return "\n".join(lines)
