"""Shared benchmark helpers: providers, timing with sync, FLOP/byte formulas, peak memory."""

from __future__ import annotations

import functools
import platform

import torch

import ssa_kernels
from ssa.metrics import peak_bytes
from ssa_kernels import reference as ref


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def providers(dev: str) -> list[str]:
    out = ["reference", "reference-compiled"]
    out += [b for b in ssa_kernels.available_backends(dev)
            if b != "reference" and not (b == "triton" and dev == "cpu")]
    return out


@functools.cache
def compiled(fn):
    return torch.compile(fn, dynamic=False)


def device_name(dev: str) -> str:
    if dev == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "threads": torch.get_num_threads()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def run(benchmark, fn, dev: str, flops: float, nbytes: float, **info) -> None:
    """Time ``fn`` (synchronised), then record the roofline figures in ``extra_info``."""
    def timed():
        out = fn()
        sync(dev)
        return out

    for _ in range(2):  # warm-up: compilation, autotuning, allocator
        timed()
    benchmark.pedantic(timed, rounds=50 if dev == "cuda" else 30, iterations=1, warmup_rounds=2)
    median = benchmark.stats.stats.median  # robust to a noisy neighbour
    benchmark.extra_info.update(
        flops=flops, bytes=nbytes, gflops_per_s=flops / median / 1e9, gbytes_per_s=nbytes / median / 1e9,
        peak_bytes=peak_bytes(fn, dev), device=device_name(dev), **versions(), **info)


def elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


__all__ = ["ref"]
