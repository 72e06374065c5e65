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

from .reference import ACTIVATIONS, PROJECTIONS, SCALINGS, acc_dtype

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


def factor_options(fn: str, ce, align, ortho, hoyer, hoyer_eps, scaling, projection, eps):
    """The loss options of the factor-gradient ops (DESIGN §6), checked; returned in argument order."""
    scaling = choice(fn, "scaling", scaling, SCALINGS)
    projection = choice(fn, "projection", projection, PROJECTIONS)
    return (number(fn, "ce", ce), number(fn, "align", align), number(fn, "ortho", ortho),
            number(fn, "hoyer", hoyer), number(fn, "hoyer_eps", hoyer_eps, positive=True), scaling,
            projection, number(fn, "eps", eps, positive=True))


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


def bias_of(fn: str, bias, x, expected: int, what: str) -> None:
    """An optional bias beside ``x``: 1-D, ``x``'s dtype and device, ``expected`` entries."""
    if bias is not None:
        tensor(fn, "bias", bias, ndim=1)
        same(fn, "x", x, "bias", bias)
        size(fn, "bias", bias, 0, expected, what)


def lowrank_linear(x, U, s, V, bias):
    fn = "ssa_kernels.lowrank_linear"
    tensor(fn, "x", x, min_ndim=1)
    m, r, n = factors(fn, U, s, V, n=x.shape[-1] if x.dim() else None, anchor=("x", x))
    bias_of(fn, bias, x, m, "m, the number of rows of U")
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


def batch_inputs(fn: str, x, t, delta, forward: str) -> None:
    """``t`` and ``delta`` beside ``x``: same rank and device, ``delta`` in ``x``'s dtype, ``t`` in
    ``x``'s or the accumulation dtype (as the ``forward`` op returns it)."""
    tensor(fn, "t", t, ndim=x.dim())
    tensor(fn, "delta", delta, ndim=x.dim())
    same(fn, "x", x, "delta", delta)
    same(fn, "x", x, "t", t, dtype=False)
    allowed = dict.fromkeys((x.dtype, acc_dtype(x.dtype)))  # one entry when x is fp32 or fp64
    if t.dtype not in allowed:
        raise TypeError(f"{fn}: t must have dtype {' or '.join(map(str, allowed))} (as "
                        f"{forward} returns it for x of {x.dtype}), got {t.dtype}")


def svd_factor_grads(x, t, delta, U, s, V, BU, BS, BV, align):
    fn = "ssa_kernels.svd_factor_grads"
    tensor(fn, "x", x, ndim=2)
    m, r, n = factors(fn, U, s, V, n=x.shape[1], anchor=("x", x))
    batch_inputs(fn, x, t, delta, "lowrank_linear")
    p = x.shape[0]
    size(fn, "t", t, 0, p, "p, the batch size of x")
    size(fn, "t", t, 1, r, "r, the number of columns of U")
    size(fn, "delta", delta, 0, p, "p, the batch size of x")
    size(fn, "delta", delta, 1, m, "m, the number of rows of U")
    _targets(fn, U, V, BU, BS, BV, align)
    finite(fn, x=x, t=t, delta=delta, U=U, s=s, V=V, BU=BU, BS=BS, BV=BV)
    return m, r, n


def _targets(fn, U, V, BU, BS, BV, align):
    m, n = U.shape[0], V.shape[0]
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


# ------------------------------------------------------------------ convolutions (DESIGN §4)


def _pair(fn: str, name: str, value, low: int) -> tuple[int, int]:
    vals = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(vals, (tuple, list)) or len(vals) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in vals)):
        raise TypeError(f"{fn}: {name} must be an int or a pair of ints, got {value!r}")
    if any(v < low for v in vals):
        raise ValueError(f"{fn}: {name} must be >= {low}, got {value!r}")
    return int(vals[0]), int(vals[1])


def conv_geometry(fn: str, kernel_size, stride, padding, dilation, groups=1, padding_mode="zeros"):
    """Normalised ``(kernel (kh, kw), stride, padding (top, bottom, left, right), dilation)``.

    ``padding``: an int, a pair ``(ph, pw)``, four ints ``(top, bottom, left, right)``,
    ``"valid"`` or ``"same"`` (stride 1 only; for an even kernel the extra row/column goes
    to the bottom/right, as ``nn.Conv2d`` pads). Grouped convolutions and padding modes
    other than ``"zeros"`` are refused (DESIGN §4).
    """
    if kernel_size is None:
        raise TypeError(f"{fn}: kernel_size is required (the factors alone do not determine it)")
    kernel = _pair(fn, "kernel_size", kernel_size, 1)
    stride = _pair(fn, "stride", stride, 1)
    dilation = _pair(fn, "dilation", dilation, 1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups != 1:
        raise ValueError(f"{fn}: groups must be 1, got {groups!r}: grouped and depthwise convolutions "
                         "have no spatial-SVD form here and stay dense (DESIGN §4)")
    if padding_mode != "zeros":
        raise ValueError(f"{fn}: padding_mode must be 'zeros', got {padding_mode!r} (DESIGN §4)")
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0, 0, 0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"{fn}: padding='same' needs stride 1 (as nn.Conv2d), got stride {stride}")
            pads = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            pads = tuple(pads)
        else:
            raise ValueError(f"{fn}: padding must be an int, a pair, four ints, 'valid' or 'same', "
                             f"got {padding!r}")
    elif isinstance(padding, (tuple, list)) and len(padding) == 4:
        if any(isinstance(v, bool) or not isinstance(v, int) for v in padding):
            raise TypeError(f"{fn}: padding must hold ints, got {padding!r}")
        if any(v < 0 for v in padding):
            raise ValueError(f"{fn}: padding must be >= 0, got {padding!r}")
        pads = tuple(int(v) for v in padding)
    else:
        ph, pw = _pair(fn, "padding", padding, 0)
        pads = (ph, ph, pw, pw)
    return kernel, stride, pads, dilation


def conv_factors(fn: str, x, U, s, V, kernel):
    """``U (N·kw × r)``, ``V (C·kh × r)`` against ``x (p, C, H, W)``; returns ``(N, C, r)``."""
    tensor(fn, "x", x, ndim=4)
    kh, kw = kernel
    C = x.shape[1]
    tensor(fn, "U", U, ndim=2)
    tensor(fn, "V", V, ndim=2)
    if U.shape[0] % kw != 0 or U.shape[0] == 0:
        raise ValueError(f"{fn}: U has shape {_shape(U)}; its rows must be N·kw (out channels × kernel "
                         f"width kw = {kw}), row n·kw + w")
    size(fn, "V", V, 0, C * kh, f"C·kh = {C}·{kh}, input channels × kernel height, row c·kh + h")
    _, r, _ = factors(fn, U, s, V, anchor=("x", x))
    return U.shape[0] // kw, C, r


def conv_out_shape(fn: str, x, kernel, stride, padding, dilation) -> tuple[int, int, int]:
    """``(Ho, Wo, Wt)``: output size and the width of ``t`` (input width + left + right)."""
    from .reference import conv_out_size

    H, W = x.shape[2], x.shape[3]
    Ho = conv_out_size(H, padding[0] + padding[1], kernel[0], stride[0], dilation[0])
    Wt = W + padding[2] + padding[3]
    Wo = conv_out_size(Wt, 0, kernel[1], stride[1], dilation[1])
    if Ho < 1 or Wo < 1:
        raise ValueError(f"{fn}: the input x {_shape(x)} is smaller than the dilated kernel {kernel} "
                         f"(dilation {dilation}, padding {padding}): the output would be {Ho}×{Wo}")
    return Ho, Wo, Wt


def lowrank_conv2d(x, U, s, V, bias, geometry):
    fn = "ssa_kernels.lowrank_conv2d"
    kernel, stride, padding, dilation = geometry
    N, C, r = conv_factors(fn, x, U, s, V, kernel)
    bias_of(fn, bias, x, N, "N, the output channels (rows of U / kw)")
    conv_out_shape(fn, x, kernel, stride, padding, dilation)
    finite(fn, x=x, U=U, s=s, V=V, bias=bias)
    return N, C, r


def svd_conv_factor_grads(x, t, delta, U, s, V, geometry, BU, BS, BV, align):
    fn = "ssa_kernels.svd_conv_factor_grads"
    kernel, stride, padding, dilation = geometry
    N, C, r = conv_factors(fn, x, U, s, V, kernel)
    batch_inputs(fn, x, t, delta, "lowrank_conv2d")
    Ho, Wo, Wt = conv_out_shape(fn, x, kernel, stride, padding, dilation)
    p = x.shape[0]
    if tuple(t.shape) != (p, r, Ho, Wt):
        raise ValueError(f"{fn}: t must have shape {(p, r, Ho, Wt)} (batch, rank, output height, padded "
                         f"input width; as lowrank_conv2d returns it), got {_shape(t)}")
    if tuple(delta.shape) != (p, N, Ho, Wo):
        raise ValueError(f"{fn}: delta must have the output's shape {(p, N, Ho, Wo)}, got {_shape(delta)}")
    _targets(fn, U, V, BU, BS, BV, align)
    finite(fn, x=x, t=t, delta=delta, U=U, s=s, V=V, BU=BU, BS=BS, BV=BV)
    return N, C, r
