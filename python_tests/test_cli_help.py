"""``msdnet train --help`` and ``msdnet evaluate --help`` read at a glance: every default is
stated once, and it is what a run without the option really uses (checked against what a
tiny run wrote, not against the constants the help text is built from)."""
import json
import re

import pytest

from msdnet_ops import cli

TINY = ["--epochs", "1", "--limit-batches", "1", "--progress", "off", "--quiet"]


def help_lines(capsys, monkeypatch, command: str) -> dict:
    """``{'--lr': 'initial learning rate (default: 0.1)', ...}``: one unwrapped line per option."""
    monkeypatch.setenv("COLUMNS", "2000")  # argparse wraps at the terminal width
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "%%" not in text and "(default: None)" not in text and "[default:" not in text
    lines, option = {}, None
    for line in text.split("options:", 1)[1].splitlines():
        m = re.match(r"  (?:-h, )?(--[\w-]+)(?: \S+)?(?:\s{2,}(.*))?$", line)
        if m:  # an option; its help follows on the same line or, after a long metavar, on the next
            option = m.group(1)
            lines[option] = m.group(2) or ""
        elif option and line.strip():
            lines[option] = (lines[option] + " " + line.strip()).strip()
    return lines, text


def stated_default(help_line: str) -> str:
    found = re.findall(r"\(default: ([^)]*)\)", help_line)
    assert len(found) == 1, f"expected the default once in {help_line!r}"
    return found[0]


def test_train_help_states_each_default_once_and_truly(tmp_path, capsys, monkeypatch):
    lines, text = help_lines(capsys, monkeypatch, "train")
    assert "50% and 75%" in text
    for option, line in lines.items():
        assert line.count("default") <= 1, (option, line)

    out = tmp_path / "run"  # every recipe option left out but --epochs
    assert cli.main(["train", "--out", str(out), *TINY]) == 0
    run = json.loads((out / "run.json").read_text())
    record = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert stated_default(lines["--data"]) == run["data"]
    assert f"{run['config_name']} for digits" in stated_default(lines["--config"])
    for option, key in [("--lr", "lr"), ("--momentum", "momentum"), ("--weight-decay", "weight_decay"),
                        ("--seed", "seed"), ("--amp", "amp"), ("--impl", "impl")]:
        assert stated_default(lines[option]) == str(run[key]), option
    assert f"{run['batch_size']} for digits" in stated_default(lines["--batch-size"])
    assert f"{run['lr_milestones']} for digits" in stated_default(lines["--lr-milestones"])
    assert f"{run['data_info']['sizes']['val']} for digits" in stated_default(lines["--val-size"])
    assert stated_default(lines["--nesterov"]) == "off" and run["nesterov"] is False
    assert f"{record['threads']} here" in stated_default(lines["--threads"])


def test_evaluate_help_explains_q_and_states_true_defaults(tmp_path, capsys, monkeypatch):
    lines, text = help_lines(capsys, monkeypatch, "evaluate")
    assert "proportional to q^k" in text.replace("\n", " ")
    assert "True" not in lines["--no-measure"] and "False" not in lines["--no-measure"]
    for option, line in lines.items():
        assert line.count("default") <= 1, (option, line)

    out = tmp_path / "run"
    assert cli.main(["train", "--out", str(out), *TINY, "--threads", "1"]) == 0
    assert cli.main(["evaluate", str(out), "--no-measure", "--quiet", "--threads", "1"]) == 0
    qs = json.loads((out / "evaluation.json").read_text())["budgeted"]["qs"]
    assert stated_default(lines["--q-min"]) == str(qs[0])
    assert stated_default(lines["--q-max"]) == str(qs[-1])
    assert stated_default(lines["--q-step"]) == str(round(qs[1] - qs[0], 10))
