"""Which Triton kernel specialisations the models launch on a GPU, found without one.

Each model runs a training step (forward + backward) and an inference forward on the CPU with
``MSDNET_OPS_BACKEND=triton`` inside ``msdnet_ops.triton._runtime.capturing``: every launch is
decided as on a GPU (blocks, autotune candidates, TF32, multiprocessor count) and recorded
instead of run. A launch becomes a :class:`Specialisation`: what ``triton.compile`` needs
(signature, constexprs, divisibility attributes), found by Triton's own binder, one per
autotune candidate config. Values computed by the skipped kernels are garbage; nothing here
depends on them.

MSDNet convolves activated buffer channels (``conv_into``/``conv_backward_``, the
``TRANSFORM=False`` kernels); DenseNet always transforms as it reads. Each ``TRANSFORM=True``
launch also gets its ``TRANSFORM=False`` twin (placeholders in place of the vectors, as the
launchers pass them), marked ``twin`` in ``used_by``, so that a plain ``msdnet_ops.conv`` on
any of those shapes compiles spill-free as well.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass, field

import torch

# batch sizes: those benches/gpu.py times on CIFAR (64); ImageNet models at 16, not 32 (their
# plain CPU stem dominates the capture time): Triton specialises integers on divisibility by 16,
# which 16 and 32 share, and both channel-statistics variants (one pass, chunked) occur at either
MODELS = (("densenet-bc100", 64, 32), ("densenet121", 16, 224),
          ("msdnet-cifar10-anytime", 64, 32), ("msdnet-cifar100-anytime", 64, 32),
          ("msdnet-cifar10-budgeted", 64, 32), ("msdnet-cifar100-budgeted", 64, 32),
          ("msdnet-imagenet-step4", 16, 224), ("msdnet-imagenet-step7", 16, 224))  # (name, batch, image)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
VECTOR_ARGS = ("scale_ptr", "shift_ptr", "gscale_ptr", "gshift_ptr")
_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


class _Pointer:
    """A tensor argument as Triton's specialisation sees it: dtype and 16-byte alignment."""

    def __init__(self, dtype, aligned: bool):
        self.dtype, self.aligned = dtype, aligned

    def data_ptr(self) -> int:
        return 0 if self.aligned else 8

    def key(self):
        return ("ptr", str(self.dtype), self.aligned)


@dataclass
class Specialisation:
    """One compiled kernel: ``kernel`` (``module:name``) with ``signature``/``constexprs``/
    ``attrs`` (``triton.compile``'s ``ASTSource`` fields) and one ``config``."""
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    config: dict
    gemm: bool
    used_by: set = field(default_factory=set)

    def key(self):
        return (self.kernel, tuple(self.signature.items()), tuple(sorted(self.constexprs.items(), key=str)),
                tuple(sorted((k, str(v)) for k, v in self.attrs.items())), tuple(sorted(self.config.items())))

    @property
    def dtype(self) -> str:
        """The feature dtype (of X_DTYPE, else of the first pointer), as torch names it."""
        x = self.constexprs.get(_path(self, "X_DTYPE"))
        name = str(x) if x is not None else next(v[1:] for v in self.signature.values() if v.startswith("*"))
        return _TORCH_NAMES.get(name, name)

    def meta(self, name):
        return self.constexprs.get(_path(self, name))


def _path(spec: Specialisation, name: str):
    names = list(spec.signature)
    return (names.index(name),) if name in names else None


def kernel_id(kernel) -> str:
    return f"{kernel.fn.__module__}:{kernel.fn.__name__}"


def load_kernel(kid: str):
    module, name = kid.split(":")
    return getattr(importlib.import_module(module), name)


def specialise(kernel, args, meta, config, backend):
    """(signature, constexprs, attrs) of ``kernel`` launched with ``args``/``meta``/``config``,
    as Triton's launcher computes them for ``backend``."""
    from triton.runtime.jit import create_function_from_signature
    kw = dict(meta, **config)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*args, **kw)
    _, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, spec, opts)
    return signature, constexprs, attrs


class Recorder:
    """The ``record`` callable of ``capturing``: collects :class:`Specialisation`s."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        self.backend = make_backend(GPUTarget("cuda", 90, 32))  # specialisation is arch-independent
        self.specs: dict = {}
        self.label = ""

    def __call__(self, kernel, args, meta, configs, tuning):
        args = [_Pointer(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args]
        self._add(kernel, args, meta, configs, tuning is not None, self.label)
        if meta.get("TRANSFORM"):
            self._add(kernel, *self._twin(kernel, args, meta), configs, tuning is not None, self.label + " twin")

    @staticmethod
    def _twin(kernel, args, meta):
        names = kernel.arg_names
        placeholder = args[names.index("w_ptr" if "w_ptr" in names else "gw_ptr")]
        args = [placeholder if n in VECTOR_ARGS else a for n, a in zip(names, args)]
        meta = dict(meta, TRANSFORM=False)
        if "HAS_GX" in meta:
            meta["HAS_GX"] = True  # conv_backward_ always has its input gradient to add
        return args, meta

    def _add(self, kernel, args, meta, configs, gemm, label):
        for config in configs:
            sig, const, attrs = specialise(kernel, args, meta, config, self.backend)
            spec = Specialisation(kernel_id(kernel), sig, const, attrs, dict(config), gemm)
            spec = self.specs.setdefault(spec.key(), spec)
            spec.used_by.add(label)


@contextlib.contextmanager
def environment(**values):
    """Within the block, the environment variables ``values`` are set; restored after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def triton_backend_on_cpu():
    """Within the block, msdnet_ops runs the ``triton`` backend on CPU tensors (the interpreter
    flag it requires is set; under ``capturing`` nothing is interpreted: every launch is
    recorded, not run). The environment is restored after."""
    return environment(MSDNET_OPS_BACKEND="triton", TRITON_INTERPRET="1")


@contextlib.contextmanager
def fused_unfused_trials():
    """Within the block, each transform-convolution shape first runs both ways, fused and
    unfused, once each and untimed, as ``auto`` tries them on a GPU (``msdnet_ops.conv_choice``),
    and then runs unfused (the choice a GPU made for most shapes: 101 of DenseNet-BC-100's 104).
    The trials' scratch gradients are laid out unlike the buffers, and the unfused path launches
    kernels of its own, so both add specialisations that a GPU's first step would otherwise
    compile. Costs CPU convolutions (the unfused trials and runs)."""
    from msdnet_ops import conv_choice
    saved_choose = conv_choice.choose
    tried = set()

    def choose(key, trial, device):
        if key not in tried:
            tried.add(key)
            for path in conv_choice.PATHS:
                trial(path)
        return "unfused"
    conv_choice.choose = choose
    try:
        with environment(MSDNET_OPS_TRANSFORM_CONV="timed"):
            yield
    finally:
        conv_choice.choose = saved_choose


def capture(models=MODELS, dtypes=DTYPES, sms: int = 132, log=print, trials: bool = False) -> list:
    """Every specialisation that ``models`` launch in a training step and an inference forward
    (one per autotune candidate config), for each of ``dtypes``; with ``trials``, also those of
    the fused/unfused trials (:func:`fused_unfused_trials`)."""
    from benches import cases
    from msdnet_ops.triton import _runtime
    rec = Recorder()
    passes = [("", contextlib.nullcontext)] + ([(" trials", fused_unfused_trials)] if trials else [])
    with triton_backend_on_cpu(), _runtime.capturing(rec, sms=sms):
        for name, batch, image in models:
            for dtype in dtypes:
                before = len(rec.specs)
                for suffix, context in passes:  # the fused path, then the trials and unfused path
                    with context():
                        model, fmt = cases.build_model(name, "ours", "cpu", dtype)
                        x, y = cases.model_input(name, batch, "cpu", dtype, fmt, image=image)
                        rec.label = f"{name} train {str(dtype)[6:]}{suffix}"
                        model.train()
                        cases.loss_of(model(x), y).backward()
                        rec.label = f"{name} infer {str(dtype)[6:]}{suffix}"
                        cases.infer_fn(model, x)()
                        del model, x, y
                log(f"[capture] {name} {str(dtype)[6:]}: {len(rec.specs) - before} new specialisations")
    return list(rec.specs.values())
