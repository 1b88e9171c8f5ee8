"""The README is the contract: every code block in it runs as printed.

* The set-up block (install, main job, tests) is what CI runs: ``.ci/run`` must hold each of
  its commands verbatim (it runs them in a fresh virtual environment).
* Every other shell command is run here, in a scratch folder holding a tiny run at
  ``runs/digits`` (what the set-up block's main job leaves), unless :data:`COVERED_ELSEWHERE`
  names the tests that run it instead. A command in neither place fails the test.
* The Python blocks run in order, in one namespace, in a scratch folder.
* The extras the README installs cover every third-party import of the package, the tests,
  the benchmarks and the README's examples.
"""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msdnet_ops import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

COVERED_ELSEWHERE = {
    "msdnet bench --quick": "python_tests/test_bench_command.py runs 'msdnet bench --quick' on two sections "
                            "through the console script; .ci/run runs every section with "
                            "'python benches/run.py --quick'",
}


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.M | re.S)


def commands(block: str) -> list[str]:
    """The block's command lines, comments stripped."""
    lines = (line.split("  #")[0].strip() for line in block.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_ci_runs_the_setup_block_as_printed():
    setup = commands(code_blocks("bash")[0])
    assert setup[0].startswith("pip install") and any("pytest" in c for c in setup), setup
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in setup:
        assert any(command in line and not line.lstrip().startswith("#") for line in ci_lines), \
            f".ci/run does not run the README's {command!r}"


def test_every_other_shell_command_runs_as_printed(tmp_path):
    assert cli.main(["train", "--out", str(tmp_path / "runs" / "digits"), "--epochs", "1", "--limit-batches", "1",
                     "--threads", "1", "--progress", "off", "--quiet"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    ran = []
    for block in code_blocks("bash")[1:]:
        for command in commands(block):
            if command in COVERED_ELSEWHERE:
                continue
            proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            ran.append(command)
    assert ran, "the README has no shell command besides the set-up block"
    assert (tmp_path / "runs" / "digits" / "evaluation.json").is_file()


def test_python_blocks_run_as_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the blocks write msdnet_reference.pth.tar
    torch.manual_seed(0)
    namespace: dict = {}
    blocks = code_blocks("python")
    assert len(blocks) >= 4
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    # the names the blocks promise
    assert namespace["new_features"].shape == (2, 32, 8, 8)
    assert len(namespace["logits_per_exit"]) == namespace["model"].num_exits
    result = namespace["result"]
    assert result.predictions.shape == (8,) and 0 < result.macs <= result.full_macs
    assert namespace["model"].input_size_range() == (17, 48)


# ---------------------------------------------------------------------------------------------
# the extras install every import

# import name -> distribution name, where they differ
DISTRIBUTION = {"sklearn": "scikit-learn"}
# imported by pytest itself (the benchmark fixture) rather than by an import statement
FIXTURE_PLUGINS = {"pytest-benchmark"}


def third_party_imports(sources) -> set[str]:
    local = {"msdnet_ops", "benches", "conftest"}
    names = set()
    for text in sources:
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in local}


def test_the_readme_extras_install_every_import():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    installed = list(project["dependencies"])
    for extra in re.search(r'pip install "\.\[([\w,]+)\]"', README).group(1).split(","):
        installed += extras[extra]
    for requirement in list(installed):  # an extra may include another: msdnet_ops[train]
        m = re.fullmatch(r"msdnet_ops\[(\w+)\]", requirement)
        if m:
            installed += extras[m.group(1)]
    distributions = {re.split(r"[<>=!;\[ ]", r)[0].lower() for r in installed}

    files = [*ROOT.glob("msdnet_ops/**/*.py"), *ROOT.glob("python_tests/*.py"), *ROOT.glob("benches/*.py")]
    imports = third_party_imports([f.read_text() for f in files] + code_blocks("python"))
    assert {"torch", "torchvision", "sklearn", "matplotlib"} <= imports  # the scan sees them
    missing = {DISTRIBUTION.get(n, n) for n in imports} - distributions
    assert not missing, f"imported but installed by no extra of the README's command: {sorted(missing)}"
    assert FIXTURE_PLUGINS <= distributions
