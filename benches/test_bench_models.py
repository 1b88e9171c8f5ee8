"""pytest-benchmark: a training step (SGD, momentum 0.9) of DenseNet-BC-100 and MSDNet
(cifar100-anytime) at batch 4, ours vs plain PyTorch, and MSDNet inference.

    python -m pytest benches/test_bench_models.py --benchmark-only --benchmark-group-by=group

Each model pair is first checked (the logits agree); no test asserts anything about speed.
The fuller picture (DenseNet-121, memory, anytime, budgets) is ``benches/run.py``.
"""
import functools

import pytest
import torch

from benches import cases, checks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BATCH = 4
NETS = ("densenet-bc100", "msdnet-cifar100-anytime")
VARIANTS = ("plain", "ours")


@functools.lru_cache(maxsize=None)
def checked_models(name: str) -> dict:
    """variant -> (model, x, y), checked."""
    models = {}
    for v in VARIANTS:
        m, fmt = cases.build_model(name, v, DEVICE)
        x, y = cases.model_input(name, BATCH, DEVICE, torch.float32, fmt)
        models[v] = (m, x, y)
    checks.check_models(name, models)
    return models


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", NETS)
def test_train_step(benchmark, name, variant):
    model, x, y = checked_models(name)[variant]
    benchmark.group = f"train step {name} batch {BATCH}"
    benchmark.pedantic(cases.train_step_fn(model, x, y), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_msdnet_inference(benchmark, variant):
    model, x, _ = checked_models("msdnet-cifar100-anytime")[variant]
    benchmark.group = f"inference msdnet-cifar100-anytime batch {BATCH}"
    benchmark.pedantic(cases.infer_fn(model, x), rounds=10, warmup_rounds=1)
