"""The ``msdnet`` command: train, resume, evaluate, and how it reports user mistakes.

Runs are tiny (1-2 epochs of 2 batches on the embedded digits, one thread) and go through
``msdnet_ops.cli.main`` in this process; two subprocesses check the real entry points. What a
run wrote is compared with values recomputed here from the checkpoint: a fresh model forward
for the accuracies, forward hooks for the multiply-adds, the thresholds applied by hand.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest
import torch
from torch import nn

import msdnet_ops
from msdnet_ops import cli
from msdnet_ops.training import train as train_module
from msdnet_ops.training.data import load_data

from conftest import run_msdnet as run

TINY = ["--epochs", "2", "--limit-batches", "2", "--threads", "1", "--progress", "off", "--quiet"]
RUNTIME = ["--limit-batches", "2", "--threads", "1", "--progress", "off", "--quiet"]
QS = ["--q-min", "0.5", "--q-max", "1.5", "--q-step", "0.5"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_ckpt(run_dir) -> dict:
    return torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)


def fresh_model(state: dict) -> nn.Module:
    model = msdnet_ops.MSDNet(**state["config"]["model"])
    model.load_state_dict(state["model"])
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-epoch run (2 batches per epoch)."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert cli.main(["train", "--out", str(out), *TINY]) == 0
    return out


# ---------------------------------------------------------------------------------------------
# train


def test_train_writes_run_checkpoint_and_log(trained):
    state = load_ckpt(trained)  # weights_only=True: nothing but tensors and plain containers
    run_json = json.loads((trained / "run.json").read_text())
    log = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    assert state["epoch"] == 2 and [r["epoch"] for r in log] == [1, 2]
    assert state["config"] == run_json and state["history"] == log
    assert run_json["data"] == "digits" and run_json["config_name"] == "digits-small"
    # the recipe: lr 0.1, decayed x0.1 at 50 % of the 2 epochs; 2 batches of 64 per epoch
    assert [r["lr"] for r in log] == pytest.approx([0.1, 0.01])
    assert [r["train_samples"] for r in log] == [128, 128]
    assert all(len(r["val_accuracy"]) == run_json["model"]["nBlocks"] for r in log)

    for cls in (msdnet_ops.MSDNet, msdnet_ops.MSDNetPlain):
        model = cls(**state["config"]["model"])
        model.load_state_dict(state["model"])  # strict: same keys and shapes
    torch.manual_seed(run_json["seed"])
    init = msdnet_ops.MSDNet(**run_json["model"]).state_dict()
    changed = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.equal(v, init[k])]
    assert len(changed) > len(init) // 2, "training should have moved most weights"
    # the last epoch's validation accuracy is that of the saved weights
    val = load_data("digits", augment=False).val
    x, y = val.images, val.labels
    with torch.no_grad():
        acc = [float((o.argmax(1) == y).double().mean()) for o in fresh_model(state)(x)]
    assert acc == pytest.approx(log[-1]["val_accuracy"], abs=1e-12)


def _interrupt_at_epoch(monkeypatch, epoch: int):
    """Make ``train_one_epoch`` raise KeyboardInterrupt (Ctrl-C) when epoch ``epoch`` starts."""
    real = train_module.train_one_epoch
    calls = []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", interrupting)


def test_interrupted_run_resumes_to_identical_weights(trained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        _interrupt_at_epoch(m, 2)
        status, _, err = run(capsys, "train", "--out", out, *TINY)
    assert status == 130 and "--resume" in err
    assert load_ckpt(out)["epoch"] == 1

    status, _, err = run(capsys, "train", "--out", out, "--resume", *RUNTIME)
    assert status == 0, err
    resumed, straight = load_ckpt(out), load_ckpt(trained)
    assert resumed["epoch"] == 2
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for key, value in straight["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][key]["momentum_buffer"], value["momentum_buffer"])
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in straight["history"]]
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2


def test_resume_with_a_different_option_is_refused(trained, capsys):
    before = (trained / "checkpoint.pt").read_bytes()
    status, _, err = run(capsys, "train", "--out", trained, "--resume", "--lr", "0.5", *RUNTIME)
    assert status == 2
    assert "--lr 0.5" in err and "0.1" in err and len(err.strip().splitlines()) == 1
    assert (trained / "checkpoint.pt").read_bytes() == before


def test_training_into_an_existing_run_needs_resume_or_overwrite(trained, capsys):
    before = (trained / "checkpoint.pt").read_bytes()
    status, _, err = run(capsys, "train", "--out", trained, *TINY)
    assert status == 2
    assert len(err.strip().splitlines()) == 1
    assert str(trained) in err and "--resume" in err and "--overwrite" in err
    assert (trained / "checkpoint.pt").read_bytes() == before


def test_overwrite_starts_a_new_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, "train", "--out", out, *TINY)[0] == 0
    (out / "evaluation.json").write_text("{}")  # a stale evaluation of the old run
    status, _, err = run(capsys, "train", "--out", out, "--overwrite", "--epochs", "1", *RUNTIME)
    assert status == 0, err
    assert load_ckpt(out)["epoch"] == 1
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 1
    assert not (out / "evaluation.json").exists()


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--out", str(tmp_path / "x"), "--resume", "--overwrite"])
    assert exc.value.code == 2
    assert "--overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# evaluate


def _macs_by_hooks(model: nn.Module, input_size) -> list:
    """Cumulative multiply-adds per exit, counted here with forward hooks on the plain model
    (conv: in*out*k*k*H*W, ReLU: one per element, pooling: kernel area per output, linear:
    weights+bias; a sample reaching exit k went through every earlier classifier)."""
    total, per_exit = [0], []

    def hook(m, inputs, output):
        if isinstance(m, nn.Conv2d):
            total[0] += m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] \
                * output.shape[2] * output.shape[3] // m.groups
        elif isinstance(m, nn.ReLU):
            total[0] += inputs[0][0].numel()
        elif isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
            total[0] += output[0].numel() * m.kernel_size * m.kernel_size
        elif isinstance(m, nn.Linear):
            total[0] += m.weight.numel() + m.bias.numel()

    for m in model.modules():
        m.register_forward_hook(hook)
    for c in model.classifier:
        c.register_forward_hook(lambda *_: per_exit.append(total[0]))
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_size))
    return per_exit


def _probabilities(model, dataset, batch_size=256):
    probs = []
    with torch.no_grad():
        for i in range(0, len(dataset), batch_size):
            probs.append(torch.stack([o.softmax(1) for o in model(dataset.images[i:i + batch_size])]))
    return torch.cat(probs, dim=1)


def test_evaluate_writes_json_and_plots(trained, capsys):
    status, out, err = run(capsys, "evaluate", trained, *QS, "--threads", "1")
    assert status == 0, err
    assert "evaluation.json" in out
    result = json.loads((trained / "evaluation.json").read_text())
    state = load_ckpt(trained)
    model = fresh_model(state)
    data = load_data("digits", augment=False)
    labels = data.test.labels
    probs = _probabilities(model, data.test)

    # anytime: per-exit accuracy and multiply-adds
    macs = _macs_by_hooks(msdnet_ops.MSDNetPlain(**state["config"]["model"]), (3, 32, 32))
    assert [e["macs"] for e in result["exits"]] == macs
    assert [e["test_accuracy"] for e in result["exits"]] == \
        pytest.approx([float((p.argmax(1) == labels).double().mean()) for p in probs], abs=1e-12)
    assert result["checkpoint_epoch"] == 2 and result["data_sizes"] == {"val": 180, "test": len(labels)}

    # budgeted: the stored thresholds applied here give the stored accuracy and exit fractions
    points = result["budgeted"]["points"]
    assert [p["q"] for p in points] == [0.5, 1.0, 1.5]
    assert result["budgeted"]["measured_available"] is True
    conf, preds = probs.max(2)
    K = len(macs)
    for p in points:
        t = torch.tensor([float(v) for v in p["thresholds"]], dtype=conf.dtype)
        passed = conf >= t[:, None]
        passed[-1] = True
        exits = passed.int().argmax(0)  # the first exit whose threshold is reached
        fractions = [float((exits == k).double().mean()) for k in range(K)]
        acc = float((preds.gather(0, exits[None]).squeeze(0) == labels).double().mean())
        assert p["exit_fractions"] == pytest.approx(fractions, abs=1e-12)
        assert p["test_accuracy"] == pytest.approx(acc, abs=1e-12)
        assert p["expected_macs"] == pytest.approx(sum(f * c for f, c in zip(fractions, macs)), rel=1e-9)
        assert math.isclose(sum(p["proportions"]), 1.0, rel_tol=1e-9)
        # the real early exit: same decisions, and lazy evaluation never costs more
        assert p["measured_accuracy"] == pytest.approx(acc, abs=1e-12)
        assert p["measured_exit_fractions"] == pytest.approx(fractions, abs=1e-12)
        assert 0 < p["measured_macs"] <= p["expected_macs"] * (1 + 1e-9)

    for name in ("anytime.png", "budgeted.png"):
        path = trained / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        pixels = mpimg.imread(path)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and float(pixels.std()) > 0.01, name


def test_evaluate_a_missing_run_is_a_user_error(tmp_path, capsys):
    status, _, err = run(capsys, "evaluate", tmp_path / "nothing", "--threads", "1")
    assert status == 2 and str(tmp_path / "nothing") in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# user mistakes: status 2 and one line that names the culprit, nothing written


def _assert_user_error(capsys, out: Path, *args, must_name: str):
    status, _, err = run(capsys, "train", "--out", out, *TINY, *args)
    assert status == 2, err
    assert err.startswith("msdnet train: error:") and len(err.strip().splitlines()) == 1, err
    assert must_name in err, err
    assert not out.exists(), "nothing should be written for a rejected run"


def test_missing_cifar_folder(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    _assert_user_error(capsys, tmp_path / "run", "--data", f"cifar10:{missing}", must_name=str(missing))


def test_malformed_cifar_folder(tmp_path, capsys):
    inner = tmp_path / "cifar" / "cifar-10-batches-py"
    inner.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta"):
        (inner / name).write_bytes(b"not a pickle")
    _assert_user_error(capsys, tmp_path / "run", "--data", f"cifar10:{tmp_path / 'cifar'}", must_name=str(inner))


def test_incomplete_cifar_folder(tmp_path, capsys):
    inner = tmp_path / "cifar" / "cifar-100-python"
    inner.mkdir(parents=True)
    (inner / "train").write_bytes(b"x")
    _assert_user_error(capsys, tmp_path / "run", "--data", f"cifar100:{inner}", must_name="missing test, meta")


def test_imagenet_folder_without_val(tmp_path, capsys):
    (tmp_path / "imagenet" / "train" / "n0").mkdir(parents=True)
    _assert_user_error(capsys, tmp_path / "run", "--data", f"imagenet:{tmp_path / 'imagenet'}",
                       must_name=f"{tmp_path / 'imagenet'} is malformed: no val/")


def test_unknown_config(tmp_path, capsys):
    _assert_user_error(capsys, tmp_path / "run", "--config", "resnet-9000", must_name="'resnet-9000'")


def test_exit_weights_of_the_wrong_length(tmp_path, capsys):
    _assert_user_error(capsys, tmp_path / "run", "--exit-weights", "1,2", must_name="--exit-weights '1,2'")


def test_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("")
    status, _, err = run(capsys, "train", "--out", out, *TINY)
    assert status == 2 and str(out) in err and len(err.strip().splitlines()) == 1


def test_bad_option_value_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--out", str(tmp_path / "x"), "--epochs", "0"])
    assert exc.value.code == 2
    assert "--epochs" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# entry points (subprocesses)


def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "msdnet_ops", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: msdnet") and all(c in proc.stdout for c in ("train", "evaluate", "bench"))


def test_console_script_reports_status_2(tmp_path):
    script = Path(sys.executable).parent / "msdnet"
    assert script.is_file(), f"the console script {script} is missing: reinstall the package"
    proc = subprocess.run([str(script), "evaluate", str(tmp_path / "missing")], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("msdnet evaluate: error:") and str(tmp_path / "missing") in proc.stderr


def test_half_precision_needs_the_plain_model(tmp_path, capsys):
    # the fused model keeps float32 feature buffers: autocast would feed them bfloat16
    _assert_user_error(capsys, tmp_path / "fused", "--amp", "bf16", must_name="--amp bf16")
    status, _, err = run(capsys, "train", "--out", tmp_path / "plain", "--amp", "bf16", "--impl", "plain",
                         "--epochs", "1", *RUNTIME)
    assert status == 0, err
    assert load_ckpt(tmp_path / "plain")["config"]["impl_used"] == "plain"
