"""The CUDA kernels' logic on the CPU: csrc/cuda/*.cu built against cuda_emulation.h.

Machines without a GPU (CI among them) cannot run the CUDA backend, but they can run its
kernels with every block emulated by CPU threads (``tests/cuda_emulation/``): index
arithmetic, tails, bounds masks, barriers, split-K and dtype handling are checked against
the reference here. On a GPU the real kernels run in test_backends.py as well.
"""

from __future__ import annotations

import itertools
import pathlib

import pytest
import torch
from _helpers import factors, gen, targets

from ssa_kernels import reference as ref

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emulation"
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))

# Tolerance against the fp64 reference of the same (rounded) inputs, per input dtype,
# scaled by the largest output magnitude and a growth factor for long sums.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load

    build = ROOT / "build" / "cuda_emulation"
    build.mkdir(parents=True, exist_ok=True)
    wrappers = []
    for src in CUDA_SOURCES:  # .cu would go to nvcc: include each from a .cpp instead
        w = build / f"emu_{src.stem}.cpp"
        text = f'#include "cuda/{src.name}"\n'
        if not w.exists() or w.read_text() != text:
            w.write_text(text)
        wrappers.append(str(w))
    sources = [str(EMU / "harness.cpp"), str(ROOT / "csrc" / "ops.cpp"),
               str(ROOT / "csrc" / "factor_cores.cpp"), str(ROOT / "csrc" / "conv.cpp"), *wrappers]
    module = load(
        "ssa_cuda_emulation", sources, build_directory=str(build), verbose=False,
        extra_cflags=["-O1", "-std=c++20", "-DSSA_WITH_CUDA=1", "-DSSA_CUDA_EMULATION=1",
                      f"-I{ROOT / 'csrc'}", f"-I{EMU}", "-Wno-unknown-pragmas"],
        extra_include_paths=[str(ROOT / "csrc"), str(EMU)])
    module.set_sm_count(132)
    return module


def _close(what, got, want, dt, growth=1.0):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.double(), want.double()
    if want.numel() == 0:
        return
    err = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    assert err <= TOL[dt] * scale * growth, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def _rounded(dt, *tensors):
    """Inputs rounded to dt, and the same values in fp64 for the reference."""
    low = [None if t is None else t.to(dt) for t in tensors]
    return low, [None if t is None else t.double() for t in low]


def _noncontig(t):
    return t.t().contiguous().t() if t is not None and t.dim() == 2 else t


LOWRANK = [(1, 1, 1, 1), (5, 5, 33, 1), (70, 33, 5, 5), (33, 257, 33, 33), (65, 33, 257, 33),
           (3, 257, 257, 128), (2, 257, 257, 130), (17, 33, 300, 16), (0, 5, 5, 2)]


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
def test_emulated_lowrank_linear(emu, dt):
    g = gen(0)
    for (p, n, m, r), (act, bias, nc) in itertools.product(
            LOWRANK, [("none", True, False), ("relu", False, True), ("tanh", True, False),
                      ("sigmoid", False, False), ("leaky_relu", True, True)]):
        x = torch.randn(p, n, dtype=torch.float64, generator=g)
        U, s, V = factors(m, n, r, g)
        b = torch.randn(m, dtype=torch.float64, generator=g) if bias else None
        low, hi = _rounded(dt, x, U, s, V, b)
        if nc:
            low = [_noncontig(t) for t in low]
        h, t = emu.lowrank_linear(*low, act, 0.1)
        h_ref, t_ref = ref.lowrank_linear(*hi, act, 0.1)
        assert h.dtype == dt and t.dtype == ref.acc_dtype(dt)
        growth = max(1.0, n**0.5 / 4)
        _close(f"h {(p, n, m, r)} {act}", h, h_ref, dt, growth)
        _close(f"t {(p, n, m, r)}", t, t_ref, torch.float64 if dt == torch.float64 else
               torch.float32, growth)


DFA = [(1, 1, 3, 1, ()), (5, 33, 10, 10, ()), (70, 257, 10, 10, ()), (9, 6, 10, 5, (3, 2)),
       (3, 5, 4, 4, (1, 7)), (66, 65, 17, 17, ())]


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_emulated_dfa_project(emu, dt):
    g = gen(1)
    for (p, d, C, k, spatial), (act, cos, nc) in itertools.product(
            DFA, [("tanh", 0.0, False), ("relu", 0.3, True), ("sigmoid", 0.3, False),
                  ("leaky_relu", 0.0, True), ("none", 0.7, False)]):
        e = torch.randn(p, C, dtype=torch.float64, generator=g)
        P = torch.randn(d, k, dtype=torch.float64, generator=g)
        Q = torch.randn(C, k, dtype=torch.float64, generator=g)
        sigma = torch.rand(k, dtype=torch.float64, generator=g)
        a = torch.randn((p, d) + spatial, dtype=torch.float64, generator=g)
        h = ref.activate(a, act, 0.05)
        low, hi = _rounded(dt, e, P, sigma, Q, h, a)
        if nc:
            low[0], low[1] = _noncontig(low[0]), _noncontig(low[1])
            if spatial:
                low[4] = low[4].transpose(2, 3).contiguous().transpose(2, 3)
                low[5] = low[5].transpose(2, 3).contiguous().transpose(2, 3)
        got = emu.dfa_project(*low[:5], low[5] if cos else None, act, 0.05, cos)
        want = ref.dfa_project(*hi[:5], act, 0.05, hi[5], cos)
        assert got.dtype == dt and got.is_contiguous()
        _close(f"delta {(p, d, C, k, spatial)} {act} cos={cos}", got, want, dt, 4.0)


FACTOR = [(1, 1, 1, 1, 1), (5, 5, 33, 5, 3), (70, 33, 5, 5, 5), (33, 257, 33, 33, 40),
          (300, 33, 5, 5, 2), (600, 65, 70, 65, 10), (0, 5, 6, 3, 2), (40, 140, 150, 130, 20)]


@pytest.mark.parametrize("sms", [132, 1], ids=["sms132", "sms1"])
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_emulated_svd_factor_grads(emu, dt, sms):
    """132 SMs: split-K over the batch for the long cases; 1 SM: never split."""
    if sms == 1 and dt != torch.float32:
        pytest.skip("the unsplit path once is enough")
    emu.set_sm_count(sms)
    g = gen(2)
    try:
        for (p, n, m, r, k), (proj, sc, align, nc) in itertools.product(
                FACTOR, [("stiefel", "euclidean", 0.1, False), ("paper", "inverse", 0.1, True),
                         ("none", "euclidean", 0.0, False)]):
            x = torch.randn(p, n, dtype=torch.float64, generator=g)
            U, s, V = factors(m, n, r, g)
            delta = torch.randn(p, m, dtype=torch.float64, generator=g)
            BU, BS, BV = targets(m, n, k, g) if k <= min(m, n) else (
                torch.randn(m, k, dtype=torch.float64, generator=g),
                torch.rand(k, dtype=torch.float64, generator=g),
                torch.randn(n, k, dtype=torch.float64, generator=g))
            kw = dict(ce=1.3, align=align, ortho=0.5, hoyer=0.01, hoyer_eps=1e-3, scaling=sc,
                      projection=proj, eps=1e-6)
            low, hi = _rounded(dt, x, None, delta, U, s, V, *((BU, BS, BV) if align else
                                                              (None,) * 3))
            low[1] = (hi[0] @ hi[5]).to(ref.acc_dtype(dt))  # t = x V, as the forward gives it
            hi[1] = low[1].double()
            if nc:
                low = [_noncontig(t) for t in low]
            got = emu.svd_factor_grads(*low, *kw.values())
            want = ref.svd_factor_grads(*hi, **kw)
            for name, gg, w in zip(("gU", "gs", "gV", "gb"), got, want):
                assert gg.dtype == dt
                _close(f"{name} {(p, n, m, r, k)} {proj}/{sc}", gg, w, dt, max(4.0, p**0.5))
    finally:
        emu.set_sm_count(132)


CONV = [  # (p, C, N, H, W, kernel, stride, padding (t, b, l, r), dilation, rank)
    (2, 3, 5, 7, 6, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4),
    (3, 4, 70, 6, 5, (2, 3), (2, 1), (0, 1, 1, 1), (1, 2), 7),
    (1, 66, 3, 4, 4, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 3),
]


@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_emulated_svd_conv_factor_grads(emu, dt):
    """The conv op's CUDA entry: ATen convolutions + the split-K finishing kernel as its epilogue."""
    g = gen(3)
    for (p, C, N, H, W, kernel, stride, pad, dil, r), (proj, sc, align) in itertools.product(
            CONV, [("stiefel", "euclidean", 0.1), ("paper", "inverse", 0.1), ("none", "euclidean", 0.0)]):
        kh, kw = kernel
        x = torch.randn(p, C, H, W, dtype=torch.float64, generator=g)
        U, s, V = factors(N * kw, C * kh, r, g)
        BU, BS, BV = targets(N * kw, C * kh, min(2, r), g)
        geo = (kernel, stride, pad, dil)
        low, hi = _rounded(dt, x, None, None, U, s, V, *((BU, BS, BV) if align else (None,) * 3))
        h, t = ref.lowrank_conv2d(hi[0], hi[3], hi[4], hi[5], None, *geo)
        delta = torch.randn(h.shape, dtype=torch.float64, generator=g)
        low[1], hi[1] = t.to(ref.acc_dtype(dt)), t.to(ref.acc_dtype(dt)).double()
        low[2] = delta.to(dt)
        hi[2] = low[2].double()
        kw_ = dict(ce=1.3, align=align, ortho=0.5, hoyer=0.01, hoyer_eps=1e-3, scaling=sc, projection=proj,
                   eps=1e-6)
        got = emu.svd_conv_factor_grads(*low[:6], *[list(v) for v in geo], *low[6:], *kw_.values())
        want = ref.svd_conv_factor_grads(*hi[:6], *geo, *hi[6:], **kw_)
        for name, gg, w in zip(("gU", "gs", "gV", "gb"), got, want):
            assert gg.dtype == dt
            _close(f"{name} {(p, C, N, kernel)} {proj}/{sc}", gg, w, dt, max(4.0, (p * H * W) ** 0.5))


# ------------------------------------------------------------------------- edge cases

INF = float("inf")


def _torch_act(a, act, slope):
    F = torch.nn.functional
    return {"none": lambda v: v, "relu": F.relu, "leaky_relu": lambda v: F.leaky_relu(v, slope),
            "tanh": torch.tanh, "sigmoid": torch.sigmoid}[act](a)


@pytest.mark.parametrize("dt", [torch.float32, torch.float64], ids=str)
def test_emulated_activations_at_infinity(emu, dt):
    """A ±inf / NaN pre-activation (from the bias) gives torch's f(a): relu(−inf) = 0 (not NaN),
    leaky_relu(−inf) = −inf, tanh(±inf) = ±1, sigmoid(±inf) = 1 / 0; fused epilogue (r <= 128)
    and the r > 128 fallback's elementwise kernel."""
    g = gen(4)
    for p, n, m, r in ((7, 5, 6, 3), (3, 131, 140, 130)):
        x = torch.randn(p, n, dtype=dt, generator=g)
        U = torch.randn(m, r, dtype=dt, generator=g) / r**0.5
        V = torch.randn(n, r, dtype=dt, generator=g) / n**0.5
        s = 0.5 + torch.rand(r, dtype=dt, generator=g)
        b = torch.randn(m, dtype=dt, generator=g)
        b[1], b[3], b[4] = -INF, INF, float("nan")
        for act in ref.ACTIVATIONS:
            for slope in (0.1, 0.0):
                h, _ = emu.lowrank_linear(x, U, s, V, b, act, slope)
                want = _torch_act(ref.lowrank_linear(*(v.double() for v in (x, U, s, V, b)))[0],
                                  act, slope)
                what = f"{(p, n, m, r)} {act} slope={slope}"
                assert torch.equal(h.isnan(), want.isnan()), what
                torch.testing.assert_close(h.double(), want, rtol=TOL[dt], atol=TOL[dt] * 10,
                                           equal_nan=True, msg=lambda msg, w=what: f"{w}: {msg}")


def test_emulated_dfa_project_grads_at_infinity(emu):
    """f'(a) read from h = f(a) at a = ±inf is autograd's (every kernel path of the op)."""
    g = gen(5)
    for spatial in ((), (2,)):
        p, d, C, k = 5, 6, 4, 4
        e = torch.randn(p, C, dtype=torch.float64, generator=g)
        P = torch.randn(d, k, dtype=torch.float64, generator=g)
        Q = torch.randn(C, k, dtype=torch.float64, generator=g)
        sigma = torch.rand(k, dtype=torch.float64, generator=g)
        a = torch.randn((p, d) + spatial, dtype=torch.float64, generator=g)
        flat = a.view(p, -1)
        flat[0, 1], flat[2, 3], flat[4, 0] = -INF, INF, -INF
        dh = ref.feedback_signal(e, P, sigma, Q)
        dhv = dh.reshape(dh.shape + (1,) * len(spatial)).expand(a.shape)
        for act in ref.ACTIVATIONS:
            leaf = a.clone().requires_grad_()
            h = _torch_act(leaf, act, 0.2)
            (want,) = torch.autograd.grad(h, leaf, dhv)
            got = emu.dfa_project(e, P, sigma, Q, h.detach(), None, act, 0.2, 0.0)
            assert not got.isnan().any(), f"{act} {spatial}"
            _close(f"delta {act} {spatial}", got, want, torch.float64)


def test_emulated_dfa_project_empty_batch(emu):
    """p = 0: an empty delta of h's shape, with and without the cosine term (as the reference)."""
    for spatial in ((), (3, 2)):
        e, P, sigma, Q = torch.randn(0, 4), torch.randn(5, 4), torch.rand(4), torch.randn(4, 4)
        a = torch.randn((0, 5) + spatial)
        h = torch.relu(a)
        for cos in (0.0, 0.5):
            got = emu.dfa_project(e, P, sigma, Q, h, a if cos else None, "relu", 0.01, cos)
            want = ref.dfa_project(e, P, sigma, Q, h, "relu", 0.01, a, cos)
            assert got.shape == want.shape == h.shape and got.dtype == want.dtype


@pytest.mark.parametrize("sms", [132, 1], ids=["sms132", "sms1"])
def test_emulated_svd_factor_grads_ortho_term_alone(emu, sms):
    """delta = 0, align = hoyer = 0, factors off the manifold: only the ortho penalty is left,
    checked against autograd of ortho·(‖UᵀU − I‖² + ‖VᵀV − I‖²) (projected under ``paper``)."""
    emu.set_sm_count(sms)
    g = gen(6)
    try:
        for p, n, m, r in ((9, 12, 10, 4), (600, 65, 70, 20)):
            x = torch.randn(p, n, dtype=torch.float64, generator=g)
            U = torch.randn(m, r, dtype=torch.float64, generator=g) / 2
            V = torch.randn(n, r, dtype=torch.float64, generator=g) / 2
            s = 0.5 + torch.rand(r, dtype=torch.float64, generator=g)
            delta = torch.zeros(p, m, dtype=torch.float64)
            Ul, Vl = U.clone().requires_grad_(), V.clone().requires_grad_()
            eye = torch.eye(r, dtype=torch.float64)
            pen = 0.7 * ((Ul.t() @ Ul - eye).pow(2).sum() + (Vl.t() @ Vl - eye).pow(2).sum())
            oU, oV = torch.autograd.grad(pen, (Ul, Vl))
            for proj in ref.PROJECTIONS:
                wU, wV = (oU - U @ (U.t() @ oU), oV - V @ (V.t() @ oV)) if proj == "paper" else (oU, oV)
                gU, gs, gV, gb = emu.svd_factor_grads(x, x @ V, delta, U, s, V, None, None, None, 1.0,
                                                      0.0, 0.7, 0.0, 1e-3, "euclidean", proj, 1e-6)
                _close(f"gU {(p, n, m, r)} {proj}", gU, wU, torch.float64)
                _close(f"gV {(p, n, m, r)} {proj}", gV, wV, torch.float64)
                assert not gs.any() and not gb.any()
    finally:
        emu.set_sm_count(132)
