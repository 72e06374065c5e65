"""Build of ssa_kernels._C (C++ CPU kernels, CUDA kernels when a toolkit is present).

Install with ``pip install --no-build-isolation .``: the extension must be compiled
against the torch that will import it, so torch is not a build requirement and an
isolated build stops at once with that advice.

Environment switches:
  SSA_KERNELS_NO_EXT=1    pure-Python install (reference and Triton backends only)
  FORCE_CUDA=1            build the CUDA kernels (also implied by TORCH_CUDA_ARCH_LIST, or
                          by a CUDA build of torch plus a CUDA toolkit); FORCE_CUDA=0 never
  CUDA_HOME               the CUDA toolkit; found from the nvcc on PATH when unset
  SSA_KERNELS_DEBUG_BUILD=1  -O0 -g
Never decided by ``torch.cuda.is_available()``: a GPU-less machine builds GPU wheels.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
NO_EXT = os.environ.get("SSA_KERNELS_NO_EXT", "0") == "1"


def _flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() not in ("0", "false", "no", "off")


def _toolkit(path: str | None) -> str | None:
    if path and os.path.exists(os.path.join(path, "include", "cuda_runtime.h")):
        return path
    return None


def _resolve_cuda_home() -> str | None:
    """CUDA_HOME, or the toolkit behind the ``nvcc`` on PATH (which may be a wrapper script)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        found = _toolkit(os.path.dirname(os.path.dirname(real)))
        if found:
            return found
        try:
            with open(real, errors="ignore") as f:
                text = f.read(4096)
        except OSError:
            text = ""
        for target in re.findall(r"(/\S+)/bin/nvcc", text):
            found = _toolkit(target)
            if found:
                return found
    return _toolkit("/usr/local/cuda")


def _nvidia_include_dirs() -> list[str]:
    """Headers of the pip CUDA wheels (cuBLAS, cuSPARSE, …) that torch's headers include."""
    dirs = []
    for entry in sys.path:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            dirs += sorted(glob.glob(os.path.join(entry, pattern)))
    seen, out = set(), []
    for d in dirs:
        if d not in seen and os.path.isdir(d):
            seen.add(d)
            out.append(d)
    return out


def _extensions():
    if NO_EXT:
        return [], {}
    cuda_home = _resolve_cuda_home()
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit(
            "ssa: torch is not importable in this build environment. The kernels are compiled "
            "against the torch that will import them, so install torch first and build with\n"
            "    pip install --no-build-isolation .\n"
            "(plain `pip install .` builds in an isolated environment without your torch), or "
            "set SSA_KERNELS_NO_EXT=1 for a pure-Python install.")

    force = _flag("FORCE_CUDA")
    if force is None:
        with_cuda = bool(os.environ.get("TORCH_CUDA_ARCH_LIST")) or bool(
            torch.version.cuda and cuda_home)
    else:
        with_cuda = force
    if with_cuda and not torch.version.cuda:
        sys.exit("ssa: CUDA kernels requested but this torch is a CPU build "
                 f"({torch.__version__}); set FORCE_CUDA=0 or install a CUDA build of torch.")
    if with_cuda and not cuda_home:
        sys.exit("ssa: CUDA kernels requested but no CUDA toolkit was found; set CUDA_HOME "
                 "(the folder with bin/nvcc and include/cuda_runtime.h) or FORCE_CUDA=0.")

    debug = os.environ.get("SSA_KERNELS_DEBUG_BUILD", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = opt + ["-fopenmp"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    kwargs = dict(extra_link_args=["-fopenmp"])
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("SSA_WITH_CUDA", "1"))
        include_dirs += _nvidia_include_dirs()
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension(
            "ssa_kernels._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    else:
        ext = CppExtension(
            "ssa_kernels._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, **kwargs)
    build = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None or
                                        _has_ninja_module())
    return [ext], {"build_ext": build}


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["ssa_kernels", "ssa_kernels.*", "ssa", "ssa.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
