"""Triton kernels (ssa_kernels/triton/) against the reference, through their plain launchers
and through the public ops with ``backend="triton"``.

Without a GPU the kernels run on the CPU under the Triton interpreter: shapes stay small,
but cover the tails (batch 1 and 129, widths 1 and 257, r = 1 and r = min(m, n)), every
activation, spatial feedback, the cosine term, every projection × scaling with every
penalty on, fewer (and more) alignment columns than r, the forced splits (m splits of the
forward, position chunks of the projection, split-K of the factor gradients), the r > 128
fallback, non-contiguous inputs, one bf16 case per op and ``opcheck`` of the three ops.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton (ssa_kernels imports it lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from _helpers import assert_low_precision, gen, orthonormal, ref64  # noqa: E402

import ssa_kernels  # noqa: E402
from ssa_kernels import _ops  # noqa: E402
from ssa_kernels import reference as ref  # noqa: E402

pytest.importorskip("triton")
import ssa_kernels.triton.dfa_project as tl_dfa  # noqa: E402
import ssa_kernels.triton.factor_grads as tl_grads  # noqa: E402
import ssa_kernels.triton.lowrank_linear as tl_lowrank  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ACTIVATIONS = ref.ACTIVATIONS
SLOPE = 0.2

pytestmark = pytest.mark.skipif(
    "triton" not in ssa_kernels.available_backends(DEVICE),
    reason="the Triton backend cannot run here")


def assert_close(actual, expected, what=""):
    """fp32 kernel output vs the fp64 reference of the same inputs: 1e-5 relative."""
    expected = expected.double().cpu()
    actual = actual.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale,
                               msg=lambda m: f"{what}: {m}")


def dev(*tensors, dtype=torch.float32):
    return [None if t is None else t.to(device=DEVICE, dtype=dtype) for t in tensors]


# ------------------------------------------------------------------ lowrank_linear

LINEAR_SHAPES = [  # (p, n, m, r)
    (1, 5, 33, 5),      # batch 1, r = min(m, n)
    (7, 33, 5, 1),      # r = 1, m smaller than a tile
    (129, 33, 17, 17),  # rows past two blocks, r = min(m, n)
    (7, 257, 5, 5),     # long n loop
    (7, 1, 257, 1),     # n = 1, long m loop
]


def _linear_inputs(p, n, m, r, seed=0):
    g = gen(seed)
    x = torch.randn(p, n, dtype=torch.float64, generator=g)
    U, V = orthonormal(m, r, g), orthonormal(n, r, g)
    s = 0.5 + torch.rand(r, dtype=torch.float64, generator=g)
    b = torch.randn(m, dtype=torch.float64, generator=g)
    return x, U, s, V, b


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: "p{}-n{}-m{}-r{}".format(*s))
def test_lowrank_linear(shape, activation):
    x, U, s, V, b = dev(*_linear_inputs(*shape))
    for bias in (b, None):
        want_h, want_t = ref64(ref.lowrank_linear, x, U, s, V, bias, activation, SLOPE)
        h, t = tl_lowrank.lowrank_linear(x, U, s, V, bias, activation, SLOPE)
        assert h.dtype == torch.float32 and t.dtype == torch.float32
        assert_close(h, want_h, f"launcher h bias={bias is not None}")
        assert_close(t, want_t, "launcher t")
        h, t = ssa_kernels.lowrank_linear(x, U, s, V, bias, activation, backend="triton",
                                          negative_slope=SLOPE)
        assert_close(h, want_h, f"op h bias={bias is not None}")
        assert_close(t, want_t, "op t")


def test_lowrank_linear_m_splits_and_noncontiguous():
    x, U, s, V, b = _linear_inputs(12, 20, 100, 6)
    want_h, want_t = ref64(ref.lowrank_linear, x, U, s, V, b, "leaky_relu", SLOPE)
    args = dev(x, U, s, V, b)
    for splits in (2, 3):  # several programs share one row block, one stores t
        h, t = tl_lowrank.lowrank_linear(*args, "leaky_relu", SLOPE, m_splits=splits)
        assert_close(h, want_h, f"h m_splits={splits}")
        assert_close(t, want_t, f"t m_splits={splits}")
    x, U, s, V, b = args
    xn = x.t().contiguous().t()
    Un = U.t().contiguous().t()
    Vn = torch.stack([V, V], 2).reshape(V.shape[0], -1)[:, ::2]
    sn = torch.stack([s, s], 1)[:, 0]
    assert not any(a.is_contiguous() for a in (xn, Un, sn, Vn))
    h, t = ssa_kernels.lowrank_linear(xn, Un, sn, Vn, b, "leaky_relu", backend="triton",
                                      negative_slope=SLOPE)
    assert_close(h, want_h, "h non-contiguous")
    assert_close(t, want_t, "t non-contiguous")


def test_lowrank_linear_fallback_rank_above_128():
    shape = (5, 140, 150, 130)
    assert shape[3] > tl_lowrank.MAX_FUSED_RANK
    x, U, s, V, b = dev(*_linear_inputs(*shape))
    want_h, want_t = ref64(ref.lowrank_linear, x, U, s, V, b, "sigmoid", SLOPE)
    h, t = ssa_kernels.lowrank_linear(x, U, s, V, b, "sigmoid", backend="triton",
                                      negative_slope=SLOPE)
    assert_close(h, want_h, "h")
    assert_close(t, want_t, "t")


def test_lowrank_linear_bf16():
    x, U, s, V, b = dev(*_linear_inputs(33, 65, 47, 20), dtype=torch.bfloat16)
    h, t = ssa_kernels.lowrank_linear(x, U, s, V, b, "tanh", backend="triton")
    assert h.dtype == torch.bfloat16 and t.dtype == torch.float32
    exact_h, exact_t = ref64(ref.lowrank_linear, x, U, s, V, b, "tanh")
    lowp_h, lowp_t = ref.lowrank_linear(*[a.cpu() for a in (x, U, s, V, b)], "tanh")
    assert_low_precision(h, lowp_h, exact_h, "h")
    assert_low_precision(t, lowp_t, exact_t, "t")


# -------------------------------------------------------------------- dfa_project

DFA_SHAPES = [  # (p, d, C, spatial); k = min(C, d)
    (1, 1, 10, ()),
    (7, 33, 3, ()),
    (129, 70, 10, ()),     # rows and channels past one block
    (6, 40, 40, ()),       # k = 40: two k blocks
    (5, 6, 10, (3, 2)),
    (3, 17, 20, (5,)),
    (2, 33, 7, (4, 9)),    # positions past one block
]


def _dfa_inputs(p, d, C, spatial, activation, seed=0):
    g = gen(seed)
    k = min(C, d)
    e = torch.randn(p, C, dtype=torch.float64, generator=g) / p
    P = torch.randn(d, k, dtype=torch.float64, generator=g)
    Q = orthonormal(C, k, g)
    sigma = 0.5 + torch.rand(k, dtype=torch.float64, generator=g)
    a = torch.randn((p, d) + tuple(spatial), dtype=torch.float64, generator=g)
    return e, P, sigma, Q, ref.activate(a, activation, SLOPE), a


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", DFA_SHAPES,
                         ids=lambda s: f"p{s[0]}-d{s[1]}-C{s[2]}-hw{'x'.join(map(str, s[3]))}")
def test_dfa_project(shape, activation):
    e, P, sigma, Q, h, a = dev(*_dfa_inputs(*shape, activation))
    spatial = bool(shape[3])
    for cos in (0.0, 0.7):
        want = ref64(ref.dfa_project, e, P, sigma, Q, h, activation, SLOPE, a, cos)
        out = ssa_kernels.dfa_project(e, P, sigma, Q, h, activation, a=a, cos=cos,
                                      negative_slope=SLOPE, backend="triton")
        assert out.dtype == torch.float32
        assert_close(out, want, f"op cos={cos}")
        for q_splits in ((None, 2) if spatial else (None,)):
            out = tl_dfa.dfa_project(e, P, sigma, Q, h, a if cos else None, activation, SLOPE,
                                     cos, q_splits=q_splits)
            assert_close(out, want, f"launcher cos={cos} q_splits={q_splits}")


def test_dfa_project_noncontiguous():
    e, P, sigma, Q, h, a = _dfa_inputs(6, 8, 10, (3, 3), "relu")
    want = ref64(ref.dfa_project, e, P, sigma, Q, h, "relu", SLOPE, a, 0.3)
    hn = h.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last
    an = a.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    Pn = P.t().contiguous().t()
    args = dev(e, Pn, sigma, Q, hn, an)
    assert not args[4].is_contiguous()
    out = ssa_kernels.dfa_project(*args[:5], "relu", a=args[5], cos=0.3, negative_slope=SLOPE,
                                  backend="triton")
    assert out.is_contiguous()
    assert_close(out, want)


def test_dfa_project_bf16():
    e, P, sigma, Q, h, a = dev(*_dfa_inputs(33, 65, 10, (2, 3), "sigmoid"), dtype=torch.bfloat16)
    out = ssa_kernels.dfa_project(e, P, sigma, Q, h, "sigmoid", a=a, cos=0.5, backend="triton")
    assert out.dtype == torch.bfloat16
    exact = ref64(ref.dfa_project, e, P, sigma, Q, h, "sigmoid", 0.01, a, 0.5)
    lowp = ref.dfa_project(*[t.cpu() for t in (e, P, sigma, Q, h)], "sigmoid", 0.01, a.cpu(), 0.5)
    assert_low_precision(out, lowp, exact, "delta")


# --------------------------------------------------------------- svd_factor_grads

GRAD_SHAPES = [  # (p, n, m, r, k): k = columns of the alignment targets
    (7, 33, 5, 1, 1),       # r = 1
    (1, 5, 33, 5, 3),       # batch 1, r = min(m, n), fewer target columns than r
    (129, 33, 17, 9, 12),   # more target columns than r (the leading r are aligned)
    (40, 20, 70, 20, 6),    # r = min(m, n), several output tiles of gU
    (9, 12, 10, 4, 2),
]
FULL = dict(ce=0.7, align=0.1, ortho=0.5, hoyer=0.05)


def _grads_inputs(p, n, m, r, k, seed=0):
    g = gen(seed)
    x = torch.randn(p, n, dtype=torch.float64, generator=g)
    U, V = orthonormal(m, r, g), orthonormal(n, r, g)
    s = 0.5 + torch.rand(r, dtype=torch.float64, generator=g)
    delta = torch.randn(p, m, dtype=torch.float64, generator=g) / p
    BU, BV = orthonormal(m, k, g), orthonormal(n, k, g)
    BS = 0.5 + torch.rand(k, dtype=torch.float64, generator=g)
    return x, x @ V, delta, U, s, V, BU, BS, BV


def _check_grads(got, want, what):
    for name, g, w in zip(("gU", "gs", "gV", "gb"), got, want, strict=True):
        assert g.dtype == torch.float32
        assert_close(g, w, f"{name} {what}")


def _launch_grads(args, targets, coeffs, scaling, projection, split_k=None):
    full = {**dict(ce=1.0, align=0.0, ortho=0.0, hoyer=0.0), **coeffs}
    return tl_grads.svd_factor_grads(
        *args, *targets, full["ce"], full["align"], full["ortho"], full["hoyer"], 1e-3,
        scaling, projection, 1e-6, split_k=split_k)


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=lambda s: "p{}-n{}-m{}-r{}-k{}".format(*s))
def test_svd_factor_grads_shapes(shape):
    x, t, delta, U, s, V, BU, BS, BV = dev(*_grads_inputs(*shape))
    args = (x, t, delta, U, s, V)
    for coeffs, targets in ((dict(ce=1.0), (None,) * 3), (FULL, (BU, BS, BV))):
        want = ref64(ref.svd_factor_grads, *args, *targets, **coeffs)
        got = ssa_kernels.svd_factor_grads(*args, BU=targets[0], BS=targets[1], BV=targets[2],
                                           **coeffs, backend="triton")
        _check_grads(got, want, f"op {coeffs}")
        got = _launch_grads(args, targets, coeffs, "euclidean", "stiefel")
        _check_grads(got, want, f"launcher {coeffs}")


@pytest.mark.parametrize("scaling", ref.SCALINGS)
@pytest.mark.parametrize("projection", ref.PROJECTIONS)
def test_svd_factor_grads_options(projection, scaling):
    x, t, delta, U, s, V, BU, BS, BV = dev(*_grads_inputs(23, 19, 21, 7, 5))
    args = (x, t, delta, U, s, V)
    kw = dict(FULL, scaling=scaling, projection=projection)
    want = ref64(ref.svd_factor_grads, *args, BU, BS, BV, **kw)
    got = ssa_kernels.svd_factor_grads(*args, BU=BU, BS=BS, BV=BV, **kw, backend="triton")
    _check_grads(got, want, f"{projection}/{scaling}")


def test_svd_factor_grads_split_k_and_noncontiguous():
    x, t, delta, U, s, V, BU, BS, BV = _grads_inputs(300, 21, 18, 6, 4)
    kw = dict(FULL, scaling="inverse", projection="paper")
    want = ref64(ref.svd_factor_grads, x, t, delta, U, s, V, BU, BS, BV, **kw)
    args = dev(x, t, delta, U, s, V)
    targets = dev(BU, BS, BV)
    for split_k in (2, 5):  # atomics into the fp32 workspace, then the epilogue kernel
        got = _launch_grads(args, targets, FULL, "inverse", "paper", split_k=split_k)
        _check_grads(got, want, f"split_k={split_k}")
    x, t, delta, U, s, V = args
    BU, BS, BV = targets
    nc = [a.t().contiguous().t() for a in (x, t, delta, U, V, BU, BV)]
    assert not any(a.is_contiguous() for a in nc)
    got = ssa_kernels.svd_factor_grads(*nc[:4], s, nc[4], BU=nc[5], BS=BS, BV=nc[6], **kw,
                                       backend="triton")
    _check_grads(got, want, "non-contiguous")


def test_svd_factor_grads_bf16():
    x, _, delta, U, s, V, BU, BS, BV = dev(*_grads_inputs(65, 33, 47, 16, 16),
                                           dtype=torch.bfloat16)
    t = (x.double() @ V.double()).float()  # as the forward returns it, from the rounded inputs
    kw = dict(ce=1.0, align=0.05, ortho=0.5, hoyer=0.01, scaling="euclidean",
              projection="stiefel")
    got = ssa_kernels.svd_factor_grads(x, t, delta, U, s, V, BU=BU, BS=BS, BV=BV, **kw,
                                       backend="triton")
    cpu = [a.cpu() for a in (x, t, delta, U, s, V, BU, BS, BV)]
    exact = ref64(ref.svd_factor_grads, *cpu, **kw)
    lowp = ref.svd_factor_grads(*cpu, **kw)
    for name, g, lp, w in zip(("gU", "gs", "gV", "gb"), got, lowp, exact, strict=True):
        assert g.dtype == torch.bfloat16
        assert_low_precision(g, lp, w, name)


# ----------------------------------------------------------------------- opcheck


def test_opcheck_lowrank_linear():
    x, U, s, V, b = dev(*_linear_inputs(6, 5, 4, 3))
    args = [a.requires_grad_(True) for a in (x, U, s, V, b)]
    torch.library.opcheck(_ops.get("lowrank_linear", "triton"), (*args, "relu", 0.01))


def test_opcheck_dfa_project():
    e, P, sigma, Q, h, a = dev(*_dfa_inputs(6, 4, 10, (), "tanh"))
    op = _ops.get("dfa_project", "triton")
    for aa, cos in ((None, 0.0), (a, 0.5)):
        torch.library.opcheck(op, (e, P, sigma, Q, h, aa, "tanh", 0.01, cos))
    e, P, sigma, Q, h, a = dev(*_dfa_inputs(6, 4, 10, (2, 3), "relu"))
    torch.library.opcheck(op, (e, P, sigma, Q, h, a, "relu", 0.01, 0.3))


def test_opcheck_svd_factor_grads():
    x, t, delta, U, s, V, BU, BS, BV = dev(*_grads_inputs(6, 5, 4, 3, 2))
    op = _ops.get("svd_factor_grads", "triton")
    base = (x, t, delta, U, s, V)
    torch.library.opcheck(op, base + (None, None, None, 1.0, 0.0, 0.0, 0.0, 1e-3, "euclidean",
                                      "stiefel", 1e-6))
    torch.library.opcheck(op, base + (BU, BS, BV, 1.0, 0.1, 0.5, 0.01, 1e-3, "inverse", "paper",
                                      1e-6))


@pytest.mark.parametrize("op", sorted(_ops.TRITON_OPS))
def test_entry_annotations_spell_the_schema(op):
    # On a GPU the ops are triton_ops whose schema is inferred from these annotations
    # (torch 2.11 ignores schema=): it must be the one schema every backend shares.
    from ssa_kernels.triton import _entry

    inferred = torch.library.infer_schema(_entry.ENTRIES[op], mutates_args=())
    assert inferred == _ops.SCHEMAS[op]
    schema = str(_ops.get(op, "triton")._schema)
    assert schema == f"{_ops.NAMESPACE}::{op}_triton{_ops.SCHEMAS[op]}"


def test_ops_without_a_triton_kernel_are_refused_by_name():
    """The conv ops have no Triton implementation ("where it pays", DESIGN §4): no silent fallback."""
    assert set(_ops.SCHEMAS) - set(_ops.TRITON_OPS) == {"lowrank_conv2d", "svd_conv_factor_grads"}
    assert "triton" not in ssa_kernels.available_backends("cpu", "lowrank_conv2d")
    x, U, s, V = torch.randn(1, 2, 4, 4), torch.eye(6, 2), torch.ones(2), torch.eye(6, 2)
    with pytest.raises(RuntimeError, match="'triton', which does not implement this op"):
        ssa_kernels.lowrank_conv2d(x, U, s, V, kernel_size=3, backend="triton")
