"""Python faces of the compiled memory-bound kernels.

* :mod:`msdnet_ops.kernels.cpu`: ``msdnet_ops._cpu_kernels`` (C++ / OpenMP), CPU tensors,
  float32 and float64.
* :mod:`msdnet_ops.kernels.cuda`: ``msdnet_ops._cuda_kernels`` (CUDA), CUDA tensors, float32,
  float64, float16 and bfloat16 (float32 accumulation; float64 accumulates in double).

Both modules have the same functions with the same signatures, taking torch tensors (semantics:
:mod:`msdnet_ops.reference`)::

    available() -> bool
    load_error() -> str | None
    channel_stats(x, eps) -> (mean, invstd)
    channel_stats_into(x, eps, mean, invstd) -> None
    channel_stats_backward_(x, mean, invstd, grad_mean, grad_invstd, grad_x) -> None
    affine_relu_into(x, scale, shift, out) -> None
    affine_relu_backward_(x, scale, shift, grad_z, grad_x, grad_scale, grad_shift,
                          accumulate=True) -> None
    gather_batch_into(src, index, out) -> None

The compiled modules are imported lazily (on the first call, or by ``available()``), so
importing either Python module never needs a GPU or a CUDA runtime. The callers
(:mod:`msdnet_ops.ops`) validate shapes, dtypes and devices; these wrappers read every tensor
through its strides (no copies) and raise ``RuntimeError`` when the compiled module is missing.
"""
