"""CudaGraphTrainStep: a captured training step trains exactly as the eager one does (GPU), and
refuses what it cannot capture before anything runs (any machine)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import msdnet_ops
from msdnet_ops.training.cuda_graph import CudaGraphTrainStep
from msdnet_ops.training.recipe import multi_exit_loss

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA graphs need a CUDA GPU (benches/gpu.py runs this file)")

SMALL_MSDNET = dict(nBlocks=3, nChannels=4, base=2, stepmode="even", step=2, growthRate=4,
                    grFactor=(1, 2, 4), bnFactor=(1, 2, 4), prune="max", reduction=0.5,
                    bottleneck=True, num_classes=5, stem="cifar")


def _tiny_model():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))


def _sgd(model, lr=0.1):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def _ce(out, y):
    return F.cross_entropy(out, y)


# --------------------------------------------------------------------------- bad input (any machine)

def test_refuses_a_model_off_the_gpu():
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="model: CUDA graphs need every parameter on one CUDA device, got cpu"):
        CudaGraphTrainStep(model, _sgd(model), _ce)


def test_refuses_a_model_without_parameters():
    with pytest.raises(ValueError, match="model: expected a module with parameters"):
        CudaGraphTrainStep(torch.nn.ReLU(), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), _ce)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(optimizer="sgd"), TypeError, "optimizer: expected a torch.optim.Optimizer, got str"),
    (dict(loss_fn=3), TypeError, "loss_fn: expected a callable"),
    (dict(warmup_steps=0), ValueError, "warmup_steps: expected an integer >= 1, got 0"),
    (dict(warmup_steps=2.0), ValueError, "warmup_steps: expected an integer >= 1, got 2.0"),
    (dict(autocast_dtype=torch.float64), ValueError, "autocast_dtype: expected None, torch.bfloat16"),
    (dict(model="net"), TypeError, "model: expected a torch.nn.Module, got str"),
])
def test_refuses_bad_arguments_before_looking_at_the_device(kwargs, error, message):
    model = torch.nn.Linear(3, 2)  # on the CPU: every check above comes before the device's
    args = dict(model=model, optimizer=_sgd(model), loss_fn=_ce)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        CudaGraphTrainStep(args.pop("model"), args.pop("optimizer"), args.pop("loss_fn"), **args)


# --------------------------------------------------------------------------- on a GPU

def _batches(shape, classes, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((n,) + shape, generator=g), torch.randint(0, classes, (n,), generator=g))
            for n in sizes]


def _train_both(model, loss_fn, batches, lr_at):
    """The same batches through an eager copy and a graphed copy of ``model``; returns both
    models, the losses of each, and the step object."""
    eager_model, graphed_model = copy.deepcopy(model), copy.deepcopy(model)
    eager_opt, graphed_opt = _sgd(eager_model), _sgd(graphed_model)
    step = CudaGraphTrainStep(graphed_model, graphed_opt, loss_fn, warmup_steps=2)
    eager_losses, graphed_losses = [], []
    for i, (x, y) in enumerate(batches):
        for opt in (eager_opt, graphed_opt):
            for group in opt.param_groups:
                group["lr"] = lr_at(i)
        x, y = x.cuda(), y.cuda()
        eager_model.train()
        eager_opt.zero_grad(set_to_none=True)
        loss = loss_fn(eager_model(x), y)
        loss.backward()
        eager_opt.step()
        eager_losses.append(loss.item())
        graphed_losses.append(step(x, y)[0].item())
    return eager_model, graphed_model, eager_losses, graphed_losses, step


def _assert_same_training(eager_model, graphed_model, eager_losses, graphed_losses):
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    for (name, a), b in zip(eager_model.state_dict().items(), graphed_model.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
        else:
            assert torch.equal(a, b), name


@needs_cuda
@pytest.mark.parametrize("kind", ["msdnet", "densenet"])
def test_graphed_training_matches_eager_training(kind):
    """Warm-up steps, captured replays, a learning-rate change (captured again), a smaller last
    batch (eager), back to the captured shape: every loss, parameter and running statistic
    as in eager training of a copy of the model."""
    torch.manual_seed(0)
    if kind == "msdnet":
        model = msdnet_ops.MSDNet(**SMALL_MSDNET).cuda()
        loss_fn, shape, classes = multi_exit_loss, (3, 32, 32), 5
    else:
        model = msdnet_ops.DenseNet(4, (2, 2), 6, bn_size=2, num_classes=3).cuda()
        loss_fn, shape, classes = _ce, (3, 16, 16), 3
    sizes = [8, 8, 8, 8, 8, 5, 8]  # 2 warm-up, capture + replay, replay, new lr, eager, replay
    results = _train_both(model, loss_fn, _batches(shape, classes, sizes),
                          lr_at=lambda i: 0.05 if i < 4 else 0.02)
    step = results[-1]
    assert (step.captures, step.eager_steps) == (2, 1)
    _assert_same_training(*results[:4])


@needs_cuda
def test_graphed_training_under_bfloat16_autocast():
    torch.manual_seed(0)
    model = msdnet_ops.MSDNet(**SMALL_MSDNET).cuda()
    eager_model, graphed_model = copy.deepcopy(model), copy.deepcopy(model)
    eager_opt, graphed_opt = _sgd(eager_model), _sgd(graphed_model)
    step = CudaGraphTrainStep(graphed_model, graphed_opt, multi_exit_loss, warmup_steps=1,
                              autocast_dtype=torch.bfloat16)
    for x, y in _batches((3, 32, 32), 5, [8, 8, 8]):
        x, y = x.cuda(), y.cuda()
        eager_opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = multi_exit_loss(eager_model(x), y)
        loss.backward()
        eager_opt.step()
        assert step(x, y)[0].item() == pytest.approx(loss.item(), rel=2e-2)
    for a, b in zip(eager_model.parameters(), graphed_model.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3)


@needs_cuda
def test_refuses_inputs_on_another_device():
    model = _tiny_model().cuda()
    model(torch.zeros(1, 3, 5, 5, device="cuda"))  # materialise the lazy layer
    step = CudaGraphTrainStep(model, _sgd(model), _ce)
    with pytest.raises(ValueError, match="x: expected a tensor on the CPU or on cuda:0, got meta"):
        step(torch.zeros(2, 3, 5, 5, device="meta"), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="y: expected a tensor, got list"):
        step(torch.zeros(2, 3, 5, 5), [0, 1])


@needs_cuda
def test_msdnet_train_with_cuda_graph_logs_what_eager_training_logs(tmp_path):
    """``msdnet train --cuda-graph``: 3 eager warm-up batches, a capture, a replay; the epoch's
    logged loss and accuracies as without the flag."""
    import json

    from msdnet_ops import cli
    common = ["--epochs", "1", "--limit-batches", "5", "--threads", "1", "--progress", "off",
              "--quiet", "--device", "cuda", "--amp", "off", "--val-every", "0"]
    logs = []
    for name, extra in (("eager", []), ("graphed", ["--cuda-graph"])):
        assert cli.main(["train", "--out", str(tmp_path / name), *common, *extra]) == 0
        logs.append(json.loads((tmp_path / name / "train_log.jsonl").read_text().splitlines()[-1]))
    eager, graphed = logs
    assert graphed["train_samples"] == eager["train_samples"]
    assert graphed["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-4)
    # a prediction at a near-tie may flip with the last bits of the logits: one sample at most
    assert graphed["train_accuracy"] == pytest.approx(eager["train_accuracy"], abs=1 / eager["train_samples"])
