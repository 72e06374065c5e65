"""Every available backend against the reference: odd shapes, every option, every dtype."""

from __future__ import annotations

import pytest
import torch
from _helpers import (
    ACTIVATIONS,
    PROJECTIONS,
    SCALINGS,
    assert_close_fp32,
    assert_low_precision,
    backend_cases,
    devices,
    factors,
    gen,
    interpreted,
    ref,
    ref64,
    shapes_for,
    targets,
    to,
)

import ssa_kernels
from ssa_kernels import _backends, _ops

CASES = backend_cases()
LOW = [torch.bfloat16, torch.float16]


def _id(shape):
    return "p{}-n{}-m{}-r{}".format(*shape)


def _linear_inputs(p, n, m, r, seed=0):
    g = gen(seed)
    x = torch.randn(p, n, dtype=torch.float64, generator=g)
    U, s, V = factors(m, n, r, g)
    b = torch.randn(m, dtype=torch.float64, generator=g)
    return x, U, s, V, b


def _grads_inputs(p, n, m, r, k, seed=0):
    g = gen(seed)
    x = torch.randn(p, n, dtype=torch.float64, generator=g)
    U, s, V = factors(m, n, r, g)
    delta = torch.randn(p, m, dtype=torch.float64, generator=g) / max(p, 1)
    BU, BS, BV = targets(m, n, k, g)
    return x, x @ V, delta, U, s, V, BU, BS, BV


def _with_shapes(shapes_of):
    """(device, backend, shape) params: each backend gets only its own shapes."""
    out = []
    for case in CASES:
        device, backend = case.values
        for shape in shapes_of(device, backend):
            out.append(pytest.param(device, backend, shape, marks=case.marks,
                                    id=f"{case.id}-{_id(shape) if len(shape) == 4 else _dfa_id(shape)}"))
    return out


def _dfa_id(s):
    return f"p{s[0]}-d{s[1]}-C{s[2]}-{s[3]}"


# ------------------------------------------------------------------ lowrank_linear


@pytest.mark.parametrize("device,backend,shape", _with_shapes(shapes_for))
def test_lowrank_linear_fp32(device, backend, shape):
    p, n, m, r = shape
    x, U, s, V, b = _linear_inputs(p, n, m, r)
    acts = ACTIVATIONS if not interpreted(device, backend) else ("relu", "tanh")
    for act in acts:
        for bias in (b, None):
            args = to(device, torch.float32, x, U, s, V, bias)
            h, t = ssa_kernels.lowrank_linear(*args, act, backend=backend, negative_slope=0.1)
            h_ref, t_ref = ref64(ref.lowrank_linear, *args, act, 0.1)
            assert h.dtype == torch.float32 and t.dtype == torch.float32
            assert h.device.type == device and h.shape == (p, m) and t.shape == (p, r)
            assert_close_fp32(h, h_ref, f"h {act} bias={bias is not None}")
            assert_close_fp32(t, t_ref, "t")


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("device,backend", CASES)
def test_lowrank_linear_low_precision(device, backend, dtype):
    x, U, s, V, b = _linear_inputs(33, 257, 33, 33)
    args = to(device, dtype, x, U, s, V, b)
    h, t = ssa_kernels.lowrank_linear(*args, "tanh", backend=backend)
    assert h.dtype == dtype and t.dtype == torch.float32
    h64, t64 = ref64(ref.lowrank_linear, *args, "tanh")
    h_lp, t_lp = ref.lowrank_linear(*[a.cpu() for a in args], "tanh")
    assert_low_precision(h, h_lp, h64, "h")
    assert_low_precision(t, t_lp, t64, "t")


@pytest.mark.parametrize("device,backend", CASES)
def test_lowrank_linear_batch_dims_and_noncontiguous(device, backend):
    x, U, s, V, b = _linear_inputs(12, 33, 17, 5)
    x3 = x.reshape(3, 4, 33)
    # Non-contiguous views of every operand.
    xt = x3.transpose(0, 1).contiguous().transpose(0, 1)
    Ut = U.t().contiguous().t()
    Vt = torch.stack([V, V], 2).reshape(V.shape[0], -1)[:, ::2]
    s2 = torch.stack([s, s], 1)[:, 0]
    args = to(device, torch.float32, xt, Ut, s2, Vt, b)
    assert not args[0].is_contiguous() and not args[1].is_contiguous()
    h, t = ssa_kernels.lowrank_linear(*args, "relu", backend=backend)
    h_ref, t_ref = ref64(ref.lowrank_linear, x, U, s, V, b, "relu")
    assert h.shape == (3, 4, 17) and t.shape == (3, 4, 5)
    assert_close_fp32(h.reshape(12, 17), h_ref, "h")
    assert_close_fp32(t.reshape(12, 5), t_ref, "t")


# -------------------------------------------------------------------- dfa_project


def _dfa_inputs(p, d, C, spatial=(), seed=0):
    g = gen(seed)
    k = min(C, d)
    e = torch.randn(p, C, dtype=torch.float64, generator=g) / p
    P = torch.randn(d, k, dtype=torch.float64, generator=g)
    Q = torch.linalg.qr(torch.randn(C, k, dtype=torch.float64, generator=g))[0]
    sigma = torch.rand(k, dtype=torch.float64, generator=g) + 0.5
    a = torch.randn((p, d) + tuple(spatial), dtype=torch.float64, generator=g)
    return e, P, sigma, Q, a


DFA_SHAPES = [(1, 1, 10, ()), (7, 5, 10, ()), (129, 257, 10, ()), (7, 33, 3, ()),
              (5, 6, 10, (3, 2)), (3, 4, 10, (5,)), (2, 33, 7, (4, 4))]
DFA_INTERP = [(7, 5, 10, ()), (5, 6, 10, (3, 2)), (7, 33, 3, ())]


@pytest.mark.parametrize("device,backend,shape", _with_shapes(
    lambda device, backend: DFA_INTERP if interpreted(device, backend) else DFA_SHAPES))
def test_dfa_project_fp32(device, backend, shape):
    p, d, C, spatial = shape
    e, P, sigma, Q, a = _dfa_inputs(p, d, C, spatial)
    for act in ACTIVATIONS:
        h = ref.activate(a, act, 0.2)
        for cos in (0.0, 0.7):
            args = to(device, torch.float32, e, P, sigma, Q, h)
            a32 = a.to(device=device, dtype=torch.float32)
            out = ssa_kernels.dfa_project(*args, act, a=a32, cos=cos, negative_slope=0.2,
                                          backend=backend)
            want = ref64(ref.dfa_project, *args, act, 0.2, a32, cos)
            assert out.shape == h.shape and out.dtype == torch.float32
            assert_close_fp32(out, want, f"{act} cos={cos}")


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("device,backend", CASES)
def test_dfa_project_low_precision(device, backend, dtype):
    e, P, sigma, Q, a = _dfa_inputs(33, 65, 10, (2, 3))
    h = torch.sigmoid(a)
    args = to(device, dtype, e, P, sigma, Q, h, a)
    out = ssa_kernels.dfa_project(*args[:5], "sigmoid", a=args[5], cos=0.5, backend=backend)
    assert out.dtype == dtype
    want = ref64(ref.dfa_project, *args[:5], "sigmoid", 0.01, args[5], 0.5)
    lowp = ref.dfa_project(*[t.cpu() for t in args[:5]], "sigmoid", 0.01, args[5].cpu(), 0.5)
    assert_low_precision(out, lowp, want, "delta")


@pytest.mark.parametrize("device,backend", CASES)
def test_dfa_project_noncontiguous(device, backend):
    e, P, sigma, Q, a = _dfa_inputs(6, 8, 10, (3, 3))
    h = torch.relu(a)
    hn = h.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last layout
    an = a.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    Pn = P.t().contiguous().t()
    args = to(device, torch.float32, e, Pn, sigma, Q, hn)
    a32 = an.to(device=device, dtype=torch.float32)
    assert not args[4].is_contiguous()
    out = ssa_kernels.dfa_project(*args, "relu", a=a32, cos=0.3, backend=backend)
    assert_close_fp32(out, ref64(ref.dfa_project, e, P, sigma, Q, h, "relu", 0.01, a, 0.3))


# --------------------------------------------------------------- svd_factor_grads

OPTION_GRID = [(proj, sc) for proj in PROJECTIONS for sc in SCALINGS]


@pytest.mark.parametrize("device,backend,shape", _with_shapes(shapes_for))
def test_svd_factor_grads_fp32(device, backend, shape):
    p, n, m, r = shape
    k = max(1, r - 1)  # targets with fewer columns than r where r > 1
    x, t, delta, U, s, V, BU, BS, BV = _grads_inputs(p, n, m, r, k)
    grid = OPTION_GRID if not interpreted(device, backend) else OPTION_GRID[:3]
    for proj, sc in grid:
        for coeffs in (dict(ce=1.0), dict(ce=0.7, align=0.1, ortho=0.5, hoyer=0.05)):
            args = to(device, torch.float32, x, t, delta, U, s, V)
            tg = to(device, torch.float32, BU, BS, BV) if "align" in coeffs else (None,) * 3
            kw = dict(coeffs, scaling=sc, projection=proj)
            got = ssa_kernels.svd_factor_grads(*args, BU=tg[0], BS=tg[1], BV=tg[2], **kw,
                                               backend=backend)
            want = ref64(ref.svd_factor_grads, *args, *tg, **kw)
            for name, g, w in zip(("gU", "gs", "gV", "gb"), got, want):
                assert g.dtype == torch.float32 and g.shape == w.shape
                assert_close_fp32(g, w, f"{name} {proj}/{sc} {coeffs}")


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("device,backend", CASES)
def test_svd_factor_grads_low_precision(device, backend, dtype):
    x, t, delta, U, s, V, BU, BS, BV = _grads_inputs(65, 33, 47, 16, 16)
    args = to(device, dtype, x, None, delta, U, s, V, BU, BS, BV)
    # t as the forward returns it: fp32, computed from the rounded x and V.
    tt = (args[0].double() @ args[5].double()).float()
    kw = dict(ce=1.0, align=0.05, ortho=0.5, hoyer=0.01, scaling="euclidean",
              projection="stiefel")
    got = ssa_kernels.svd_factor_grads(args[0], tt, *args[2:6], BU=args[6], BS=args[7],
                                       BV=args[8], **kw, backend=backend)
    cpu_args = [a.cpu() for a in args[:1]] + [tt.cpu()] + [a.cpu() for a in args[2:]]
    want = ref64(ref.svd_factor_grads, *cpu_args, **kw)
    lowp = ref.svd_factor_grads(*cpu_args, **kw)
    for name, g, lp, w in zip(("gU", "gs", "gV", "gb"), got, lowp, want):
        assert g.dtype == dtype
        assert_low_precision(g, lp, w, name)


@pytest.mark.parametrize("device,backend", CASES)
def test_svd_factor_grads_noncontiguous(device, backend):
    x, t, delta, U, s, V, BU, BS, BV = _grads_inputs(9, 12, 10, 4, 6)
    nc = [a.t().contiguous().t() for a in (x, t, delta, U, V, BU, BV)]
    args = to(device, torch.float32, nc[0], nc[1], nc[2], nc[3], s, nc[4])
    tg = to(device, torch.float32, nc[5], BS, nc[6])
    kw = dict(ce=1.0, align=0.1, ortho=0.3, projection="paper", scaling="inverse")
    got = ssa_kernels.svd_factor_grads(*args, BU=tg[0], BS=tg[1], BV=tg[2], **kw, backend=backend)
    want = ref64(ref.svd_factor_grads, x, t, delta, U, s, V, BU, BS, BV, **kw)
    for g, w in zip(got, want):
        assert_close_fp32(g, w)


@pytest.mark.parametrize("device,backend", CASES)
def test_fp64_where_supported(device, backend):
    if torch.float64 not in ssa_kernels._backends.REGISTRY[backend].dtypes:
        with pytest.raises(TypeError, match="supports dtypes"):
            ssa_kernels.lowrank_linear(*to(device, torch.float64, *_linear_inputs(3, 4, 5, 2)),
                                       backend=backend)
        return
    x, U, s, V, b = _linear_inputs(7, 33, 5, 5)
    args = to(device, torch.float64, x, U, s, V, b)
    h, t = ssa_kernels.lowrank_linear(*args, "sigmoid", backend=backend)
    h_ref, t_ref = ref.lowrank_linear(x, U, s, V, b, "sigmoid")
    assert t.dtype == torch.float64
    torch.testing.assert_close(h.cpu(), h_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t.cpu(), t_ref, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ GPU-only sizes

GPU_CASES = [c for c in CASES if c.values[0] == "cuda"]


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(16384, 48, 40, 16), (4096, 1024, 512, 64),
                                   (2048, 300, 700, 200)], ids=_id)
@pytest.mark.parametrize("device,backend", GPU_CASES or [pytest.param("cuda", "cuda")])
def test_gpu_sizes_split_k_and_wide_rank(device, backend, shape):
    """Long batches (split-K over p), large widths, and r > 128 (the two-GEMM fallbacks)."""
    p, n, m, r = shape
    x, t, delta, U, s, V, BU, BS, BV = _grads_inputs(p, n, m, r, r)
    args = to(device, torch.float32, x, t, delta, U, s, V)
    tg = to(device, torch.float32, BU, BS, BV)
    kw = dict(ce=1.0, align=0.01, ortho=1.0, scaling="euclidean", projection="stiefel")
    got = ssa_kernels.svd_factor_grads(*args, BU=tg[0], BS=tg[1], BV=tg[2], **kw, backend=backend)
    want = ref64(ref.svd_factor_grads, *args, *tg, **kw)
    for g, w in zip(got, want):
        assert_close_fp32(g, w)
    h, tt = ssa_kernels.lowrank_linear(args[0], args[3], args[4], args[5], None, "relu",
                                       backend=backend)
    h_ref, t_ref = ref64(ref.lowrank_linear, args[0], args[3], args[4], args[5], None, "relu")
    assert_close_fp32(h, h_ref, "h")
    assert_close_fp32(tt, t_ref, "t")


@pytest.mark.cuda
def test_reorthonormalize_on_gpu_matches_cpu():
    U, s, V = factors(300, 200, 32, gen(3))
    U = U + 0.01
    got = ssa_kernels.reorthonormalize(*(a.float().cuda() for a in (U, s, V)))
    want = ssa_kernels.reorthonormalize(*(a.float() for a in (U, s, V)))
    for g, w in zip(got, want):
        assert g.device.type == "cuda"
        torch.testing.assert_close(g.cpu(), w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("op", sorted(_ops.SCHEMAS))
def test_auto_order_is_a_ranking_of_the_device_backends(op):
    for dev in ("cpu", "cuda"):
        order = _backends.auto_order(op, torch.device(dev))
        assert sorted(order) == sorted(_backends.PREFERENCE[dev])
    # The CUDA ranking follows docs/benchmarks/h100.md.
    assert _backends.auto_order("dfa_project", torch.device("cuda"))[0] == "cuda"
    assert _backends.auto_order("lowrank_linear", torch.device("cuda"))[0] == "reference"


@pytest.mark.parametrize("op", sorted(_ops.SCHEMAS))
def test_auto_picks_the_first_available_of_its_order(op, monkeypatch):
    monkeypatch.delenv(_backends.ENV_BACKEND, raising=False)
    for dev in devices():
        device = torch.device(dev)
        first = next(n for n in _backends.auto_order(op, device)
                     if _backends.REGISTRY[n].available(device))
        chosen = _backends.select(op, "auto", device, torch.float32)
        assert chosen is _backends.REGISTRY[first].op(op)


# ------------------------------------------------------------ edge cases (every backend)

ALL_CASES = [pytest.param("cpu", "reference", id="cpu-reference"), *CASES]
INF = float("inf")


def _torch_activation(a, act, slope):
    """torch's own activation functions, independent of reference.activate."""
    F = torch.nn.functional
    return {"none": lambda v: v, "relu": F.relu, "leaky_relu": lambda v: F.leaky_relu(v, slope),
            "tanh": torch.tanh, "sigmoid": torch.sigmoid}[act](a)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter: −inf·0
@pytest.mark.parametrize("device,backend", ALL_CASES)
def test_lowrank_linear_activations_at_infinity_match_torch(device, backend):
    """A −inf / +inf / NaN pre-activation (from the bias) gives torch's f(a) in every backend:
    relu(−inf) = 0 (not −inf·0 = NaN), leaky_relu(−inf) = −inf, tanh(±inf) = ±1,
    sigmoid(±inf) = 0 / 1, and NaN propagates."""
    x, U, s, V, b = _linear_inputs(7, 5, 6, 3)
    b[1], b[3], b[4] = -INF, INF, float("nan")
    for act in ACTIVATIONS:
        for slope in (0.1, 0.0):
            args = to(device, torch.float32, x, U, s, V, b)
            h, _ = ssa_kernels.lowrank_linear(*args, act, backend=backend, negative_slope=slope)
            a64 = (x @ V * s) @ U.t() + b
            want = _torch_activation(a64, act, slope)
            what = f"{act} slope={slope}"
            torch.testing.assert_close(h.double().cpu(), want, rtol=2e-5, atol=2e-5, equal_nan=True,
                                       msg=lambda m, w=what: f"{w}: {m}")
            assert torch.equal(torch.isnan(h.cpu()), torch.isnan(want)), what


@pytest.mark.parametrize("device,backend", ALL_CASES)
def test_dfa_project_activation_grads_at_infinity_match_autograd(device, backend):
    """f'(a) read from h = f(a) at a = ±inf is autograd's: relu 0 / 1, leaky_relu slope / 1,
    tanh and sigmoid 0."""
    for spatial in ((), (2,)):
        e, P, sigma, Q, a = _dfa_inputs(5, 6 // (len(spatial) + 1), 10, spatial)
        a.view(5, -1)[0, 1], a.view(5, -1)[2, 3], a.view(5, -1)[4, 0] = -INF, INF, -INF
        dh = ref.feedback_signal(e, P, sigma, Q)
        dhv = dh.reshape(dh.shape + (1,) * len(spatial)).expand(a.shape)
        for act in ACTIVATIONS:
            leaf = a.clone().requires_grad_()
            h64 = _torch_activation(leaf, act, 0.2)
            (want,) = torch.autograd.grad(h64, leaf, dhv)
            args = to(device, torch.float32, e, P, sigma, Q, h64.detach())
            out = ssa_kernels.dfa_project(*args, act, negative_slope=0.2, backend=backend)
            assert not out.isnan().any(), f"{act} spatial={spatial}"
            assert_close_fp32(out, want, f"{act} spatial={spatial}")


@pytest.mark.parametrize("device,backend", ALL_CASES)
def test_dfa_project_empty_batch(device, backend):
    """p = 0: an empty delta of h's shape from every backend, with and without the cosine term."""
    for d, spatial in ((5, ()), (6, (3, 2))):
        e, P, sigma, Q, a = _dfa_inputs(1, d, 10, spatial)
        e, a = e[:0], a[:0]
        for act in ("relu", "sigmoid"):
            h = ref.activate(a, act)
            for cos in (0.0, 0.5):
                args = to(device, torch.float32, e, P, sigma, Q, h, a)
                out = ssa_kernels.dfa_project(*args[:5], act, a=args[5], cos=cos, backend=backend)
                assert out.shape == h.shape and out.dtype == torch.float32, (d, spatial, act, cos)
                assert out.device.type == device


def _ortho_only(U, V, projection):
    """Independent form of the ortho term: autograd of ortho·(‖UᵀU − I‖² + ‖VᵀV − I‖²),
    projected by M − Y(YᵀM) under ``paper`` (added after projecting under ``stiefel``)."""
    Ul, Vl = U.clone().requires_grad_(), V.clone().requires_grad_()
    eye = torch.eye(U.shape[1], dtype=U.dtype)
    penalty = (Ul.t() @ Ul - eye).pow(2).sum() + (Vl.t() @ Vl - eye).pow(2).sum()
    gU, gV = torch.autograd.grad(penalty, (Ul, Vl))
    if projection == "paper":
        gU, gV = gU - U @ (U.t() @ gU), gV - V @ (V.t() @ gV)
    return gU, gV


@pytest.mark.parametrize("device,backend", CASES)
def test_svd_factor_grads_ortho_term_alone(device, backend):
    """delta = 0, align = hoyer = 0: only the ortho penalty is left, on factors off the manifold
    (the other tests use orthonormal U, V, where the ortho term vanishes)."""
    g = gen(11)
    p, n, m, r = 9, 12, 10, 4
    x = torch.randn(p, n, dtype=torch.float64, generator=g)
    U = torch.randn(m, r, dtype=torch.float64, generator=g) / 2
    V = torch.randn(n, r, dtype=torch.float64, generator=g) / 2
    s = 0.5 + torch.rand(r, dtype=torch.float64, generator=g)
    delta = torch.zeros(p, m, dtype=torch.float64)
    ortho = 0.7
    for proj in PROJECTIONS:
        for sc in SCALINGS:
            args = to(device, torch.float32, x, x @ V, delta, U, s, V)
            gU, gs, gV, gb = ssa_kernels.svd_factor_grads(*args, ce=1.0, ortho=ortho, scaling=sc,
                                                          projection=proj, backend=backend)
            wU, wV = _ortho_only(*(a.double().cpu() for a in (args[3], args[5])), proj)
            assert wU.abs().max() > 0.1  # the penalty is far from zero here
            assert_close_fp32(gU, ortho * wU, f"gU {proj}/{sc}")
            assert_close_fp32(gV, ortho * wV, f"gV {proj}/{sc}")
            assert_close_fp32(gs, torch.zeros(r), "gs")
            assert_close_fp32(gb, torch.zeros(m), "gb")


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] != "triton"])
def test_svd_conv_factor_grads_ortho_term_alone(device, backend):
    """The convolution op shares the epilogue: the same isolated ortho term."""
    g = gen(12)
    p, C, N, kh, kw, r = 2, 3, 4, 3, 2, 3
    x = torch.randn(p, C, 6, 5, dtype=torch.float64, generator=g)
    U = torch.randn(N * kw, r, dtype=torch.float64, generator=g) / 2
    V = torch.randn(C * kh, r, dtype=torch.float64, generator=g) / 2
    s = 0.5 + torch.rand(r, dtype=torch.float64, generator=g)
    h, t = ref.lowrank_conv2d(x, U, s, V, None, (kh, kw))
    for proj in PROJECTIONS:
        args = to(device, torch.float32, x, t, torch.zeros_like(h), U, s, V)
        gU, gs, gV, gb = ssa_kernels.svd_conv_factor_grads(*args, (kh, kw), ce=1.0, ortho=0.7,
                                                           projection=proj, backend=backend)
        wU, wV = _ortho_only(*(a.double().cpu() for a in (args[3], args[5])), proj)
        assert_close_fp32(gU, 0.7 * wU, f"gU {proj}")
        assert_close_fp32(gV, 0.7 * wV, f"gV {proj}")
        assert_close_fp32(gs, torch.zeros(r), "gs")
        assert_close_fp32(gb, torch.zeros(N), "gb")
