"""A training step captured in a CUDA graph and replayed: no Python and no launch cost per kernel.

On a fast GPU a small-image training step is bound by the host, not the device: on an H200,
MSDNet cifar100-anytime at batch 64 kept the device busy 18% of plain PyTorch's eager step and
4% of ours' (``benches/RESULTS-gpu.md``). Replaying the whole step (forward, loss, backward,
optimizer step) as one graph removes that cost for both; what is left is the kernels' time.

The step must not read a tensor value on the host (ours' models do not:
``python_tests/test_launch_count.py``) and must see the same shapes every time, so:

* the first ``warmup_steps`` calls run eagerly, on a side stream, as PyTorch's CUDA-graph notes
  prescribe: they make what is done once (autotuning, the fused/unfused choices, cuDNN's
  search, the optimizer's state) before anything is captured;
* the next call captures the step for its batch shape and replays it;
* a batch of another shape (the last, smaller batch of an epoch) runs eagerly: same result,
  only slower, said once in the log;
* a changed learning rate (or any optimizer hyperparameter) is captured again at the next call:
  the captured optimizer step holds them as constants.

Returned tensors (loss, outputs) are the graph's own: the next call overwrites them.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

log = logging.getLogger(__name__)

LossFn = Callable[[object, torch.Tensor], torch.Tensor]


def _hyperparameters(optimizer: torch.optim.Optimizer) -> tuple:
    """What a captured optimizer step holds as constants: each group's settings."""
    return tuple(tuple(sorted((k, v) for k, v in group.items() if k != "params"
                              and isinstance(v, (int, float, bool, type(None)))))
                 for group in optimizer.param_groups)


def _detached(outputs):
    """``outputs`` (a tensor, or a list/tuple of them, as the models return) detached."""
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_detached(o) for o in outputs)
    return outputs


def _model_device(model: torch.nn.Module) -> torch.device:
    params = list(model.parameters())
    if not params:
        raise ValueError("model: expected a module with parameters to train, got none")
    devices = {p.device for p in params}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise ValueError(f"model: CUDA graphs need every parameter on one CUDA device, got "
                         f"{', '.join(sorted(map(str, devices)))}")
    return params[0].device


class CudaGraphTrainStep:
    """``step(x, y)`` runs ``loss = loss_fn(model(x), y); loss.backward(); optimizer.step()``
    (after ``optimizer.zero_grad(set_to_none=True)``), captured in a CUDA graph after
    ``warmup_steps`` eager calls, and returns ``(loss, outputs)``.

    ``autocast_dtype`` (``torch.bfloat16`` or ``torch.float16``) runs the forward under autocast;
    a float16 gradient scaler is not supported (it reads the gradients' finiteness on the host).
    Distributed (DDP) models are not supported either.

    >>> step = CudaGraphTrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    >>> for x, y in loader:
    ...     loss, outputs = step(x, y)
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: LossFn,
                 *, warmup_steps: int = 3, autocast_dtype: Optional[torch.dtype] = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise ValueError("model: DistributedDataParallel models are not supported (their "
                             "gradient all-reduce is not captured); train them eagerly")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable (outputs, target) -> loss, got "
                            f"{type(loss_fn).__name__}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps: expected an integer >= 1, got {warmup_steps!r}")
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype: expected None, torch.bfloat16 or torch.float16, "
                             f"got {autocast_dtype}")
        self.device = _model_device(model)
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.autocast_dtype = autocast_dtype
        self.warmup_left = warmup_steps
        self.captures = 0          # how many times the step was captured
        self.eager_steps = 0       # steps run eagerly after the warm-up (other shapes)
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._key = None           # (input shapes/dtypes, hyperparameters) of the graph
        self._static_x = self._static_y = self._static_out = None
        self._warned_shape = False

    # ---- the step itself, eager or inside the capture
    def _step(self, x: torch.Tensor, y: torch.Tensor):
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            outputs = self.model(x)
            loss = self.loss_fn(outputs, y)
        loss.backward()
        self.optimizer.step()
        # detached: outputs kept by the caller must not keep this step's autograd graph alive
        # (its gradient-accumulation nodes would then meet the next step on another stream)
        return loss.detach(), _detached(outputs)

    def _on_side_stream(self, x, y):
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            result = self._step(x, y)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return result

    def _capture(self, x, y, key) -> None:
        self._graph = None  # frees the previous graph's memory pool first
        self._static_x, self._static_y = x.clone(), y.clone()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph):
            self._static_out = self._step(self._static_x, self._static_y)
        self._graph, self._key = graph, key
        self.captures += 1

    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        for t, name in ((x, "x"), (y, "y")):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
            if t.device.type not in ("cpu", "cuda") or (t.device.type == "cuda" and t.device != self.device):
                raise ValueError(f"{name}: expected a tensor on the CPU or on {self.device}, got {t.device}")
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.warmup_left > 0:
            self.warmup_left -= 1
            return self._on_side_stream(x, y)
        shapes = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype)
        if self._graph is not None and shapes != self._key[0]:
            if not self._warned_shape:
                self._warned_shape = True
                log.info("CudaGraphTrainStep: a batch of shape %s (captured: %s) runs eagerly; "
                         "same result, slower", tuple(x.shape), self._key[0][0])
            self.eager_steps += 1
            return self._on_side_stream(x, y)
        key = (shapes, _hyperparameters(self.optimizer))
        if key != self._key:
            self._capture(x, y, key)  # capturing records the kernels; the replay below runs them
        else:
            self._static_x.copy_(x)
            self._static_y.copy_(y)
        self._graph.replay()
        return self._static_out
