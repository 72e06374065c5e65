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
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
NO_EXT = os.environ.get("SSA_KERNELS_NO_EXT", "0") == "1"


def _cuda_env():
    """tools/cuda_env.py, loaded by path (an isolated or PEP 517 build has no ROOT on sys.path)."""
    spec = importlib.util.spec_from_file_location("_ssa_cuda_env",
                                                  os.path.join(ROOT, "tools", "cuda_env.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    if NO_EXT:
        return [], {}
    cuda_env = _cuda_env()
    cuda_home = cuda_env.resolve_cuda_home()
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

    with_cuda = cuda_env.builds_cuda()
    if with_cuda and not torch.version.cuda:
        sys.exit("ssa: CUDA kernels requested but this torch is a CPU build "
                 f"({torch.__version__}); set FORCE_CUDA=0 or install a CUDA build of torch.")
    if with_cuda and not cuda_home:
        sys.exit("ssa: CUDA kernels requested but no CUDA toolkit was found; set CUDA_HOME "
                 "(the folder with bin/nvcc and include/cuda_runtime.h) or FORCE_CUDA=0.")

    debug = os.environ.get("SSA_KERNELS_DEBUG_BUILD", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math lets GCC if-convert (and so vectorise) the activation masks of the
    # row epilogues; without it `h > 0` stays a branch that mispredicts on random signs.
    cxx = opt + ["-fopenmp", "-fno-trapping-math"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    kwargs = dict(extra_link_args=["-fopenmp"])
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("SSA_WITH_CUDA", "1"))
        include_dirs += cuda_env.nvidia_include_dirs()
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
