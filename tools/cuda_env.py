"""Locate the CUDA toolkit and the pip CUDA wheels' headers and libraries.

Used by setup.py (loaded by path, so it needs no sys.path entry) and by the CMake/ctest
script: ``eval "$(python tools/cuda_env.py)"`` prints the shell exports
``CUDA_HOME``, ``SSA_NVRTC_LIBRARY`` and ``SSA_NVIDIA_INCLUDE`` (``:``-separated).
Why: on machines where ``nvcc`` on PATH is a wrapper script (as on the project's CI),
torch would take its parent folder as CUDA_HOME; and torch's CUDA headers include
cuBLAS/cuSPARSE headers that ship in the ``nvidia-*`` wheels, not in the toolkit.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import sys


def _toolkit(path: str | None) -> str | None:
    if path and os.path.exists(os.path.join(path, "include", "cuda_runtime.h")):
        return path
    return None


def resolve_cuda_home() -> str | None:
    """CUDA_HOME/CUDA_PATH, else the toolkit behind the ``nvcc`` on PATH (maybe a wrapper)."""
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


def _site_dirs() -> list[str]:
    return [p for p in sys.path if p and os.path.isdir(p)]


def nvidia_include_dirs() -> list[str]:
    """``include`` folders of the installed ``nvidia-*`` wheels (cu13 layout first)."""
    out: list[str] = []
    for entry in _site_dirs():
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for d in sorted(glob.glob(os.path.join(entry, pattern))):
                if os.path.isdir(d) and d not in out:
                    out.append(d)
    return out


def nvidia_library(stem: str) -> str | None:
    """Path of ``lib<stem>.so*`` in the toolkit or the ``nvidia-*`` wheels."""
    roots = [os.path.join(h, "lib64") for h in [resolve_cuda_home()] if h]
    for entry in _site_dirs():
        roots += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "lib")))
    for root in roots:
        hits = sorted(glob.glob(os.path.join(root, f"lib{stem}.so*")))
        if hits:
            return hits[0]
    return None


def builds_cuda() -> bool:
    """Whether setup.py compiles the CUDA kernels with the current environment."""
    force = os.environ.get("FORCE_CUDA", "").lower()
    if force:
        return force not in ("0", "false", "no", "off")
    import torch

    return bool(os.environ.get("TORCH_CUDA_ARCH_LIST")) or bool(
        torch.version.cuda and resolve_cuda_home())


def main() -> None:
    if sys.argv[1:] == ["--expect-cuda"]:
        print(int(builds_cuda()))
        return
    values = {
        "CUDA_HOME": resolve_cuda_home() or "",
        "SSA_NVRTC_LIBRARY": nvidia_library("nvrtc") or "",
        "SSA_NVIDIA_INCLUDE": ":".join(nvidia_include_dirs()),
    }
    for key, value in values.items():
        print(f"export {key}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
