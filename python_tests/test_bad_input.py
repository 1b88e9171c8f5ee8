"""Bad input to every public op and module: the right exception, with a message that names the
argument.

Conventions checked (those of ``msdnet_ops.validation``): a wrong dtype or a non-tensor raises
``TypeError``; a wrong rank, channel count, size, device or value raises ``ValueError``; an op's
message starts with ``"<argument>: "``, a module's or helper's names the argument as a word.

"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import pytest
import torch

import msdnet_ops as M
from msdnet_ops import ops

F32, F64 = torch.float32, torch.float64
NAN = float("nan")


@dataclasses.dataclass
class Case:
    """``call()`` must raise ``exc`` naming ``name``."""
    id: str
    call: Callable
    name: str
    exc: type = ValueError
    op: bool = False       # an op: the message starts with "name: "
    backend: str = "cpu"

    def check(self, use_backend):
        use_backend(self.backend)
        with pytest.raises(self.exc) as info:
            self.call()
        message = str(info.value)
        pattern = rf"^{re.escape(self.name)}: " if self.op else \
            rf"(?<![\w.]){re.escape(self.name)}\b"
        assert re.search(pattern, message), f"the message does not name {self.name!r}: {message!r}"


# ============================================================================= ops

OP_ARGUMENTS = {
    "channel_stats": ("x", "eps"),
    "channel_stats_backward_": ("x", "mean", "invstd", "grad_mean", "grad_invstd", "grad_x"),
    "affine_relu": ("x", "scale", "shift"),
    "affine_relu_into_": ("x", "scale", "shift", "out"),
    "affine_relu_backward_": ("x", "scale", "shift", "grad_z", "grad_x", "grad_scale",
                              "grad_shift"),
    "transform_conv": ("x", "scale", "shift", "weight", "stride", "padding", "pool"),
    "transform_conv_into_": ("x", "scale", "shift", "weight", "stride", "padding", "pool", "out"),
    "transform_conv_backward_": ("grad_out", "x", "scale", "shift", "weight", "stride",
                                 "padding", "pool", "grad_x", "grad_scale", "grad_shift"),
    "conv": ("x", "weight", "stride", "padding", "pool"),
    "conv_into_": ("x", "weight", "stride", "padding", "pool", "out"),
    "conv_backward_": ("grad_out", "x", "weight", "stride", "padding", "pool", "grad_x"),
    "gather_batch": ("src", "index"),
}
VECTORS = ("mean", "invstd", "grad_mean", "grad_invstd", "scale", "shift", "grad_scale",
           "grad_shift")
N, C, H, W = 2, 3, 5, 5


def valid_arguments():
    """Arguments every op accepts: float32, x an NHWC channel prefix, a 1x1 convolution to C
    channels (so every output is shaped like x)."""
    x = torch.randn(N, H, W, C + 2).permute(0, 3, 1, 2)[:, :C]
    vectors = {name: torch.rand(C) + 0.5 for name in VECTORS}
    return dict(vectors, x=x, src=x, eps=1e-5, weight=torch.randn(C, C, 1, 1), stride=1,
                padding=0, pool=1, out=torch.empty(N, C, H, W), grad_out=torch.randn(N, C, H, W),
                grad_x=torch.zeros(N, C, H, W), grad_z=torch.randn(N, C, H, W),
                index=torch.tensor([1, 0]))


def call_op(op, **changes):
    args = valid_arguments()
    args.update(changes)
    return getattr(ops, op)(*(args[name] for name in OP_ARGUMENTS[op]))


def mutations(name):
    """``(label, change, exception)`` of what can be wrong with argument ``name``."""
    if name == "eps":
        return [(f"={v}", lambda _, v=v: v, ValueError) for v in (0.0, -1e-5, NAN)]
    if name in ("stride", "padding", "pool"):
        values = {"stride": (0, -1, 3), "padding": (-1, 2), "pool": (0, -1, 3)}[name]
        return [(f"={v}", lambda _, v=v: v, ValueError) for v in values]
    if name in ("x", "src"):  # the tensor every other argument is checked against
        return [("rank", lambda t: t[0], ValueError),
                ("dtype", lambda t: t.to(torch.int32), TypeError),
                ("empty-batch", lambda t: t[:0], ValueError),
                ("empty-channels", lambda t: t[:, :0], ValueError),
                ("not-a-tensor", lambda t: None, TypeError)]
    meta = ("device", lambda t: t.to("meta"), ValueError)
    if name == "index":
        return [("rank", lambda t: t[None], ValueError),
                ("dtype", lambda t: t.to(F32), TypeError), meta,
                ("negative", lambda t: t - 2, ValueError),
                ("past-the-batch", lambda t: t + N, ValueError)]
    dtype = ("dtype", lambda t: t.to(F64), TypeError)
    if name == "weight":
        return [dtype, meta, ("rank", lambda t: t[0], ValueError),
                ("channels", lambda t: t[:, 1:], ValueError),
                ("kernel-2x2", lambda t: torch.randn(C, C, 2, 2), ValueError),
                ("kernel-3x1", lambda t: torch.randn(C, C, 3, 1), ValueError)]
    if name in VECTORS:
        return [dtype, meta, ("rank", lambda t: t[None], ValueError),
                ("channels", lambda t: t[1:], ValueError),
                ("empty", lambda t: t[:0], ValueError)]
    return [dtype, meta, ("rank", lambda t: t[0], ValueError),  # grad_x, grad_z, out, grad_out
            ("channels", lambda t: t[:, 1:], ValueError),
            ("spatial", lambda t: t[:, :, 1:], ValueError),
            ("empty-batch", lambda t: t[:0], ValueError),
            ("not-a-tensor", lambda t: None, TypeError)]


def op_argument_cases():
    for op, names in OP_ARGUMENTS.items():
        for name in names:
            for label, change, exc in mutations(name):
                value = valid_arguments()[name]
                yield Case(f"{op}-{name}{'' if label.startswith('=') else '-'}{label}",
                           lambda op=op, name=name, v=change(value): call_op(op, **{name: v}),
                           name, exc, op=True)


def op_geometry_cases():
    x, w3 = valid_arguments()["x"], torch.randn(C, C, 3, 3)
    for op in ("conv", "transform_conv"):
        yield Case(f"{op}-pool2-3x3", lambda op=op: call_op(op, weight=w3, padding=1, pool=2),
                   "pool", op=True)
        yield Case(f"{op}-pool2-stride2", lambda op=op: call_op(op, stride=2, pool=2), "pool",
                   op=True)
        yield Case(f"{op}-x-too-small-for-3x3", lambda op=op: call_op(op, x=x[:, :, :2, :2],
                                                                      weight=w3), "x", op=True)
        yield Case(f"{op}-weight-no-output-channels",
                   lambda op=op: call_op(op, weight=torch.randn(0, C, 1, 1)), "weight", op=True)
    # pooling is fused only before a 1x1 stride-1 convolution without padding (the Transition)
    for backend in ("reference", "cpu", "triton"):
        yield Case(f"conv-pool2-padding1-{backend}",
                   lambda: call_op("conv", x=torch.randn(N, C, 1, 1), padding=1, pool=2),
                   "padding", op=True, backend=backend)
    yield Case("channel_stats-one-value-per-channel",
               lambda: ops.channel_stats(torch.randn(1, C, 1, 1), 1e-5), "x", op=True)


# ============================================================================= modules

def tiny_densenet(**changes):
    kwargs = dict(growth_rate=4, block_config=(1, 1), num_init_features=4, bn_size=2,
                  num_classes=3, stem="cifar")
    kwargs.update(changes)
    return M.DenseNet(**kwargs)


def tiny_msdnet(**changes):
    torch.manual_seed(0)
    return M.MSDNet(**dict(dict(nBlocks=2, nChannels=4, base=1, step=1, growthRate=2,
                                grFactor=(1, 2), bnFactor=(1, 2), num_classes=3), **changes))


def budgeted_predict(x):
    return M.BudgetedClassifier(tiny_msdnet().eval(), [0.9, -math.inf]).predict(x)


def anytime(x):
    return M.anytime_predict(tiny_msdnet().eval(), x, max_macs=1e12)


# entry point -> (call, shape of a valid input, the argument's name)
FORWARDS = {
    "DenseLayer": (lambda x: M.DenseLayer(4, 3, 2, 0.0)(x), (2, 4, 5, 5), "input"),
    "DenseBlock": (lambda x: M.DenseBlock(2, 4, 2, 3, 0.0)(x), (2, 4, 5, 5), "init_features"),
    "Transition": (lambda x: M.Transition(4, 2)(x), (2, 4, 4, 4), "x"),
    "DenseNet": (lambda x: tiny_densenet()(x), (2, 3, 8, 8), "x"),
    "MSDNet": (lambda x: tiny_msdnet()(x), (2, 3, 16, 16), "x"),
    "BudgetedClassifier.predict": (budgeted_predict, (2, 3, 16, 16), "x"),
    "anytime_predict": (anytime, (2, 3, 16, 16), "x"),
}


def forward_cases():
    for entry, (call, shape, name) in FORWARDS.items():
        def case(label, change, exc, entry=entry, call=call, shape=shape, name=name):
            return Case(f"{entry}-{label}", lambda: call(change(torch.randn(shape))), name, exc)
        yield case("rank", lambda x: x[0], ValueError)
        yield case("channels", lambda x: x[:, 1:], ValueError)
        yield case("dtype", lambda x: x.to(F64), TypeError)
        yield case("device", lambda x: x.to("meta"), ValueError)
        yield case("empty-batch", lambda x: x[:0], ValueError)
        yield case("not-a-tensor", lambda x: None, TypeError)
        if entry not in ("DenseLayer", "DenseBlock"):  # padded 3x3 convolutions take 1x1
            yield case("too-small", lambda x: x[:, :, :1, :1], ValueError)
    for entry in ("DenseLayer", "DenseBlock"):  # as nn.BatchNorm2d in training mode
        call, _, name = FORWARDS[entry]
        yield Case(f"{entry}-one-value-per-channel",
                   lambda call=call: call(torch.randn(1, 4, 1, 1)), name)

    def nan_pixel():
        x = torch.randn(2, 3, 16, 16)
        x[0, 0, 3, 3] = NAN
        return x
    yield Case("BudgetedClassifier.predict-nan", lambda: budgeted_predict(nan_pixel()), "x")


CONSTRUCTORS = [
    # (id, call, argument)
    ("DenseLayer-num_input_features=0", lambda: M.DenseLayer(0, 3, 2, 0.0), "num_input_features"),
    ("DenseLayer-growth_rate=-1", lambda: M.DenseLayer(4, -1, 2, 0.0), "growth_rate"),
    ("DenseLayer-bn_size=-1", lambda: M.DenseLayer(4, 3, -1, 0.0), "bn_size"),
    ("DenseLayer-drop_rate=nan", lambda: M.DenseLayer(4, 3, 2, NAN), "drop_rate"),
    ("DenseLayer-drop_rate=1", lambda: M.DenseLayer(4, 3, 2, 1.0), "drop_rate"),
    ("DenseBlock-num_layers=0", lambda: M.DenseBlock(0, 4, 2, 3, 0.0), "num_layers"),
    ("DenseBlock-num_input_features=0", lambda: M.DenseBlock(2, 0, 2, 3, 0.0),
     "num_input_features"),
    ("DenseBlock-growth_rate=0", lambda: M.DenseBlock(2, 4, 2, 0, 0.0), "growth_rate"),
    ("DenseBlock-drop_rate=nan", lambda: M.DenseBlock(2, 4, 2, 3, NAN), "drop_rate"),
    ("Transition-num_input_features=0", lambda: M.Transition(0, 2), "num_input_features"),
    ("Transition-num_output_features=0", lambda: M.Transition(4, 0), "num_output_features"),
    ("Transition-num_output_features=-1", lambda: M.Transition(4, -1), "num_output_features"),
    ("DenseNet-growth_rate=0", lambda: tiny_densenet(growth_rate=0), "growth_rate"),
    ("DenseNet-block_config=()", lambda: tiny_densenet(block_config=()), "block_config"),
    ("DenseNet-block_config=(1,0)", lambda: tiny_densenet(block_config=(1, 0)), "block_config"),
    ("DenseNet-num_init_features=0", lambda: tiny_densenet(num_init_features=0),
     "num_init_features"),
    ("DenseNet-bn_size=-1", lambda: tiny_densenet(bn_size=-1), "bn_size"),
    ("DenseNet-drop_rate=nan", lambda: tiny_densenet(drop_rate=NAN), "drop_rate"),
    ("DenseNet-num_classes=-1", lambda: tiny_densenet(num_classes=-1), "num_classes"),
    ("DenseNet-stem", lambda: tiny_densenet(stem="mnist"), "stem"),
    ("DenseNet-compression=nan", lambda: tiny_densenet(compression=NAN), "compression"),
    ("DenseNet-compression=0", lambda: tiny_densenet(compression=0.0), "compression"),
    ("DenseNet-compression=0.01", lambda: tiny_densenet(compression=0.01), "compression"),
    ("DenseNet-in_channels=0", lambda: tiny_densenet(in_channels=0), "in_channels"),
    ("densenet-name", lambda: M.densenet("densenet7"), "name"),
    ("MSDNet-nBlocks=0", lambda: tiny_msdnet(nBlocks=0), "nBlocks"),
    ("MSDNet-nBlocks=1.5", lambda: tiny_msdnet(nBlocks=1.5), "nBlocks"),
    ("MSDNet-nChannels=0", lambda: tiny_msdnet(nChannels=0), "nChannels"),
    ("MSDNet-base=0", lambda: tiny_msdnet(base=0), "base"),
    ("MSDNet-step=-1", lambda: tiny_msdnet(step=-1), "step"),
    ("MSDNet-growthRate=0", lambda: tiny_msdnet(growthRate=0), "growthRate"),
    ("MSDNet-growthRate-odd-split", lambda: tiny_msdnet(growthRate=3, grFactor=(1, 1),
                                                        bnFactor=(1, 1)), "growthRate"),
    ("MSDNet-grFactor=()", lambda: tiny_msdnet(grFactor=()), "grFactor"),
    ("MSDNet-grFactor-zero", lambda: tiny_msdnet(grFactor=(1, 0)), "grFactor"),
    ("MSDNet-bnFactor-length", lambda: tiny_msdnet(bnFactor=(1,)), "bnFactor"),
    ("MSDNet-prune", lambda: tiny_msdnet(prune="median"), "prune"),
    ("MSDNet-stepmode", lambda: tiny_msdnet(stepmode="odd"), "stepmode"),
    ("MSDNet-reduction=nan", lambda: tiny_msdnet(reduction=NAN), "reduction"),
    ("MSDNet-reduction=-0.5", lambda: tiny_msdnet(reduction=-0.5), "reduction"),
    ("MSDNet-bottleneck", lambda: tiny_msdnet(bottleneck=1), "bottleneck"),
    ("MSDNet-num_classes=0", lambda: tiny_msdnet(num_classes=0), "num_classes"),
    ("MSDNet-stem", lambda: tiny_msdnet(stem="mnist"), "stem"),
]


def constructor_cases():
    for case_id, call, name in CONSTRUCTORS:
        yield Case(case_id, call, name)


# ============================================================================= inference helpers

def probs(K=2, n=10, classes=3):
    return torch.softmax(torch.randn(K, n, classes, generator=torch.Generator().manual_seed(0)),
                         -1)


def one_image():
    return torch.randn(1, 3, 16, 16)


HELPERS = [
    # (id, call, argument, exception)
    ("calibrate-probs-rank", lambda: M.calibrate_thresholds(probs()[0], [0.5, 0.5]), "probs",
     ValueError),
    ("calibrate-probs-dtype", lambda: M.calibrate_thresholds(probs().to(torch.int32),
                                                             [0.5, 0.5]), "probs", TypeError),
    ("calibrate-probs-nan", lambda: M.calibrate_thresholds(probs() * NAN, [0.5, 0.5]), "probs",
     ValueError),
    ("calibrate-probs-no-sample", lambda: M.calibrate_thresholds(probs(n=0), [0.5, 0.5]),
     "probs", ValueError),
    ("calibrate-probs-no-exit", lambda: M.calibrate_thresholds(probs(K=0), []), "probs",
     ValueError),
    ("calibrate-probs-ragged", lambda: M.calibrate_thresholds([probs()[0], probs()[1, :5]],
                                                              [0.5, 0.5]), "probs", ValueError),
    ("calibrate-probs-not-a-tensor", lambda: M.calibrate_thresholds(None, [0.5, 0.5]), "probs",
     TypeError),
    ("calibrate-proportions-length", lambda: M.calibrate_thresholds(probs(), [0.2, 0.3, 0.5]),
     "proportions", ValueError),
    ("calibrate-proportions-rank", lambda: M.calibrate_thresholds(probs(), [[0.5, 0.5]]),
     "proportions", ValueError),
    ("calibrate-proportions-nan", lambda: M.calibrate_thresholds(probs(), [NAN, 0.5]),
     "proportions", ValueError),
    ("calibrate-proportions-negative", lambda: M.calibrate_thresholds(probs(), [-0.5, 0.5]),
     "proportions", ValueError),
    ("calibrate-proportions-zero", lambda: M.calibrate_thresholds(probs(), [0.0, 0.0]),
     "proportions", ValueError),
    ("exit_proportions-q=nan", lambda: M.exit_proportions(NAN, 3), "q", ValueError),
    ("exit_proportions-q=0", lambda: M.exit_proportions(0.0, 3), "q", ValueError),
    ("exit_proportions-q=-1", lambda: M.exit_proportions(-1.0, 3), "q", ValueError),
    ("exit_proportions-q=inf", lambda: M.exit_proportions(math.inf, 3), "q", ValueError),
    ("exit_proportions-K=0", lambda: M.exit_proportions(2.0, 0), "K", ValueError),
    ("exit_proportions-K=2.0", lambda: M.exit_proportions(2.0, 2.0), "K", ValueError),
    ("BudgetedClassifier-model", lambda: M.BudgetedClassifier(torch.nn.Linear(2, 2), [0.5, 0.1]),
     "model", TypeError),
    ("BudgetedClassifier-thresholds-nan",
     lambda: M.BudgetedClassifier(tiny_msdnet(), [NAN, -math.inf]), "thresholds", ValueError),
    ("BudgetedClassifier-thresholds-length",
     lambda: M.BudgetedClassifier(tiny_msdnet(), [0.5]), "thresholds", ValueError),
    ("BudgetedClassifier-thresholds-rank",
     lambda: M.BudgetedClassifier(tiny_msdnet(), [[0.5, -math.inf]]), "thresholds", ValueError),
    ("anytime_predict-max_macs=nan",
     lambda: M.anytime_predict(tiny_msdnet(), one_image(), max_macs=NAN), "max_macs", ValueError),
    ("anytime_predict-max_macs=0",
     lambda: M.anytime_predict(tiny_msdnet(), one_image(), max_macs=0), "max_macs", ValueError),
    ("anytime_predict-deadline_s=nan",
     lambda: M.anytime_predict(tiny_msdnet(), one_image(), deadline_s=NAN), "deadline_s",
     ValueError),
    ("anytime_predict-deadline_s=-1",
     lambda: M.anytime_predict(tiny_msdnet(), one_image(), deadline_s=-1.0), "deadline_s",
     ValueError),
    ("anytime_predict-model", lambda: M.anytime_predict(torch.nn.Linear(2, 2), one_image()),
     "model", TypeError),
    ("convert-model", lambda: M.convert(5), "model", TypeError),
    ("msdnet_config-name", lambda: M.msdnet_config("cifar7-anytime"), "name", ValueError),
]


def helper_cases():
    for case_id, call, name, exc in HELPERS:
        yield Case(case_id, call, name, exc)


# ============================================================================= the tests

ALL_CASES = [*op_argument_cases(), *op_geometry_cases(), *forward_cases(), *constructor_cases(),
             *helper_cases()]


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_rejects_bad_input(case, use_backend):
    case.check(use_backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_backend_rejects_half_precision_clearly(dtype, use_backend):
    """The CPU kernels run float32 and float64; other dtypes get one clear TypeError."""
    use_backend("cpu")
    x = torch.randn(N, C, H, W, dtype=dtype)
    with pytest.raises(TypeError, match=f"{dtype}.*CUDA devices only"):
        ops.affine_relu(x, torch.ones(C), torch.zeros(C))
    with pytest.raises(TypeError, match=f"{dtype}.*CUDA devices only"):
        ops.conv(x, torch.randn(C, C, 1, 1, dtype=dtype), 1, 0, 1)
