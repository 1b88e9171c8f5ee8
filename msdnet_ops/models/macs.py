"""Multiply-add and parameter counts of an MSDNet, per exit, measured from the module tree.

Counting rules (those of the reference's ``op_counter.py``, which produced the paper's
figures), per sample (batch 1):

* ``Conv2d``: ``in * out * kh * kw * H_out * W_out / groups`` (a conv bias is not counted);
* ``ReLU``: one per element of its input;
* ``AvgPool2d`` / ``MaxPool2d``: kernel area per output element;
* ``Linear``: ``weights + bias`` (``in*out + out``);
* ``BatchNorm2d`` (and ``Dropout``/``Identity``/``Flatten``): nothing (BN folds into the conv
  at inference);
* ``torch.cat`` and other functional glue: nothing.

Any other leaf module raises ``TypeError`` (so a new module type can never be silently counted
as free).  The reference measures pooling with the *height* for both output sides; we use the
real output shape, which is the same for square inputs.

The counts come from a forward pass with forward hooks on every leaf module, run on the
``meta`` device through ``torch.func.functional_call`` (no memory, no arithmetic, the
model's parameters are untouched).

Exit ``b`` costs everything computed before its logits come out: blocks ``0..b`` *and* the
classifiers ``0..b`` (a sample that leaves at exit ``b`` was evaluated by every earlier
classifier).  ``MacsReport.exit_macs[b]`` is that cumulative number and is the cost to use in
budgeted accounting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

__all__ = ["MacsReport", "count_macs", "exit_macs", "count_parameters", "exit_parameters",
           "leaf_macs"]

_FREE = (nn.BatchNorm2d, nn.BatchNorm1d, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten)


def leaf_macs(module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    """Multiply-adds of one leaf module for one forward call (per sample: divided by batch)."""
    x = inputs[0]
    batch = x.shape[0] if x.dim() > 0 else 1
    if isinstance(module, nn.Conv2d):
        h_out, w_out = output.shape[-2], output.shape[-1]
        kh, kw = module.kernel_size
        total = module.in_channels * module.out_channels * kh * kw * h_out * w_out
        return total // module.groups
    if isinstance(module, nn.ReLU):
        return x.numel() // batch
    if isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
        k = module.kernel_size
        kh, kw = (k, k) if isinstance(k, int) else tuple(k)
        return (output.numel() // batch) * kh * kw
    if isinstance(module, nn.Linear):
        return module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
    if isinstance(module, _FREE):
        return 0
    raise TypeError(f"count_macs: no counting rule for leaf module {type(module).__name__}")


@dataclass(frozen=True)
class MacsReport:
    """Per-sample multiply-add counts of one model at one input size.

    * ``input_size``: ``(C, H, W)``;
    * ``block_macs[b]``: MACs of ``blocks[b]`` (the stem is in block 0);
    * ``classifier_macs[b]``: MACs of ``classifier[b]``;
    * ``step_macs[b] = block_macs[b] + classifier_macs[b]``: extra work to go from exit ``b-1``
      to exit ``b`` (no lazy evaluation);
    * ``exit_macs[b] = sum(step_macs[:b+1])``: cumulative cost of reaching exit ``b``;
    * ``module_macs``: MACs of every leaf module by qualified name (for finer accounting,
      e.g. a lazy evaluator summing what it really ran).
    """

    input_size: Tuple[int, int, int]
    block_macs: Tuple[int, ...]
    classifier_macs: Tuple[int, ...]
    step_macs: Tuple[int, ...]
    exit_macs: Tuple[int, ...]
    module_macs: Dict[str, int]


def _check_model(model: nn.Module) -> Tuple[int, nn.ModuleList, nn.ModuleList]:
    blocks = getattr(model, "blocks", None)
    classifier = getattr(model, "classifier", None)
    if not isinstance(blocks, nn.ModuleList) or not isinstance(classifier, nn.ModuleList):
        raise TypeError("model: expected an MSDNet with ModuleLists `blocks` and `classifier`, "
                        f"got {type(model).__name__}")
    if len(blocks) != len(classifier) or len(blocks) == 0:
        raise ValueError(f"model: expected as many classifiers as blocks (>0), got {len(blocks)} "
                         f"blocks and {len(classifier)} classifiers")
    return len(blocks), blocks, classifier


def count_macs(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> MacsReport:
    """Measure the per-sample multiply-adds of every block, classifier and exit of ``model``
    (an :class:`MSDNetPlain` or any module with the same ``blocks``/``classifier`` layout whose
    ``forward`` runs every block and classifier) for inputs of ``input_size = (C, H, W)``."""
    n_exits, _, _ = _check_model(model)
    if len(tuple(input_size)) != 3 or any(int(v) < 1 for v in input_size):
        raise ValueError(f"input_size: expected (C, H, W) with positive sizes, got {input_size!r}")
    input_size = tuple(int(v) for v in input_size)

    leaves = {name: m for name, m in model.named_modules() if len(list(m.children())) == 0}
    counts: Dict[str, int] = {name: 0 for name in leaves}
    handles = []
    for name, m in leaves.items():
        def hook(mod, inp, out, _name=name):
            counts[_name] += leaf_macs(mod, inp, out)
        handles.append(m.register_forward_hook(hook))

    tensors = {k: v.to("meta") for k, v in model.named_parameters(remove_duplicate=False)}
    tensors.update({k: v.to("meta") for k, v in model.named_buffers(remove_duplicate=False)})
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            dtype = next(iter(tensors.values())).dtype if tensors else torch.float32
            x = torch.zeros((1,) + input_size, device="meta", dtype=dtype)
            torch.func.functional_call(model, tensors, (x,), strict=False)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode

    block_macs = [0] * n_exits
    cls_macs = [0] * n_exits
    for name, v in counts.items():
        parts = name.split(".")
        if parts[0] == "blocks":
            block_macs[int(parts[1])] += v
        elif parts[0] == "classifier":
            cls_macs[int(parts[1])] += v
        elif v:
            raise ValueError(f"count_macs: module {name} is outside blocks/classifier")
    step = [b + c for b, c in zip(block_macs, cls_macs)]
    cum, total = [], 0
    for s in step:
        total += s
        cum.append(total)
    return MacsReport(input_size=input_size, block_macs=tuple(block_macs),
                      classifier_macs=tuple(cls_macs), step_macs=tuple(step),
                      exit_macs=tuple(cum), module_macs=counts)


def exit_macs(model: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> List[int]:
    """Cumulative per-sample multiply-adds to reach every exit (earlier classifiers included)."""
    return list(count_macs(model, input_size).exit_macs)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def exit_parameters(model: nn.Module) -> List[int]:
    """Cumulative parameters needed up to every exit: blocks ``0..b`` and classifiers ``0..b``.
    The last entry equals :func:`count_parameters` for an MSDNet."""
    n_exits, blocks, classifier = _check_model(model)
    out, total = [], 0
    for b in range(n_exits):
        total += count_parameters(blocks[b]) + count_parameters(classifier[b])
        out.append(total)
    return out
