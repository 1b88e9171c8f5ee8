"""Evaluation of a trained run: the anytime table and the budgeted accuracy-cost curve.

``evaluate_run(DIR)`` loads ``DIR/checkpoint.pt`` (``weights_only=True``) and the data set it
was trained on, then

* runs every exit on the validation and test splits (softmax probabilities per exit);
* **anytime**: accuracy of each exit on both splits, with the cumulative multiply-adds per
  image to reach it (:func:`msdnet_ops.models.macs.exit_macs`);
* **budgeted batch classification**: for each ``q`` of a sweep (default 0.05 .. 1.95, step
  0.05, as in the paper), exit proportions ``P_k ~ q^k``, thresholds calibrated on the
  validation split and applied to the test split; accuracy and *expected* multiply-adds
  (``sum_k fraction_k * cost_k``). Unless ``--no-measure``, the same thresholds also run
  through :class:`msdnet_ops.BudgetedClassifier` (real early exit) on the test split, whose
  *measured* multiply-adds and wall time are reported beside the expected ones;
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

from . import UserError
from .data import load_data
from .distributed import choose_device, threads_per_process
from .model_factory import build_model, impl_name
from .precision import autocast
from .run_files import (atomic_write_json, check_checkpoint_matches_run, check_run_dir, checkpoint_path,
                        load_checkpoint, read_run_config)

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
    measure: bool = True  # also run the real early exit (BudgetedClassifier) and measure its cost
    threads: Optional[int] = None
    quiet: bool = False
    force: bool = False  # evaluate a checkpoint whose configuration differs from run.json


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


def measure_budgeted(model, thresholds, dataset, batch_size: int, device) -> dict:
    """Run ``msdnet_ops.BudgetedClassifier(model, thresholds).predict`` on ``dataset``:
    accuracy, measured multiply-adds per image, wall time per image, exit fractions."""
    from ..inference.budgeted import BudgetedClassifier

    clf = BudgetedClassifier(model, thresholds)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    correct, macs, wall, n = 0, 0, 0.0, 0
    exits_all = []
    for x, y in loader:
        result = clf.predict(x.to(device))
        correct += int((result.predictions == y).sum())
        macs += result.macs
        wall += result.wall_time
        exits_all.append(result.exits)
        n += y.shape[0]
    exits = torch.cat(exits_all)
    return {"measured_accuracy": correct / n, "measured_macs": macs / n, "measured_wall_s_per_image": wall / n,
            "measured_wall_s": wall,
            "measured_exit_fractions": [float((exits == k).sum()) / n for k in range(len(thresholds))]}


def evaluate_run(opts: EvaluateOptions) -> dict:
    """Evaluate the run in ``opts.run_dir``; writes the JSON and the plots; returns the dict."""
    t_start = time.perf_counter()
    run_dir = Path(opts.run_dir)
    check_run_dir(run_dir)
    state = load_checkpoint(checkpoint_path(run_dir))
    if not opts.force:
        check_checkpoint_matches_run(state, read_run_config(run_dir), run_dir)
    config = state["config"]
    torch.set_num_threads(opts.threads or threads_per_process())
    device = choose_device(opts.device)
    data = load_data(opts.data or config["data"], val_size=config.get("val_size"), augment=False)
    if data.num_classes != config["num_classes"]:
        raise UserError(f"data set {data.spec} has {data.num_classes} classes but the run was trained with "
                        f"{config['num_classes']}")
    model = _trained_model(config["model"], opts.impl or "auto", state, device)
    input_size = tuple(config.get("input_size", data.input_size))

    t0 = time.perf_counter()
    val_probs, val_labels = collect_probabilities(model, data.val, opts.batch_size, device)
    test_probs, test_labels = collect_probabilities(model, data.test, opts.batch_size, device)
    t_infer = time.perf_counter() - t0
    costs = _exit_costs(config["model"], input_size)
    exits = [{"exit": k + 1, "macs": cost, "val_accuracy": val, "test_accuracy": test} for k, (cost, val, test)
             in enumerate(zip(costs, exit_accuracies(val_probs, val_labels), exit_accuracies(test_probs, test_labels)))]
    points = budgeted_curve(val_probs, test_probs, test_labels, costs, q_sweep(opts.q_min, opts.q_max, opts.q_step))
    if opts.measure:
        lazy = model if hasattr(model, "start") else _trained_model(config["model"], "fused", state, device)
        for p in points:
            p.update(measure_budgeted(lazy, p["_thresholds"], data.test, opts.batch_size, device))
    for p in points:
        del p["_thresholds"]
        for key in ("measured_macs", "measured_accuracy", "measured_wall_s_per_image"):
            p.setdefault(key, None)

    history = state.get("history", [])
    result = {
        "run_dir": str(run_dir),
        "checkpoint_epoch": int(state["epoch"]),
        "epochs": config.get("epochs"),
        "data": data.spec,
        "data_sizes": {"val": int(val_labels.numel()), "test": int(test_labels.numel())},
        "config_name": config.get("config_name"),
        "model": config["model"],
        "impl": impl_name(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "input_size": list(input_size),
        "exits": exits,
        "budgeted": {"qs": [p["q"] for p in points], "calibrated_on": "val", "applied_to": "test", "points": points,
                     "measured_available": opts.measure,
                     "note": None if opts.measure else "measurement turned off (--no-measure)"},
        "checks": dict(dominance_check(points, costs, [e["test_accuracy"] for e in exits]),
                       last_exit_test_accuracy=exits[-1]["test_accuracy"]),
        "timing": {"train_s": history[-1]["elapsed_s"] if history else None, "inference_s": round(t_infer, 3)},
        "device": str(device),
    }
    _write_outputs(run_dir, result, data.name, t_start)
    return result


def _trained_model(kwargs: dict, impl: str, state: dict, device):
    """The checkpoint's weights in a fresh model of implementation ``impl``, in eval mode."""
    model = build_model(kwargs, impl)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def _exit_costs(kwargs: dict, input_size) -> list[int]:
    """Cumulative multiply-adds per image to reach each exit, counted on the plain module tree
    (same structure and multiply-adds as any implementation; exit_macs hooks its leaf modules)."""
    from ..models.macs import exit_macs

    return [int(c) for c in exit_macs(build_model(kwargs, "plain"), input_size)]


def _write_outputs(run_dir: Path, result: dict, data_name: str, t_start: float) -> None:
    """The two plots, then evaluation.json (with the total evaluation time)."""
    from .plots import plot_anytime, plot_budgeted

    name = result["config_name"]
    plot_anytime(run_dir / ANYTIME_PLOT, result["exits"], title=f"{name} on {data_name}: anytime prediction")
    plot_budgeted(run_dir / BUDGETED_PLOT, result["budgeted"]["points"], result["exits"],
                  title=f"{name} on {data_name}: budgeted batch classification")
    result["timing"]["evaluate_s"] = round(time.perf_counter() - t_start, 3)
    result["files"] = [EVALUATION_NAME, ANYTIME_PLOT, BUDGETED_PLOT]
    atomic_write_json(run_dir / EVALUATION_NAME, result)


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
    lines.append(dominance_sentence(result["checks"]))
    measured = [p for p in pts if p["measured_macs"] is not None]
    if measured:
        saved = [1 - p["measured_macs"] / p["expected_macs"] for p in measured]
        lines.append(f"Measured with real early exit, the budgeted classifier costs {min(saved) * 100:.0f}-"
                     f"{max(saved) * 100:.0f} % fewer multiply-adds than expected: it computes only the feature "
                     "maps each exit needs, while the expected cost counts what a full forward pass computes up "
                     "to the exit.")
    return "\n".join(lines)


def dominance_sentence(checks: dict) -> str:
    """What :func:`dominance_check` found, as a sentence."""
    compared = [e for e in checks["per_exit"] if e["budgeted_at_least_as_accurate"] is not None]
    if not compared:
        return "No budgeted point is as cheap as any single exit, so none was compared with them."
    worse = [e for e in compared if not e["budgeted_at_least_as_accurate"]]
    skipped = [e["exit"] for e in checks["per_exit"] if e["budgeted_at_least_as_accurate"] is None]
    if worse:
        return "Early exit loses accuracy here: " + "; ".join(
            f"at the cost of exit {e['exit']} ({e['macs'] / 1e6:.2f} MMACs) the best budgeted point reaches "
            f"{e['best_budgeted_accuracy_at_or_below'] * 100:.2f} %, below the exit's "
            f"{e['exit_accuracy'] * 100:.2f} %" for e in worse) + "."
    names = ", ".join(str(e["exit"]) for e in compared)
    sentence = (f"Early exit pays off: for exit{'s' if len(compared) > 1 else ''} {names}, some budgeted point is at "
                "least as accurate as the exit at no more expected multiply-adds.")
    if skipped:
        sentence += (f" (Exit{'s' if len(skipped) > 1 else ''} {', '.join(map(str, skipped))}: every budgeted "
                     "point costs more, so not compared.)")
    return sentence
