"""Direct launches of remembered compiled kernels (msdnet_ops.triton._direct_launch).

On any machine: the bookkeeping, with a stand-in kernel and launcher — which launches are
remembered, that a launch differing in anything Triton specialises on goes through Triton
again, and that the launcher gets the arguments in Triton's order; and, for every Triton
launch a small MSDNet and DenseNet training step makes (captured as on a GPU), that each
parameter gets its value. On a GPU (benches/gpu.py runs this file): ops launched again and
again with fresh inputs, aligned and not, match the reference, most of them directly.
"""
import inspect
import os
import sys

import pytest
import torch
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benches

from msdnet_ops.triton import _direct_launch as direct
from msdnet_ops.triton import _runtime as rt


def _kernel(x_ptr, y_ptr, n, eps, HAS_Y: tl.constexpr, BLOCK: tl.constexpr, EXTRA: tl.constexpr = 7):
    pass


class _Kernel:
    """What the module reads of a Triton kernel: the Python function behind it."""
    fn = staticmethod(_kernel)


KERNEL = _Kernel()


class _Compiled:
    """A compiled kernel whose launcher records its calls."""
    function, packed_metadata = "function", "packed"

    def __init__(self):
        self.calls = []

    def run(self, *launch):
        self.calls.append(launch)


class _Triton:
    """Triton's launch, counted: returns the compiled kernel and the blocks it ran with."""

    def __init__(self):
        self.compiled, self.launches = _Compiled(), 0

    def __call__(self, blocks):
        def call():
            self.launches += 1
            return self.compiled, blocks
        return call


@pytest.fixture
def fresh(monkeypatch):
    direct.clear()
    monkeypatch.setattr(direct, "ENABLED", True)
    monkeypatch.setattr(direct, "_current_stream", lambda index: f"stream{index}")
    yield
    direct.clear()


def _launch(triton, x, n=32, eps=1e-5, meta=None, blocks=None, device=0, grid=(3, 2)):
    blocks = dict(BLOCK=64) if blocks is None else blocks
    direct.launch(KERNEL, grid, (x, x, n, eps), dict(HAS_Y=True) if meta is None else meta,
                  blocks, device, triton(blocks))


def test_a_repeated_launch_calls_the_launcher_with_every_parameter_in_order(fresh):
    triton, x = _Triton(), torch.randn(8)
    _launch(triton, x)
    assert (triton.launches, triton.compiled.calls) == (1, [])
    y = torch.randn(8)
    _launch(triton, y, eps=3e-4)   # new data, another float: the same kernel
    assert triton.launches == 1
    (call,) = triton.compiled.calls
    assert call == (3, 2, 1, "stream0", "function", "packed", None, None, None,
                    y, y, 32, 3e-4, True, 64, 7)
    assert direct.stats == {"direct": 1, "through_triton": 1}


@pytest.mark.parametrize("change", [
    dict(n=33), dict(n=True), dict(eps=1), dict(device=1), dict(meta=dict(HAS_Y=False)),
    dict(meta=dict(HAS_Y=1)), dict(blocks=dict(BLOCK=32)),
    dict(x=torch.randn(9)[1:]),             # 4-byte aligned: Triton specialises on 16
    dict(x=torch.randn(8, dtype=torch.float64)),
])
def test_a_launch_that_triton_could_specialise_differently_goes_through_triton(fresh, change):
    triton = _Triton()
    args = dict(x=torch.randn(8), n=32, eps=1e-5, meta=None, blocks=None, device=0)
    _launch(triton, **args)
    args.update(change)
    _launch(triton, **args)
    assert (triton.launches, triton.compiled.calls) == (2, [])


def test_a_callable_grid_gets_the_block_sizes_triton_ran_with(fresh):
    triton, x, seen = _Triton(), torch.randn(8), []

    def grid(meta):
        seen.append(dict(meta))
        return (meta["BLOCK"] // 16,)
    for _ in range(2):
        _launch(triton, x, blocks=dict(BLOCK=128), grid=grid)
    assert seen == [dict(BLOCK=128)]
    assert triton.compiled.calls[0][:3] == (8, 1, 1)


def test_launch_hooks_or_the_switch_send_every_launch_through_triton(fresh, monkeypatch):
    triton, x = _Triton(), torch.randn(8)
    monkeypatch.setattr(direct, "_no_hooks", lambda: False)
    for _ in range(2):
        _launch(triton, x)
    monkeypatch.setattr(direct, "_no_hooks", lambda: True)
    monkeypatch.setattr(direct, "ENABLED", False)
    for _ in range(2):
        _launch(triton, x)
    assert (triton.launches, triton.compiled.calls) == (4, [])


def test_triton_hooks_are_seen(fresh):
    from triton import knobs
    chain = knobs.runtime.launch_enter_hook
    if not hasattr(chain, "add"):
        pytest.skip(f"this Triton's launch hooks are plain attributes ({type(chain).__name__})")
    assert direct._no_hooks()

    def hook(metadata):
        pass
    chain.add(hook)
    try:
        assert not direct._no_hooks()
    finally:
        chain.remove(hook)


def test_the_cache_starts_over_when_full_and_says_so_once(fresh, monkeypatch):
    monkeypatch.setattr(direct, "MAX_REMEMBERED", 2)
    monkeypatch.setattr(direct, "_warned_full", False)
    triton, x = _Triton(), torch.randn(8)
    with pytest.warns(RuntimeWarning, match="direct-launch cache starts over"):
        for n in range(1, 5):
            _launch(triton, x, n=16 * n)
    assert len(direct._remembered) <= 2
    _launch(triton, x, n=64)   # the last one is still remembered
    assert (triton.launches, len(triton.compiled.calls)) == (4, 1)


def test_a_float_constexpr_passed_positionally_is_not_remembered(fresh):
    def kernel(x_ptr, SCALE: tl.constexpr):
        pass

    class K:
        fn = staticmethod(kernel)
    triton, x, k = _Triton(), torch.randn(8), K()
    for scale in (0.5, 2.0):
        direct.launch(k, (1,), (x, scale), {}, {}, 0, triton({}))
    assert (triton.launches, triton.compiled.calls) == (2, [])


@pytest.mark.parametrize("value, expected", [(None, False), ("", False), ("0", False), ("1", True), (" 1 ", True)])
def test_the_switch_reads_0_or_1(value, expected):
    assert direct.enabled_by(value) is expected


@pytest.mark.parametrize("value", ["yes", "true", "2", "on"])
def test_the_switch_refuses_anything_else(value):
    with pytest.raises(ValueError, match=f"MSDNET_OPS_DIRECT_LAUNCH='{value}': expected 0 .* or 1"):
        direct.enabled_by(value)


# ----------------------------------------------------------------------------- real launches

@pytest.mark.parametrize("name", ["msdnet-cifar100-anytime", "densenet-bc100"])
def test_every_launch_of_a_training_step_gets_a_value_for_every_parameter(name):
    from benches import cases
    from benches.gpu_launches import triton_backend_on_cpu
    launches = []
    with triton_backend_on_cpu():
        model, fmt = cases.build_model(name, "ours", "cpu")
        x, y = cases.model_input(name, 2, "cpu", torch.float32, fmt)
        with rt.capturing(lambda kernel, args, meta, configs, tuning: launches.append((kernel, args, meta, configs))):
            cases.loss_of(model(x), y).backward()
    assert len({id(k) for k, *_ in launches}) >= 5
    for kernel, args, meta, configs in launches:
        params = list(inspect.signature(kernel.fn).parameters)
        for blocks in configs:
            tail = direct._tail(kernel, len(args), meta, blocks)
            assert len(args) + len(tail) == len(params), kernel.fn.__name__
            named = {**meta, **blocks}
            assert all(v is named[p] for p, v in zip(params[len(args):], tail) if p in named)


class _InterpretedLaunch:
    """A stand-in ``CompiledKernel`` for an interpreted kernel: its launcher runs the kernel
    with the argument list a direct launch passes (every parameter, positionally)."""
    function = packed_metadata = None

    def __init__(self, kernel):
        self.kernel = kernel

    def run(self, g0, g1, g2, stream, function, packed, metadata, enter, exit, *args):
        assert (metadata, enter, exit) == (None, None, None)
        self.kernel[(g0, g1, g2)](*args)


@pytest.fixture
def interpreter_as_launcher(fresh, monkeypatch):
    """Launches on CPU tensors take the compiled path (direct launches on), with the
    interpreter standing in for Triton's launch and launcher: the first launch of a signature
    runs the kernel as Triton would (keywords; tuned kernels with the first candidate config)
    and hands back a stand-in whose launcher runs it again from the direct launch's list."""
    from triton.runtime.interpreter import InterpretedFunction

    from msdnet_ops.triton import _autotune
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        original(self, *args, **kwargs)
        return _InterpretedLaunch(self)

    def launch_tuned(kernel, tuning, grid, args, meta):
        config = _autotune.candidates(tuning, dict(zip(kernel.arg_names, args)))[0]
        blocks = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
        return kernel[grid](*args, **meta, **blocks), blocks
    monkeypatch.setattr(InterpretedFunction, "run", run)
    monkeypatch.setattr(rt, "_launch_tuned", launch_tuned)
    monkeypatch.setattr(rt, "is_interpreted", lambda device: False)
    monkeypatch.setattr(rt, "interpreting", lambda kernel, device: False)
    monkeypatch.setattr(rt, "FLOAT32_PRECISION", "ieee")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_direct_launches_of_the_real_kernels_compute_what_their_first_launch_did(interpreter_as_launcher):
    """Tuned GEMMs (a 3x3 stride-2 convolution forward, dgrad, wgrad) and untuned kernels
    (statistics) twice with fresh inputs: the second time every launch is direct, its argument
    list assembled from the first (block sizes from the config, constexprs, defaults), and
    the results still match float64."""
    from msdnet_ops import reference as R
    from msdnet_ops import triton as T
    d = torch.float64
    for i in range(2):
        gen = torch.Generator().manual_seed(i)
        x = torch.randn(2, 5, 23, 23, generator=gen)  # 12x12 outputs: several row tiles
        w = torch.randn(3, 5, 3, 3, generator=gen)
        scale, shift = torch.rand(5, generator=gen) + 0.5, torch.randn(5, generator=gen)
        out = T.transform_conv(x, scale, shift, w, 2, 1, 1)
        torch.testing.assert_close(out.double(), R.transform_conv(x.to(d), scale.to(d), shift.to(d), w.to(d), 2, 1, 1),
                                   rtol=1e-4, atol=1e-5)
        grad_out = torch.randn(out.shape, generator=gen)
        gx, gs, gh = torch.zeros_like(x), torch.zeros(5), torch.zeros(5)
        rx, rs, rh = gx.to(d), gs.to(d), gh.to(d)
        gw = T.transform_conv_backward_(grad_out, x, scale, shift, w, 2, 1, 1, gx, gs, gh)
        rw = R.transform_conv_backward_(grad_out.to(d), x.to(d), scale.to(d), shift.to(d), w.to(d), 2, 1, 1, rx, rs, rh)
        for got, want in ((gx, rx), (gs, rs), (gh, rh), (gw, rw)):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
        mean, invstd = T.channel_stats(x, 1e-5)
        rm, ri = R.channel_stats(x.to(d), 1e-5)
        torch.testing.assert_close((mean.double(), invstd.double()), (rm, ri), rtol=1e-4, atol=1e-6)
        if i == 0:
            first = dict(direct.stats)
    assert first["direct"] == 0 and first["through_triton"] >= 4  # forward, dgrad, wgrad, statistics
    assert direct.stats["direct"] == first["through_triton"], direct.stats


# ----------------------------------------------------------------------------- on a GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="direct launches need a CUDA GPU (benches/gpu.py runs this file)")


def _rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@needs_cuda
def test_kernels_launched_again_and_again_match_the_reference_on_a_gpu(monkeypatch):
    """A tuned GEMM (convolution forward and backward) and untuned kernels (statistics), six
    times each with fresh inputs, every other time 4 bytes off 16-byte alignment (another
    specialisation): every result matches float64, and from the third round on every launch is
    direct."""
    from msdnet_ops import reference as R
    from msdnet_ops import triton as T
    monkeypatch.setattr(rt, "FLOAT32_PRECISION", "ieee")
    monkeypatch.setattr(direct, "ENABLED", True)
    direct.clear()
    dev, d, n = torch.device("cuda"), torch.float64, 3 * 13 * 7 * 7
    for i in range(6):
        base = torch.randn(n + 4, device=dev)
        x = base[i % 2:i % 2 + n].view(3, 13, 7, 7)
        w = torch.randn(5, 13, 3, 3, device=dev)
        scale, shift = torch.rand(13, device=dev) + 0.5, torch.randn(13, device=dev)
        out = T.transform_conv(x, scale, shift, w, 1, 1, 1)
        assert _rel_err(out, R.transform_conv(x.to(d), scale.to(d), shift.to(d), w.to(d), 1, 1, 1)) < 1e-5
        grad_out = torch.randn_like(out)
        gx, gs, gh = torch.zeros_like(x), torch.zeros(13, device=dev), torch.zeros(13, device=dev)
        rx, rs, rh = gx.to(d), gs.to(d), gh.to(d)
        gw = T.transform_conv_backward_(grad_out, x, scale, shift, w, 1, 1, 1, gx, gs, gh)
        rw = R.transform_conv_backward_(grad_out.to(d), x.to(d), scale.to(d), shift.to(d), w.to(d),
                                        1, 1, 1, rx, rs, rh)
        for got, want, tol in ((gx, rx, 1e-5), (gs, rs, 4e-5), (gh, rh, 4e-5), (gw, rw, 1e-5)):
            assert _rel_err(got, want) < tol  # as test_gpu_transform_conv (per-channel sums: 4x)
        mean, invstd = T.channel_stats(x, 1e-5)
        rm, ri = R.channel_stats(x.to(d), 1e-5)
        assert _rel_err(mean, rm) < 1e-5 and _rel_err(invstd, ri) < 1e-4
        if i == 1:
            after_two = dict(direct.stats)
    # rounds 0 and 1 went through Triton (aligned, then not); rounds 2-5 repeat their signatures
    assert direct.stats["through_triton"] == after_two["through_triton"] > 0, direct.stats
    assert direct.stats["direct"] >= 2 * after_two["through_triton"], direct.stats
