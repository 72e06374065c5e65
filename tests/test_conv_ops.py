"""The convolution ops (DESIGN §4): ``lowrank_conv2d`` and ``svd_conv_factor_grads``.

The reference against ``conv2d`` (full rank) and against autograd through the two-convolution
form; every backend against the reference; the autograd formula; bad input.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from _helpers import devices, factors, gen, targets

import ssa_kernels
from ssa_kernels import _checks
from ssa_kernels import reference as ref

OPS = ("lowrank_conv2d", "svd_conv_factor_grads")

# (kernel, stride, padding, dilation): square, non-square, 1×1, stride, padding forms, dilation.
GEOMETRIES = [
    ((3, 3), 1, 0, 1),
    ((3, 3), 1, 1, 1),
    ((3, 3), 2, 1, 1),
    ((2, 3), 1, "same", 1),
    ((4, 4), 1, "same", 1),
    ((1, 1), 1, 0, 1),
    ((1, 1), 2, 0, 1),
    ((5, 1), (2, 1), (2, 0), 1),
    ((3, 2), (1, 2), (0, 1, 1, 0), (2, 1)),
    ((3, 3), 1, "same", (1, 2)),
    ((2, 2), 2, "valid", 1),
]


def _gid(g):
    k, st, pad, dil = g
    return f"k{k[0]}x{k[1]}-s{st}-p{pad}-d{dil}".replace(" ", "")


def backend_cases():
    out = []
    for dev in devices():
        for b in ssa_kernels.available_backends(dev, "lowrank_conv2d"):
            out.append(
                pytest.param(dev, b, id=f"{dev}-{b}", marks=[pytest.mark.cuda] if dev == "cuda" else [])
            )
    return out


def _norm(g):
    return _checks.conv_geometry("test", *g)


def _conv_inputs(C, N, g, p=3, H=9, W=8, rank=None, seed=0):
    kernel = _norm(g)[0]
    kh, kw = kernel
    gg = gen(seed)
    m, n = N * kw, C * kh
    r = min(m, n) if rank is None else min(rank, m, n)
    x = torch.randn(p, C, H, W, dtype=torch.float64, generator=gg)
    U, s, V = factors(m, n, r, gg)
    b = torch.randn(N, dtype=torch.float64, generator=gg)
    return x, U, s, V, b


def _dense_conv(x, K, b, g):
    kernel, stride, pads, dil = _norm(g)
    xp = F.pad(x, (pads[2], pads[3], pads[0], pads[1]))
    return F.conv2d(xp, K, b, stride, 0, dil)


# ------------------------------------------------------------------ the reference itself


@pytest.mark.parametrize("g", GEOMETRIES, ids=_gid)
def test_reference_at_full_rank_is_conv2d(g):
    x, _, _, _, b = _conv_inputs(3, 5, g)
    kh, kw = _norm(g)[0]
    K = torch.randn(5, 3, kh, kw, dtype=torch.float64, generator=gen(1))
    U, s, Vh = torch.linalg.svd(ref.factors_from_kernel(K), full_matrices=False)
    h, t = ssa_kernels.lowrank_conv2d(
        x, U, s, Vh.t(), b, kernel_size=g[0], stride=g[1], padding=g[2], dilation=g[3], backend="reference"
    )
    torch.testing.assert_close(h, _dense_conv(x, K, b, g), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ref.kernel_from_factors(U, s, Vh.t(), (kh, kw)), K)
    if g[2] == "same":  # nn.Conv2d's own "same" (asymmetric for even kernels) agrees
        torch.testing.assert_close(h, F.conv2d(x, K, b, 1, "same", g[3]), rtol=1e-10, atol=1e-10)


def test_layout_is_n_kw_and_c_kh():
    """``K'[(n, w), (c, h)] = K[n, c, h, w]``: row ``n·kw + w`` of U, row ``c·kh + h`` of V (DESIGN §4)."""
    K = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5)
    Kp = ref.factors_from_kernel(K)
    for n, c, h, w in itertools.product(range(2), range(3), range(4), range(5)):
        assert Kp[n * 5 + w, c * 4 + h] == K[n, c, h, w]


@pytest.mark.parametrize("g", GEOMETRIES, ids=_gid)
def test_reference_factor_grads_are_autograd_of_the_two_convolutions(g):
    """euclidean + projection none: ce part = autograd of Σ δ⊙a, plus the penalties' gradients."""
    x, U, s, V, b = _conv_inputs(3, 4, g, rank=5)
    kernel = _norm(g)[0]
    h, t = ref.lowrank_conv2d(x, U, s, V, b, *_norm(g))
    delta = torch.randn(h.shape, dtype=torch.float64, generator=gen(2))
    r = U.shape[1]
    k = min(3, r)
    BU, BS, BV = targets(U.shape[0], V.shape[0], k, gen(3))
    ce, align, ortho, hoyer, heps = 1.3, 0.2, 0.5, 0.05, 1e-3
    Ux, sx, Vx, bx = (a.clone().requires_grad_(True) for a in (U, s, V, b))
    a, _ = ref.lowrank_conv2d(x, Ux, sx, Vx, bx, *_norm(g))  # activation none: a = h
    eye = torch.eye(r, dtype=torch.float64)
    L = (
        ce * (delta * a).sum()
        + align
        * (
            ((Ux[:, :k] - BU) ** 2).sum()
            + ((Vx[:, :k] - BV) ** 2).sum()
            + ((sx[:k] / sx[:k].norm() - BS / BS.norm()) ** 2).sum()
        )
        + ortho * (((Ux.t() @ Ux - eye) ** 2).sum() + ((Vx.t() @ Vx - eye) ** 2).sum())
        + hoyer * torch.sqrt(sx * sx + heps**2).sum() / sx.norm()
    )
    want = torch.autograd.grad(L, (Ux, sx, Vx, bx))
    got = ssa_kernels.svd_conv_factor_grads(
        x,
        t,
        delta,
        U,
        s,
        V,
        kernel,
        g[1],
        g[2],
        g[3],
        BU=BU,
        BS=BS,
        BV=BV,
        ce=ce,
        align=align,
        ortho=ortho,
        hoyer=hoyer,
        hoyer_eps=heps,
        projection="none",
        backend="reference",
    )
    for name, gg, w in zip(("gU", "gs", "gV", "gb"), got, want):
        torch.testing.assert_close(gg, w, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


def test_inverse_scaling_divides_the_weight_gradients_by_s_squared():
    g = GEOMETRIES[2]
    x, U, s, V, b = _conv_inputs(3, 4, g, rank=6)
    h, t = ref.lowrank_conv2d(x, U, s, V, b, *_norm(g))
    delta = torch.randn(h.shape, dtype=torch.float64, generator=gen(4))
    kw = dict(projection="none", backend="reference")
    eu = ssa_kernels.svd_conv_factor_grads(x, t, delta, U, s, V, g[0], g[1], g[2], g[3], **kw)
    inv = ssa_kernels.svd_conv_factor_grads(
        x, t, delta, U, s, V, g[0], g[1], g[2], g[3], scaling="inverse", **kw
    )
    torch.testing.assert_close(inv[0], eu[0] / s**2)
    torch.testing.assert_close(inv[2], eu[2] / s**2)
    torch.testing.assert_close(inv[1], eu[1])
    torch.testing.assert_close(inv[3], eu[3])


def test_projected_factor_grads_are_tangent_and_match_the_linear_epilogue():
    """The epilogue is the linear op's: stiefel gives UᵀgU + gUᵀU = 0 without penalties."""
    g = GEOMETRIES[1]
    x, U, s, V, b = _conv_inputs(3, 4, g, rank=6)
    h, t = ref.lowrank_conv2d(x, U, s, V, b, *_norm(g))
    delta = torch.randn(h.shape, dtype=torch.float64, generator=gen(5))
    gU, _, gV, _ = ssa_kernels.svd_conv_factor_grads(
        x, t, delta, U, s, V, g[0], g[1], g[2], g[3], backend="reference"
    )
    for Y, gY in ((U, gU), (V, gV)):
        A = Y.t() @ gY
        torch.testing.assert_close(A + A.t(), torch.zeros_like(A), atol=1e-10, rtol=0)
    raw = ssa_kernels.svd_conv_factor_grads(
        x, t, delta, U, s, V, g[0], g[1], g[2], g[3], projection="none", backend="reference"
    )
    torch.testing.assert_close(gU, ref.tangent_projection(U, raw[0], "stiefel"))


# ------------------------------------------------------------------ autograd formula


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("g", [GEOMETRIES[2], GEOMETRIES[3], GEOMETRIES[8]], ids=_gid)
def test_lowrank_conv2d_gradcheck(backend, g):
    if backend not in ssa_kernels.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    x, U, s, V, b = _conv_inputs(2, 3, g, p=2, H=6, W=5, rank=4)
    args = [a.clone().requires_grad_(True) for a in (x, U, s, V, b)]

    def f(x, U, s, V, b):
        h, t = ssa_kernels.lowrank_conv2d(
            x,
            U,
            s,
            V,
            b,
            kernel_size=g[0],
            stride=g[1],
            padding=g[2],
            dilation=g[3],
            activation="tanh",
            backend=backend,
        )
        return h, t

    assert torch.autograd.gradcheck(f, args)


def test_svd_conv_factor_grads_has_no_backward():
    g = GEOMETRIES[0]
    x, U, s, V, b = _conv_inputs(2, 3, g, rank=3)
    h, t = ref.lowrank_conv2d(x, U, s, V, b, *_norm(g))
    Ug = U.clone().requires_grad_(True)
    out = ssa_kernels.svd_conv_factor_grads(x, t, torch.ones_like(h), Ug, s, V, g[0], backend="reference")
    with pytest.raises(RuntimeError, match="autograd-free"):
        out[0].sum().backward()


@pytest.mark.parametrize("family", ["ref", "native"])
def test_opcheck(family):
    from ssa_kernels import _ops

    if family == "native" and "cpu" not in ssa_kernels.available_backends("cpu"):
        pytest.skip("the compiled extension is not available")
    g = GEOMETRIES[8]
    x, U, s, V, b = _conv_inputs(2, 3, g, rank=4)
    geo = [list(v) for v in _norm(g)]
    torch.library.opcheck(_ops.get("lowrank_conv2d", family), (x, U, s, V, b, *geo, "relu", 0.01))
    h, t = ref.lowrank_conv2d(x, U, s, V, b, *_norm(g))
    BU, BS, BV = targets(U.shape[0], V.shape[0], 2, gen(1))
    torch.library.opcheck(
        _ops.get("svd_conv_factor_grads", family),
        (
            x,
            t,
            torch.randn_like(h),
            U,
            s,
            V,
            *geo,
            BU,
            BS,
            BV,
            1.0,
            0.1,
            0.5,
            0.01,
            1e-3,
            "inverse",
            "paper",
            1e-6,
        ),
    )


# ------------------------------------------------------------------ every backend vs the reference


@pytest.mark.parametrize("g", GEOMETRIES, ids=_gid)
@pytest.mark.parametrize("device,backend", backend_cases())
def test_backend_forward_matches_reference(device, backend, g):
    for act, dtype in itertools.product(
        ("relu", "leaky_relu", "tanh", "sigmoid", "none"), (torch.float64, torch.float32)
    ):
        x, U, s, V, b = _conv_inputs(3, 6, g, rank=4 if act == "relu" else None)
        args = [a.to(device=device, dtype=dtype) for a in (x, U, s, V, b)]
        kw = dict(
            kernel_size=g[0], stride=g[1], padding=g[2], dilation=g[3], activation=act, negative_slope=0.1
        )
        h, t = ssa_kernels.lowrank_conv2d(*args, backend=backend, **kw)
        hr, tr = ssa_kernels.lowrank_conv2d(x, U, s, V, b, backend="reference", **kw)
        assert h.dtype == dtype and t.dtype == ref.acc_dtype(dtype) and h.device.type == device
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(h.double().cpu(), hr, rtol=tol, atol=tol * max(1.0, float(hr.abs().max())))
        torch.testing.assert_close(t.double().cpu(), tr, rtol=tol, atol=tol * max(1.0, float(tr.abs().max())))


@pytest.mark.parametrize("g", GEOMETRIES, ids=_gid)
@pytest.mark.parametrize("device,backend", backend_cases())
def test_backend_factor_grads_match_reference(device, backend, g):
    options = [
        ("stiefel", "euclidean", 0.1, 0.0),
        ("paper", "inverse", 0.1, 0.01),
        ("none", "euclidean", 0.0, 0.0),
    ]
    for (proj, sc, align, hoyer), dtype in itertools.product(options, (torch.float64, torch.float32)):
        x, U, s, V, b = _conv_inputs(3, 5, g, rank=4)
        h, t = ref.lowrank_conv2d(x, U, s, V, b, *_norm(g))
        delta = torch.randn(h.shape, dtype=torch.float64, generator=gen(7)) / 3
        BU, BS, BV = targets(U.shape[0], V.shape[0], min(3, U.shape[1]), gen(8))
        kw = dict(ce=1.3, align=align, ortho=0.5, hoyer=hoyer, scaling=sc, projection=proj)
        tg = (BU, BS, BV) if align else (None, None, None)
        low = [None if a is None else a.to(device=device, dtype=dtype) for a in (x, t, delta, U, s, V, *tg)]
        low[1] = t.to(device=device, dtype=ref.acc_dtype(dtype))
        got = ssa_kernels.svd_conv_factor_grads(
            *low[:6], g[0], g[1], g[2], g[3], BU=low[6], BS=low[7], BV=low[8], backend=backend, **kw
        )
        want = ssa_kernels.svd_conv_factor_grads(
            x,
            t,
            delta,
            U,
            s,
            V,
            g[0],
            g[1],
            g[2],
            g[3],
            BU=tg[0],
            BS=tg[1],
            BV=tg[2],
            backend="reference",
            **kw,
        )
        tol = 1e-10 if dtype == torch.float64 else 5e-5
        for name, gg, w in zip(("gU", "gs", "gV", "gb"), got, want):
            assert gg.dtype == dtype and gg.device.type == device
            torch.testing.assert_close(
                gg.double().cpu(),
                w,
                rtol=tol,
                atol=tol * max(1.0, float(w.abs().max())),
                msg=lambda m, what=f"{name} {proj}/{sc}": f"{what}: {m}",
            )


@pytest.mark.parametrize("device,backend", backend_cases())
def test_backend_low_precision_close_to_fp64(device, backend):
    g = GEOMETRIES[3]
    x, U, s, V, b = _conv_inputs(4, 8, g, rank=6)
    for dtype in (torch.bfloat16, torch.float16):
        args = [a.to(device=device, dtype=dtype) for a in (x, U, s, V, b)]
        exact = [a.to(dtype).double() for a in (x, U, s, V, b)]
        kw = dict(kernel_size=g[0], padding=g[2], activation="relu")
        h, t = ssa_kernels.lowrank_conv2d(*args, backend=backend, **kw)
        hr, tr = ssa_kernels.lowrank_conv2d(*exact, backend="reference", **kw)
        assert h.dtype == dtype and t.dtype == torch.float32
        scale = float(hr.abs().max())
        assert float((h.double().cpu() - hr).abs().max()) <= 4e-2 * scale
        delta = torch.randn(hr.shape, dtype=torch.float64, generator=gen(9)) / 4
        got = ssa_kernels.svd_conv_factor_grads(
            args[0], t, delta.to(device=device, dtype=dtype), *args[1:4], g[0], padding=g[2], backend=backend
        )
        want = ssa_kernels.svd_conv_factor_grads(
            exact[0], tr, delta.to(dtype).double(), *exact[1:4], g[0], padding=g[2], backend="reference"
        )
        for gg, w in zip(got, want):
            assert gg.dtype == dtype
            assert float((gg.double().cpu() - w).abs().max()) <= 4e-2 * max(1.0, float(w.abs().max()))


# ------------------------------------------------------------------ bad input


def _good():
    g = GEOMETRIES[1]
    x, U, s, V, b = (a.float() for a in _conv_inputs(3, 4, g, rank=5))
    h, t = ref.lowrank_conv2d(x, U, s, V, b, *_norm(g))
    return x, U, s, V, b, h, t


def test_lowrank_conv2d_rejects_bad_input():
    x, U, s, V, b, h, t = _good()
    call = ssa_kernels.lowrank_conv2d
    with pytest.raises(TypeError, match="kernel_size is required"):
        call(x, U, s, V, b, kernel_size=None)
    with pytest.raises(TypeError, match="kernel_size"):
        call(x, U, s, V, b, kernel_size=(3, 3, 3))
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        call(x, U, s, V, b, kernel_size=0)
    with pytest.raises(ValueError, match="U has shape .* N·kw"):
        call(x, U[:-1], s, V, b, kernel_size=3, padding=1)
    with pytest.raises(ValueError, match=r"V has shape .* \(C·kh"):
        call(x, U, s, V[:-1], b, kernel_size=3, padding=1)
    with pytest.raises(
        ValueError, match=r"V has shape .* \(C·kh"
    ):  # kernel_size that does not fit the factors
        call(x, U, s, V, b, kernel_size=(2, 3), padding=1)
    with pytest.raises(ValueError, match="x must be 4-D"):
        call(x[0], U, s, V, b, kernel_size=3, padding=1)
    with pytest.raises(ValueError, match="bias"):
        call(x, U, s, V, b[:-1], kernel_size=3, padding=1)
    with pytest.raises(TypeError, match="dtype"):
        call(x, U.double(), s, V, b, kernel_size=3, padding=1)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        call(x, U, s, V, b, kernel_size=3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding must be"):
        call(x, U, s, V, b, kernel_size=3, padding="full")
    with pytest.raises(ValueError, match="padding must be >= 0"):
        call(x, U, s, V, b, kernel_size=3, padding=(0, 0, -1, 0))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        call(x, U, s, V, b, kernel_size=3, dilation=5)
    with pytest.raises(ValueError, match="activation"):
        call(x, U, s, V, b, kernel_size=3, activation="gelu")
    with pytest.raises(RuntimeError, match="'triton', which does not implement this op"):
        call(x, U, s, V, b, kernel_size=3, backend="triton")
    with pytest.raises(ValueError, match="rank r"):
        call(x, torch.zeros(12, 13), torch.zeros(13), torch.zeros(9, 13), b, kernel_size=3)


def test_conv_geometry_refuses_groups_and_padding_modes():
    with pytest.raises(ValueError, match="groups must be 1"):
        _checks.conv_geometry("f", 3, 1, 0, 1, groups=2)
    with pytest.raises(ValueError, match="padding_mode must be 'zeros'"):
        _checks.conv_geometry("f", 3, 1, 0, 1, padding_mode="reflect")
    assert _checks.conv_geometry("f", (2, 4), 1, "same", (1, 2)) == ((2, 4), (1, 1), (0, 1, 3, 3), (1, 2))


def test_svd_conv_factor_grads_rejects_bad_input():
    x, U, s, V, b, h, t = _good()
    d = torch.randn_like(h)
    call = ssa_kernels.svd_conv_factor_grads
    with pytest.raises(ValueError, match="t must have shape"):
        call(x, t[:, :, :-1], d, U, s, V, 3, 1, 1)
    with pytest.raises(ValueError, match="delta must have the output's shape"):
        call(x, t, d[:, :-1], U, s, V, 3, 1, 1)
    with pytest.raises(ValueError, match="t must have shape"):  # a geometry that does not fit
        call(x, t, d, U, s, V, 3, 2, 1)
    with pytest.raises(TypeError, match="t must have dtype"):
        call(x, t.half(), d, U, s, V, 3, 1, 1)
    with pytest.raises(ValueError, match="align = 0.1 needs the alignment targets"):
        call(x, t, d, U, s, V, 3, 1, 1, align=0.1)
    with pytest.raises(ValueError, match="BU"):
        call(x, t, d, U, s, V, 3, 1, 1, align=0.1, BU=U[:-1], BS=s, BV=V)
    with pytest.raises(ValueError, match="projection"):
        call(x, t, d, U, s, V, 3, 1, 1, projection="cayley")
    ssa_kernels.set_debug(True)
    try:
        with pytest.raises(ValueError, match="NaN or inf"):
            call(x, t, d * float("nan"), U, s, V, 3, 1, 1)
    finally:
        ssa_kernels.set_debug(None)


@pytest.mark.skipif("cpu" not in ssa_kernels.available_backends("cpu"), reason="needs the compiled extension")
def test_native_kernels_check_direct_calls():
    """torch.ops calls bypass the Python checks: the C++ checks still refuse bad shapes."""
    from ssa_kernels import _ops

    x, U, s, V, b, h, t = _good()
    with pytest.raises((ValueError, RuntimeError), match="padding 4"):
        _ops.get("lowrank_conv2d", "native")(x, U, s, V, b, [3, 3], [1, 1], [1, 1], [1, 1], "none", 0.0)
    with pytest.raises((ValueError, RuntimeError), match="N·kw rows"):
        _ops.get("lowrank_conv2d", "native")(
            x, U[:-1], s, V, b, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], "none", 0.0
        )
    with pytest.raises((ValueError, RuntimeError), match="delta"):
        _ops.get("svd_conv_factor_grads", "native")(
            x,
            t,
            h[:, :, 1:],
            U,
            s,
            V,
            [3, 3],
            [1, 1],
            [1, 1, 1, 1],
            [1, 1],
            None,
            None,
            None,
            1.0,
            0.0,
            0.0,
            0.0,
            1e-3,
            "euclidean",
            "stiefel",
            1e-6,
        )


_STRIDED_1X1 = """
import torch, ssa_kernels
g = torch.Generator().manual_seed(0)
x = torch.randn(3, 3, 9, 8, generator=g)
U = torch.linalg.qr(torch.randn(5, 3, generator=g))[0]
V = torch.linalg.qr(torch.randn(3, 3, generator=g))[0]
s = torch.rand(3, generator=g) + 0.5
for backend in ssa_kernels.available_backends("cpu", "svd_conv_factor_grads"):
    Ug = U.clone().requires_grad_(True)
    h, t = ssa_kernels.lowrank_conv2d(x, Ug, s, V, kernel_size=1, stride=2, backend=backend)
    h.sum().backward()  # the autograd formula's weight-gradients too
    ssa_kernels.svd_conv_factor_grads(x, t, torch.randn(h.shape, generator=g), U, s, V, 1, 2, backend=backend)
print("done")
"""


def test_strided_1x1_convolutions_avoid_the_onednn_nhwc_weight_gradient():
    """Regression: 1×1 kernels made as views (N×r×1×1 with strides that also read as channels-last)
    sent ATen to oneDNN's NHWC strided 1×1 backward-weights kernel, which corrupts the heap in
    torch 2.14 with several threads (the test suite segfaulted at exit). Every kernel and input is
    now given canonical NCHW strides first."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="2", ONEDNN_VERBOSE="1")
    run = subprocess.run([sys.executable, "-c", _STRIDED_1X1], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "done" in run.stdout, run.stderr[-2000:]
    weights = [line for line in run.stdout.splitlines() if "backward_weights" in line]
    if torch.backends.mkldnn.is_available():
        assert weights, "oneDNN ran no backward-weights primitive: the check below checked nothing"
    assert not [line for line in weights if "acdb" in line], weights
