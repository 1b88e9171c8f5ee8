"""What is benchmarked: ops, dense layers, MSDNet layers and whole models, each as a set of
callables (ours and the baselines, same weights) shared by ``run.py``, the memory probe and
the pytest-benchmark files.

Variants
--------
``plain``            torchvision / plain PyTorch: ``torch.cat`` + BatchNorm2d + ReLU + Conv2d
                     (oneDNN on CPU, cuDNN on GPU), NCHW.
``channels_last``    the same module and inputs in ``torch.channels_last``.
``memory_efficient`` torchvision's ``memory_efficient=True`` (checkpointing of cat+BN+ReLU+conv1).
``compile``          ``torch.compile`` of the plain module (inductor, default mode).
``ours``             msdnet_ops (backend from ``MSDNET_OPS_BACKEND``, default ``auto``).
``ours_memory_efficient``  ours, recomputing bottleneck outputs in backward.
``ours_recompute_all``  MSDNet ours with ``memory_efficient="all"``: every convolution output
                     recomputed in backward; only activated buffers kept.
``ours_compile``     ``torch.compile`` of ours (MSDNet: inference compiles to one graph; the
                     training forward runs eagerly inside it).
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import msdnet_ops
from msdnet_ops import ops, reference
from msdnet_ops.models.msdnet_runtime import GridRun
from msdnet_ops.nn.bn_affine import deferred_running_stats
from msdnet_ops.nn.dense_layer import read_channels
from msdnet_ops.nn.feature_buffer import FeatureBuffer

LAYER_VARIANTS = ("plain", "channels_last", "memory_efficient", "compile", "ours")
EPS = 1e-5


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(shape, device, dtype, seed=0, requires_grad=False):
    """Random normal data (never zeros: zeros can run faster than real data)."""
    t = torch.randn(shape, generator=_gen(seed)).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


# =========================================================================== dense layers

@dataclass(frozen=True)
class LayerShape:
    """A DenseNet dense layer: ``cin`` input channels made of a block input of ``cin0``
    channels and ``(cin - cin0) / growth`` earlier layers' outputs, ``hw x hw`` pixels."""
    name: str
    family: str
    batch: int
    cin: int
    cin0: int
    growth: int
    bn_size: int
    hw: int


def densenet_layer_shapes(batch_cifar: int, batch_imagenet: int):
    """Representative layers of DenseNet-BC-100 (CIFAR 32x32; k=12, 24 stem channels) and
    DenseNet-121 (224x224; k=32, 64 stem channels): first/last layer of the first block, a
    middle layer of a middle block, the last layer of the last block."""
    b, B = batch_cifar, batch_imagenet
    return [
        LayerShape("bc100 b1 L1", "DenseNet-BC-100", b, 24, 24, 12, 4, 32),
        LayerShape("bc100 b1 L16", "DenseNet-BC-100", b, 204, 24, 12, 4, 32),
        LayerShape("bc100 b2 L8", "DenseNet-BC-100", b, 192, 108, 12, 4, 16),
        LayerShape("bc100 b3 L16", "DenseNet-BC-100", b, 330, 150, 12, 4, 8),
        LayerShape("d121 b1 L1", "DenseNet-121", B, 64, 64, 32, 4, 56),
        LayerShape("d121 b1 L6", "DenseNet-121", B, 224, 64, 32, 4, 56),
        LayerShape("d121 b3 L12", "DenseNet-121", B, 608, 256, 32, 4, 14),
        LayerShape("d121 b4 L16", "DenseNet-121", B, 992, 512, 32, 4, 7),
    ]


def module_callables(module, inputs, grad):
    """``(fwd, fwdbwd)`` of a baseline module: its forward on ``inputs``, and forward plus
    backward of ``grad``."""
    def fwd():
        return module(inputs)

    def fwdbwd():
        module(inputs).backward(grad)
    return fwd, fwdbwd


def _tv_layer(shape: LayerShape, memory_efficient: bool):
    from torchvision.models.densenet import _DenseLayer
    return _DenseLayer(shape.cin, shape.growth, shape.bn_size, 0.0, memory_efficient)


class LayerBench:
    """One dense layer in every variant, with ``fwd`` (training-mode forward, autograd graph
    recorded) and ``fwdbwd`` (forward + backward of a fixed random output gradient) callables.

    * Baselines get the layer input as torchvision passes it inside a block: a list of the
      block input and every earlier layer's output (so ``torch.cat`` is included), all
      requiring grad (so the input gradient is computed, and checkpointing is active).
    * ``ours`` runs the layer as it runs inside a fused block: a feature buffer already holds
      the ``cin`` prefix channels and their batch statistics; the layer appends its ``growth``
      channels (``DenseLayer.append_to``). Backward accumulates the shared gradient into the
      prefix and finalizes (BN-statistics part) the layer's own new channels once: the
      per-layer share of the block's backward. The finalize of the prefix channels belongs to
      their producers (earlier layers) and is not counted here.
    """

    def __init__(self, shape: LayerShape, device, dtype=torch.float32, seed: int = 0):
        self.shape, self.device, self.dtype = shape, torch.device(device), dtype
        s = shape
        torch.manual_seed(seed)
        self.plain_module = _tv_layer(s, False).to(self.device, dtype).train()
        state = self.plain_module.state_dict()
        n_prev = (s.cin - s.cin0) // s.growth
        assert s.cin0 + n_prev * s.growth == s.cin, s
        sizes = [s.cin0] + [s.growth] * n_prev
        self.feats = [randn((s.batch, c, s.hw, s.hw), self.device, dtype, seed + 1 + i, True)
                      for i, c in enumerate(sizes)]
        self.grad = randn((s.batch, s.growth, s.hw, s.hw), self.device, dtype, seed + 99)
        self._state = state
        self._built = {}
        self.modules = {}  # variant -> the module it runs (for the agreement checks)

    # ---- builders
    def _baseline(self, variant: str):
        s = self.shape
        if variant == "plain":
            m, feats, grad = self.plain_module, self.feats, self.grad
        elif variant == "channels_last":
            m = copy.deepcopy(self.plain_module).to(memory_format=torch.channels_last)
            feats = [f.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
                     for f in self.feats]
            grad = self.grad.contiguous(memory_format=torch.channels_last)
        elif variant == "memory_efficient":
            m = _tv_layer(s, True).to(self.device, self.dtype).train()
            m.load_state_dict(self._state)
            feats, grad = self.feats, self.grad
        elif variant == "compile":
            m = torch.compile(copy.deepcopy(self.plain_module))
            feats, grad = self.feats, self.grad
        else:
            raise ValueError(variant)
        self.modules[variant] = m
        return module_callables(m, feats, grad)

    def _ours(self):
        s = self.shape
        layer = msdnet_ops.DenseLayer(s.cin, s.growth, s.bn_size, 0.0).to(self.device, self.dtype)
        layer.load_state_dict(self._state)
        layer.train()
        buf = FeatureBuffer(s.batch, s.cin + s.growth, s.hw, s.hw, dtype=self.dtype,
                            device=self.device, track_stats=True, eps=EPS)
        with torch.no_grad():
            buf.values[:, :s.cin] = torch.cat([f.detach() for f in self.feats], 1)
        buf.state.compute_stats(0, s.cin)
        buf.filled = s.cin
        grad = self.grad

        def reset():
            buf.filled, buf.token = s.cin, None
            buf.state.release_grads()

        def fwd():
            reset()
            layer.append_to(buf)

        def fwdbwd():
            reset()
            layer.append_to(buf)
            read_channels(buf, s.cin, s.cin + s.growth).backward(grad)
        self.modules["ours"], self.ours_buffer = layer, buf
        return fwd, fwdbwd

    def callables(self, variant: str):
        """``(fwd, fwdbwd)`` of ``variant``."""
        if variant not in self._built:
            self._built[variant] = self._ours() if variant == "ours" else self._baseline(variant)
        return self._built[variant]

    def outputs(self, variant: str) -> list:
        """The layer's new channels after one ``fwd`` of ``variant``."""
        out = self.callables(variant)[0]()
        if variant == "ours":
            s = self.shape
            out = self.ours_buffer.values[:, s.cin:s.cin + s.growth]
        return [out.detach().clone()]

    def param_grads(self, variant: str) -> list:
        """The parameter gradients of one ``fwdbwd`` of ``variant`` (zeroed first)."""
        fwdbwd = self.callables(variant)[1]
        module = self.modules[variant]
        module.zero_grad(set_to_none=True)
        fwdbwd()
        grads = [p.grad.detach().clone() for p in module.parameters()]
        module.zero_grad(set_to_none=True)
        return grads


# =========================================================================== ops

@dataclass(frozen=True)
class OpShape:
    """A buffer prefix: ``c`` channels of a ``c + growth``-channel buffer (a strided view)."""
    name: str
    batch: int
    c: int
    growth: int
    hw: int
    bottleneck: int


def op_shapes(batch_cifar: int, batch_imagenet: int):
    return [OpShape("bc100 b1 L16", batch_cifar, 204, 12, 32, 48),
            OpShape("d121 b1 L6", batch_imagenet, 224, 32, 56, 128)]


OP_NAMES = ("channel_stats", "affine_relu", "affine_relu_backward", "finalize",
            "transform_conv 1x1", "transform_conv 3x3", "transform_conv_backward 1x1",
            "transform_conv_backward 3x3", "transition (pool+1x1)", "gather_batch")

# bytes moved per call (multiples of the prefix size) of the memory-bound ops, for bandwidth
MEMORY_BOUND_TRAFFIC = {"channel_stats": 1, "affine_relu": 2, "affine_relu_backward": 4,
                        "finalize": 3, "gather_batch": 1}


class OpBench:
    """``ours`` (``msdnet_ops.ops``, the selected backend) and ``plain`` (the pure-PyTorch
    composition of the same math, ``msdnet_ops.reference``) for every op, on a strided prefix
    view of a feature buffer (as the fused modules call them)."""

    def __init__(self, shape: OpShape, device, dtype=torch.float32, seed: int = 0, layout: str = "nchw"):
        if layout not in ("nchw", "nhwc"):
            raise ValueError(f"layout: expected 'nchw' or 'nhwc', got {layout!r}")
        self.shape = s = shape
        self.layout = layout
        dev = torch.device(device)
        sdt = reference.stats_dtype(dtype)
        cap = s.c + s.growth
        fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format

        def feature(shape, dev, dtype, seed):  # every feature map in the bench's layout
            return randn(shape, dev, dtype, seed).contiguous(memory_format=fmt)
        buf = feature((s.batch, cap, s.hw, s.hw), dev, dtype, seed)
        self.x = x = buf[:, :s.c]
        self.prefix_bytes = x.numel() * x.element_size()
        mean, invstd = reference.channel_stats(x, EPS)
        scale = torch.rand(s.c, generator=_gen(seed + 1)).to(dev, sdt) + 0.5
        shift = (torch.rand(s.c, generator=_gen(seed + 2)).to(dev, sdt) - 0.5) * 0.2
        scale, shift = (scale * invstd).contiguous(), (shift - scale * mean).contiguous()
        gz = feature(x.shape, dev, dtype, seed + 3)
        gx = torch.zeros_like(buf)[:, :s.c]
        gs, gh = torch.zeros(s.c, device=dev, dtype=sdt), torch.zeros(s.c, device=dev, dtype=sdt)
        gm, gi = torch.randn(s.c, generator=_gen(seed + 4)).to(dev, sdt), \
            torch.randn(s.c, generator=_gen(seed + 5)).to(dev, sdt)
        w1 = randn((s.bottleneck, s.c, 1, 1), dev, dtype, seed + 6) * 0.05
        inner = feature((s.batch, s.bottleneck, s.hw, s.hw), dev, dtype, seed + 7)
        isc = torch.rand(s.bottleneck, generator=_gen(seed + 8)).to(dev, sdt) + 0.5
        ish = torch.rand(s.bottleneck, generator=_gen(seed + 9)).to(dev, sdt) - 0.5
        w3 = randn((s.growth, s.bottleneck, 3, 3), dev, dtype, seed + 10) * 0.05
        wt = randn((s.c // 2, s.c, 1, 1), dev, dtype, seed + 11) * 0.05
        empty = functools.partial(torch.empty, device=dev, dtype=dtype, memory_format=fmt)
        out1 = empty((s.batch, s.bottleneck, s.hw, s.hw))
        out3_buf = empty((s.batch, s.c + s.growth, s.hw, s.hw))
        out3 = out3_buf[:, s.c:]
        outt = empty((s.batch, s.c // 2, s.hw // 2, s.hw // 2))
        go1 = feature(out1.shape, dev, dtype, seed + 12)
        go3 = feature(out3.shape, dev, dtype, seed + 13)
        gin = torch.zeros_like(inner)
        gis, gih = torch.zeros_like(isc), torch.zeros_like(ish)
        half = torch.arange(0, s.batch, 2, device=dev)
        R = reference

        def transition_plain():
            # torchvision's order: BN-ReLU, 1x1 conv at full resolution, then pool
            outt.copy_(F.avg_pool2d(F.conv2d(R.affine_relu(x, scale, shift), wt), 2))

        # name -> (ours, plain, tensors the op writes: zeroed before a checked call)
        table = {
            "channel_stats": (lambda: ops.channel_stats(x, EPS),
                              lambda: R.channel_stats(x, EPS), ()),
            "affine_relu": (lambda: ops.affine_relu(x, scale, shift),
                            lambda: R.affine_relu(x, scale, shift), ()),
            "affine_relu_backward": (
                lambda: ops.affine_relu_backward_(x, scale, shift, gz, gx, gs, gh),
                lambda: R.affine_relu_backward_(x, scale, shift, gz, gx, gs, gh), (gx, gs, gh)),
            "finalize": (lambda: ops.channel_stats_backward_(x, mean, invstd, gm, gi, gx),
                         lambda: R.channel_stats_backward_(x, mean, invstd, gm, gi, gx), (gx,)),
            "transform_conv 1x1": (
                lambda: ops.transform_conv_into_(x, scale, shift, w1, 1, 0, 1, out1),
                lambda: R.transform_conv_into(x, scale, shift, w1, 1, 0, 1, out1), (out1,)),
            "transform_conv 3x3": (
                lambda: ops.transform_conv_into_(inner, isc, ish, w3, 1, 1, 1, out3),
                lambda: R.transform_conv_into(inner, isc, ish, w3, 1, 1, 1, out3), (out3,)),
            "transform_conv_backward 1x1": (
                lambda: ops.transform_conv_backward_(go1, x, scale, shift, w1, 1, 0, 1, gx, gs, gh),
                lambda: R.transform_conv_backward_(go1, x, scale, shift, w1, 1, 0, 1, gx, gs, gh),
                (gx, gs, gh)),
            "transform_conv_backward 3x3": (
                lambda: ops.transform_conv_backward_(go3, inner, isc, ish, w3, 1, 1, 1, gin, gis, gih),
                lambda: R.transform_conv_backward_(go3, inner, isc, ish, w3, 1, 1, 1, gin, gis, gih),
                (gin, gis, gih)),
            "transition (pool+1x1)": (
                lambda: ops.transform_conv_into_(x, scale, shift, wt, 1, 0, 2, outt),
                transition_plain, (outt,)),
            "gather_batch": (lambda: ops.gather_batch(x, half),
                             lambda: R.gather_batch(x, half), ()),
        }
        self.ops = {name: (ours, plain) for name, (ours, plain, _) in table.items()}
        self._writes = {name: written for name, (_, _, written) in table.items()}

    def outputs(self, op: str, variant: str) -> list:
        """What one call of ``op`` (``'ours'`` or ``'plain'``) computes: its return values and
        the tensors it writes (zeroed first, so accumulating ops are compared from zero)."""
        for t in self._writes[op]:
            t.zero_()
        ret = self.ops[op][0 if variant == "ours" else 1]()
        ret = [] if ret is None else list(ret) if isinstance(ret, (tuple, list)) else [ret]
        return [t.detach().clone() for t in ret + list(self._writes[op])]

    def bytes_moved(self, op: str) -> int | None:
        """Fewest bytes a memory-bound op must move (each input read once, each output written
        once; per-channel vectors neglected). gather_batch takes half the batch: reads and
        writes half the prefix."""
        k = MEMORY_BOUND_TRAFFIC.get(op)
        return None if k is None else int(self.prefix_bytes * k)


# =========================================================================== MSDNet layers

@dataclass(frozen=True)
class MSDLayerShape:
    """Scale ``scale`` of global dense layer ``layer`` of a named MSDNet configuration."""
    name: str
    config: str
    layer: int
    scale: int
    batch: int
    image: int = 32


def msdnet_layer_shapes(batch: int, config: str = "cifar100-anytime"):
    return [MSDLayerShape("msd L3 s0 (normal)", config, 3, 0, batch),
            MSDLayerShape("msd L3 s2 (down+normal)", config, 3, 2, batch),
            MSDLayerShape("msd L12 s2 (down+normal)", config, 12, 2, batch)]


class MSDLayerBench:
    """One scale of one MSDNet dense layer (``ConvNormal`` or ``ConvDownNormal``: bottleneck
    1x1 -> BN -> ReLU -> 3x3 (stride 1, or 2 for the strided path) -> BN -> ReLU, then
    ``torch.cat`` with the input).

    Every variant computes the same function of the same post-activation inputs:

    * ``plain`` / ``channels_last`` / ``compile``: the reference module; output = the
      concatenation.
    * ``ours``: the cell exactly as :class:`msdnet_ops.MSDNet` trains it (its plan's cell, run
      by a ``GridRun``): the scale buffers hold the activated inputs, each path appends
      ``relu(bn(conv(.)))`` of a buffer prefix to the layer's buffer (no cat), backward
      accumulates the inputs' gradients in the buffers' shared gradient.
    """

    def __init__(self, shape: MSDLayerShape, device, dtype=torch.float32, seed: int = 0):
        self.shape = s = shape
        self.device, self.dtype = dev, dt = torch.device(device), dtype
        torch.manual_seed(seed)
        self.plain_model = model = msdnet_ops.MSDNetPlain(**msdnet_ops.msdnet_config(s.config))
        layer = next(m for _, _, m in model.dense_layers() if m.index == s.layer)
        self.position = pos = next(i for i, sp in enumerate(layer.specs) if sp.scale == s.scale)
        self.spec = spec = layer.specs[pos]
        self.module = layer.layers[pos].to(dev, dt).train()
        sizes = model.scale_sizes(s.image, s.image)
        h, w = sizes[s.scale]
        shapes = ([(spec.finer_channels,) + tuple(sizes[s.scale - 1])] if spec.two_path else []) \
            + [(spec.in_channels, h, w)]
        # what the plain network stores: relu(BN(x)) of its producers, BN affine not all 1/0
        self.inputs = []
        for i, (c, hh, ww) in enumerate(shapes):
            raw = randn((s.batch, c, hh, ww), dev, dt, seed + 1 + i)
            weight = (torch.rand(c, generator=_gen(seed + 10 + i)) + 0.5).to(dev, dt)
            bias = ((torch.rand(c, generator=_gen(seed + 20 + i)) - 0.5) * 0.2).to(dev, dt)
            post = torch.relu(F.batch_norm(raw, None, None, weight, bias, True, 0.0, EPS))
            self.inputs.append(post.requires_grad_())
        self.grad = randn((s.batch, spec.out_channels, h, w), dev, dt, seed + 3)
        self.new = spec.out_channels - spec.in_channels
        self.hw = (h, w)
        self._built, self.modules = {}, {}

    def _baseline(self, variant):
        m, inputs, grad = self.module, self.inputs, self.grad
        if variant == "channels_last":
            m = copy.deepcopy(m).to(memory_format=torch.channels_last)
            inputs = [t.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
                      for t in inputs]
            grad = grad.contiguous(memory_format=torch.channels_last)
        elif variant == "compile":
            m = torch.compile(copy.deepcopy(m))
        elif variant != "plain":
            raise ValueError(variant)
        self.modules[variant] = m
        return module_callables(m, inputs, grad)

    def _ours(self):
        s, dev, dt = self.shape, self.device, self.dtype
        model = msdnet_ops.MSDNet(**msdnet_ops.msdnet_config(s.config))
        model.load_state_dict(self.plain_model.state_dict())
        model = model.to(dev, dt).train()
        layer = next(m for _, _, m in model.dense_layers() if m.index == s.layer)
        unit = layer.layers[self.position]
        cell = next(c for c in model.plan.cells if c.module is unit)
        image = torch.empty((s.batch, 3, s.image, s.image), device=dev, dtype=dt)
        setup = GridRun(model, model.plan, image, None)
        buffers = {}
        for (key, width), post in zip(cell.reads, self.inputs):  # the inputs, written once
            buf = setup._buffer(key)  # the scale buffer as the model makes it
            with torch.no_grad():
                buf.values[:, :width] = post
            buf.filled = width
            buffers[key] = buf
        dst, c_s = buffers[cell.writes], self.spec.in_channels

        def run():
            for buf in buffers.values():
                buf.token = None
                buf.state.release_grads()
            dst.filled = c_s
            grid = GridRun(model, model.plan, image, None)
            grid.buffers = dict(buffers)
            with deferred_running_stats():  # as the model's exits batch them
                grid.run_cell(cell.index)

        grad_new = self.grad[:, c_s:].contiguous()

        def fwdbwd():
            run()
            read_channels(dst, c_s, c_s + self.new).backward(grad_new)
        self.ours_buffer, self.modules["ours"] = dst, unit
        return run, fwdbwd

    def callables(self, variant):
        if variant not in self._built:
            self._built[variant] = self._ours() if variant == "ours" else self._baseline(variant)
        return self._built[variant]

    def outputs(self, variant: str) -> list:
        """The layer's new channels (post-activation) after one ``fwd`` of ``variant``."""
        c_s = self.spec.in_channels
        out = self.callables(variant)[0]()
        if variant != "ours":
            return [out[:, c_s:].detach().clone()]
        return [self.ours_buffer.values[:, c_s:c_s + self.new].detach().clone()]

    param_grads = LayerBench.param_grads


# =========================================================================== models

@dataclass(frozen=True)
class ModelCase:
    name: str
    kind: str          # 'densenet' | 'msdnet'
    image: int
    classes: int


MODEL_CASES = {
    # torchvision's DenseNet class (ImageNet stem), k=12, (16,16,16)
    "densenet-bc-k12-64px": ModelCase("densenet-bc-k12-64px", "densenet", 64, 10),
    "densenet-bc100": ModelCase("densenet-bc100", "densenet", 32, 10),
    "densenet121": ModelCase("densenet121", "densenet", 224, 1000),
    "msdnet-cifar100-anytime": ModelCase("msdnet-cifar100-anytime", "msdnet", 32, 100),
    "msdnet-cifar10-anytime": ModelCase("msdnet-cifar10-anytime", "msdnet", 32, 10),
    "msdnet-imagenet-step4": ModelCase("msdnet-imagenet-step4", "msdnet", 224, 1000),
}


def _tv_densenet(name: str, memory_efficient: bool, depth_per_block: int | None = None):
    """The torchvision (plain) network of ``name``; CIFAR forms get a 3x3 stem (norm0, relu0
    and pool0 become Identity, so the state_dict keys equal msdnet_ops' CIFAR DenseNet)."""
    from torchvision.models import DenseNet as TV
    if name == "densenet121":
        return TV(32, (6, 12, 24, 16), 64, memory_efficient=memory_efficient)
    if name == "densenet-bc-k12-64px":
        return TV(growth_rate=12, block_config=(16, 16, 16), num_init_features=24, bn_size=4,
                  num_classes=10, memory_efficient=memory_efficient)
    if name in ("densenet-bc100", "densenet-bc-depth"):
        n = 16 if depth_per_block is None else depth_per_block
        m = TV(growth_rate=12, block_config=(n, n, n), num_init_features=24, bn_size=4,
               num_classes=10, memory_efficient=memory_efficient)
        m.features.conv0 = nn.Conv2d(3, 24, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(m.features.conv0.weight)
        for k in ("norm0", "relu0", "pool0"):
            setattr(m.features, k, nn.Identity())
        return m
    raise ValueError(f"unknown DenseNet case {name!r}")


def build_densenet(name: str, variant: str, device, dtype=torch.float32, seed: int = 0,
                   depth_per_block: int | None = None):
    """``(model, memory_format)`` of a DenseNet case in ``variant`` (same weights for every
    variant, given the seed)."""
    torch.manual_seed(seed)
    plain = _tv_densenet(name, False, depth_per_block)
    fmt = torch.contiguous_format
    if variant == "plain":
        model = plain
    elif variant == "channels_last":
        model, fmt = plain.to(memory_format=torch.channels_last), torch.channels_last
    elif variant == "memory_efficient":
        model = _tv_densenet(name, True, depth_per_block)
        model.load_state_dict(plain.state_dict())
    elif variant == "compile":
        model = torch.compile(plain)
    elif variant in ("ours", "ours_memory_efficient"):
        if name in ("densenet121", "densenet-bc-k12-64px"):
            if variant == "ours_memory_efficient":  # the bottleneck recomputed in backward
                checkpointed = _tv_densenet(name, True, depth_per_block)
                checkpointed.load_state_dict(plain.state_dict())
                plain = checkpointed
            model = msdnet_ops.convert(plain)
        else:
            n = 16 if depth_per_block is None else depth_per_block
            model = msdnet_ops.DenseNet(12, (n, n, n), 24, bn_size=4, num_classes=10,
                                        stem="cifar", compression=0.5)
            model.load_state_dict(plain.state_dict())
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return model.to(device=device, dtype=dtype), fmt


# MSDNet variants of ours -> their ``memory_efficient``
MSDNET_OURS = {"ours": False, "ours_compile": False, "ours_memory_efficient": True,
               "ours_recompute_all": "all"}


def build_msdnet(name: str, variant: str, device, dtype=torch.float32, seed: int = 0):
    cfg = msdnet_ops.msdnet_config(name[len("msdnet-"):])
    torch.manual_seed(seed)
    plain = msdnet_ops.MSDNetPlain(**cfg)
    fmt = torch.contiguous_format
    if variant == "plain":
        model = plain
    elif variant == "channels_last":
        model, fmt = plain.to(memory_format=torch.channels_last), torch.channels_last
    elif variant == "compile":
        model = torch.compile(plain)
    elif variant in MSDNET_OURS:
        model = msdnet_ops.MSDNet(**cfg, memory_efficient=MSDNET_OURS[variant])
        model.load_state_dict(plain.state_dict())
        if variant == "ours_compile":
            model = torch.compile(model)
    else:
        raise ValueError(f"unknown variant {variant!r} for MSDNet")
    return model.to(device=device, dtype=dtype), fmt


def build_model(name: str, variant: str, device, dtype=torch.float32, **kw):
    case = MODEL_CASES.get(name)
    if name == "densenet-bc-depth" or (case and case.kind == "densenet"):
        return build_densenet(name, variant, device, dtype, **kw)
    return build_msdnet(name, variant, device, dtype)


def model_input(name: str, batch: int, device, dtype, fmt, seed: int = 0, image: int | None = None):
    case = MODEL_CASES.get(name, ModelCase(name, "densenet", 32, 10))
    side = image or case.image
    x = randn((batch, 3, side, side), device, dtype, seed).contiguous(memory_format=fmt)
    y = torch.randint(0, case.classes, (batch,), generator=_gen(seed + 1)).to(device)
    return x, y


def loss_of(out, y):
    """Cross-entropy; MSDNet: summed over exits (the paper's training loss)."""
    if isinstance(out, (list, tuple)):
        return sum(F.cross_entropy(o.float(), y) for o in out)
    return F.cross_entropy(out.float(), y)


def train_step_fn(model, x, y, lr: float = 1e-3):
    """One SGD (momentum 0.9) training step: zero_grad(set_to_none), forward, loss, backward,
    optimizer step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss_of(model(x), y).backward()
        opt.step()
    step.optimizer = opt
    return step


def infer_fn(model, x):
    def infer():
        model.eval()
        with torch.no_grad():
            return model(x)
    return infer


def cuda_graphed(fn, device, warmup: int = 3):
    """``fn`` (a training step or an inference call on fixed tensors, as above) captured whole
    in a CUDA graph; returns a callable that replays it. ``warmup`` eager calls on a side stream
    come first, so that what runs once (the fused/unfused choices, autotuning, the optimizer's
    state) is done before the capture (the whole-network recipe of PyTorch's CUDA-graph
    notes). Replays launch the captured kernels with no Python or launch cost per kernel; the
    step must never read a tensor value on the host (ours does not: test_launch_count.py)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device: CUDA graphs need a CUDA device, got {device}")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# =========================================================================== dense blocks

def build_dense_block(variant: str, layers: int, device, dtype=torch.float32, cin: int = 24,
                      growth: int = 12, bn_size: int = 4, seed: int = 0):
    """A single dense block (torchvision ``_DenseBlock`` or ours) for the memory-vs-depth
    curve."""
    from torchvision.models.densenet import _DenseBlock
    torch.manual_seed(seed)
    plain = _DenseBlock(layers, cin, bn_size, growth, 0.0, memory_efficient=False)
    if variant == "plain":
        m = plain
    elif variant == "memory_efficient":
        m = _DenseBlock(layers, cin, bn_size, growth, 0.0, memory_efficient=True)
        m.load_state_dict(plain.state_dict())
    elif variant == "ours":
        m = msdnet_ops.convert(plain)
    else:
        raise ValueError(variant)
    return m.to(device=device, dtype=dtype).train()
