"""ssa_kernels: the fused ops of SVD-Space Alignment as PyTorch custom ops.

Ops (DESIGN.md §3, §5, §6, §7)::

    lowrank_linear(x, U, s, V, bias=None, activation="none", backend="auto") -> (h, t)
    dfa_project(e, P, sigma, Q, h, activation="none", *, a=None, cos=0.0) -> delta
    svd_factor_grads(x, t, delta, U, s, V, *, BU, BS, BV, ce, align, ortho, hoyer, ...)
        -> (gU, gs, gV, gb)
    lowrank_conv2d(x, U, s, V, bias=None, *, kernel_size, stride, padding, dilation,
                   activation, backend) -> (h, t)                                 (DESIGN §4)
    svd_conv_factor_grads(x, t, delta, U, s, V, kernel_size, stride, padding, dilation, *,
                          <the options of svd_factor_grads>) -> (gU, gs, gV, gb)
    reorthonormalize(U, s, V) -> (U, s, V)
    available_backends(device) -> list[str]

Backends: ``reference`` (pure PyTorch), ``cpu``/``cuda`` (compiled ``ssa_kernels._C``),
``triton``. Without ``_C`` the package still imports (one warning) and the reference
and Triton paths work.
"""

from __future__ import annotations

import importlib
import warnings

from . import (  # noqa: F401  (_ops defines every op schema first)
    _backends,
    _ops,
    functional,  # noqa: F401  (the shared math, public)
)
from ._api import (
    available_backends,
    dfa_project,
    lowrank_conv2d,
    lowrank_linear,
    reorthonormalize,
    svd_conv_factor_grads,
    svd_factor_grads,
)
from ._checks import set_debug

__version__ = "0.1.0"


def _load_extension() -> None:
    try:
        _C = importlib.import_module("ssa_kernels._C")
    except (ImportError, OSError) as err:
        _backends.set_extension(None, f"{type(err).__name__}: {err}")
        warnings.warn(
            "ssa_kernels: the compiled extension ssa_kernels._C could not be loaded "
            f"({err}); the 'cpu' and 'cuda' backends are unavailable, 'reference' and "
            "'triton' still work. Build it with `pip install --no-build-isolation .`.",
            RuntimeWarning,
            stacklevel=3,
        )
    else:
        _backends.set_extension(_C, None)


_load_extension()

__all__ = [
    "available_backends",
    "dfa_project",
    "functional",
    "lowrank_conv2d",
    "lowrank_linear",
    "reorthonormalize",
    "set_debug",
    "svd_conv_factor_grads",
    "svd_factor_grads",
]
