"""What a newcomer gets for the mistakes of issue 12: one line that says what is wrong with
which input and what was expected, status 2, nothing overwritten.

A run here is one epoch of one batch on the embedded digits (one thread); evaluation sweeps
one q and skips the measured early-exit run, which these tests do not look at.
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import msdnet_ops
from msdnet_ops import cli

from conftest import run_msdnet as run

TINY = ["--epochs", "1", "--limit-batches", "1", "--threads", "1", "--progress", "off", "--quiet"]
QUICK_EVAL = ["--q-min", "1", "--q-max", "1", "--no-measure", "--threads", "1", "--quiet"]


def assert_one_line_error(status: int, err: str, command: str = "evaluate") -> str:
    assert status == 2, err
    assert err.startswith(f"msdnet {command}: error: ") and len(err.strip().splitlines()) == 1, err
    message = err.strip()
    assert not message.endswith(":"), "the message must say what is wrong, not stop at a colon"
    return message


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert cli.main(["train", "--out", str(out), *TINY]) == 0
    return out


@pytest.fixture
def run_copy(digits_run, tmp_path):
    """A copy of the trained run that a test may damage."""
    return Path(shutil.copytree(digits_run, tmp_path / "run"))


# ---------------------------------------------------------------------------------------------
# checkpoints that cannot be evaluated


def test_random_bytes_checkpoint(run_copy, capsys):
    (run_copy / "checkpoint.pt").write_bytes(os.urandom(4096))
    message = assert_one_line_error(*run(capsys, "evaluate", run_copy, *QUICK_EVAL)[::2])
    assert str(run_copy / "checkpoint.pt") in message and "4096 bytes" in message
    assert "not a file written by torch.save" in message
    # nothing of torch's own advice, which is about trusting pickles, not about this file
    assert "weights_only" not in message and "issue" not in message.lower()
    assert "msdnet train" in message  # what was expected


def test_truncated_checkpoint(run_copy, capsys):
    path = run_copy / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:1000])
    message = assert_one_line_error(*run(capsys, "evaluate", run_copy, *QUICK_EVAL)[::2])
    assert "1000 bytes" in message and "truncated" in message


def test_empty_checkpoint(run_copy, capsys):
    (run_copy / "checkpoint.pt").write_bytes(b"")
    message = assert_one_line_error(*run(capsys, "evaluate", run_copy, *QUICK_EVAL)[::2])
    assert "is empty (0 bytes)" in message and str(run_copy / "checkpoint.pt") in message


def test_bare_state_dict_as_checkpoint(run_copy, capsys):
    torch.save(msdnet_ops.MSDNet(**msdnet_ops.msdnet_config("digits-small")).state_dict(),
               run_copy / "checkpoint.pt")
    message = assert_one_line_error(*run(capsys, "evaluate", run_copy, *QUICK_EVAL)[::2])
    assert "bare state_dict" in message and "'msdnet_ops.training/1'" in message


def test_checkpoint_with_pickled_objects(run_copy, capsys):
    torch.save({"format": "msdnet_ops.training/1", "anything": Path("x")}, run_copy / "checkpoint.pt")
    message = assert_one_line_error(*run(capsys, "evaluate", run_copy, *QUICK_EVAL)[::2])
    assert "does not load as tensors and plain containers" in message
    assert "weights_only" not in message


def test_checkpoint_file_instead_of_run_folder(digits_run, capsys):
    ckpt = digits_run / "checkpoint.pt"
    message = assert_one_line_error(*run(capsys, "evaluate", ckpt, *QUICK_EVAL)[::2])
    assert f"{ckpt} is a file, not a run folder" in message
    assert f"give the folder that holds it: {digits_run}" in message


def test_missing_run_folder(tmp_path, capsys):
    message = assert_one_line_error(*run(capsys, "evaluate", tmp_path / "nothing", *QUICK_EVAL)[::2])
    assert f"run folder {tmp_path / 'nothing'} does not exist" in message


# ---------------------------------------------------------------------------------------------
# a checkpoint of another configuration than the run's run.json


@pytest.fixture(scope="module")
def other_config_checkpoint(tmp_path_factory):
    """checkpoint.pt of a cifar10-anytime run (10 exits) trained on the digits."""
    out = tmp_path_factory.mktemp("runs") / "cifar10-anytime"
    assert cli.main(["train", "--out", str(out), "--config", "cifar10-anytime", "--batch-size", "8", *TINY]) == 0
    return out / "checkpoint.pt"


def test_checkpoint_of_another_config_is_refused(run_copy, other_config_checkpoint, capsys):
    shutil.copyfile(other_config_checkpoint, run_copy / "checkpoint.pt")
    message = assert_one_line_error(*run(capsys, "evaluate", run_copy, *QUICK_EVAL)[::2])
    assert f"does not belong to the run in {run_copy}" in message
    assert "config_name (checkpoint 'cifar10-anytime', run.json 'digits-small')" in message
    assert "--force" in message
    assert not (run_copy / "evaluation.json").exists()


def test_force_evaluates_the_checkpoint_with_its_own_config(run_copy, other_config_checkpoint, capsys):
    shutil.copyfile(other_config_checkpoint, run_copy / "checkpoint.pt")
    status, _, err = run(capsys, "evaluate", run_copy, *QUICK_EVAL, "--force")
    assert status == 0, err
    result = json.loads((run_copy / "evaluation.json").read_text())
    assert result["config_name"] == "cifar10-anytime" and len(result["exits"]) == 10


# ---------------------------------------------------------------------------------------------
# configurations, learning rate


def test_the_cli_default_config_is_a_named_config(digits_run):
    run_json = json.loads((digits_run / "run.json").read_text())
    assert run_json["config_name"] == "digits-small"
    assert "digits-small" in msdnet_ops.MSDNET_CONFIG_NAMES
    # the library builds the same network the command line trained
    model = msdnet_ops.MSDNet(**msdnet_ops.msdnet_config("digits-small"))
    state = torch.load(digits_run / "checkpoint.pt", weights_only=True)
    model.load_state_dict(state["model"])  # strict: same keys and shapes


def test_unknown_config_lists_the_names(tmp_path, capsys):
    status, _, err = run(capsys, "train", "--out", tmp_path / "run", "--config", "digits-large", *TINY)
    message = assert_one_line_error(status, err, "train")
    assert all(name in message for name in msdnet_ops.MSDNET_CONFIG_NAMES)
    with pytest.raises(ValueError, match="digits-small"):
        msdnet_ops.msdnet_config("digits-large")


def test_decayed_learning_rate_is_logged_as_written(tmp_path):
    # 4 epochs, decays at 50 % and 75 %: 0.1, 0.1, 0.1 * 0.1, 0.1 * 0.1 * 0.1
    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), *TINY, "--epochs", "4"]) == 0
    log_text = (out / "train_log.jsonl").read_text()
    assert [json.loads(line)["lr"] for line in log_text.splitlines()] == [0.1, 0.1, 0.01, 0.001]
    assert "0.010000000000000002" not in log_text and '"lr": 0.01,' in log_text


def test_cuda_graph_on_the_cpu(tmp_path, capsys):
    status, _, err = run(capsys, "train", "--out", tmp_path / "run", "--device", "cpu", "--cuda-graph", *TINY)
    message = assert_one_line_error(status, err, "train")
    assert "--cuda-graph needs a CUDA device, got --device cpu" in message
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
