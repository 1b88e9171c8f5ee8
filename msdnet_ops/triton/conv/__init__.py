"""Convolutions as implicit GEMMs: forward, data gradient and weight gradient, each one kernel
shared by the two consumers of buffer channels:

* ``transform_conv``: ``conv2d(avg_pool(relu(scale*x+shift), pool), weight)``, the consumer
  of raw (pre-BN) channels, whose prologue applies the producer's BN+ReLU;
* ``conv``: ``conv2d(avg_pool(x, pool), weight)``, the consumer of activated channels
  (``TRANSFORM=False``: the prologue is the identity and costs nothing).

1x1 is a GEMM, 3x3 an implicit GEMM, stride 1/2, and ``pool == 2`` is the DenseNet transition
(2x2 average before a 1x1). ``x`` is read through its strides (a buffer prefix, NCHW or NHWC,
is never copied); outputs are written in place through theirs.
"""
from __future__ import annotations

import torch

from .. import _runtime as rt
from .args import Geometry, batch_chunks, check_conv_args, check_output
from .dgrad import launch_dgrad
from .forward import launch_forward
from .wgrad import launch_wgrad

__all__ = ["transform_conv", "transform_conv_into", "transform_conv_backward_",
           "conv_into", "conv_backward_", "Geometry", "check_conv_args"]


def _forward_into(x, scale, shift, weight, g: Geometry, out) -> None:
    check_output("out", out, g, x)
    if out.numel() == 0:
        return
    if g.Cin == 0:
        out.zero_()
        return
    for n0, n1 in batch_chunks(g.N, x, out):
        launch_forward(x[n0:n1], scale, shift, weight, g, out[n0:n1])


def new_weight_grad(weight, dtype, device):
    """The weight gradient's uninitialised accumulator (the dgrad kernel zeroes it): dense, in
    ``weight``'s strides. Apart so that a test can hand out one filled with garbage."""
    return torch.empty_like(weight, dtype=dtype, device=device)


def _backward(grad_out, x, scale, shift, weight, g: Geometry, grad_x, grad_scale, grad_shift,
              accumulate: bool = True):
    check_output("grad_out", grad_out, g, x)
    if grad_x is not None:
        rt.check_writable_grad("grad_x", grad_x, x.shape, x.device)
        if not accumulate and g.pool != 1 and (g.H % g.pool or g.W % g.pool):
            # pixels outside every complete pooling window get no gradient from the kernel:
            # zero them (and accumulate onto zeros) rather than leave them unwritten
            grad_x.zero_()
            accumulate = True
    sdt = rt.stats_dtype(x.dtype)
    empty = x.numel() == 0 or grad_out.numel() == 0
    dgrad = grad_x is not None or scale is not None
    # in weight's strides (the kernel writes any): returned as they are, no copy to match them;
    # zeroed by the first dgrad launch where there is one
    grad_w = (new_weight_grad if dgrad and not empty else torch.zeros_like)(
        weight, dtype=sdt, device=x.device)
    if empty:
        if grad_x is not None and not accumulate:
            grad_x.zero_()  # no output: no gradient, written as zeros
        return grad_w.to(weight.dtype)
    chunks = batch_chunks(g.N, grad_out, x, grad_x)
    for n0, n1 in chunks:
        gx = None if grad_x is None else grad_x[n0:n1]
        if dgrad:
            launch_dgrad(grad_out[n0:n1], x[n0:n1], scale, shift, weight, g, gx, grad_scale,
                         grad_shift, accumulate, zero=grad_w if n0 == 0 else None)
        # the autotuner zeroes its output between trials: one fresh buffer per chunk beyond the first
        part = grad_w if len(chunks) == 1 else torch.zeros_like(grad_w)
        launch_wgrad(grad_out[n0:n1], x[n0:n1], scale, shift, g, part)
        if part is not grad_w:
            grad_w += part
    return grad_w if grad_w.dtype == weight.dtype else grad_w.to(weight.dtype)


def transform_conv_into(x, scale, shift, weight, stride, padding, pool, out) -> None:
    """``out[...] = conv2d(avg_pool(relu(scale*x+shift), pool), weight, stride, padding)``.

    ``x`` (NCHW, any strides), ``scale``/``shift`` (per-channel, float32 or float64),
    ``weight`` ``[Cout, Cin, k, k]`` with ``k`` in (1, 3) and ``x``'s dtype; ``out``
    ``[N, Cout, Ho, Wo]`` of ``x``'s dtype, any strides (e.g. a channel slice of a buffer),
    written in place and nowhere else."""
    g = check_conv_args(x, scale, shift, weight, stride, padding, pool)
    _forward_into(x, scale, shift, weight, g, out)


def transform_conv(x, scale, shift, weight, stride, padding, pool):
    """Allocating variant of :func:`transform_conv_into` (contiguous output)."""
    g = check_conv_args(x, scale, shift, weight, stride, padding, pool)
    out = torch.empty((g.N, g.Cout, g.Ho, g.Wo), dtype=x.dtype, device=x.device)
    _forward_into(x, scale, shift, weight, g, out)
    return out


def transform_conv_backward_(grad_out, x, scale, shift, weight, stride, padding, pool,
                             grad_x, grad_scale, grad_shift, accumulate=True) -> torch.Tensor:
    """Backward of :func:`transform_conv_into`, as ``reference.transform_conv_backward_``.

    Accumulates (``+=``; ``accumulate=False``: overwrites) into ``grad_x`` (shape of ``x``, any
    strides and floating dtype, or None to skip it), ``grad_scale`` and ``grad_shift``
    (per-channel, float32; float64 for float64 ``x``). Returns ``grad_weight`` (shape of ``weight``, ``weight``'s dtype; accumulated
    in float32, float64 for float64)."""
    g = check_conv_args(x, scale, shift, weight, stride, padding, pool)
    sdt = rt.stats_dtype(x.dtype)
    rt.check_vector("grad_scale", grad_scale, g.Cin, x.device, sdt)
    rt.check_vector("grad_shift", grad_shift, g.Cin, x.device, sdt)
    return _backward(grad_out, x, scale, shift, weight, g, grad_x, grad_scale, grad_shift,
                     accumulate)


def conv_into(x, weight, stride, padding, pool, out) -> None:
    """``out[...] = conv2d(avg_pool(x, pool), weight, stride, padding)`` (no transform: ``x``
    holds activated channels), as ``reference.conv_into``; arguments as
    :func:`transform_conv_into`."""
    g = check_conv_args(x, None, None, weight, stride, padding, pool)
    _forward_into(x, None, None, weight, g, out)


def conv_backward_(grad_out, x, weight, stride, padding, pool, grad_x) -> torch.Tensor:
    """Backward of :func:`conv_into`, as ``reference.conv_backward_``: accumulates the input
    gradient into ``grad_x`` (shape of ``x``, any strides and floating dtype, or None to skip
    it) and returns ``grad_weight`` (``weight``'s dtype)."""
    g = check_conv_args(x, None, None, weight, stride, padding, pool)
    return _backward(grad_out, x, None, None, weight, g, grad_x, None, None)
