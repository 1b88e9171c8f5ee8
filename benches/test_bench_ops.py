"""pytest-benchmark: every op of ``msdnet_ops.ops``, ours vs the pure-PyTorch reference
(``msdnet_ops.reference``), on a strided buffer prefix as the fused modules pass it.

    python -m pytest benches/test_bench_ops.py --benchmark-only
    python -m pytest benches/ --benchmark-disable     # run each once: checks only

Small shapes (seconds per test on a CPU). Each test first checks that ours and the reference
agree; no test asserts anything about speed. ``--benchmark-group-by=group`` puts ours and
the reference of one op side by side.
"""
import functools

import pytest
import torch

from benches import cases, checks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = {"bc100 b1 L16": cases.OpShape("bc100 b1 L16", 8, 204, 12, 32, 48),
          "d121 b1 L6": cases.OpShape("d121 b1 L6", 2, 224, 32, 56, 128)}


@functools.lru_cache(maxsize=None)
def op_bench(shape_name: str) -> cases.OpBench:
    return cases.OpBench(SHAPES[shape_name], DEVICE)


@pytest.mark.parametrize("variant", ["ours", "plain"])
@pytest.mark.parametrize("op", cases.OP_NAMES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_op(benchmark, shape, op, variant):
    bench = op_bench(shape)
    checks.check_op(bench, op)
    benchmark.group = f"op {op} | {shape}"
    benchmark(bench.ops[op][0 if variant == "ours" else 1])
