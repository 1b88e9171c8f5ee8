"""Builds msdnet_ops's compiled kernels with CMake and lists the packages, benches/ included
(project metadata: pyproject.toml).

    pip install --no-build-isolation .        # install
    pip install --no-build-isolation -e .     # development (modules built into msdnet_ops/)

Modules (pybind11, no torch headers; see docs/ARCHITECTURE.md §4 "Build"):

* ``msdnet_ops._cpu_kernels``: C++ / OpenMP, always built.
* ``msdnet_ops._cuda_kernels``: CUDA, built when a CUDA toolkit is found.

Environment:

* ``FORCE_CUDA=1``: the CUDA module is required; the build fails if no toolkit is found.
* ``SKIP_CUDA=1``: do not build the CUDA module.
* ``CUDA_HOME`` (or ``CUDA_PATH``): the toolkit; otherwise ``nvcc`` on ``PATH`` (wrapper
  scripts that ``exec`` a real nvcc are followed), then ``/usr/local/cuda*``.
* ``MSDNET_OPS_CUDA_ARCHS``: CUDA architectures, CMake syntax (default ``80;90``; ``8.0``,
  ``90a`` and comma-separated lists are accepted too).
* ``MAX_JOBS``: parallel compile jobs (default: all cores).
* ``CMAKE_BUILD_TYPE``: default ``Release``.

Every build also copies the modules into the source tree's ``msdnet_ops/`` (as
``build_ext --inplace`` would), so that tests run from the repository root, where the source
package shadows the installed one, find them too.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = ROOT / "msdnet_ops"
CPU_MODULE = "msdnet_ops._cpu_kernels"
CUDA_MODULE = "msdnet_ops._cuda_kernels"

# benches/ ships inside the package, so that 'msdnet bench' runs after a normal install. The
# runner imports its modules as the top-level package 'benches' and puts the folder above
# benches/ on sys.path; that folder must hold nothing else (msdnet_ops/ itself holds triton/,
# which would shadow the real Triton), hence the extra level: msdnet_ops/_benchmarks/benches/.
BENCH_PACKAGE = "msdnet_ops._benchmarks.benches"
PACKAGES = find_packages(include=["msdnet_ops", "msdnet_ops.*"]) + [BENCH_PACKAGE]
PACKAGE_DIRS = {BENCH_PACKAGE: "benches"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"msdnet_ops build: {msg}", flush=True)


# --------------------------------------------------------------------------- CUDA toolkit

def _toolkit_root_of_nvcc(nvcc: Path, seen: set | None = None) -> Path | None:
    """The toolkit folder (holding bin/nvcc and include/cuda_runtime.h) that ``nvcc`` runs,
    following symlinks and shell-script wrappers such as ``exec /usr/local/cuda-X/bin/nvcc "$@"``."""
    seen = set() if seen is None else seen
    nvcc = Path(os.path.realpath(nvcc))
    if nvcc in seen or not nvcc.is_file():
        return None
    seen.add(nvcc)
    root = nvcc.parent.parent
    if (root / "include" / "cuda_runtime.h").is_file():
        return root
    try:
        head = nvcc.read_bytes()[:8192]
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    for match in re.finditer(rb"""(?:^|[\s"'=])(/[^\s"';|&]*/nvcc)(?=[\s"';]|$)""", head, re.M):
        found = _toolkit_root_of_nvcc(Path(match.group(1).decode(errors="replace")), seen)
        if found is not None:
            return found
    return None


def _version_key(path: Path):
    nums = re.findall(r"\d+", path.name)
    return [int(n) for n in nums] if nums else [-1]


def find_cuda_toolkit() -> tuple[Path | None, str]:
    """(toolkit root, how it was found) or (None, why not)."""
    tried = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            root = Path(value)
            if (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file():
                return root.resolve(), f"{var}={value}"
            tried.append(f"{var}={value} has no bin/nvcc or include/cuda_runtime.h")
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_root_of_nvcc(Path(nvcc))
        if root is not None:
            return root, f"nvcc on PATH ({nvcc})"
        tried.append(f"nvcc on PATH ({nvcc}) does not lead to a toolkit folder")
    candidates = [Path("/usr/local/cuda")] + sorted(Path("/usr/local").glob("cuda-*"),
                                                    key=_version_key, reverse=True)
    for root in candidates:
        if (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file():
            return root.resolve(), f"found at {root}"
    tried.append("no /usr/local/cuda*")
    return None, "; ".join(tried) or "no CUDA toolkit found"


def cuda_architectures() -> str:
    raw = os.environ.get("MSDNET_OPS_CUDA_ARCHS", "80;90")
    archs = []
    for item in re.split(r"[;,\s]+", raw.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d*)([a-z]?)(-real|-virtual)?", item.strip())
        if not m:
            raise RuntimeError(f"MSDNET_OPS_CUDA_ARCHS: cannot read {item!r} (expected e.g. 80;90)")
        archs.append(f"{m.group(1)}{m.group(2)}{m.group(3)}{m.group(4) or ''}")
    if not archs:
        raise RuntimeError("MSDNET_OPS_CUDA_ARCHS is empty")
    return ";".join(archs)


def cuda_plan() -> tuple[Path | None, str]:
    """Whether to build the CUDA module: (toolkit root or None, reason)."""
    if _flag("SKIP_CUDA"):
        if _flag("FORCE_CUDA"):
            raise RuntimeError("FORCE_CUDA=1 and SKIP_CUDA=1 contradict each other")
        return None, "SKIP_CUDA=1"
    root, how = find_cuda_toolkit()
    if root is None and _flag("FORCE_CUDA"):
        raise RuntimeError(
            "FORCE_CUDA=1 but no CUDA toolkit was found (" + how + "). Set CUDA_HOME to the "
            "toolkit folder (holding bin/nvcc) or put nvcc on PATH.")
    return root, how


# --------------------------------------------------------------------------- build

def _cmake_executable() -> str:
    try:
        import cmake  # the PyPI package (build requirement)
        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.is_file():
            return str(exe)
    except (ImportError, AttributeError):
        pass
    exe = shutil.which("cmake")
    if exe is None:
        raise RuntimeError("cmake not found: pip install cmake")
    return exe


def _ninja_executable() -> str | None:
    try:
        import ninja
        exe = Path(ninja.BIN_DIR) / "ninja"
        if exe.is_file():
            return str(exe)
    except (ImportError, AttributeError):
        pass
    return shutil.which("ninja")


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds the CMake project once, then places every module where
    setuptools expects it and into the source tree."""

    def build_extensions(self):
        cuda_root = _CUDA_ROOT
        try:
            out_dir = self._run_cmake(cuda_root)
        except subprocess.CalledProcessError:
            if cuda_root is None or _flag("FORCE_CUDA"):
                raise
            # The toolkit was found but does not work here (e.g. an unsupported host
            # compiler): without FORCE_CUDA=1 the CPU module alone is still useful.
            _log("building with CUDA failed; building the CPU kernels only "
                 "(set FORCE_CUDA=1 to make this an error)")
            self.extensions = [e for e in self.extensions if e.name != CUDA_MODULE]
            out_dir = self._run_cmake(None)
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        for ext in self.extensions:
            short = ext.name.rsplit(".", 1)[-1]
            built = out_dir / f"{short}{suffix}"
            if not built.is_file():
                raise RuntimeError(f"CMake did not produce {built}")
            targets = {Path(self.get_ext_fullpath(ext.name)).resolve(),
                       (PACKAGE_DIR / f"{short}{suffix}").resolve()}
            for target in targets:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                shutil.copyfile(built, tmp)
                os.replace(tmp, target)  # atomic: a running process keeps the old inode
                _log(f"wrote {target}")
        if not any(ext.name == CUDA_MODULE for ext in self.extensions):
            for stale in PACKAGE_DIR.glob(f"_cuda_kernels{suffix}"):
                stale.unlink()
                _log(f"removed stale {stale} (CUDA module not built)")

    def _run_cmake(self, cuda_root: Path | None) -> Path:
        import pybind11

        # A fixed folder (not build_temp, which editable installs make temporary) so that
        # rebuilds, regular or editable, are incremental.
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        out_dir = build_dir / "out"

        args = [
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DPYBIND11_FINDPYTHON=ON",
            f"-DMSDNET_OPS_OUTPUT_DIR={out_dir}",
            f"-DMSDNET_OPS_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
        ]
        if cuda_root is not None:
            args += [
                "-DMSDNET_OPS_WITH_CUDA=ON",
                f"-DCMAKE_CUDA_COMPILER={cuda_root / 'bin' / 'nvcc'}",
                f"-DCUDAToolkit_ROOT={cuda_root}",
                f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures()}",
            ]
        else:
            args.append("-DMSDNET_OPS_WITH_CUDA=OFF")
        ninja = _ninja_executable()
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))

        # A different configuration (compiler, generator, CUDA on/off) starts from scratch.
        stamp = build_dir / "msdnet_ops_configure_args.txt"
        wanted = "\n".join(args)
        if build_dir.exists() and (not stamp.is_file() or stamp.read_text() != wanted):
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)

        cmake = _cmake_executable()
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        start = time.perf_counter()
        if not stamp.is_file():
            subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir)] + args, check=True)
            stamp.write_text(wanted)
        configured = time.perf_counter()
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        done = time.perf_counter()
        _log(f"cmake configure {configured - start:.1f} s, build {done - configured:.1f} s")
        return out_dir


def extensions() -> tuple[list[Extension], Path | None]:
    cuda_root, why = cuda_plan()
    exts = [CMakeExtension(CPU_MODULE)]
    if cuda_root is not None:
        _log(f"building the CUDA kernels with the toolkit at {cuda_root} ({why}), "
             f"architectures {cuda_architectures()}")
        exts.append(CMakeExtension(CUDA_MODULE))
    else:
        _log(f"not building the CUDA kernels: {why}")
    return exts, cuda_root


_CUDA_ROOT: Path | None = None

if __name__ == "__main__":  # pip / setuptools run this file as __main__; tests import it
    _EXTS, _CUDA_ROOT = extensions()
    setup(packages=PACKAGES, package_dir=PACKAGE_DIRS, ext_modules=_EXTS, cmdclass={"build_ext": CMakeBuild})
