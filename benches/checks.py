"""Agreement checks: before anything is timed, ours and every baseline must compute the same
thing (to a loose tolerance: this catches wrong results, not rounding differences).

The error measure is ``max|got - want| / max|want|`` over a tensor (the plain-PyTorch result
is ``want``). A failed check raises :class:`CheckFailed`: its section of the report is marked
failed and ``run.py`` exits with status 1; nothing of that case is timed.
"""
from __future__ import annotations

import torch

# float32 on a GPU: cuDNN convolutions use TF32 by default; deep networks add up rounding.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 5e-2, torch.bfloat16: 1.5e-1,
             torch.float16: 1e-1}
# budgeted inference: share of samples whose prediction must equal the plain network's
# prediction at the exit they left by (near-ties may flip under rounding)
MIN_PREDICTION_AGREEMENT = 0.97


class CheckFailed(AssertionError):
    """Ours and a baseline disagree."""


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        raise CheckFailed(f"shape {tuple(got.shape)} != expected {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        return float("inf")
    scale = want.abs().max().item() if want.numel() else 0.0
    return (got - want).abs().max().item() / max(scale, 1e-30) if got.numel() else 0.0


def compare(label: str, got, want, dtype=torch.float32) -> float:
    """Largest relative error over the tensors of ``got`` vs ``want`` (sequences of equal
    length); raises :class:`CheckFailed` above the tolerance of ``dtype``."""
    got, want = list(got), list(want)
    if len(got) != len(want):
        raise CheckFailed(f"{label}: {len(got)} outputs, expected {len(want)}")
    tol = TOLERANCE.get(dtype, 5e-2)
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        try:
            err = max_rel_err(g, w)
        except CheckFailed as e:
            raise CheckFailed(f"{label}, output {i}: {e}") from None
        if not err <= tol:
            raise CheckFailed(f"{label}, output {i}: max relative error {err:.3g} > {tol:g} "
                              f"({dtype}): the outputs disagree, not timed")
        worst = max(worst, err)
    return worst


# --------------------------------------------------------------------------- per benchmark

def check_op(bench, op: str, dtype=torch.float32) -> float:
    """An op of :class:`cases.OpBench`: ours vs the pure-PyTorch reference."""
    return compare(f"op {op!r} ({bench.shape.name})", bench.outputs(op, "ours"),
                   bench.outputs(op, "plain"), dtype)


def check_layer(bench, variants, dtype=torch.float32) -> float:
    """A :class:`cases.LayerBench` or :class:`cases.MSDLayerBench`: every variant's forward
    output vs plain, and (dense layers) its parameter gradients vs plain."""
    name = bench.shape.name
    want = bench.outputs("plain")
    worst = 0.0
    for v in variants:
        if v != "plain":
            worst = max(worst, compare(f"layer {name!r} forward, {v} vs plain",
                                       bench.outputs(v), want, dtype))
    if hasattr(bench, "param_grads"):
        want = bench.param_grads("plain")
        for v in variants:
            if v != "plain":
                worst = max(worst, compare(f"layer {name!r} parameter gradients, {v} vs plain",
                                           bench.param_grads(v), want, dtype))
    return worst


def _as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def check_models(name: str, models: dict, dtype=torch.float32) -> float:
    """``models``: variant -> (model, x, y). The logits (every exit for MSDNet) of a training-
    mode forward of each variant vs plain's (one at a time, graphs freed)."""
    def logits(v):
        m, x, _ = models[v]
        m.train()
        return [o.detach().clone() for o in _as_list(m(x))]
    want = logits("plain")
    worst = 0.0
    for v in models:
        if v != "plain":
            worst = max(worst, compare(f"model {name!r} training forward, {v} vs plain",
                                       logits(v), want, dtype))
    return worst


def check_eval(name: str, ours, plain, x, dtype=torch.float32) -> float:
    """Eval-mode logits of two models on ``x`` (every exit)."""
    ours.eval()
    plain.eval()
    with torch.no_grad():
        return compare(f"model {name!r} eval forward, ours vs plain", _as_list(ours(x)),
                       _as_list(plain(x)), dtype)


def check_budgeted(label: str, result, plain_probs: torch.Tensor) -> float:
    """A :class:`msdnet_ops.BudgetedResult` vs the plain network: each sample's prediction
    must be the plain network's argmax at the exit the sample left by. ``plain_probs``:
    (exits, N, classes). Returns the share of samples that agree."""
    n = result.predictions.shape[0]
    exits = result.exits.cpu()
    want = plain_probs[exits, torch.arange(n)].argmax(1)
    agree = (result.predictions.cpu() == want).double().mean().item()
    if agree < MIN_PREDICTION_AGREEMENT:
        raise CheckFailed(f"budgeted {label!r}: {agree:.1%} of the predictions equal the plain "
                          f"network's at the same exit (< {MIN_PREDICTION_AGREEMENT:.0%})")
    return agree


def check_block(ours, plain, x, dtype=torch.float32) -> float:
    """Training-mode output of a dense block, ours vs plain."""
    ours.train()
    plain.train()
    with torch.no_grad():
        return compare("dense block forward, ours vs plain", [ours(x)], [plain(x)], dtype)
