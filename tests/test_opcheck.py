"""torch.library integration: opcheck, torch.compile(fullgraph=True), gradcheck, autograd-free ops."""

from __future__ import annotations

import pytest
import torch
from _helpers import devices, factors, gen, targets

import ssa_kernels
from ssa_kernels import _backends, _ops


def _families():
    """(device, backend, family) for every backend available here, reference included."""
    out = []
    for dev in devices():
        for b in ssa_kernels.available_backends(dev):
            fam = _backends.REGISTRY[b].family
            out.append(pytest.param(dev, b, fam, id=f"{dev}-{b}",
                                    marks=[pytest.mark.cuda] if dev == "cuda" else []))
    return out


def _inputs(device, dtype=torch.float32, p=6, n=5, m=4, r=3, k=2):
    g = gen(0)
    U, s, V = factors(m, n, r, g)
    BU, BS, BV = targets(m, n, k, g)
    x = torch.randn(p, n, dtype=torch.float64, generator=g)
    b = torch.randn(m, dtype=torch.float64, generator=g)
    delta = torch.randn(p, m, dtype=torch.float64, generator=g)
    e = torch.randn(p, 10, dtype=torch.float64, generator=g)
    Q = torch.randn(10, 4, dtype=torch.float64, generator=g)
    P = torch.randn(m, 4, dtype=torch.float64, generator=g)
    sig = torch.rand(4, dtype=torch.float64, generator=g)
    a = torch.randn(p, m, dtype=torch.float64, generator=g)
    d = dict(x=x, U=U, s=s, V=V, b=b, delta=delta, BU=BU, BS=BS, BV=BV, e=e, Q=Q, P=P,
             sigma=sig, a=a, t=x @ V)
    return {k_: v.to(device=device, dtype=dtype) for k_, v in d.items()}


@pytest.mark.parametrize("device,backend,family", _families())
def test_opcheck_lowrank_linear(device, backend, family):
    d = _inputs(device)
    args = [d["x"], d["U"], d["s"], d["V"]]
    args = [a.requires_grad_(True) for a in args] + [d["b"].requires_grad_(True), "relu", 0.01]
    torch.library.opcheck(_ops.get("lowrank_linear", family), tuple(args))


@pytest.mark.parametrize("device,backend,family", _families())
def test_opcheck_dfa_project(device, backend, family):
    d = _inputs(device)
    h = torch.tanh(d["a"])
    for a, cos in ((None, 0.0), (d["a"], 0.5)):
        torch.library.opcheck(_ops.get("dfa_project", family),
                              (d["e"], d["P"], d["sigma"], d["Q"], h, a, "tanh", 0.01, cos))
    h4 = torch.relu(d["a"]).reshape(6, 4, 1, 1).expand(6, 4, 2, 3).contiguous()
    torch.library.opcheck(_ops.get("dfa_project", family),
                          (d["e"], d["P"], d["sigma"], d["Q"], h4, None, "relu", 0.01, 0.0))


@pytest.mark.parametrize("device,backend,family", _families())
def test_opcheck_svd_factor_grads(device, backend, family):
    d = _inputs(device)
    base = (d["x"], d["t"], d["delta"], d["U"], d["s"], d["V"])
    torch.library.opcheck(_ops.get("svd_factor_grads", family),
                          base + (None, None, None, 1.0, 0.0, 0.0, 0.0, 1e-3, "euclidean",
                                  "stiefel", 1e-6))
    torch.library.opcheck(_ops.get("svd_factor_grads", family),
                          base + (d["BU"], d["BS"], d["BV"], 1.0, 0.1, 0.5, 0.01, 1e-3, "inverse",
                                  "paper", 1e-6))


@pytest.mark.parametrize("device,backend,family", [
    c for c in _families() if c.values[1] in ("reference", "cpu", "cuda")])
def test_gradcheck_lowrank_linear_float64(device, backend, family):
    d = _inputs(device, torch.float64, p=4, n=5, m=3, r=2)
    for act in ("none", "tanh", "sigmoid"):
        inputs = [d[k].clone().requires_grad_(True) for k in ("x", "U", "s", "V", "b")]

        def fn(x, U, s, V, b, act=act):
            return ssa_kernels.lowrank_linear(x, U, s, V, b, act, backend=backend)

        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device,backend,family", _families())
def test_autograd_free_ops_raise_on_backward(device, backend, family):
    d = _inputs(device)
    e = d["e"].clone().requires_grad_(True)
    out = ssa_kernels.dfa_project(e, d["P"], d["sigma"], d["Q"], d["a"], backend=backend)
    with pytest.raises(RuntimeError, match="dfa_project is autograd-free"):
        out.sum().backward()
    delta = d["delta"].clone().requires_grad_(True)
    gU, *_ = ssa_kernels.svd_factor_grads(d["x"], d["t"], delta, d["U"], d["s"], d["V"],
                                          backend=backend)
    with pytest.raises(RuntimeError, match="svd_factor_grads is autograd-free"):
        gU.sum().backward()


def test_lowrank_linear_trains_through_autograd():
    """BP through an SSA forward moves the loss down (the registered formula is usable)."""
    d = _inputs("cpu", p=16, n=5, m=4, r=3)
    params = [d[k].clone().requires_grad_(True) for k in ("U", "s", "V", "b")]
    opt = torch.optim.SGD(params, lr=0.1)
    target = torch.randn(16, 4, generator=gen(9))
    losses = []
    for _ in range(20):
        h, _t = ssa_kernels.lowrank_linear(d["x"], *params[:3], params[3], "tanh")
        loss = (h - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_torch_compile_fullgraph():
    """One fused SSA layer update traced whole by torch.compile (no graph break)."""
    backend = "cpu" if "cpu" in ssa_kernels.available_backends("cpu") else "reference"
    d = _inputs("cpu", p=8, n=6, m=5, r=3, k=3)

    def step(x, U, s, V, b, e, P, sigma, Q, BU, BS, BV):
        h, t = ssa_kernels.lowrank_linear(x, U, s, V, b, "relu", backend=backend)
        delta = ssa_kernels.dfa_project(e, P, sigma, Q, h, "relu", backend=backend)
        return ssa_kernels.svd_factor_grads(x, t, delta, U, s, V, BU=BU, BS=BS, BV=BV, align=0.1,
                                            ortho=0.5, backend=backend)

    P = torch.randn(5, 4, generator=gen(1))
    args = (d["x"], d["U"], d["s"], d["V"], d["b"], d["e"], P, d["sigma"], d["Q"], d["BU"],
            d["BS"], d["BV"])
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), step(*args)):
        torch.testing.assert_close(got, want)


def test_torch_compile_fullgraph_conv_layer_update():
    """The conv path (DESIGN §4): forward, channel-shared DFA projection, factor gradients, one graph."""
    backend = "cpu" if "cpu" in ssa_kernels.available_backends("cpu") else "reference"
    g = gen(2)
    x = torch.randn(2, 3, 6, 5, generator=g)
    U = torch.linalg.qr(torch.randn(8 * 3, 4, generator=g))[0]
    V = torch.linalg.qr(torch.randn(3 * 3, 4, generator=g))[0]
    s, b = torch.rand(4, generator=g) + 0.5, torch.randn(8, generator=g)
    e = torch.randn(2, 5, generator=g)
    P, sigma, Q = torch.randn(8, 5, generator=g), torch.rand(5, generator=g), torch.randn(5, 5, generator=g)

    def step(x, U, s, V, b, e, P, sigma, Q):
        h, t = ssa_kernels.lowrank_conv2d(x, U, s, V, b, kernel_size=3, padding="same", activation="relu",
                                          backend=backend)
        delta = ssa_kernels.dfa_project(e, P, sigma, Q, h, "relu", backend=backend)
        return ssa_kernels.svd_conv_factor_grads(x, t, delta, U, s, V, 3, 1, "same", ortho=0.5,
                                                 backend=backend)

    args = (x, U, s, V, b, e, P, sigma, Q)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(*args), step(*args)):
        torch.testing.assert_close(got, want)
