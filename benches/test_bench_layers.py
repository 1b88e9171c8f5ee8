"""pytest-benchmark: one DenseNet dense layer and one MSDNet layer, forward and
forward+backward, ours vs plain PyTorch, channels_last and torchvision memory_efficient=True
(torch.compile: see ``benches/run.py``, too slow to compile here for every case).

    python -m pytest benches/test_bench_layers.py --benchmark-only --benchmark-group-by=group

Small batches. Each case is first checked (outputs and parameter gradients agree with plain);
no test asserts anything about speed.
"""
import functools

import pytest
import torch

from benches import cases, checks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DENSE = {s.name: s for s in cases.densenet_layer_shapes(8, 2)
         if s.name in ("bc100 b1 L16", "d121 b3 L12")}
MSD = {s.name: s for s in cases.msdnet_layer_shapes(8) if s.name == "msd L3 s2 (down+normal)"}
DENSE_VARIANTS = ("plain", "channels_last", "memory_efficient", "ours")
MSD_VARIANTS = ("plain", "channels_last", "ours")


@functools.lru_cache(maxsize=None)
def checked_bench(kind: str, name: str):
    """The bench of one layer shape, checked once for all its variants."""
    if kind == "dense":
        bench = cases.LayerBench(DENSE[name], DEVICE)
        checks.check_layer(bench, DENSE_VARIANTS)
    else:
        bench = cases.MSDLayerBench(MSD[name], DEVICE)
        checks.check_layer(bench, MSD_VARIANTS)
    return bench


@pytest.mark.parametrize("variant", DENSE_VARIANTS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", list(DENSE))
def test_dense_layer(benchmark, shape, mode, variant):
    _run(benchmark, "dense", shape, mode, variant)


@pytest.mark.parametrize("variant", MSD_VARIANTS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", list(MSD))
def test_msdnet_layer(benchmark, shape, mode, variant):
    _run(benchmark, "msd", shape, mode, variant)


def _run(benchmark, kind, shape, mode, variant):
    fwd, fwdbwd = checked_bench(kind, shape).callables(variant)
    benchmark.group = f"{'dense' if kind == 'dense' else 'msdnet'} layer {shape} {mode}"
    benchmark(fwd if mode == "fwd" else fwdbwd)
