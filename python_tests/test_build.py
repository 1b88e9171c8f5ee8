"""The build and the loading of the compiled modules.

* ``import msdnet_ops.kernels.cuda`` works with no GPU and no CUDA runtime (lazy loading).
* A wrapper whose compiled module is missing raises a RuntimeError saying how to rebuild,
  including the original import error.
* setup.py finds the CUDA toolkit through wrappers around nvcc, honours FORCE_CUDA / SKIP_CUDA
  and reads the architecture list.
* The compiled modules sit in the source tree (tests run from the repository root) and need
  no torch.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from msdnet_ops.kernels import _common
from msdnet_ops.kernels import cpu as cpu_kernels
from msdnet_ops.kernels import cuda as cuda_kernels

ROOT = Path(__file__).resolve().parents[1]
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_import_cuda_wrapper_without_gpu():
    """Importing the CUDA wrapper loads no compiled CUDA code and needs no device."""
    code = (
        "import sys\n"
        "import msdnet_ops.kernels.cuda as k\n"
        "assert 'msdnet_ops._cuda_kernels' not in sys.modules, 'loaded eagerly'\n"
        "import torch\n"
        "assert not torch.cuda.is_available()\n"
        "print('ok', k.available())\n"
    )
    result = _run_python(code, CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_cuda_module_loads_without_driver_when_built():
    """The CUDA module links the runtime statically: importing it needs no driver, and its
    device query says 0 devices instead of failing."""
    if not cuda_kernels.available():
        pytest.skip(f"CUDA module not built: {cuda_kernels.load_error()}")
    result = _run_python(
        "import msdnet_ops._cuda_kernels as m; print(m.device_count()); print(m.runtime_description())",
        CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "0"


def _missing(monkeypatch, wrapper):
    real = wrapper._MODULE
    monkeypatch.setattr(wrapper, "_MODULE", _common.LazyModule("msdnet_ops._no_such_module", real.what,
                                                               real.how_to_build))


def test_missing_cuda_module_raises_clear_error(monkeypatch):
    _missing(monkeypatch, cuda_kernels)
    assert not cuda_kernels.available()
    assert "No module named" in cuda_kernels.load_error()
    x = torch.zeros(2, 3, 4, 4)
    v = torch.zeros(3)
    calls = [
        lambda: cuda_kernels.channel_stats(x, 1e-5),
        lambda: cuda_kernels.channel_stats_backward_(x, v, v, v, v, x),
        lambda: cuda_kernels.affine_relu_into(x, v, v, x.clone()),
        lambda: cuda_kernels.affine_relu_backward_(x, v, v, x, x.clone(), v, v),
        lambda: cuda_kernels.gather_batch_into(x, torch.tensor([0]), x[:1].clone()),
    ]
    for call in calls:
        with pytest.raises(RuntimeError) as info:
            call()
        msg = str(info.value)
        assert "msdnet_ops was built without its CUDA kernels" in msg
        assert "FORCE_CUDA=1 pip install --no-build-isolation ." in msg
        assert "No module named 'msdnet_ops._no_such_module'" in msg  # the original error


def test_missing_cpu_module_raises_clear_error(monkeypatch):
    _missing(monkeypatch, cpu_kernels)
    assert not cpu_kernels.available()
    with pytest.raises(RuntimeError, match="built without its CPU kernels.*pip install"):
        cpu_kernels.channel_stats(torch.zeros(2, 3, 4, 4), 1e-5)


def test_wrappers_have_the_same_api():
    names = ["available", "load_error", "channel_stats", "channel_stats_backward_",
             "affine_relu_into", "affine_relu_backward_", "gather_batch_into"]
    import inspect

    for name in names:
        a, b = getattr(cpu_kernels, name), getattr(cuda_kernels, name)
        assert inspect.signature(a) == inspect.signature(b), name


def test_cpu_module_in_source_tree_and_needs_no_torch():
    """The in-place copy exists (tests import the source package) and loads in a process
    that never imports torch: no torch headers, no libtorch ABI."""
    so = ROOT / "msdnet_ops" / f"_cpu_kernels{EXT_SUFFIX}"
    assert so.is_file(), f"{so} missing: run `pip install --no-build-isolation .` (or -e .)"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_cpu_kernels', {str(so)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "assert 'torch' not in sys.modules\n"
        "print(m.current_isa())\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("baseline", "avx2", "avx512")


# ---------------------------------------------------------------------------- setup.py

@pytest.fixture(scope="module")
def setup_module_():
    spec = importlib.util.spec_from_file_location("msdnet_ops_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines functions, builds nothing
    return module


def _fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho fake\n")
    nvcc.chmod(0o755)
    (root / "include" / "cuda_runtime.h").write_text("// fake\n")
    return nvcc


def test_setup_follows_nvcc_wrapper_script(setup_module_, tmp_path, monkeypatch):
    real = _fake_toolkit(tmp_path / "cuda-99.9")
    bindir = tmp_path / "wrappers"
    bindir.mkdir()
    wrapper = bindir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    root, how = setup_module_.find_cuda_toolkit()
    assert root == (tmp_path / "cuda-99.9").resolve()
    assert "nvcc on PATH" in how
    # a symlink to the real nvcc works too
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    (link_dir / "nvcc").symlink_to(real)
    assert setup_module_._toolkit_root_of_nvcc(link_dir / "nvcc") == root


def test_setup_cuda_home_wins(setup_module_, tmp_path, monkeypatch):
    _fake_toolkit(tmp_path / "tk")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "tk"))
    root, how = setup_module_.find_cuda_toolkit()
    assert root == (tmp_path / "tk").resolve() and how.startswith("CUDA_HOME")


def test_setup_force_and_skip_cuda(setup_module_, tmp_path, monkeypatch):
    monkeypatch.setattr(setup_module_, "find_cuda_toolkit", lambda: (None, "nothing here"))
    monkeypatch.setenv("FORCE_CUDA", "1")
    monkeypatch.delenv("SKIP_CUDA", raising=False)
    with pytest.raises(RuntimeError, match="FORCE_CUDA=1 but no CUDA toolkit"):
        setup_module_.cuda_plan()
    monkeypatch.delenv("FORCE_CUDA")
    assert setup_module_.cuda_plan() == (None, "nothing here")
    monkeypatch.setattr(setup_module_, "find_cuda_toolkit", lambda: (tmp_path, "found"))
    monkeypatch.setenv("SKIP_CUDA", "1")
    assert setup_module_.cuda_plan() == (None, "SKIP_CUDA=1")


def test_setup_cuda_architectures(setup_module_, monkeypatch):
    monkeypatch.delenv("MSDNET_OPS_CUDA_ARCHS", raising=False)
    assert setup_module_.cuda_architectures() == "80;90"
    monkeypatch.setenv("MSDNET_OPS_CUDA_ARCHS", "8.0, 9.0a sm_100-real")
    assert setup_module_.cuda_architectures() == "80;90a;100-real"
    monkeypatch.setenv("MSDNET_OPS_CUDA_ARCHS", "ampere")
    with pytest.raises(RuntimeError, match="MSDNET_OPS_CUDA_ARCHS"):
        setup_module_.cuda_architectures()


def test_pyproject_metadata():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "msdnet_ops" and project["version"] == "0.1.0"
    assert project["requires-python"] == ">=3.10"
    deps = project["dependencies"]
    assert "torch>=2.4" in deps and "numpy" in deps
    assert any(d.startswith("triton>=3.0") and "Linux" in d for d in deps)
    assert project["scripts"]["msdnet"] == "msdnet_ops.cli:main"
    assert set(project["optional-dependencies"]) >= {"train", "test"}
    for req in ("setuptools", "wheel", "cmake", "ninja", "pybind11"):
        assert any(r.startswith(req) for r in meta["build-system"]["requires"]), req
