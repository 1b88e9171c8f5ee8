"""Fused MSDNet: parity with the plain-PyTorch composition (MSDNetPlain, torch.cat), lazy
anytime prediction, real budgeted early exit."""
import math

import pytest
import torch

import msdnet_ops
from conftest import MSDNET_CONFIGS, MSDNET_SMALL, backend_params, msdnet_pair
from msdnet_ops.inference import assign_exits, exit_predictions
from msdnet_ops.models import MSDNetPlain

F64 = torch.float64
SMALL, CONFIGS, _pair = MSDNET_SMALL, MSDNET_CONFIGS, msdnet_pair


def _compare(ref, ours, x, train, tol):
    ref.train(train)
    ours.train(train)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    assert len(yo) == len(yr) == ref.num_exits
    grads = [torch.randn_like(y) for y in yr]
    sum((y * g).sum() for y, g in zip(yr, grads)).backward()
    sum((y * g).sum() for y, g in zip(yo, grads)).backward()
    for k, (a, b) in enumerate(zip(yo, yr)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"logits of exit {k}")
    torch.testing.assert_close(xo.grad, xr.grad, rtol=tol, atol=tol, msg="input gradient")
    for (name, pr), (_, po) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(po.grad, pr.grad, rtol=tol, atol=tol, msg=f"grad of {name}")
    for (name, br), (_, bo) in zip(ref.named_buffers(), ours.named_buffers()):
        torch.testing.assert_close(bo, br, rtol=tol, atol=tol, msg=f"buffer {name}")
    ref.zero_grad()
    ours.zero_grad()


@pytest.mark.parametrize("backend", backend_params(include_triton=False))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_msdnet_matches_plain_pytorch(backend, use_backend, config):
    dev = use_backend(backend)
    cfg, size = CONFIGS[config]
    ref, ours = _pair(cfg, device=dev)
    x = torch.randn(2, 3, size, size, dtype=F64, device=dev)
    _compare(ref, ours, x, True, 1e-9)
    _compare(ref, ours, x, False, 1e-9)


@pytest.mark.parametrize("choice", ["onednn", "gemm", "direct"])
def test_msdnet_matches_plain_pytorch_with_each_cpu_convolution(use_backend, monkeypatch, choice):
    """Each CPU convolution implementation forced wherever it applies (oneDNN elsewhere): the
    whole network, training (forward and backward) and inference, still equals the plain
    model in float64; forced "direct" does run our direct k x k kernel (forward, inference
    and input gradient), our pointwise kernel and, in inference, the two fused (a path's
    bottleneck computed into the direct kernel's scratch)."""
    from msdnet_ops.kernels import cpu as cpu_kernels
    dev = use_backend("cpu")
    monkeypatch.setenv("MSDNET_OPS_CPU_CONV", choice)
    calls = []

    def spy(name, prepare, relu_arg):  # every use of a kernel runs a call prepared by it
        def prepared(*args):
            run = prepare(*args)
            return lambda x, out: calls.append((name, args[relu_arg])) or run(x, out)
        return prepared
    for name, relu_arg in (("direct_conv", 4), ("pointwise_conv_rows", 2),
                           ("bottleneck_direct_conv", 6)):
        monkeypatch.setattr(cpu_kernels, "prepared_" + name,
                            spy(name, getattr(cpu_kernels, "prepared_" + name), relu_arg))
    cfg, size = CONFIGS["cifar-max"]
    ref, ours = _pair(cfg, device=dev)
    x = torch.randn(2, 3, size, size, dtype=F64, device=dev)
    _compare(ref, ours, x, True, 1e-9)
    ref.eval()
    ours.eval()
    with torch.no_grad():
        for k, (a, b) in enumerate(zip(ours(x), ref(x))):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"logits of exit {k}")
    kinds = {(name, relu) for name, relu in calls}
    if choice == "direct":  # relu: the inference convolution; without: forward, input gradient
        assert {("direct_conv", True), ("direct_conv", False),
                ("pointwise_conv_rows", True), ("pointwise_conv_rows", False),
                ("bottleneck_direct_conv", True)} <= kinds
    else:
        assert not kinds


def test_msdnet_float32_and_batch_one(use_backend):
    dev = use_backend("cpu")
    ref, ours = _pair(SMALL, dtype=torch.float32, device=dev)
    _compare(ref, ours, torch.randn(1, 3, 32, 32, device=dev), True, 2e-4)


@pytest.mark.parametrize("backend", backend_params(include_triton=False))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_inference_on_activated_buffers_matches_plain_pytorch(backend, use_backend, config):
    """Eval mode without autograd runs the inference path (BatchNorms folded into the
    convolutions, activated buffers): same logits as the plain model, in float64."""
    from msdnet_ops.models.msdnet_inference import InferenceRun
    dev = use_backend(backend)
    cfg, size = CONFIGS[config]
    ref, ours = _pair(cfg, device=dev)
    _compare(ref, ours, torch.randn(3, 3, size, size, dtype=F64, device=dev), True, 1e-9)
    ref.eval()
    ours.eval()
    x = torch.randn(3, 3, size, size, dtype=F64, device=dev)
    with torch.no_grad():
        assert isinstance(ours.start(x), InferenceRun)
        for k, (a, b) in enumerate(zip(ours(x), ref(x))):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"logits of exit {k}")
    # running statistics changed in place (a training step, a loaded checkpoint): the folded
    # weights follow
    for m in list(ref.modules()) + list(ours.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.mul_(1.5)
    with torch.no_grad():
        for a, b in zip(ours(x), ref(x)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_inference_follows_replaced_parameters_and_a_new_dtype(use_backend):
    """The inference path's folded units are checked once per forward pass against every
    convolution and BatchNorm tensor (storage address and version counter): parameters
    replaced by new tensors (a state dict loaded with ``assign=True``), a single weight
    replaced by a new Parameter, and the model moved to another dtype all reach the next
    forward pass's logits."""
    dev = use_backend("cpu")
    ref, ours = msdnet_pair(MSDNET_SMALL, device=dev)
    ref.eval()
    ours.eval()

    def check(dtype):
        x = torch.randn(2, 3, 32, 32, dtype=dtype, device=dev)
        tol = 1e-10 if dtype == F64 else 1e-4
        with torch.no_grad():
            for k, (a, b) in enumerate(zip(ours(x), ref(x))):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"logits of exit {k}")
    check(F64)  # (folds every unit)
    g = torch.Generator().manual_seed(3)
    new = {k: v * (1 + 0.2 * torch.rand(v.shape, generator=g, dtype=v.dtype))
           if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    ref.load_state_dict(new)
    ours.load_state_dict({k: v.clone() for k, v in new.items()}, assign=True)
    check(F64)
    conv = next(m for m in ours.modules() if isinstance(m, torch.nn.Conv2d))
    name = next(n for n, m in ours.named_modules() if m is conv)
    weight = torch.randn_like(conv.weight)
    conv.weight = torch.nn.Parameter(weight.clone())
    ref.get_submodule(name).weight = torch.nn.Parameter(weight.clone())
    check(F64)
    ref.float()
    ours.float()
    check(torch.float32)


def test_inference_compiles_as_one_graph_from_a_fresh_model(use_backend):
    """torch.compile of a new model in eval mode: one graph with no break (fullgraph raises
    on one) on the first call, as on later ones (no recompilation), and the plain model's
    logits. The first call used to break the graph (multiply-add counting with hooks) and the
    second to recompile (the folded-weight cache compares storage addresses)."""
    from torch._dynamo.testing import CompileCounter
    dev = use_backend("cpu")
    ref, ours = _pair(SMALL, dtype=torch.float32, device=dev)
    ref.eval()
    ours.eval()
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(ours, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, 32, 32, device=dev)
    try:
        with torch.no_grad():
            for _ in range(2):
                for k, (a, b) in enumerate(zip(compiled(x), ref(x))):
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5,
                                               msg=f"logits of exit {k}")
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1


@pytest.mark.parametrize("mode", [True, "all"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_memory_efficient_recomputes_exactly(use_backend, config, mode):
    use_backend("cpu")
    cfg, size = CONFIGS[config]
    ref, _ = _pair(cfg)
    ours = msdnet_ops.MSDNet(**cfg, memory_efficient=mode).double()
    ours.load_reference_state_dict(ref.state_dict())
    x = torch.randn(2, 3, size, size, dtype=F64)
    _compare(ref, ours, x, True, 1e-9)
    _compare(ref, ours, x, False, 1e-9)


def test_memory_efficient_frees_what_it_says_after_forward(use_backend, monkeypatch):
    """After a training forward: nothing freed by default; with ``memory_efficient=True``
    every bottleneck output and every scale buffer (its units keep their convolution outputs,
    from which backward writes the activated channels again); with ``"all"`` every bottleneck
    output and every unit's convolution output (one per BatchNorm but the classifiers' two),
    but no scale buffer, so only activated buffers and classifier maps stay. Backward then
    brings each back once, and gives the default model's gradients."""
    import weakref
    from msdnet_ops.nn.feature_buffer import BufferState
    use_backend("cpu")
    states, restored, most_alive = [], [], [0]
    init, restore = BufferState.__init__, BufferState.restore_values

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        states.append(weakref.ref(self))
        most_alive[0] = max(most_alive[0], sum(1 for s in states if s() is not None))

    def recording_restore(self):
        if self.values is None:
            restored.append(id(self))
        restore(self)
    monkeypatch.setattr(BufferState, "__init__", recording_init)
    monkeypatch.setattr(BufferState, "restore_values", recording_restore)
    torch.manual_seed(0)
    base = msdnet_ops.MSDNet(**SMALL).double()
    bottlenecks = sum(1 for m in base.modules() if getattr(m, "bottleneck", False))
    units = sum(1 for m in base.modules() if isinstance(m, torch.nn.BatchNorm2d)) \
        - 2 * base.num_exits - bottlenecks
    # one per scale, and a new one for each scale a transition keeps
    scale_buffers = len(SMALL["grFactor"]) + sum(
        m.n_scales_kept for m in base.modules() if type(m).__name__ == "MSDNetTransition")
    assert bottlenecks > 0 and units > 0 and scale_buffers == len(base.plan.capacity)
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    grads = {}
    for mode, freed in ((False, 0), (True, scale_buffers + bottlenecks),
                        ("all", bottlenecks + units)):
        model = msdnet_ops.MSDNet(**SMALL, memory_efficient=mode).double()
        model.load_state_dict(base.state_dict())
        states.clear()
        restored.clear()
        loss = sum(o.square().sum() for o in model(x))
        assert sum(1 for s in states if s() is not None and s().values is None) == freed, mode
        loss.backward()
        assert len(restored) == len(set(restored)) == freed, mode
        grads[mode] = [p.grad for p in model.parameters()]
    for mode in (True, "all"):
        for a, b in zip(grads[mode], grads[False]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # no backward to come: nothing is kept alive for a rewrite (each unit's output goes once
    # written: the scale buffers, the image's and one or two transient ones are alive at once)
    model = msdnet_ops.MSDNet(**SMALL, memory_efficient=True).double()
    states.clear()
    most_alive[0] = 0
    with torch.no_grad():
        model(x)
    assert most_alive[0] <= scale_buffers + 3 < units


@pytest.mark.parametrize("bad", ["al", "bottlenecks", 2, None, [True]])
def test_memory_efficient_rejects_an_unknown_mode(bad):
    with pytest.raises(ValueError, match="memory_efficient"):
        msdnet_ops.MSDNet(**SMALL, memory_efficient=bad)


def test_backward_frees_each_buffer_when_its_last_node_ran(use_backend, monkeypatch):
    """Nodes drop their feature buffers as backward passes them (peak memory), unless the
    graph is retained, in which case a second backward gives the same gradients."""
    import gc
    import weakref
    from msdnet_ops.nn.feature_buffer import BufferState
    use_backend("cpu")
    ref, ours = _pair(SMALL)
    states = []
    init = BufferState.__init__

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        states.append(weakref.ref(self))
    monkeypatch.setattr(BufferState, "__init__", recording_init)
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    loss = sum(o.sum() for o in ours(x))
    assert len(states) > 5
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in ours.parameters()]
    gc.collect()
    assert all(s() is not None for s in states), "a retained graph lost its buffers"
    ours.zero_grad()
    loss.backward()
    for a, p in zip(first, ours.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-12, atol=1e-12)
    gc.collect()
    alive = [s for s in states if s() is not None]
    assert not alive, f"{len(alive)} feature buffers outlived backward while the graph is alive"


@pytest.mark.triton
def test_imagenet_inference_on_triton_kernels(use_backend):
    """The inference path on the Triton kernels, ImageNet stem included (its 7x7 convolution
    has no Triton kernel and runs in PyTorch)."""
    dev = use_backend("triton")
    cfg, size = CONFIGS["imagenet"]
    ref, ours = _pair(cfg, dtype=torch.float32, device=dev)
    ref.eval()
    ours.eval()
    x = torch.randn(1, 3, size, size, device=dev)
    with torch.no_grad():
        for a, b in zip(ours(x), ref(x)):
            torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)


@pytest.mark.triton
def test_msdnet_on_triton_kernels(use_backend):
    dev = use_backend("triton")
    cfg = dict(SMALL, nBlocks=1, base=1, grFactor=(1, 2), bnFactor=(1, 2), growthRate=2)
    ref, ours = _pair(cfg, dtype=torch.float32, device=dev)
    ref.eval()
    ours.eval()
    x = torch.randn(2, 3, 12, 12, device=dev)
    with torch.no_grad():
        for a, b in zip(ours(x), ref(x)):
            torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)


def test_cifar100_anytime_figures_of_the_paper():
    model = msdnet_ops.MSDNet(**msdnet_ops.msdnet_config("cifar100-anytime"))
    assert sum(p.numel() for p in model.parameters()) == 3_067_960
    macs = model.exit_macs((3, 32, 32))
    assert [round(m / 1e6, 1) for m in macs] == [15.1, 25.5, 37.1, 46.3, 57.3, 67.0, 75.9]


@pytest.mark.parametrize("name", msdnet_ops.MSDNET_CONFIG_NAMES)
def test_every_named_configuration_builds(name):
    model = msdnet_ops.MSDNet(**msdnet_ops.msdnet_config(name))
    assert model.num_exits == len(model.plan.exit_cells)
    # every leaf module belongs to exactly one cell, so cell costs add up to the exit costs
    size = (3, 224, 224) if "imagenet" in name else (3, 32, 32)
    assert sum(model.cell_macs(size)) == model.exit_macs(size)[-1]


def test_anytime_is_lazy_and_matches_forward(use_backend):
    use_backend("cpu")
    _, model = _pair(SMALL)
    model.eval()
    x = torch.randn(3, 3, 32, 32, dtype=F64)
    with torch.no_grad():
        full = model(x)
        run = model.start(x)
        full_macs = model.exit_macs((3, 32, 32))
        for k in range(model.num_exits):
            logits = run.exit_logits(k)
            torch.testing.assert_close(logits, full[k], rtol=1e-12, atol=1e-12)
            per_sample = run.macs / 3
            if k < model.num_exits - 1:
                assert per_sample < full_macs[k], "exit computed maps it does not depend on"
            else:
                assert per_sample == full_macs[k]
        steps = list(model.anytime(x))
    assert len(steps) == model.num_exits
    for a, b in zip(steps, full):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_anytime_predict_respects_a_macs_budget(use_backend):
    use_backend("cpu")
    _, model = _pair(SMALL)
    model.eval()
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    costs = model.exit_macs((3, 32, 32))
    logits, k = msdnet_ops.anytime_predict(model, x, max_macs=costs[1])
    assert k >= 1
    logits_all, k_all = msdnet_ops.anytime_predict(model, x, max_macs=costs[-1])
    assert k_all == model.num_exits - 1
    with torch.no_grad():
        torch.testing.assert_close(logits_all, model(x)[-1])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_budgeted_early_exit_equals_the_simulation(backend, use_backend):
    """Real early exit (samples leave the batch) gives the predictions and exits that the
    reference's simulation (run everything, assign afterwards) gives, and costs less."""
    use_backend(backend)
    _, model = _pair(SMALL)
    model.eval()
    torch.manual_seed(5)
    x = torch.randn(16, 3, 32, 32, dtype=F64)
    with torch.no_grad():
        probs = torch.stack([torch.softmax(l, 1) for l in model(x)])
    conf = probs.max(2).values
    thresholds = torch.stack([conf[0].median(), conf[1].median(), torch.tensor(-math.inf, dtype=F64)])
    result = msdnet_ops.BudgetedClassifier(model, thresholds).predict(x)
    want_exits = assign_exits(probs, thresholds)
    assert torch.equal(result.exits, want_exits)
    assert torch.equal(result.predictions, exit_predictions(probs, want_exits))
    assert 0 < (result.exits == 0).sum() < 16
    assert result.macs < result.expected_macs <= result.full_macs
    assert result.wall_time > 0


def test_budgeted_everyone_leaves_at_exit_one(use_backend):
    use_backend("cpu")
    _, model = _pair(SMALL)
    x = torch.randn(4, 3, 32, 32, dtype=F64)
    result = msdnet_ops.BudgetedClassifier(model, [0.0, 0.0, 0.0]).predict(x)
    assert (result.exits == 0).all()
    model.eval()
    with torch.no_grad():
        assert torch.equal(result.predictions, model(x)[0].argmax(1))
    assert result.macs <= 4 * model.exit_macs((3, 32, 32))[0]


def test_bad_input_raises_clear_errors():
    model = msdnet_ops.MSDNet(**SMALL)
    with pytest.raises(ValueError, match="x: expected 3 input channels"):
        model(torch.randn(2, 4, 32, 32))
    with pytest.raises(ValueError, match="image size 64x64 is not accepted"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"thresholds: expected one threshold per exit, shape \(3,\)"):
        msdnet_ops.BudgetedClassifier(model, [0.5, 0.5])
    with pytest.raises(ValueError, match="thresholds: contains NaN"):
        msdnet_ops.BudgetedClassifier(model, [0.5, float("nan"), 0.0])
    broken = msdnet_ops.MSDNet(**SMALL)
    with torch.no_grad():
        broken.classifier[0].linear.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="exit 0 produced non-finite logits"):
        msdnet_ops.BudgetedClassifier(broken, [0.5, 0.5, 0.0]).predict(torch.randn(2, 3, 32, 32))


def test_reference_checkpoint_keys_load():
    plain = MSDNetPlain(**SMALL)
    wrapped = {"state_dict": {"module." + k: v for k, v in plain.state_dict().items()}}
    model = msdnet_ops.MSDNet(**SMALL)
    model.load_reference_state_dict(wrapped)
    for k, v in plain.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    MSDNetPlain(**SMALL).load_state_dict(model.reference_state_dict())
