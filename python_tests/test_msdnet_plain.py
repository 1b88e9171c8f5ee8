"""MSDNetPlain: structure, state-dict layout, forward arithmetic and cost figures.

The expectations come from docs/MSDNET.md (the paper's reference): a flat walker over
the specification text (``spec_walk``) enumerates every parameter with its shape, computes the
forward functionally from a state dict, and counts multiply-adds analytically.  None of it
uses the package's modules.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from msdnet_ops.models import (MSDNET_CONFIG_NAMES, MSDNetLayer, MSDNetPlain, count_macs,
                               count_parameters, default_input_size, exit_macs, exit_parameters,
                               msdnet_config)

# Figures of the paper's reference implementation (docs/MSDNET.md).
CIFAR100_ANYTIME_PARAMS = 3_067_960
CIFAR100_ANYTIME_MACS_M = [15.1, 25.5, 37.1, 46.3, 57.3, 67.0, 75.9]
IMAGENET_STEP7_PARAMS_M = 62.3
IMAGENET_STEP7_MACS_G = [0.62, 1.44, 2.28, 2.97, 3.25]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many tiny convolutions: one intra-op thread avoids OpenMP spin-waiting,
    which makes them many times slower on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# Independent reading of the specification
# ---------------------------------------------------------------------------------------------
def _factors(v):
    return tuple(int(t) for t in v.split("-")) if isinstance(v, str) else tuple(v)


def spec_walk(cfg):
    """Yield the network as flat events, from the docs/MSDNET.md text."""
    grF, bnF = _factors(cfg["grFactor"]), _factors(cfg["bnFactor"])
    S, k, nB = len(grF), cfg["growthRate"], cfg["nBlocks"]
    steps = [cfg["base"]]
    for i in range(1, nB):
        steps.append(cfg["step"] if cfg["stepmode"] == "even" else cfg["step"] * i + 1)
    n_all = sum(steps)
    width, n = cfg["nChannels"], 0
    for b in range(nB):
        i = 0
        if b == 0:
            yield ("stem", b, i, S, grF)
            i += 1
        for _ in range(steps[b]):
            n += 1
            if cfg["prune"] == "max":
                interval = math.ceil(n_all / S)
                in_s = S - math.floor(max(0, n - 2) / interval)
                out_s = S - math.floor((n - 1) / interval)
            else:
                in_s, out_s = min(S, n_all - n + 2), min(S, n_all - n + 1)
            yield ("layer", b, i, in_s, out_s, width, k, grF, bnF)
            i += 1
            width += k
            red = cfg["reduction"]
            if red > 0 and ((cfg["prune"] == "max" and in_s > out_s) or
                            (cfg["prune"] == "min" and n in (math.floor(n_all / 3),
                                                             math.floor(2 * n_all / 3)))):
                new = math.floor(red * width)
                yield ("transition", b, i, out_s, width, new, grF)
                i += 1
                width = new
        c = width * grF[-1]
        yield ("classifier", b, c, 128 if cfg["stem"] == "cifar" else c, cfg["num_classes"])


def spec_param_shapes(cfg):
    shapes = {}
    bott = cfg["bottleneck"]

    def bn(p, c):
        shapes[p + ".weight"] = (c,)
        shapes[p + ".bias"] = (c,)

    def conv_basic(p, cin, cout, ks):
        shapes[p + ".net.0.weight"] = (cout, cin, ks, ks)
        bn(p + ".net.1", cout)

    def conv_bn(p, cin, cout, width):
        if bott:
            inner = min(cin, width * cout)
            shapes[p + ".net.0.weight"] = (inner, cin, 1, 1)
            bn(p + ".net.1", inner)
            shapes[p + ".net.3.weight"] = (cout, inner, 3, 3)
            bn(p + ".net.4", cout)
        else:
            shapes[p + ".net.0.weight"] = (cout, cin, 3, 3)
            bn(p + ".net.1", cout)

    for ev in spec_walk(cfg):
        if ev[0] == "stem":
            _, b, i, S, grF = ev
            c0 = cfg["nChannels"] * grF[0]
            if cfg["stem"] == "cifar":
                conv_basic("blocks.0.0.layers.0", 3, c0, 3)
            else:
                shapes["blocks.0.0.layers.0.0.weight"] = (c0, 3, 7, 7)
                shapes["blocks.0.0.layers.0.0.bias"] = (c0,)
                bn("blocks.0.0.layers.0.1", c0)
            for s in range(1, S):
                conv_basic(f"blocks.0.0.layers.{s}", cfg["nChannels"] * grF[s - 1],
                           cfg["nChannels"] * grF[s], 3)
        elif ev[0] == "layer":
            _, b, i, in_s, out_s, w, k, grF, bnF = ev
            S = len(grF)
            off = S - out_s
            for j, s in enumerate(range(off, S)):
                p = f"blocks.{b}.{i}.layers.{j}"
                if s == off and in_s == out_s:
                    conv_bn(p + ".conv_normal", w * grF[s], k * grF[s], bnF[s])
                else:
                    conv_bn(p + ".conv_down", w * grF[s - 1], k * grF[s] // 2, bnF[s - 1])
                    conv_bn(p + ".conv_normal", w * grF[s], k * grF[s] // 2, bnF[s])
        elif ev[0] == "transition":
            _, b, i, out_s, w, new, grF = ev
            S = len(grF)
            for j, s in enumerate(range(S - out_s, S)):
                conv_basic(f"blocks.{b}.{i}.m.{j}", w * grF[s], new * grF[s], 1)
        else:
            _, b, c, mid, ncls = ev
            conv_basic(f"classifier.{b}.m.0", c, mid, 3)
            conv_basic(f"classifier.{b}.m.1", mid, mid, 3)
            shapes[f"classifier.{b}.linear.weight"] = (ncls, mid)
            shapes[f"classifier.{b}.linear.bias"] = (ncls,)
    return shapes


def spec_forward(sd, cfg, x):
    """Eval-mode forward computed functionally from a state dict."""
    eps = 1e-5

    def bn_relu(t, p):
        return F.relu(F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"],
                                   sd[p + ".weight"], sd[p + ".bias"], False, 0.0, eps))

    def conv_basic(t, p, stride, pad):
        return bn_relu(F.conv2d(t, sd[p + ".net.0.weight"], stride=stride, padding=pad), p + ".net.1")

    def conv_bn(t, p, stride):
        if cfg["bottleneck"]:
            t = bn_relu(F.conv2d(t, sd[p + ".net.0.weight"]), p + ".net.1")
            return bn_relu(F.conv2d(t, sd[p + ".net.3.weight"], stride=stride, padding=1),
                           p + ".net.4")
        return bn_relu(F.conv2d(t, sd[p + ".net.0.weight"], stride=stride, padding=1), p + ".net.1")

    feats, logits = None, []
    for ev in spec_walk(cfg):
        if ev[0] == "stem":
            S = ev[3]
            if cfg["stem"] == "cifar":
                t = conv_basic(x, "blocks.0.0.layers.0", 1, 1)
            else:
                t = F.conv2d(x, sd["blocks.0.0.layers.0.0.weight"], sd["blocks.0.0.layers.0.0.bias"],
                             stride=2, padding=3)
                t = F.max_pool2d(bn_relu(t, "blocks.0.0.layers.0.1"), 3, 2, 1)
            feats = [t]
            for s in range(1, S):
                feats.append(conv_basic(feats[-1], f"blocks.0.0.layers.{s}", 2, 1))
        elif ev[0] == "layer":
            _, b, i, in_s, out_s, w, k, grF, bnF = ev
            S = len(grF)
            first_in = S - in_s
            off = S - out_s
            new = []
            for j, s in enumerate(range(off, S)):
                p = f"blocks.{b}.{i}.layers.{j}"
                xs = feats[s - first_in]
                if s == off and in_s == out_s:
                    new.append(torch.cat([xs, conv_bn(xs, p + ".conv_normal", 1)], 1))
                else:
                    xf = feats[s - 1 - first_in]
                    new.append(torch.cat([xs, conv_bn(xf, p + ".conv_down", 2),
                                          conv_bn(xs, p + ".conv_normal", 1)], 1))
            feats = new
        elif ev[0] == "transition":
            _, b, i = ev[:3]
            feats = [conv_basic(t, f"blocks.{b}.{i}.m.{j}", 1, 0) for j, t in enumerate(feats)]
        else:
            b = ev[1]
            t = conv_basic(feats[-1], f"classifier.{b}.m.0", 2, 1)
            t = conv_basic(t, f"classifier.{b}.m.1", 2, 1)
            t = F.avg_pool2d(t, 2).flatten(1)
            logits.append(F.linear(t, sd[f"classifier.{b}.linear.weight"],
                                   sd[f"classifier.{b}.linear.bias"]))
    return logits


def spec_macs(cfg, h, w):
    """Cumulative per-exit multiply-adds with docs/MSDNET.md's counting rules."""
    def out(v, ks, st, pd):
        return (v + 2 * pd - ks) // st + 1

    grF = _factors(cfg["grFactor"])
    S = len(grF)
    sizes = []
    hh, ww = h, w
    if cfg["stem"] == "imagenet":
        hh, ww = out(hh, 7, 2, 3), out(ww, 7, 2, 3)
        stem0 = (hh, ww)
        hh, ww = out(hh, 3, 2, 1), out(ww, 3, 2, 1)
    sizes.append((hh, ww))
    for _ in range(1, S):
        hh, ww = out(hh, 3, 2, 1), out(ww, 3, 2, 1)
        sizes.append((hh, ww))
    total, cum = 0, []

    def conv_relu(cin, cout, ks, hw_out):  # conv + its ReLU (BN is free)
        return cin * cout * ks * ks * hw_out[0] * hw_out[1] + cout * hw_out[0] * hw_out[1]

    def conv_bn(cin, cout, width, hw_in, stride):
        hw_out = (out(hw_in[0], 3, stride, 1), out(hw_in[1], 3, stride, 1))
        if cfg["bottleneck"]:
            inner = min(cin, width * cout)
            return conv_relu(cin, inner, 1, hw_in) + conv_relu(inner, cout, 3, hw_out)
        return conv_relu(cin, cout, 3, hw_out)

    for ev in spec_walk(cfg):
        if ev[0] == "stem":
            c = [cfg["nChannels"] * g for g in grF]
            if cfg["stem"] == "cifar":
                total += conv_relu(3, c[0], 3, sizes[0])
            else:
                total += conv_relu(3, c[0], 7, stem0) + c[0] * sizes[0][0] * sizes[0][1] * 9
            for s in range(1, S):
                total += conv_relu(c[s - 1], c[s], 3, sizes[s])
        elif ev[0] == "layer":
            _, b, i, in_s, out_s, wd, k, grF_, bnF = ev
            off = S - out_s
            for s in range(off, S):
                if s == off and in_s == out_s:
                    total += conv_bn(wd * grF[s], k * grF[s], bnF[s], sizes[s], 1)
                else:
                    total += conv_bn(wd * grF[s - 1], k * grF[s] // 2, bnF[s - 1], sizes[s - 1], 2)
                    total += conv_bn(wd * grF[s], k * grF[s] // 2, bnF[s], sizes[s], 1)
        elif ev[0] == "transition":
            _, b, i, out_s, wd, new, _g = ev
            for s in range(S - out_s, S):
                total += conv_relu(wd * grF[s], new * grF[s], 1, sizes[s])
        else:
            _, b, c, mid, ncls = ev
            h1 = (out(sizes[-1][0], 3, 2, 1), out(sizes[-1][1], 3, 2, 1))
            h2 = (out(h1[0], 3, 2, 1), out(h1[1], 3, 2, 1))
            total += conv_relu(c, mid, 3, h1) + conv_relu(mid, mid, 3, h2)
            total += mid * (h2[0] // 2) * (h2[1] // 2) * 4 + mid * ncls + ncls
            cum.append(total)
    return cum


SMALL_CONFIGS = {
    "min-prune": dict(nBlocks=3, nChannels=8, base=2, stepmode="even", step=2, growthRate=4,
                      grFactor=(1, 2, 4), bnFactor=(1, 2, 4), prune="min", reduction=0.5,
                      bottleneck=True, num_classes=5, stem="cifar"),
    "no-bottleneck-lin": dict(nBlocks=3, nChannels=6, base=1, stepmode="lin_grow", step=1,
                              growthRate=4, grFactor="1-2-2", bnFactor="1-1-2", prune="max",
                              reduction=0.5, bottleneck=False, num_classes=3, stem="cifar"),
    "two-scales-no-transition": dict(nBlocks=2, nChannels=5, base=3, stepmode="even", step=2,
                                     growthRate=2, grFactor=(1, 3), bnFactor=(2, 1), prune="max",
                                     reduction=0.0, bottleneck=True, num_classes=4, stem="cifar"),
    "imagenet-tiny": dict(nBlocks=2, nChannels=8, base=3, stepmode="even", step=3, growthRate=4,
                          grFactor=(1, 2, 4, 4), bnFactor=(1, 2, 4, 4), prune="max",
                          reduction=0.5, bottleneck=True, num_classes=7, stem="imagenet"),
}


def _cfg(name):
    return SMALL_CONFIGS[name] if name in SMALL_CONFIGS else msdnet_config(name)


# ---------------------------------------------------------------------------------------------
# Figures of the paper
# ---------------------------------------------------------------------------------------------
def test_cifar100_anytime_matches_paper_figures():
    model = MSDNetPlain(**msdnet_config("cifar100-anytime"))
    assert count_parameters(model) == CIFAR100_ANYTIME_PARAMS
    macs = exit_macs(model, (3, 32, 32))
    assert [round(m / 1e6, 1) for m in macs] == CIFAR100_ANYTIME_MACS_M
    assert exit_parameters(model)[-1] == CIFAR100_ANYTIME_PARAMS


def test_imagenet_step7_matches_paper_figures():
    model = MSDNetPlain(**msdnet_config("imagenet-step7"))
    assert round(count_parameters(model) / 1e6, 1) == IMAGENET_STEP7_PARAMS_M
    macs = exit_macs(model, (3, 224, 224))
    assert [round(m / 1e9, 2) for m in macs] == IMAGENET_STEP7_MACS_G


# ---------------------------------------------------------------------------------------------
# Structure: keys and shapes, structural attributes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MSDNET_CONFIG_NAMES) + list(SMALL_CONFIGS))
def test_parameter_keys_and_shapes_follow_spec(name):
    cfg = _cfg(name)
    model = MSDNetPlain(**cfg)
    got = {k: tuple(v.shape) for k, v in model.named_parameters()}
    want = spec_param_shapes(cfg)
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))[:10]
    assert got == want
    # every BN has its running statistics, nothing else is a buffer
    buffers = {k for k, _ in model.named_buffers()}
    bn_prefixes = {k[:-len(".weight")] for k, s in want.items()
                   if k.endswith(".weight") and len(s) == 1 and "linear" not in k}
    assert buffers == {p + suffix for p in bn_prefixes
                       for suffix in (".running_mean", ".running_var", ".num_batches_tracked")}


def test_structural_attributes_match_modules_and_runtime():
    cfg = msdnet_config("cifar100-anytime")
    model = MSDNetPlain(**cfg).eval()
    seen = {}
    hooks = []
    for b, i, layer in model.dense_layers():
        assert isinstance(layer, MSDNetLayer) and model.blocks[b][i] is layer
        assert layer.offset == model.n_scales - layer.out_scales
        assert layer.discard == layer.in_scales - layer.out_scales
        for spec, m in zip(layer.specs, layer.layers):
            assert spec.scale == layer.offset + spec.position
            cn = m.conv_normal
            assert spec.normal == (cn.in_channels, cn.inner_channels, cn.out_channels)
            assert cn.conv1.in_channels == spec.in_channels
            assert cn.conv3.out_channels == spec.normal[2]
            if spec.two_path:
                cd = m.conv_down
                assert spec.down == (cd.in_channels, cd.inner_channels, cd.out_channels)
                assert cd.conv1.in_channels == spec.finer_channels and cd.conv3.stride == (2, 2)
            else:
                assert spec.down is None and not hasattr(m, "conv_down")
        hooks.append(layer.register_forward_hook(
            lambda mod, inp, out, _l=layer: seen.__setitem__(_l.index, (inp[0], out))))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert len(seen) == model.n_layers_all
    for _, _, layer in model.dense_layers():
        inp, out = seen[layer.index]
        assert tuple(t.shape[1] for t in inp) == layer.in_channels
        assert tuple(t.shape[1] for t in out) == layer.out_channels
    for blk in model.blocks:
        assert blk.kinds[0] == ("stem" if blk.index == 0 else "layer")
        for i in blk.transition_indices:
            assert blk.kinds[i - 1] == "layer" and blk[i - 1].discard == 1
            assert blk[i].in_channels == blk[i - 1].out_channels
    assert model.classifier_channels == tuple(c.in_channels for c in model.classifier)
    assert model.steps == [4, 2, 2, 2, 2, 2, 2]
    part = model.blocks[0][1:3]  # slicing a block gives a plain Sequential of the same modules
    assert isinstance(part, torch.nn.Sequential) and part[0] is model.blocks[0][1]


def test_init_follows_spec():
    torch.manual_seed(0)
    model = MSDNetPlain(**msdnet_config("cifar100-anytime"))
    conv = model.classifier[6].m[1].net[0]  # 128x128x3x3: many samples
    n = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / n), rel=0.02)
    assert conv.weight.mean().abs().item() < 0.1 * math.sqrt(2.0 / n)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, torch.nn.Linear):
            assert torch.all(m.bias == 0)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------
def _randomize(model, gen):
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
            elif name.endswith("num_batches_tracked"):
                continue
            elif name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.1)
            elif t.dim() == 1:  # BN weight
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)


@pytest.mark.parametrize("name,size", [("cifar100-anytime", (32, 32)),
                                       ("min-prune", (17, 48)),
                                       ("no-bottleneck-lin", (31, 20)),
                                       ("two-scales-no-transition", (19, 24)),
                                       ("imagenet-tiny", (150, 133))])
def test_forward_matches_functional_spec(name, size):
    cfg = _cfg(name)
    gen = torch.Generator().manual_seed(1)
    model = MSDNetPlain(**cfg).double().eval()
    _randomize(model, gen)
    x = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        got = model(x)
        want = spec_forward(model.state_dict(), cfg, x)
    assert len(got) == len(want) == cfg["nBlocks"]
    for g, w in zip(got, want):
        assert g.shape == (2, cfg["num_classes"])
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", MSDNET_CONFIG_NAMES)
def test_every_named_config_runs(name):
    cfg = msdnet_config(name)
    model = MSDNetPlain(**cfg).eval()
    c, h, w = default_input_size(name)
    batch = 2 if cfg["stem"] == "cifar" else 1
    with torch.no_grad():
        out = model(torch.randn(batch, c, h, w))
    assert len(out) == cfg["nBlocks"] == model.num_exits
    assert all(o.shape == (batch, cfg["num_classes"]) for o in out)
    assert all(torch.isfinite(o).all() for o in out)


def test_train_mode_backward_and_state_dict_round_trip():
    cfg = SMALL_CONFIGS["min-prune"]
    model = MSDNetPlain(**cfg)
    out = model(torch.randn(3, 3, 24, 24))
    sum(o.square().mean() for o in out).backward()
    assert all(p.grad is not None for p in model.parameters())
    other = MSDNetPlain(**cfg)
    other.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    other.eval()
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        for a, b in zip(model(x), other(x)):
            torch.testing.assert_close(a, b)


def test_accepted_input_sizes():
    model = MSDNetPlain(**msdnet_config("cifar10-anytime")).eval()
    lo, hi = model.input_size_range()
    assert (lo, hi) == (17, 48)  # coarsest scale (/4) must be 5..12 px
    with torch.no_grad():
        for h, w in [(lo, hi), (hi, lo)]:
            assert model(torch.randn(1, 3, h, w))[0].shape == (1, 10)
    for h, w in [(lo - 1, 32), (32, hi + 1), (8, 8), (1, 1)]:
        with pytest.raises(ValueError, match=r"\[17, 48\]"):
            model(torch.randn(1, 3, h, w))
    imnet = MSDNetPlain(**SMALL_CONFIGS["imagenet-tiny"])
    assert imnet.input_size_range() == (129, 384)
    assert imnet.scale_sizes(224, 224) == [(56, 56), (28, 28), (14, 14), (7, 7)]


def test_input_validation():
    model = MSDNetPlain(**SMALL_CONFIGS["min-prune"])
    with pytest.raises(ValueError, match="3 input channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(TypeError):
        model([torch.randn(1, 3, 32, 32)])


@pytest.mark.parametrize("change,match", [
    (dict(bnFactor=(1, 2)), "len\\(grFactor\\)=3 != len\\(bnFactor\\)=2"),
    (dict(prune="avg"), "prune"),
    (dict(stepmode="log"), "stepmode"),
    (dict(stem="mnist"), "stem"),
    (dict(growthRate=3, grFactor=(1, 1, 2)), "growthRate\\*grFactor\\[1\\] = 3 must be even"),
    (dict(grFactor="1-x-4"), "grFactor"),
    (dict(grFactor=(1, 0, 4)), "grFactor"),
    (dict(nBlocks=0), "nBlocks"),
    (dict(reduction=1.5), "reduction"),
    (dict(bottleneck="yes"), "bottleneck"),
    (dict(step=0), "step"),
])
def test_bad_constructor_arguments(change, match):
    cfg = dict(SMALL_CONFIGS["min-prune"], **change)
    with pytest.raises(ValueError, match=match):
        MSDNetPlain(**cfg)


def test_unknown_config_name_lists_valid_ones():
    with pytest.raises(ValueError, match="cifar100-anytime") as e:
        msdnet_config("cifar1000")
    for n in MSDNET_CONFIG_NAMES:
        assert n in str(e.value)
    a = msdnet_config("cifar10-budgeted")
    a["nBlocks"] = 99
    assert msdnet_config("cifar10-budgeted")["nBlocks"] == 7


# ---------------------------------------------------------------------------------------------
# Multiply-add counting
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,size", [("cifar10-anytime", (32, 32)),
                                       ("cifar10-budgeted", (32, 32)),
                                       ("cifar100-budgeted", (32, 32)),
                                       ("imagenet-step4", (224, 224)),
                                       ("min-prune", (40, 40)),
                                       ("no-bottleneck-lin", (32, 32)),
                                       ("two-scales-no-transition", (19, 24)),
                                       ("imagenet-tiny", (150, 133))])
def test_macs_match_analytic_count(name, size):
    cfg = _cfg(name)
    model = MSDNetPlain(**cfg)
    report = count_macs(model, (3,) + size)
    assert list(report.exit_macs) == spec_macs(cfg, *size)
    assert sum(report.module_macs.values()) == report.exit_macs[-1]
    assert list(report.exit_macs) == [sum(report.step_macs[:b + 1])
                                      for b in range(cfg["nBlocks"])]
    assert all(s == b + c for s, b, c in zip(report.step_macs, report.block_macs,
                                             report.classifier_macs))


def test_count_macs_leaves_model_untouched():
    model = MSDNetPlain(**SMALL_CONFIGS["min-prune"])
    model.train()
    model.classifier[0].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, (3, 32, 32))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(v.device.type == "cpu" for v in after.values())
    assert model.training and not model.classifier[0].training and model.blocks[0].training


def test_count_macs_rejects_unknown_leaves():
    model = MSDNetPlain(**SMALL_CONFIGS["min-prune"])
    model.classifier[0].m[2] = torch.nn.Softplus()  # no counting rule
    with pytest.raises(TypeError, match="Softplus"):
        count_macs(model, (3, 32, 32))
