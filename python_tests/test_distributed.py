"""DistributedDataParallel on 2 CPU processes (gloo): a step on the global batch split over the
ranks equals one process on the combined batch, in float64.

Each rank runs in its own Python process (started here with a timeout); the ranks meet through
a file store, so no port is needed. The single-process references are computed in the test
process itself, with the plain PyTorch loop below, from the same initial weights and batches.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import msdnet_ops
from msdnet_ops.training import distributed as D
from msdnet_ops.training.run_files import load_checkpoint

HERE = Path(__file__).resolve().parent
WORLD = 2
PER_RANK = 4
STEPS = 2                    # the second step fails if DDP waits for gradients that never come
WORKER_TIMEOUT_S = 120
TORCHRUN_TIMEOUT_S = 150

MSDNET_KW = dict(nBlocks=2, nChannels=4, base=1, step=1, stepmode="even", growthRate=4,
                 grFactor=[1, 2, 4], bnFactor=[1, 2, 4], prune="max", reduction=0.5,
                 bottleneck=True, num_classes=5, stem="cifar")
DENSENET_KW = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                   num_classes=5, stem="cifar")
# name -> (class, constructor arguments, image size)
CASES = {
    "msdnet_fused": (msdnet_ops.MSDNet, MSDNET_KW, (3, 32, 32)),
    "densenet_fused": (msdnet_ops.DenseNet, DENSENET_KW, (3, 16, 16)),
    "msdnet_plain": (msdnet_ops.MSDNetPlain, MSDNET_KW, (3, 32, 32)),
}


def _build(name: str) -> nn.Module:
    cls, kwargs, _ = CASES[name]
    return cls(**kwargs).double()


def _loss(out, y):
    outs = out if isinstance(out, (list, tuple)) else [out]
    return sum(F.cross_entropy(o, y) for o in outs)


def _train_steps(model: nn.Module, batches, rows: slice) -> dict:
    """SGD steps on ``batches[rows]``; logits, gradients and buffers after the first step, and
    the parameters and buffers after the last one."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    module = D.unwrap(model)
    model.train()
    record = {}
    for step, (x, y) in enumerate(batches):
        out = model(x[rows])
        opt.zero_grad(set_to_none=True)
        _loss(out, y[rows]).backward()
        if step == 0:
            record["logits"] = [o.detach().clone() for o in (out if isinstance(out, list) else [out])]
            record["grads"] = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
            record["buffers"] = {n: b.clone() for n, b in module.named_buffers()}
        opt.step()
    record["params"] = {n: p.detach().clone() for n, p in module.named_parameters()}
    record["final_buffers"] = {n: b.clone() for n, b in module.named_buffers()}
    return record


def _count_collectives(model: nn.Module, x: torch.Tensor) -> dict:
    """How many all_reduce / all_gather calls one training-mode forward makes."""
    counts = {"all_reduce": 0, "all_gather": 0}
    originals = {name: getattr(dist, name) for name in counts}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return call

    model.train()
    for name in counts:
        setattr(dist, name, counting(name))
    try:
        model(x)
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return counts


def _worker(rank: int, store: str, work_dir: str) -> None:
    """One rank: every case through ``wrap_ddp``, then the collective counts."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        ctx = D.DistContext(rank=rank, world_size=WORLD, distributed=True)
        inputs = torch.load(Path(work_dir) / "inputs.pt", weights_only=True)
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        results = {}
        for name in CASES:
            model = _build(name)
            model.load_state_dict(inputs["init"][name])
            results[name] = _train_steps(D.wrap_ddp(model, ctx), inputs["batches"][name], rows)
        x = inputs["batches"]["msdnet_fused"][0][0][rows]
        for name in ("msdnet_fused", "msdnet_plain"):
            results[f"collectives_{name}"] = _count_collectives(D.prepare_model_for_ddp(_build(name)), x)
        torch.save(results, Path(work_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_ranks(work_dir: Path) -> list:
    store = work_dir / "store"
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_distributed as t; "
            f"t._worker(int(sys.argv[1]), {str(store)!r}, {str(work_dir)!r})")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env) for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=WORKER_TIMEOUT_S)
            logs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the {WORLD} gloo ranks did not finish within {WORKER_TIMEOUT_S} s")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited with status {p.returncode}:\n{log[-4000:]}"
    return [torch.load(work_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """(per-rank results, single-process references) of every case."""
    work_dir = tmp_path_factory.mktemp("ddp")
    gen = torch.Generator().manual_seed(1234)
    init, batches = {}, {}
    for name, (_, _, size) in CASES.items():
        torch.manual_seed(len(name))
        init[name] = _build(name).state_dict()
        batches[name] = [(torch.randn(WORLD * PER_RANK, *size, generator=gen, dtype=torch.float64),
                          torch.randint(0, 5, (WORLD * PER_RANK,), generator=gen)) for _ in range(STEPS)]
    torch.save({"init": init, "batches": batches}, work_dir / "inputs.pt")
    ranks = _run_ranks(work_dir)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {}
        for name in CASES:
            model = _build(name)
            model.load_state_dict(init[name])
            single[name] = _train_steps(model, batches[name], slice(None))
    finally:
        torch.set_num_threads(before)
    return ranks, single


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12, msg=lambda m: f"{what}: {m}")


def _check_case(ddp, name: str) -> None:
    ranks, single = ddp
    ref = single[name]
    for k in range(len(ref["logits"])):
        _close(torch.cat([r[name]["logits"][k] for r in ranks]), ref["logits"][k], f"{name} exit {k} logits")
    for r, res in enumerate(ranks):
        assert res[name]["grads"].keys() == ref["grads"].keys(), f"{name}: rank {r} has gradients of other parameters"
        for part in ("grads", "buffers", "params", "final_buffers"):
            for key, value in ref[part].items():
                _close(res[name][part][key], value, f"{name} rank {r} {part} {key}")
    # the comparison is not vacuous: the step changed the weights and the running statistics
    init = _build(name).state_dict()
    assert any(not torch.equal(v, init[k]) for k, v in ref["params"].items())
    assert any(k.endswith("running_var") and not torch.equal(v, init[k]) for k, v in ref["buffers"].items())


def test_fused_msdnet_ddp_step_equals_single_process(ddp):
    _check_case(ddp, "msdnet_fused")


def test_fused_densenet_ddp_step_equals_single_process(ddp):
    _check_case(ddp, "densenet_fused")


def test_plain_msdnet_with_cpu_sync_batchnorm_equals_single_process(ddp):
    _check_case(ddp, "msdnet_plain")


def test_prepare_model_for_ddp_picks_the_synchronization():
    fused = msdnet_ops.MSDNet(**MSDNET_KW)
    assert D.prepare_model_for_ddp(fused, group="G") is fused and fused.sync_group == "G"
    plain = D.prepare_model_for_ddp(msdnet_ops.MSDNetPlain(**MSDNET_KW))
    bns = [m for m in plain.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, D.SyncBatchNorm) for m in bns)
    assert plain.state_dict().keys() == msdnet_ops.MSDNetPlain(**MSDNET_KW).state_dict().keys()


def test_fused_msdnet_all_reduces_once_per_buffer_write(ddp):
    ranks, _ = ddp
    model = msdnet_ops.MSDNet(**MSDNET_KW)
    plan = model.plan
    executed = set()
    for cell in plan.exit_cells:
        executed |= set(plan.closure(cell, set()))
    # post-activation MSDNet: every BatchNorm of an executed cell normalizes exactly one conv
    # output, i.e. one write into a feature buffer (this config's stem is the CIFAR one, whose
    # scale-0 output is written with statistics too)
    writes = sum(isinstance(m, nn.BatchNorm2d) for i in executed for m in plan.cells[i].module.modules())
    plain_bns = sum(isinstance(m, nn.BatchNorm2d) for m in msdnet_ops.MSDNetPlain(**MSDNET_KW).modules())
    assert writes < plain_bns, "this configuration should have cells that no exit reads (prune='max')"
    for r, res in enumerate(ranks):
        assert res["collectives_msdnet_fused"] == {"all_reduce": writes, "all_gather": 0}, f"rank {r}"
        # the plain model's SyncBatchNorm gathers once per BatchNorm module, dead cells included
        assert res["collectives_msdnet_plain"] == {"all_reduce": 0, "all_gather": plain_bns}, f"rank {r}"


def test_unused_parameter_names_are_the_cells_no_exit_reads():
    model = msdnet_ops.MSDNet(**MSDNET_KW)
    names = D.unused_parameter_names(model)
    assert names == D.unused_parameter_names(msdnet_ops.MSDNetPlain(**MSDNET_KW))
    # independently: the parameters that get no gradient from the loss of every exit
    loss = sum(o.sum() for o in model(torch.randn(2, 3, 32, 32)))
    loss.backward()
    assert names and names == [n for n, p in model.named_parameters() if p.grad is None]
    assert D.unused_parameter_names(msdnet_ops.DenseNet(**DENSENET_KW)) == []


def test_torchrun_trains_two_processes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
           "-m", "msdnet_ops", "train", "--out", str(out), "--epochs", "1", "--limit-batches", "2",
           "--threads", "1", "--progress", "off"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun did not finish within {TORCHRUN_TIMEOUT_S} s: {e.stderr}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = load_checkpoint(out / "checkpoint.pt")
    record, = state["history"]
    assert state["epoch"] == 1 and record["world_size"] == WORLD
    # 2 batches on each rank, each a 1/WORLD share of the global batch of 64
    assert record["train_samples"] == 2 * 64
    assert record["val_accuracy"] is not None and len(record["val_accuracy"]) == state["config"]["model"]["nBlocks"]
    model = msdnet_ops.MSDNet(**state["config"]["model"])
    model.load_state_dict(state["model"])
