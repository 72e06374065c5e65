"""Convolution layers: one SSA step against the dense ``nn.Conv2d`` step it replaces.

Shapes are the 3×3 (padding 1, stride 1) convolutions of ``smallconv`` (3→96 at 32×32,
96→192 at 16×16, 192→512 at 8×8) and VGG-13 (64→64 at 32×32 … 512→512 at 4×4 and 2×2),
each at full rank ``r = min(N·kw, C·kh)``, ``full // 4`` and 16; batch ``p = 128`` on CUDA,
``p = 8`` and a subset of (layer, rank) on the CPU (``CPU_CASES``), fp32 throughout.

Benchmarks (``op`` in ``extra_info``):

* ``ssa_conv_step``: ``lowrank_conv2d`` forward (bias, relu) then ``svd_conv_factor_grads``
  (``ce=1, align=0.01`` with targets ``BU, BS, BV`` of rank r, ``ortho=1``, ``stiefel``,
  ``euclidean``) with a given pre-activation error ``delta``. Providers: every backend of
  ``available_backends(dev, op)`` for both ops, ``reference`` (the functions of
  ``ssa_kernels.reference`` called directly, geometry normalised: kernel ``(3, 3)``, stride
  ``(1, 1)``, padding ``(1, 1, 1, 1)``, dilation ``(1, 1)``) and ``reference-compiled``
  (``torch.compile`` of that reference step, compile time excluded).
* ``ssa_conv_forward``: ``lowrank_conv2d`` alone, same providers.
* ``dense_conv_step``: ``nn.Conv2d`` (bias) forward, relu, ``backward(delta)`` on the
  pre-activation by autograd: weight and bias gradients, the input does not require grad.
  Provider ``torch``.
* ``dense_conv_forward``: ``relu(F.conv2d(x, K, b))`` without autograd. Provider ``torch``.

FLOPs (a multiply-add is 2; ``m = N·kw``, ``n = C·kh``, ``Wt = W + pad_left + pad_right``)::

    conv1 = 2·p·r·C·kh·Ho·Wt            (t = x ⋆ K1, K1 from V)
    conv2 = 2·p·N·r·kw·Ho·Wo            (a = (t ⊙ s) ⋆ K2, K2 from U)
    ssa forward = conv1 + conv2
    ssa factor grads = conv2 (input-grad w) + conv2 (weight-grad, RU) + conv1 (weight-grad, RV)
                       + 2·p·r²·Ho·Wt (wᵀt) + 6·(m + n)·r² (r×r cores, as benchmarks/test_ops.py)
    ssa step = ssa forward + ssa factor grads
    dense forward = 2·p·N·C·kh·kw·Ho·Wo
    dense step = 2 × dense forward (forward + weight-grad; no input-grad, as the input does
                 not require grad; bias sums and relu are not counted)

Bytes are the minimum traffic, every input read once and every output written once
(``e`` = element size; ``t`` is fp32 and, being kept for the update, an output of the step)::

    ssa forward = e·(p·C·H·W + (m + n + 1)·r + N + p·N·Ho·Wo) + 4·p·r·Ho·Wt
    ssa step    = e·(p·C·H·W + 2·p·N·Ho·Wo + 3·(m + n + 1)·r + 2·N) + 4·p·r·Ho·Wt
                  (x, delta, U s V, targets, bias in; h, gU gs gV, gb, t out)
    dense forward = e·(p·C·H·W + N·C·kh·kw + N + p·N·Ho·Wo)
    dense step    = e·(p·C·H·W + 2·(N·C·kh·kw + N) + 2·p·N·Ho·Wo)

With ``--benchmark-disable`` every case runs once as a smoke test (finite outputs), and
``reference-compiled`` only for the first case (one compile of each graph instead of ~10 s
per shape).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _common import compiled, device, elem, ref, run, sync
from torch import nn

import ssa_kernels

DEV = device()
DTYPE = torch.float32
KS, STRIDE, PAD, DIL = (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)  # the reference's normalised geometry
FG = dict(ce=1.0, align=0.01, ortho=1.0, hoyer=0.0, scaling="euclidean", projection="stiefel")

# name, C (in), N (out), H = W
LAYERS = [
    ("smallconv1", 3, 96, 32), ("smallconv2", 96, 192, 16), ("smallconv3", 192, 512, 8),
    ("vgg13", 64, 64, 32), ("vgg13", 128, 128, 16), ("vgg13", 256, 256, 8),
    ("vgg13", 512, 512, 4), ("vgg13", 512, 512, 2),
]


def full_rank(C: int, N: int) -> int:
    return min(N * KS[1], C * KS[0])


def ranks(C: int, N: int) -> list[int]:
    full = full_rank(C, N)
    return sorted({full, max(full // 4, 1)} | ({16} if 16 < full else set()), reverse=True)


if DEV == "cuda":
    P = 128
    CASES = [(name, C, N, H, r) for name, C, N, H in LAYERS for r in ranks(C, N)]
else:
    # Within ~3 minutes with OMP_NUM_THREADS=1, most of it torch.compile (~10 s per case, less
    # with inductor's cache warm). Left out here (run on CUDA): smallconv3, VGG-13's 128- and
    # 256-channel layers and 512 at 2×2, and the 512-channel layers at full rank (r = 1536:
    # ~0.7 s a step at p = 8, most of it the 6·(m+n)·r² ≈ 43 GFLOP of the r×r cores).
    P = 8
    CASES = [("smallconv1", 3, 96, 32, 9)]
    CASES += [("smallconv2", 96, 192, 16, r) for r in (288, 72, 16)]
    CASES += [("vgg13", 64, 64, 32, r) for r in (48, 16)]
    CASES += [("vgg13", 512, 512, 4, r) for r in (384, 16)]
DENSE = sorted({case[:4] for case in CASES}, key=[case[:4] for case in CASES].index)
SMOKE_COMPILED = CASES[0]


def _layer_id(layer) -> str:
    name, C, N, H = layer[:4]
    return f"{name}-C{C}-N{N}-H{H}"


def _case_id(case) -> str:
    return f"{_layer_id(case)}-r{case[4]}"


def _providers() -> list[str]:
    ops = ("lowrank_conv2d", "svd_conv_factor_grads")
    backends = [b for b in ssa_kernels.available_backends(DEV, ops[0])
                if all(b in ssa_kernels.available_backends(DEV, op) for op in ops[1:])]
    return ["reference", "reference-compiled"] + [b for b in backends if b != "reference"]


PROVIDERS = _providers()


def _orthonormal(rows: int, r: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, r, device=DEV))[0].to(DTYPE)


def _tensors(C: int, N: int, H: int, r: int) -> dict:
    torch.manual_seed(0)
    kh, kw = KS
    d = dict(x=torch.randn(P, C, H, H, device=DEV, dtype=DTYPE),
             U=_orthonormal(N * kw, r), s=(torch.rand(r, device=DEV) + 0.5).to(DTYPE),
             V=_orthonormal(C * kh, r), b=torch.randn(N, device=DEV, dtype=DTYPE),
             delta=(torch.randn(P, N, H, H, device=DEV) / P).to(DTYPE),  # Ho = H, Wo = W (padding 1)
             BU=_orthonormal(N * kw, r), BS=(torch.rand(r, device=DEV) + 0.5).to(DTYPE),
             BV=_orthonormal(C * kh, r))
    return d


def _sizes(C: int, N: int, H: int, r: int) -> dict:
    kh, kw = KS
    Ho, Wo, Wt = H, H, H + PAD[2] + PAD[3]
    conv1 = 2 * P * r * C * kh * Ho * Wt
    conv2 = 2 * P * N * r * kw * Ho * Wo
    return dict(kh=kh, kw=kw, Ho=Ho, Wo=Wo, Wt=Wt, m=N * kw, n=C * kh, conv1=conv1, conv2=conv2)


def _shape(name, C, N, H, r=None) -> dict:
    out = dict(layer=name, p=P, C=C, N=N, H=H, W=H, k=f"{KS[0]}x{KS[1]}")
    if r is not None:
        out.update(r=r, r_full=full_rank(C, N))
    return out


# ---------------------------------------------------------------- the reference, called directly


def _ref_forward(x, U, s, V, b):
    return ref.lowrank_conv2d(x, U, s, V, b, KS, STRIDE, PAD, DIL, "relu")


def _ref_step(x, U, s, V, b, delta, BU, BS, BV):
    h, t = ref.lowrank_conv2d(x, U, s, V, b, KS, STRIDE, PAD, DIL, "relu")
    grads = ref.svd_conv_factor_grads(x, t, delta, U, s, V, KS, STRIDE, PAD, DIL, BU, BS, BV, **FG)
    return h, t, grads


# Every (shape, rank) is a recompile of the same two functions (dynamic=False): allow more than
# dynamo's default 8, past which it would silently run them eagerly.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(CASES))


def _reference(provider: str, fn, args):
    if provider == "reference":
        return lambda: fn(*args)
    f = compiled(fn)
    try:
        f(*args)  # compile now, so that a failure is told apart from a slow benchmark
        sync(DEV)
    except Exception as e:  # inductor and dynamo raise many kinds
        if DEV != "cpu":
            raise
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        pytest.skip(f"torch.compile of the reference failed on the CPU: {type(e).__name__}: {msg}")
    return lambda: f(*args)


def _bench(benchmark, fn, flops: float, nbytes: float, **info) -> None:
    if benchmark.disabled:  # --benchmark-disable: one call, a smoke test of the case
        out = benchmark.pedantic(fn, rounds=1, iterations=1)
        sync(DEV)
        flat = [out] if isinstance(out, torch.Tensor) else list(_flatten(out))
        assert flat and all(torch.isfinite(o).all() for o in flat), info
        return
    run(benchmark, fn, DEV, flops, nbytes, dtype=str(DTYPE), **info)


def _flatten(out):
    for o in out:
        if isinstance(o, torch.Tensor):
            yield o
        elif isinstance(o, (tuple, list)):
            yield from _flatten(o)


def _skip_compiled_in_smoke(benchmark, provider, case) -> None:
    if benchmark.disabled and provider == "reference-compiled" and case != SMOKE_COMPILED:
        pytest.skip("--benchmark-disable: torch.compile is smoked on the first case only (~10 s a shape)")


# ---------------------------------------------------------------- SSA


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_ssa_conv_step(benchmark, provider, case):
    _skip_compiled_in_smoke(benchmark, provider, case)
    name, C, N, H, r = case
    T = _tensors(C, N, H, r)
    x, U, s, V, b, delta, BU, BS, BV = (T[k] for k in ("x", "U", "s", "V", "b", "delta", "BU", "BS", "BV"))
    if provider.startswith("reference"):
        fn = _reference(provider, _ref_step, (x, U, s, V, b, delta, BU, BS, BV))
    else:
        def fn():
            h, t = ssa_kernels.lowrank_conv2d(x, U, s, V, b, kernel_size=KS, stride=STRIDE, padding=PAD,
                                              dilation=DIL, activation="relu", backend=provider)
            grads = ssa_kernels.svd_conv_factor_grads(x, t, delta, U, s, V, KS, STRIDE, PAD, DIL, BU=BU,
                                                      BS=BS, BV=BV, **FG, backend=provider)
            return h, t, grads
    z = _sizes(C, N, H, r)
    m, n = z["m"], z["n"]
    flops = (z["conv1"] + z["conv2"]) + (2 * z["conv2"] + z["conv1"]
                                         + 2 * P * r * r * z["Ho"] * z["Wt"] + 6 * (m + n) * r * r)
    nbytes = (elem(DTYPE) * (P * C * H * H + 2 * P * N * z["Ho"] * z["Wo"] + 3 * (m + n + 1) * r + 2 * N)
              + 4 * P * r * z["Ho"] * z["Wt"])
    _bench(benchmark, fn, flops, nbytes, op="ssa_conv_step", provider=provider,
           shape=_shape(name, C, N, H, r))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_ssa_conv_forward(benchmark, provider, case):
    _skip_compiled_in_smoke(benchmark, provider, case)
    name, C, N, H, r = case
    T = _tensors(C, N, H, r)
    x, U, s, V, b = (T[k] for k in ("x", "U", "s", "V", "b"))
    if provider.startswith("reference"):
        fn = _reference(provider, _ref_forward, (x, U, s, V, b))
    else:
        fn = lambda: ssa_kernels.lowrank_conv2d(  # noqa: E731
            x, U, s, V, b, kernel_size=KS, stride=STRIDE, padding=PAD, dilation=DIL, activation="relu",
            backend=provider)
    z = _sizes(C, N, H, r)
    flops = z["conv1"] + z["conv2"]
    nbytes = (elem(DTYPE) * (P * C * H * H + (z["m"] + z["n"] + 1) * r + N + P * N * z["Ho"] * z["Wo"])
              + 4 * P * r * z["Ho"] * z["Wt"])
    _bench(benchmark, fn, flops, nbytes, op="ssa_conv_forward", provider=provider,
           shape=_shape(name, C, N, H, r))


# ---------------------------------------------------------------- dense nn.Conv2d (what SSA replaces)


def _dense_sizes(C: int, N: int, H: int) -> tuple[int, int, int]:
    kh, kw = KS
    fwd = 2 * P * N * C * kh * kw * H * H
    return fwd, N * C * kh * kw, P * N * H * H


@pytest.mark.parametrize("layer", DENSE, ids=_layer_id)
def test_dense_conv_step(benchmark, layer):
    name, C, N, H = layer
    T = _tensors(C, N, H, 1)
    x, delta = T["x"], T["delta"]
    conv = nn.Conv2d(C, N, KS, stride=STRIDE, padding=PAD[::2], dilation=DIL).to(DEV, DTYPE)

    def fn():
        conv.weight.grad = conv.bias.grad = None
        a = conv(x)
        h = torch.relu(a)
        a.backward(delta)  # delta is the error at the pre-activation, as for SSA
        return h.detach(), conv.weight.grad, conv.bias.grad

    fwd, weights, outs = _dense_sizes(C, N, H)
    nbytes = elem(DTYPE) * (P * C * H * H + 2 * (weights + N) + 2 * outs)
    _bench(benchmark, fn, 2 * fwd, nbytes, op="dense_conv_step", provider="torch",
           shape=_shape(name, C, N, H))


@pytest.mark.parametrize("layer", DENSE, ids=_layer_id)
def test_dense_conv_forward(benchmark, layer):
    name, C, N, H = layer
    T = _tensors(C, N, H, 1)
    x = T["x"]
    K = torch.randn(N, C, *KS, device=DEV, dtype=DTYPE) / (C * KS[0] * KS[1]) ** 0.5
    b = T["b"]
    fn = lambda: torch.relu_(F.conv2d(x, K, b, STRIDE, PAD[::2], DIL))  # noqa: E731
    fwd, weights, outs = _dense_sizes(C, N, H)
    nbytes = elem(DTYPE) * (P * C * H * H + weights + N + outs)
    _bench(benchmark, fn, fwd, nbytes, op="dense_conv_forward", provider="torch", shape=_shape(name, C, N, H))
