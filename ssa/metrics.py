"""Measurements the package reports (DESIGN §10). More metrics arrive with the baselines."""

from __future__ import annotations

import torch

__all__ = ["cpu_peak_bytes", "peak_bytes"]


def cpu_peak_bytes(fn) -> int:
    """Peak bytes allocated by ``fn()`` on the CPU, from the profiler's memory events.

    (``tracemalloc`` does not see tensor storage; DESIGN §10.) Events are replayed in time
    order, each op counting its own allocations and frees; the peak is relative to the
    memory in use before the call.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def peak_bytes(fn, device: str | torch.device = "cpu") -> int:
    """Peak extra bytes allocated during ``fn()`` on ``device`` (CUDA allocator stats or the profiler)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return cpu_peak_bytes(fn)
