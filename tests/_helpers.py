"""Shared test helpers: backends per device, inputs, tolerances (one per dtype)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import ssa_kernels
from ssa_kernels import reference as ref

ACTIVATIONS = ("none", "relu", "leaky_relu", "tanh", "sigmoid")
PROJECTIONS = ("stiefel", "paper", "none")
SCALINGS = ("euclidean", "inverse")

# Odd and tail shapes (issue: batch 1, 7, 129; n, m in 1, 5, 33, 257; r = 1 and min(m, n)).
BATCHES = (1, 7, 129)
WIDTHS = (1, 5, 33, 257)


def shape_grid():
    out = []
    for p in BATCHES:
        for n in WIDTHS:
            for m in WIDTHS:
                for r in sorted({1, min(m, n)}):
                    out.append((p, n, m, r))
    return out


# A representative few for the Triton interpreter (slow on the CPU).
INTERPRETER_SHAPES = [(1, 5, 33, 5), (7, 33, 5, 1), (129, 33, 33, 33), (7, 257, 5, 5),
                      (7, 1, 257, 1)]


def devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def backend_cases():
    """(device, backend) pairs of every non-reference backend available here."""
    cases = []
    for dev in devices():
        for b in ssa_kernels.available_backends(dev):
            if b != "reference":
                cases.append(pytest.param(dev, b, id=f"{dev}-{b}",
                                          marks=[pytest.mark.cuda] if dev == "cuda" else []))
    return cases


def interpreted(device: str, backend: str) -> bool:
    return backend == "triton" and device == "cpu"


def shapes_for(device: str, backend: str):
    return INTERPRETER_SHAPES if interpreted(device, backend) else shape_grid()


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=gen))
    return q


def factors(m: int, n: int, r: int, gen: torch.Generator):
    U = orthonormal(m, r, gen)
    V = orthonormal(n, r, gen)
    s = 0.5 + torch.rand(r, dtype=torch.float64, generator=gen)
    return U, s, V


def targets(m: int, n: int, k: int, gen: torch.Generator):
    BU = orthonormal(m, k, gen)
    BV = orthonormal(n, k, gen)
    BS = 0.5 + torch.rand(k, dtype=torch.float64, generator=gen)
    return BU, BS, BV


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def to(device, dtype, *tensors):
    return [None if t is None else t.to(device=device, dtype=dtype) for t in tensors]


def assert_close_fp32(actual, expected, what=""):
    """fp32 kernel output against an fp64 reference of the same inputs."""
    expected = expected.double().cpu()
    actual = actual.double().cpu()
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=2e-5 * scale, msg=lambda m: f"{what}: {m}")


def assert_low_precision(actual, lowp_ref, exact, what=""):
    """STYLE rule: error vs the fp64 reference at most twice PyTorch's own same-precision error.

    ``lowp_ref``: the reference run in the low precision; ``exact``: the fp64 reference on the
    same (already rounded) inputs. A floor of one ulp of the output's magnitude covers outputs
    the low-precision reference happens to get exactly.
    """
    exact = exact.double().cpu()
    err = (actual.double().cpu() - exact).abs().max().item() if exact.numel() else 0.0
    base = (lowp_ref.double().cpu() - exact).abs().max().item() if exact.numel() else 0.0
    ulp = torch.finfo(actual.dtype).eps * max(1.0, float(exact.abs().max())) if exact.numel() else 0
    assert err <= 2 * base + ulp, f"{what}: error {err:.3g} > 2 x torch's {base:.3g} + {ulp:.3g}"


def ext_expected() -> bool:
    return os.environ.get("SSA_KERNELS_EXPECT_EXT", "0") == "1"


def ref64(fn, *args, **kwargs):
    """Run a reference function with every tensor argument promoted to fp64 on the CPU."""
    def up(v):
        return v.detach().double().cpu() if isinstance(v, torch.Tensor) else v
    return fn(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})


__all__ = ["ref"]


# ---------------------------------------------------------------------------- trainer tests
def mlp(sizes=(12, 32, 24, 5), act=nn.ReLU):
    layers = []
    for i, (n, m) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n, m))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def batch(p=9, n=12, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(p, n, generator=g), torch.randint(0, C, (p,), generator=g)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------- multi-process tests
def _dist_entry(fn, rank, world, init_file, timeout_s, args):
    """A rank of :func:`run_distributed`: init, ``fn``, barrier, destroy, hard exit."""
    import datetime
    import faulthandler
    import sys
    import traceback

    import torch.distributed as dist

    faulthandler.enable()  # a crash still prints every thread's Python stack
    code = 1
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            fn(rank, world, *args)
            # No rank tears down its connections while a peer may still be reading from them.
            dist.barrier()
        finally:
            dist.destroy_process_group()
        code = 0
    except BaseException:  # noqa: BLE001 - reported on stderr, exit code 1
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip interpreter and C++ static teardown: the results are on disk, and gloo's
        # transport threads must not race the process's destructors (SIGABRT,
        # "terminate called without an active exception", seen on a loaded machine).
        os._exit(code)


def run_distributed(fn, world: int, *args, timeout: float = 300.0) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` fresh (spawned) processes joined in a gloo group.

    The robust pattern for multi-process tests: a file rendezvous in a private temporary folder
    (no port to collide with other tests or agents on the machine), an explicit collective
    timeout, a barrier before ``destroy_process_group``, children that leave through
    ``os._exit`` once their results are written, and a parent that waits at most ``timeout``
    seconds, kills what is left and names the rank that failed. ``fn`` must be a module-level
    function and write its results to files (return values are dropped).
    """
    import tempfile
    import time

    ctx = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="ssa-dist-") as folder:
        init = os.path.join(folder, "rendezvous")
        procs = [ctx.Process(target=_dist_entry, args=(fn, r, world, init, timeout, args), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout + 30  # + start-up (imports) on a loaded machine
        timed_out = False
        while True:
            codes = [p.exitcode for p in procs]
            if None not in codes or any(c not in (None, 0) for c in codes):
                break
            if time.monotonic() > deadline:
                timed_out = True
                break
            procs[codes.index(None)].join(0.2)
        first = next((r for r, p in enumerate(procs) if p.exitcode not in (None, 0)), None)
        grace = time.monotonic() + (0 if timed_out or first is not None else 5)
        for p in procs:  # a failed rank leaves its peers blocked in a collective: end them
            p.join(max(0.0, grace - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        codes = {r: p.exitcode for r, p in enumerate(procs)}
        if timed_out:
            raise AssertionError(f"run_distributed({fn.__name__}): timed out after {timeout:.0f} s; "
                                 f"exit codes {codes}")
        if first is not None:
            raise AssertionError(f"run_distributed({fn.__name__}): rank {first} failed first; exit codes "
                                 f"{codes} (negative: killed by that signal; see the captured stderr)")
