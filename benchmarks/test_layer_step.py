"""One linear layer's training step: SSA (every provider) against the dense BP step (issue 6).

"Layer step" = low-rank forward (``lowrank_linear``, relu) + DFA projection (``dfa_project``,
C = 10) + factor gradients with penalties and Stiefel projection (``svd_factor_grads``,
``align=0.01, ortho=1.0``) + the optimizer step (Adam, the trainer's default; ``fused=True``
where torch has it) — what :class:`ssa.Trainer` runs per SSA layer. Providers: the fused
backends, the eager ``reference`` of the same math and its ``torch.compile`` (compile time
excluded), and ``dense-bp``: ``relu(F.linear)`` forward + autograd backward to ``W``, ``b`` and
the input (the error BP sends down) + the same Adam step, at the same ``p, n, m``.

Shapes: the CPU set has ``r`` on both sides of ``mn / (4(m + n))`` (= 128 at n = m = 1024), the
rank below which issue 6 expects the SSA step to beat the dense one on this machine; the
GPU set is issue 6's (p = 4096, n = m ∈ {1024, 2048, 4096}, r ∈ {16, 64, 256}).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _common import compiled, device, elem, providers, ref, run

import ssa_kernels

DEV = device()
DTYPE = torch.float32
C = 10
if DEV == "cuda":
    SHAPES = [(4096, n, n, r) for n in (1024, 2048, 4096) for r in (16, 64, 256)]
else:
    SHAPES = [(512, 1024, 1024, r) for r in (16, 64, 128, 256)] + [(2048, 1024, 1024, 64)]
FACTOR_KW = dict(ce=1.0, align=0.01, ortho=1.0, hoyer=0.0, scaling="euclidean", projection="stiefel")


def _ids(shape):
    return "p{}-n{}-m{}-r{}".format(*shape)


def _adam(params):
    try:
        return torch.optim.Adam(params, lr=1e-6, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.Adam(params, lr=1e-6)


def _orthonormal(rows, cols):
    return torch.linalg.qr(torch.randn(rows, cols, device=DEV, dtype=torch.float64))[0].to(DTYPE)


def _ssa_step(provider, p, n, m, r):
    x = torch.randn(p, n, device=DEV, dtype=DTYPE)
    e = (torch.randn(p, C, device=DEV) / p).to(DTYPE)
    U = torch.nn.Parameter(_orthonormal(m, r))
    V = torch.nn.Parameter(_orthonormal(n, r))
    s = torch.nn.Parameter(torch.rand(r, device=DEV, dtype=DTYPE) + 0.5)
    b = torch.nn.Parameter(torch.zeros(m, device=DEV, dtype=DTYPE))
    BU, BV = _orthonormal(m, r), _orthonormal(n, r)
    BS = torch.rand(r, device=DEV, dtype=DTYPE) + 0.5
    k = min(C, m, r)
    P, Q = BU[:, :k].contiguous(), _orthonormal(C, k)
    sigma = torch.rand(k, device=DEV, dtype=DTYPE) + 0.5
    opt = _adam([U, s, V, b])
    if provider.startswith("reference"):
        def math(x, e, U, s, V, b):
            h, t = ref.lowrank_linear(x, U, s, V, b, "relu", 0.01)
            delta = ref.dfa_project(e, P, sigma, Q, h, "relu")
            return ref.svd_factor_grads(x, t, delta, U, s, V, BU, BS, BV, **FACTOR_KW)
        grads_of = compiled(math) if provider == "reference-compiled" else math
    else:
        def grads_of(x, e, U, s, V, b):
            h, t = ssa_kernels.lowrank_linear(x, U, s, V, b, "relu", backend=provider)
            delta = ssa_kernels.dfa_project(e, P, sigma, Q, h, "relu", backend=provider)
            return ssa_kernels.svd_factor_grads(x, t, delta, U, s, V, BU=BU, BS=BS, BV=BV, **FACTOR_KW,
                                                backend=provider)

    def step():
        with torch.no_grad():
            gU, gs, gV, gb = grads_of(x, e, U.detach(), s.detach(), V.detach(), b.detach())
        U.grad, s.grad, V.grad, b.grad = gU, gs, gV, gb
        opt.step()
    # forward + projection + factor gradients (test_ops.py's formulas) + Adam (~ 16 flops / element)
    flops = (2 * p * r * (n + m) + 2 * p * C * k + 2 * p * k * m + 2 * p * m
             + 2 * p * r * (2 * m + n) + 2 * p * r * r + 6 * (m + n) * r * r + 16 * (m + n + 1) * r)
    el = elem(DTYPE)
    # x, e, h, δ and t once; Adam reads and writes parameter, gradient and two moments
    nbytes = el * (p * n + p * C + 2 * p * m) + 4 * p * r + el * 4 * 4 * (m + n + 1) * r
    return step, flops, nbytes


def _dense_step(p, n, m):
    x = torch.randn(p, n, device=DEV, dtype=DTYPE, requires_grad=True)
    g = (torch.randn(p, m, device=DEV) / p).to(DTYPE)
    lin = torch.nn.Linear(n, m, device=DEV, dtype=DTYPE)
    opt = _adam(lin.parameters())

    def step():
        x.grad = None
        opt.zero_grad(set_to_none=True)
        torch.relu(F.linear(x, lin.weight, lin.bias)).backward(g)
        opt.step()
    flops = 3 * 2 * p * n * m + 16 * (n + 1) * m
    el = elem(DTYPE)
    nbytes = el * (2 * p * n + 2 * p * m) + el * 4 * 4 * (n + 1) * m
    return step, flops, nbytes


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("provider", providers(DEV) + ["dense-bp"])
def test_linear_layer_step(benchmark, provider, shape):
    p, n, m, r = shape
    if provider == "dense-bp":
        if any(sh[:3] == shape[:3] for sh in SHAPES[:SHAPES.index(shape)]):
            pytest.skip("the dense step does not depend on r: measured once per (p, n, m)")
        fn, flops, nbytes = _dense_step(p, n, m)
    else:
        fn, flops, nbytes = _ssa_step(provider, p, n, m, r)
    run(benchmark, fn, DEV, flops, nbytes, op="linear_layer_step", provider=provider,
        shape=dict(p=p, n=n, m=m, r=r), dtype=str(DTYPE))


def test_copy_bandwidth(benchmark):
    """The device's copy bandwidth in the same run (issue 6, target 3: effective bandwidth of a
    step as a fraction of it): one ``copy_`` of a 256 MiB (GPU) / 64 MiB (CPU) fp32 buffer."""
    numel = (256 if DEV == "cuda" else 64) * 2**20 // 4
    src = torch.randn(numel, device=DEV)
    dst = torch.empty_like(src)
    run(benchmark, lambda: dst.copy_(src), DEV, 0.0, 2 * 4 * numel, op="copy", provider="torch",
        shape=dict(bytes=4 * numel), dtype=str(DTYPE))
