"""``msdnet bench``: the installed console script runs the benchmark runner, passes --help and
--quick through, writes into ./bench-results (not into the package) and says where.

Run through the console script in a fresh folder, so after a normal install (CI runs the
README's ``pip install ".[train,test]"``) it is the runner shipped inside the package that runs.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "msdnet"


def msdnet(cwd, *args, timeout=300):
    assert SCRIPT.is_file(), f"the console script {SCRIPT} is missing: install the package"
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_help_passes_through_to_the_runner(tmp_path):
    proc = msdnet(tmp_path, "bench", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--sections" in proc.stdout  # the runner's own options
    assert "without --out it writes into ./bench-results" in proc.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_quick_run_writes_results_here_and_names_them(tmp_path):
    proc = msdnet(tmp_path, "bench", "--quick", "--sections", "msd_layers,anytime")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = tmp_path / "bench-results" / "RESULTS.md"
    assert results.is_file()
    assert f"wrote {results}" in proc.stdout
    text = results.read_text()
    assert "MSDNet" in text
    # the anytime table has plain's time at each of its exits beside ours: 7 exit rows
    exit_rows = [line for line in text.splitlines() if line.startswith("| ") and " M | " in line]
    assert "plain time / full" in text and len(exit_rows) == 7
    assert all(cell.strip() not in ("-", "") for row in exit_rows for cell in row.split("|")[1:-1])


def test_unknown_runner_option_is_the_runners_error(tmp_path):
    proc = msdnet(tmp_path, "bench", "--no-such-option")
    assert proc.returncode == 2
    assert "--no-such-option" in proc.stderr and "usage: run.py" in proc.stderr


def test_the_package_ships_the_runner(tmp_path):
    """What a wheel holds: setup.py maps benches/ to msdnet_ops/_benchmarks/benches/ (checked here
    with build_py, which copies the Python files and compiles nothing)."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=root,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, SKIP_CUDA="1", FORCE_CUDA="0"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    shipped = tmp_path / "msdnet_ops" / "_benchmarks" / "benches"
    assert {p.name for p in (root / "benches").glob("*.py")} <= {p.name for p in shipped.glob("*.py")}
    assert (tmp_path / "msdnet_ops" / "cli.py").is_file()
