"""Each op for every provider over shapes that fit the device (``--benchmark-only``).

FLOPs count multiply-adds as 2; bytes are the minimum traffic (every input read once,
every output written once). ``t`` and the factor-gradient accumulators are fp32.
"""

from __future__ import annotations

import pytest
import torch
from _common import compiled, device, elem, providers, ref, run

import ssa_kernels

DEV = device()
DTYPES = [torch.float32] + ([torch.bfloat16] if DEV == "cuda" else [])
if DEV == "cuda":
    SHAPES = [(4096, 1024, 1024, r) for r in (16, 64, 256)] + [(4096, 4096, 4096, r) for r in (16, 64, 256)]
else:
    SHAPES = [(512, 512, 512, 16), (512, 512, 512, 64), (2048, 1024, 1024, 64)]
DFA_SHAPES = sorted({(p, m) for p, _, m, _ in SHAPES})  # (batch, layer width d)
C = 10


def _ids(shape):
    return "p{}-n{}-m{}-r{}".format(*shape)


def _factors(n, m, r, dtype):
    U = torch.linalg.qr(torch.randn(m, r, device=DEV))[0].to(dtype)
    V = torch.linalg.qr(torch.randn(n, r, device=DEV))[0].to(dtype)
    s = (torch.rand(r, device=DEV) + 0.5).to(dtype)
    return U, s, V


def _call(provider, op, ref_fn):
    if provider == "reference":
        return ref_fn
    if provider == "reference-compiled":
        return compiled(ref_fn)
    return lambda *a, **k: op(*a, backend=provider, **k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("provider", providers(DEV))
def test_lowrank_linear(benchmark, provider, shape, dtype):
    p, n, m, r = shape
    x = torch.randn(p, n, device=DEV, dtype=dtype)
    U, s, V = _factors(n, m, r, dtype)
    b = torch.randn(m, device=DEV, dtype=dtype)
    if provider.startswith("reference"):
        f = _call(provider, None, ref.lowrank_linear)
        fn = lambda: f(x, U, s, V, b, "relu", 0.01)  # noqa: E731
    else:
        fn = lambda: ssa_kernels.lowrank_linear(x, U, s, V, b, "relu", backend=provider)  # noqa: E731
    e = elem(dtype)
    flops = 2 * p * r * (n + m)
    nbytes = e * (p * n + (n + m + 1) * r + m + p * m) + 4 * p * r
    run(benchmark, fn, DEV, flops, nbytes, op="lowrank_linear", provider=provider,
        shape=dict(p=p, n=n, m=m, r=r), dtype=str(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DFA_SHAPES, ids=lambda s: "p{}-d{}".format(*s))
@pytest.mark.parametrize("provider", providers(DEV))
def test_dfa_project(benchmark, provider, shape, dtype):
    p, d = shape
    k = C
    e_ = (torch.randn(p, C, device=DEV) / p).to(dtype)
    P = torch.randn(d, k, device=DEV, dtype=dtype)
    Q = torch.linalg.qr(torch.randn(C, k, device=DEV))[0].to(dtype)
    sigma = torch.rand(k, device=DEV, dtype=dtype)
    h = torch.relu(torch.randn(p, d, device=DEV, dtype=dtype))
    if provider.startswith("reference"):
        f = _call(provider, None, ref.dfa_project)
        fn = lambda: f(e_, P, sigma, Q, h, "relu")  # noqa: E731
    else:
        fn = lambda: ssa_kernels.dfa_project(e_, P, sigma, Q, h, "relu", backend=provider)  # noqa: E731
    el = elem(dtype)
    flops = 2 * p * C * k + 2 * p * k * d + 2 * p * d
    nbytes = el * (p * C + d * k + C * k + k + 2 * p * d)
    run(benchmark, fn, DEV, flops, nbytes, op="dfa_project", provider=provider,
        shape=dict(p=p, d=d, C=C, k=k), dtype=str(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("provider", providers(DEV))
def test_svd_factor_grads(benchmark, provider, shape, dtype):
    p, n, m, r = shape
    x = torch.randn(p, n, device=DEV, dtype=dtype)
    U, s, V = _factors(n, m, r, dtype)
    t = (x.float() @ V.float())
    delta = (torch.randn(p, m, device=DEV) / p).to(dtype)
    BU, BS, BV = _factors(n, m, r, dtype)
    kw = dict(ce=1.0, align=0.01, ortho=1.0, hoyer=0.0, scaling="euclidean", projection="stiefel")
    if provider.startswith("reference"):
        f = _call(provider, None, ref.svd_factor_grads)
        fn = lambda: f(x, t, delta, U, s, V, BU, BS, BV, **kw)  # noqa: E731
    else:
        fn = lambda: ssa_kernels.svd_factor_grads(x, t, delta, U, s, V, BU=BU, BS=BS, BV=BV,  # noqa: E731
                                                  **kw, backend=provider)
    el = elem(dtype)
    # w = δU, δᵀt, xᵀw, wᵀt; cores O((m + n) r²)
    flops = 2 * p * r * (2 * m + n) + 2 * p * r * r + 6 * (m + n) * r * r
    nbytes = el * (p * n + p * m + 4 * (m + n) * r) + 4 * p * r
    run(benchmark, fn, DEV, flops, nbytes, op="svd_factor_grads", provider=provider,
        shape=dict(p=p, n=n, m=m, r=r), dtype=str(dtype))
