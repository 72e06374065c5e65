"""Argument checks shared by every backend: shapes, dtypes, devices and options only.

Nothing here reads tensor values, so the checks cost no host synchronisation. Values
(NaN/inf) are checked only in debug mode (``SSA_KERNELS_DEBUG=1`` or
:func:`ssa_kernels.set_debug`), where every input is tested once per call.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .reference import ACTIVATIONS, acc_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_debug = {"on": None}


def set_debug(on: bool | None) -> None:
    """Check every op input for NaN/inf (one host sync per tensor). ``None``: follow the env."""
    _debug["on"] = on


def debug_enabled() -> bool:
    if _debug["on"] is not None:
        return bool(_debug["on"])
    return os.environ.get("SSA_KERNELS_DEBUG", "0") == "1"


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def tensor(fn: str, name: str, value, ndim: int | None = None, min_ndim: int | None = None):
    if not isinstance(value, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be a floating tensor (float16, bfloat16, float32 "
                        f"or float64), got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {_shape(value)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{fn}: {name} must have at least {min_ndim} dims, "
                         f"got shape {_shape(value)}")
    return value


def same(fn: str, ref_name: str, ref: Tensor, name: str, value: Tensor, dtype: bool = True):
    if value.device != ref.device:
        raise ValueError(f"{fn}: {name} is on {value.device} but {ref_name} is on {ref.device}; "
                         "all inputs must be on one device")
    if dtype and value.dtype != ref.dtype:
        raise TypeError(f"{fn}: {name} has dtype {value.dtype} but {ref_name} has "
                        f"{ref.dtype}; all inputs must share one dtype")


def size(fn: str, name: str, value: Tensor, dim: int, expected: int, what: str):
    if value.shape[dim] != expected:
        raise ValueError(f"{fn}: {name} has shape {_shape(value)}; its dim {dim} must be "
                         f"{expected} ({what})")


def activation(fn: str, act, negative_slope) -> tuple[str, float]:
    act = "none" if act is None else act
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be None or one of {ACTIVATIONS}, got {act!r}")
    slope = number(fn, "negative_slope", negative_slope)
    if slope < 0:
        raise ValueError(f"{fn}: negative_slope must be >= 0 (f'(a) is read from h = f(a)), "
                         f"got {slope}")
    return act, slope


def number(fn: str, name: str, value, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{fn}: {name} must be > 0, got {value}")
    return value


def choice(fn: str, name: str, value, options) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{fn}: {name} must be one of {tuple(options)}, got {value!r}")
    return value


def finite(fn: str, **tensors) -> None:
    if not debug_enabled():
        return
    for name, value in tensors.items():
        if value is not None and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{fn}: {name} contains NaN or inf (debug mode)")


def factors(fn: str, U, s, V, n: int | None = None, anchor: tuple[str, Tensor] | None = None):
    """``U (m×r), s (r), V (n×r)`` with ``1 <= r <= min(m, n)``; returns ``(m, r, n)``.

    Device and dtype are compared with ``anchor`` (the op's first input), else with ``U``.
    """
    tensor(fn, "U", U, ndim=2)
    tensor(fn, "s", s, ndim=1)
    tensor(fn, "V", V, ndim=2)
    name, ref = anchor if anchor is not None else ("U", U)
    for other, value in (("U", U), ("s", s), ("V", V)):
        if value is not ref:
            same(fn, name, ref, other, value)
    m, r = U.shape
    if n is not None:
        size(fn, "V", V, 0, n, "n, the number of input features")
    nn = V.shape[0]
    size(fn, "s", s, 0, r, "r, the number of columns of U")
    size(fn, "V", V, 1, r, "r, the number of columns of U")
    if r < 1 or r > min(m, nn):
        raise ValueError(f"{fn}: rank r = {r} (columns of U and V) must satisfy "
                         f"1 <= r <= min(m, n) = {min(m, nn)} for U {_shape(U)}, V {_shape(V)}")
    return m, r, nn


def lowrank_linear(x, U, s, V, bias):
    fn = "ssa_kernels.lowrank_linear"
    tensor(fn, "x", x, min_ndim=1)
    m, r, n = factors(fn, U, s, V, n=x.shape[-1] if x.dim() else None, anchor=("x", x))
    if bias is not None:
        tensor(fn, "bias", bias, ndim=1)
        same(fn, "x", x, "bias", bias)
        size(fn, "bias", bias, 0, m, "m, the number of rows of U")
    finite(fn, x=x, U=U, s=s, V=V, bias=bias)
    return m, r, n


def dfa_project(e, P, sigma, Q, h, a):
    fn = "ssa_kernels.dfa_project"
    tensor(fn, "e", e, ndim=2)
    tensor(fn, "P", P, ndim=2)
    tensor(fn, "sigma", sigma, ndim=1)
    tensor(fn, "Q", Q, ndim=2)
    tensor(fn, "h", h, min_ndim=2)
    for name, value in (("P", P), ("sigma", sigma), ("Q", Q), ("h", h)):
        same(fn, "e", e, name, value)
    p, C = e.shape
    d, k = P.shape
    size(fn, "Q", Q, 0, C, "C, the number of columns of e")
    size(fn, "Q", Q, 1, k, "k, the number of columns of P")
    size(fn, "sigma", sigma, 0, k, "k, the number of columns of P")
    size(fn, "h", h, 0, p, "p, the batch size of e")
    size(fn, "h", h, 1, d, "d, the number of rows of P")
    if a is not None:
        tensor(fn, "a", a)
        same(fn, "h", h, "a", a)
        if a.shape != h.shape:
            raise ValueError(f"{fn}: a must have the shape of h {_shape(h)}, got {_shape(a)}")
    finite(fn, e=e, P=P, sigma=sigma, Q=Q, h=h, a=a)


def svd_factor_grads(x, t, delta, U, s, V, BU, BS, BV, align):
    fn = "ssa_kernels.svd_factor_grads"
    tensor(fn, "x", x, ndim=2)
    tensor(fn, "t", t, ndim=2)
    tensor(fn, "delta", delta, ndim=2)
    m, r, n = factors(fn, U, s, V, n=x.shape[1], anchor=("x", x))
    same(fn, "x", x, "delta", delta)
    same(fn, "x", x, "t", t, dtype=False)
    if t.dtype not in (x.dtype, acc_dtype(x.dtype)):
        raise TypeError(f"{fn}: t must have dtype {x.dtype} or {acc_dtype(x.dtype)} (as "
                        f"lowrank_linear returns it), got {t.dtype}")
    p = x.shape[0]
    size(fn, "t", t, 0, p, "p, the batch size of x")
    size(fn, "t", t, 1, r, "r, the number of columns of U")
    size(fn, "delta", delta, 0, p, "p, the batch size of x")
    size(fn, "delta", delta, 1, m, "m, the number of rows of U")
    given = [b is not None for b in (BU, BS, BV)]
    if any(given) and not all(given):
        raise ValueError(f"{fn}: alignment targets BU, BS, BV must be given together or not "
                         "at all")
    if all(given):
        tensor(fn, "BU", BU, ndim=2)
        tensor(fn, "BS", BS, ndim=1)
        tensor(fn, "BV", BV, ndim=2)
        for name, value in (("BU", BU), ("BS", BS), ("BV", BV)):
            same(fn, "U", U, name, value)
        k = BS.shape[0]
        if k < 1:
            raise ValueError(f"{fn}: BS must have at least one entry, got shape {_shape(BS)}")
        size(fn, "BU", BU, 0, m, "m, the number of rows of U")
        size(fn, "BU", BU, 1, k, "k, the length of BS")
        size(fn, "BV", BV, 0, n, "n, the number of rows of V")
        size(fn, "BV", BV, 1, k, "k, the length of BS")
    elif align != 0.0:
        raise ValueError(f"{fn}: align = {align} needs the alignment targets BU, BS, BV")
    finite(fn, x=x, t=t, delta=delta, U=U, s=s, V=V, BU=BU, BS=BS, BV=BV)
    return m, r, n
