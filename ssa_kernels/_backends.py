"""Backend registry: which implementation of an op runs for a device and dtype.

Four backends (DESIGN §1): ``reference`` (pure PyTorch, any device), ``cpu`` and ``cuda``
(the compiled extension ``ssa_kernels._C``), ``triton`` (GPU, or the CPU under
``TRITON_INTERPRET=1``). ``backend="auto"`` takes the first available one in
:data:`AUTO` for the op and device (the fastest measured there, see
``docs/benchmarks/``), else in :data:`PREFERENCE`; the environment variable ``SSA_KERNELS_BACKEND``
overrides ``"auto"`` (an explicit ``backend=`` argument still wins). Forcing a backend
that cannot run raises, naming the ones that can: nothing falls back silently.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

from . import _ops

ENV_BACKEND = "SSA_KERNELS_BACKEND"
BACKENDS = ("reference", "cpu", "cuda", "triton")
PREFERENCE = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}
#: ``"auto"``'s order where it differs from :data:`PREFERENCE`, from the medians of
#: docs/benchmarks/h100.md (H100, torch 2.11, fp32 and bf16, p = 4096, n = m in {1024, 4096},
#: r in {16, 64, 256}): eager cuBLAS beats this package's fused CUDA/Triton forward and
#: factor-gradient kernels there (0.1-0.9x in most cells), while the fused DFA projection
#: wins (1.25-1.63x fp32). On the CPU the C++ backend won every measured cell.
AUTO = {
    ("cuda", "lowrank_linear"): ("reference", "triton", "cuda"),
    ("cuda", "dfa_project"): ("cuda", "reference", "triton"),
    ("cuda", "svd_factor_grads"): ("reference", "cuda", "triton"),
}

_ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_state: dict[str, object] = {}


def extension():
    """The compiled module ``ssa_kernels._C``, or ``None`` when it failed to load."""
    return _state.get("_C")


def extension_error() -> str | None:
    return _state.get("_C_error")  # type: ignore[return-value]


def set_extension(module, error: str | None) -> None:
    _state["_C"] = module
    _state["_C_error"] = error


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_module():
    """``ssa_kernels.triton`` (importing it registers the Triton ops), or ``None``."""
    if "triton" not in _state:
        try:
            module = importlib.import_module("ssa_kernels.triton")
            for op in _ops.TRITON_OPS:
                _ops.get(op, "triton")  # AttributeError if the module did not register it
            _state["triton"] = module
            _state["triton_error"] = None
        except (ImportError, AttributeError) as err:  # triton missing or too old
            _state["triton"] = None
            _state["triton_error"] = f"{type(err).__name__}: {err}"
    return _state["triton"]


@dataclass(frozen=True)
class Backend:
    name: str
    family: str
    dtypes: tuple[torch.dtype, ...]
    ops: tuple[str, ...] | None = None  # None: every op of _ops.SCHEMAS

    def implements(self, op: str) -> bool:
        return self.ops is None or op in self.ops

    def available(self, device: torch.device) -> bool:
        if self.name == "reference":
            return True
        if self.name == "cpu":
            return device.type == "cpu" and extension() is not None
        if self.name == "cuda":
            ext = extension()
            return device.type == "cuda" and ext is not None and bool(ext.WITH_CUDA)
        if device.type == "cpu" and not triton_interpret():
            return False
        if device.type not in ("cpu", "cuda"):
            return False
        return triton_module() is not None

    def why_not(self, device: torch.device) -> str:
        if self.name == "cpu" and device.type != "cpu":
            return "it runs on CPU tensors only"
        if self.name == "cuda" and device.type != "cuda":
            return "it runs on CUDA tensors only"
        if self.name in ("cpu", "cuda"):
            if extension() is None:
                return f"the compiled extension ssa_kernels._C did not load ({extension_error()})"
            return "ssa_kernels._C was built without CUDA kernels"
        if device.type == "cpu" and not triton_interpret():
            return "Triton runs on the CPU only with TRITON_INTERPRET=1"
        if triton_module() is None:
            return f"Triton is unavailable ({_state.get('triton_error')})"
        return f"it does not support device type {device.type!r}"

    def op(self, op: str):
        return _ops.get(op, self.family)


REGISTRY = {
    "reference": Backend("reference", "ref", _ALL_FLOATS),
    "cpu": Backend("cpu", "native", _ALL_FLOATS),
    "cuda": Backend("cuda", "native", _ALL_FLOATS),
    "triton": Backend("triton", "triton", (torch.float16, torch.bfloat16, torch.float32),
                      _ops.TRITON_OPS),
}


def available_backends(device: torch.device | str | None = None, op: str | None = None) -> list[str]:
    """Names of the backends that can run on ``device`` (default: CPU), in preference order.

    With ``op`` (one of the op names, e.g. ``"lowrank_linear"``), only those that implement it.
    An unknown device string or op name raises ``ValueError``.
    """
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"ssa_kernels.available_backends: device must be a torch.device or a device "
                         f"string like 'cpu' or 'cuda:0', got {device!r} ({err})") from None
    if op is not None and op not in _ops.SCHEMAS:
        raise ValueError(f"ssa_kernels.available_backends: op must be one of {tuple(_ops.SCHEMAS)}, "
                         f"got {op!r}")
    order = PREFERENCE.get(device.type, ("reference",))
    names = [n for n in order if REGISTRY[n].available(device)]
    names += [n for n in BACKENDS if n not in names and REGISTRY[n].available(device)]
    if op is not None:
        names = [n for n in names if REGISTRY[n].implements(op)]
    return names


def auto_order(op: str, device: torch.device) -> tuple[str, ...]:
    """The backends ``"auto"`` tries for ``op`` on ``device``, best first."""
    return AUTO.get((device.type, op), PREFERENCE.get(device.type, ("reference",)))


def select(op: str, backend: str, device: torch.device, dtype: torch.dtype):
    """The op overload to call, after checking ``backend`` can run it."""
    fn = f"ssa_kernels.{op}"
    if not isinstance(backend, str):
        raise TypeError(f"{fn}: backend must be a str, got {type(backend).__name__}")
    source = "backend"
    if backend == "auto":
        forced = os.environ.get(ENV_BACKEND, "auto").strip().lower()
        if forced not in ("", "auto"):
            backend, source = forced, f"the environment variable {ENV_BACKEND}"
    if backend == "auto":
        for name in auto_order(op, device):
            b = REGISTRY[name]
            if b.implements(op) and dtype in b.dtypes and b.available(device):
                return b.op(op)
        return REGISTRY["reference"].op(op)
    if backend not in REGISTRY:
        raise ValueError(f"{fn}: {source} must be 'auto' or one of {BACKENDS}, got {backend!r}")
    b = REGISTRY[backend]
    if not b.implements(op):
        raise RuntimeError(
            f"{fn}: {source} asks for {backend!r}, which does not implement this op (its two "
            "convolutions are cuDNN/ATen calls; a Triton kernel would not speed them up). "
            f"Backends for it here: {available_backends(device, op)}.")
    if not b.available(device):
        raise RuntimeError(
            f"{fn}: {source} asks for {backend!r}, which cannot run on device {str(device)!r}: "
            f"{b.why_not(device)}. Available here: {available_backends(device, op)}.")
    if dtype not in b.dtypes:
        raise TypeError(f"{fn}: backend {backend!r} supports dtypes "
                        f"{[str(d) for d in b.dtypes]}, got {dtype}")
    return b.op(op)
