"""Bad input raises a clear error naming the argument and what was expected."""

from __future__ import annotations

import pytest
import torch
from _helpers import factors, gen, targets

import ssa_kernels


def _lin(p=4, n=6, m=5, r=3):
    g = gen(0)
    U, s, V = factors(m, n, r, g)
    x = torch.randn(p, n, dtype=torch.float64, generator=g)
    b = torch.randn(m, dtype=torch.float64, generator=g)
    return [t.float() for t in (x, U, s, V, b)]


def _grads(p=4, n=6, m=5, r=3, k=2):
    x, U, s, V, _ = _lin(p, n, m, r)
    delta = torch.randn(p, m)
    BU, BS, BV = (t.float() for t in targets(m, n, k, gen(1)))
    return x, x @ V, delta, U, s, V, BU, BS, BV


def _dfa(p=4, C=10, d=5, k=4):
    return (torch.randn(p, C), torch.randn(d, k), torch.rand(k), torch.randn(C, k),
            torch.randn(p, d))


LIN_BAD = [
    ("x wrong width", lambda x, U, s, V, b: (torch.randn(4, 7), U, s, V, b), ValueError, "V"),
    ("U rank mismatch", lambda x, U, s, V, b: (x, U[:, :2], s, V, b), ValueError, "s"),
    ("s rank mismatch", lambda x, U, s, V, b: (x, U, s[:2], V, b), ValueError, "s"),
    ("bias length", lambda x, U, s, V, b: (x, U, s, V, b[:3]), ValueError, "bias"),
    ("U 3-D", lambda x, U, s, V, b: (x, U[None], s, V, b), ValueError, "U must be 2-D"),
    ("int x", lambda x, U, s, V, b: (x.long(), U, s, V, b), TypeError, "x must be a floating"),
    ("dtype mismatch", lambda x, U, s, V, b: (x.double(), U, s, V, b), TypeError, "U has dtype"),
    ("not a tensor", lambda x, U, s, V, b: (x.tolist(), U, s, V, b), TypeError, "x must be a torch"),
    ("rank too large", lambda x, U, s, V, b: (x[:, :2], U[:2], s, V[:2], b[:2]), ValueError,
     "1 <= r <= min"),
]


@pytest.mark.parametrize("name,mutate,exc,match", LIN_BAD, ids=[c[0] for c in LIN_BAD])
def test_lowrank_linear_bad_input(name, mutate, exc, match):
    with pytest.raises(exc, match=match):
        ssa_kernels.lowrank_linear(*mutate(*_lin()))


def test_rank_larger_than_min_mn_is_refused():
    g = gen(0)
    U = torch.randn(3, 4, generator=g)
    V = torch.randn(6, 4, generator=g)
    with pytest.raises(ValueError, match=r"rank r = 4 .* min\(m, n\) = 3"):
        ssa_kernels.lowrank_linear(torch.randn(2, 6), U, torch.ones(4), V)


def test_unknown_options_are_refused():
    x, U, s, V, b = _lin()
    with pytest.raises(ValueError, match="activation must be None or one of"):
        ssa_kernels.lowrank_linear(x, U, s, V, b, "gelu")
    with pytest.raises(ValueError, match="negative_slope must be >= 0"):
        ssa_kernels.lowrank_linear(x, U, s, V, b, "leaky_relu", negative_slope=-0.1)
    xs, t, delta, U, s, V, BU, BS, BV = _grads()
    with pytest.raises(ValueError, match="projection must be one of"):
        ssa_kernels.svd_factor_grads(xs, t, delta, U, s, V, projection="cayley")
    with pytest.raises(ValueError, match="scaling must be one of"):
        ssa_kernels.svd_factor_grads(xs, t, delta, U, s, V, scaling="natural")
    with pytest.raises(ValueError, match="hoyer_eps must be > 0"):
        ssa_kernels.svd_factor_grads(xs, t, delta, U, s, V, hoyer_eps=0.0)
    with pytest.raises(ValueError, match="ortho must be finite"):
        ssa_kernels.svd_factor_grads(xs, t, delta, U, s, V, ortho=float("nan"))
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        ssa_kernels.lowrank_linear(x, U, s, V, b, backend="fast")


def test_unavailable_backend_names_the_alternatives():
    x, U, s, V, b = _lin()
    with pytest.raises(RuntimeError, match=r"'cuda'.*CUDA tensors only.*Available here"):
        ssa_kernels.lowrank_linear(x, U, s, V, b, backend="cuda")


def test_device_mismatch_is_refused():
    x, U, s, V, b = _lin()
    with pytest.raises(ValueError, match="U is on meta but x is on cpu"):
        ssa_kernels.lowrank_linear(x, U.to("meta"), s, V, b)


GRAD_BAD = [
    ("t wrong rank", dict(t=lambda a: a["t"][:, :2]), ValueError, "t has shape"),
    ("t int", dict(t=lambda a: a["t"].long()), TypeError, "t must be a floating"),
    ("t fp16 with fp32 x", dict(t=lambda a: a["t"].half()), TypeError, "t must have dtype"),
    ("delta width", dict(delta=lambda a: a["delta"][:, :3]), ValueError, "delta has shape"),
    ("delta batch", dict(delta=lambda a: a["delta"][:3]), ValueError, "delta has shape"),
    ("BU rows", dict(BU=lambda a: a["BU"][:3]), ValueError, "BU has shape"),
    ("BV cols", dict(BV=lambda a: a["BV"][:, :1]), ValueError, "BV has shape"),
    ("BS dtype", dict(BS=lambda a: a["BS"].double()), TypeError, "BS has dtype"),
    ("targets partial", dict(BV=lambda a: None), ValueError, "given together"),
    ("x 3-D", dict(x=lambda a: a["x"][None]), ValueError, "x must be 2-D"),
]


@pytest.mark.parametrize("name,change,exc,match", GRAD_BAD, ids=[c[0] for c in GRAD_BAD])
def test_svd_factor_grads_bad_input(name, change, exc, match):
    keys = ("x", "t", "delta", "U", "s", "V", "BU", "BS", "BV")
    a = dict(zip(keys, _grads()))
    for k, f in change.items():
        a[k] = f(a)
    with pytest.raises(exc, match=match):
        ssa_kernels.svd_factor_grads(a["x"], a["t"], a["delta"], a["U"], a["s"], a["V"],
                                     BU=a["BU"], BS=a["BS"], BV=a["BV"], align=0.1)


def test_align_without_targets_is_refused():
    x, t, delta, U, s, V, *_ = _grads()
    with pytest.raises(ValueError, match="align = 0.1 needs the alignment targets"):
        ssa_kernels.svd_factor_grads(x, t, delta, U, s, V, align=0.1)


DFA_BAD = [
    ("Q rows", lambda e, P, sg, Q, h: (e, P, sg, Q[:5], h), ValueError, "Q has shape"),
    ("sigma length", lambda e, P, sg, Q, h: (e, P, sg[:2], Q, h), ValueError, "sigma has shape"),
    ("h width", lambda e, P, sg, Q, h: (e, P, sg, Q, h[:, :3]), ValueError, "h has shape"),
    ("h batch", lambda e, P, sg, Q, h: (e, P, sg, Q, h[:2]), ValueError, "h has shape"),
    ("h 1-D", lambda e, P, sg, Q, h: (e, P, sg, Q, h[0]), ValueError, "h must have at least 2"),
    ("P dtype", lambda e, P, sg, Q, h: (e, P.double(), sg, Q, h), TypeError, "P has dtype"),
]


@pytest.mark.parametrize("name,mutate,exc,match", DFA_BAD, ids=[c[0] for c in DFA_BAD])
def test_dfa_project_bad_input(name, mutate, exc, match):
    with pytest.raises(exc, match=match):
        ssa_kernels.dfa_project(*mutate(*_dfa()))


def test_dfa_cos_needs_a_of_the_right_shape():
    e, P, sg, Q, h = _dfa()
    with pytest.raises(ValueError, match="needs the pre-activation a"):
        ssa_kernels.dfa_project(e, P, sg, Q, h, cos=0.1)
    with pytest.raises(ValueError, match="a must have the shape of h"):
        ssa_kernels.dfa_project(e, P, sg, Q, h, a=h[:, :2], cos=0.1)


def test_debug_mode_catches_non_finite_values():
    x, U, s, V, b = _lin()
    x[0, 0] = float("nan")
    ssa_kernels.lowrank_linear(x, U, s, V, b)  # off by default: no host sync, no check
    ssa_kernels.set_debug(True)
    try:
        with pytest.raises(ValueError, match="x contains NaN or inf"):
            ssa_kernels.lowrank_linear(x, U, s, V, b)
    finally:
        ssa_kernels.set_debug(None)


def test_direct_native_op_calls_are_checked_too():
    if "cpu" not in ssa_kernels.available_backends("cpu"):
        pytest.skip("compiled extension not built")
    x, U, s, V, b = _lin()
    with pytest.raises(ValueError, match="must have n = 6 rows"):
        torch.ops.ssa_kernels.lowrank_linear_native(x, U, s, V[:4], b, "none", 0.0)
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.ssa_kernels.lowrank_linear_native(x, U, s, V, b, "gelu", 0.0)


def test_available_backends_refuses_an_unknown_device_or_op():
    assert "reference" in ssa_kernels.available_backends("cpu", "lowrank_conv2d")
    with pytest.raises(ValueError, match="device must be"):
        ssa_kernels.available_backends("nope")
    with pytest.raises(ValueError, match="op must be one of .*'nope'"):
        ssa_kernels.available_backends("cpu", "nope")
