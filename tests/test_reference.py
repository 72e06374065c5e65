"""The reference against autograd and against the properties DESIGN.md states (§3, §5-§7)."""

from __future__ import annotations

import pytest
import torch
from _helpers import PROJECTIONS, SCALINGS, factors, gen, targets

import ssa_kernels
from ssa_kernels import _cores
from ssa_kernels import reference as ref

D = torch.float64


def _setup(p=11, n=9, m=7, r=5, k=5, seed=0):
    g = gen(seed)
    x = torch.randn(p, n, dtype=D, generator=g)
    U, s, V = factors(m, n, r, g)
    # Off the manifold, so the ortho penalty is not zero.
    U = U + 0.1 * torch.randn(m, r, dtype=D, generator=g)
    V = V + 0.1 * torch.randn(n, r, dtype=D, generator=g)
    b = torch.randn(m, dtype=D, generator=g)
    delta = torch.randn(p, m, dtype=D, generator=g)
    BU, BS, BV = targets(m, n, k, g)
    return x, U, s, V, b, delta, BU, BS, BV


def _leaves(*ts):
    return [t.clone().requires_grad_(True) for t in ts]


def test_factor_grads_equal_autograd_of_delta_dot_a():
    """euclidean + none + ce only: (gU, gs, gV, gb) = ∇ Σ δ ⊙ a (DESIGN §6)."""
    x, U, s, V, b, delta, *_ = _setup()
    Ul, sl, Vl, bl = _leaves(U, s, V, b)
    a = x @ Vl @ torch.diag(sl) @ Ul.t() + bl
    (delta * a).sum().backward()
    for ce in (1.0, 0.3):
        gU, gs, gV, gb = ref.svd_factor_grads(x, x @ V, delta, U, s, V, ce=ce,
                                              scaling="euclidean", projection="none")
        for got, want in ((gU, Ul.grad), (gs, sl.grad), (gV, Vl.grad), (gb, bl.grad)):
            torch.testing.assert_close(got, ce * want)


@pytest.mark.parametrize("k", [5, 3], ids=["k=r", "k<r"])
def test_penalties_equal_autograd_of_their_losses(k):
    """All five coefficients, projection none: the gradient of the summed local loss."""
    x, U, s, V, b, delta, BU, BS, BV = _setup(k=k)
    ce, align, ortho, hoyer, heps = 0.7, 0.3, 0.2, 0.05, 1e-2
    Ul, sl, Vl = _leaves(U, s, V)
    a = x @ Vl @ torch.diag(sl) @ Ul.t() + b
    eye = torch.eye(5, dtype=D)
    sk = sl[:k]
    loss = (ce * (delta * a).sum()
            + align * ((Ul[:, :k] - BU).pow(2).sum() + (Vl[:, :k] - BV).pow(2).sum()
                       + (sk / sk.norm() - BS / BS.norm()).pow(2).sum())
            + ortho * ((Ul.t() @ Ul - eye).pow(2).sum() + (Vl.t() @ Vl - eye).pow(2).sum())
            + hoyer * torch.sqrt(sl * sl + heps**2).sum() / sl.norm())
    loss.backward()
    gU, gs, gV, _ = ref.svd_factor_grads(x, x @ V, delta, U, s, V, BU, BS, BV, ce=ce,
                                         align=align, ortho=ortho, hoyer=hoyer, hoyer_eps=heps,
                                         scaling="euclidean", projection="none")
    torch.testing.assert_close(gU, Ul.grad)
    torch.testing.assert_close(gs, sl.grad)
    torch.testing.assert_close(gV, Vl.grad)


def test_inverse_scaling_divides_by_s_squared():
    x, U, s, V, b, delta, *_ = _setup()
    e = ref.svd_factor_grads(x, x @ V, delta, U, s, V, scaling="euclidean", projection="none")
    i = ref.svd_factor_grads(x, x @ V, delta, U, s, V, scaling="inverse", projection="none")
    torch.testing.assert_close(i[0], e[0] / s**2)
    torch.testing.assert_close(i[2], e[2] / s**2)
    torch.testing.assert_close(i[1], e[1])


def test_safe_inverse_floors_small_and_zero_singular_values():
    s = torch.tensor([2.0, -1e-9, 0.0, 1.0], dtype=D)
    inv = ref.safe_inverse(s, 1e-3)
    torch.testing.assert_close(inv, torch.tensor([0.5, -500.0, 500.0, 1.0], dtype=D))


def _orthonormal_setup():
    x, U, s, V, b, delta, BU, BS, BV = _setup()
    U = torch.linalg.qr(U)[0]
    V = torch.linalg.qr(V)[0]
    return x, U, s, V, delta, BU, BS, BV


def test_stiefel_projection_is_tangent():
    """stiefel, no ortho: UᵀgU + gUᵀU = 0 at orthonormal U (a tangent vector)."""
    x, U, s, V, delta, BU, BS, BV = _orthonormal_setup()
    gU, _, gV, _ = ref.svd_factor_grads(x, x @ V, delta, U, s, V, BU, BS, BV, align=0.5,
                                        projection="stiefel")
    for Y, G in ((U, gU), (V, gV)):
        skew = Y.t() @ G + G.t() @ Y
        assert skew.abs().max() < 1e-12 * max(1.0, G.abs().max().item())
        assert G.abs().max() > 1e-3  # and not trivially zero


def test_paper_projection_is_orthogonal_to_span():
    """paper: UᵀgU = 0 — the projection onto the complement of span(U), ortho included."""
    x, U, s, V, delta, BU, BS, BV = _orthonormal_setup()
    U = U + 0.05  # off the manifold: the ortho term is non-zero but still projected away
    gU, _, gV, _ = ref.svd_factor_grads(x, x @ V, delta, U, s, V, BU, BS, BV, align=0.5,
                                        ortho=1.0, projection="paper")
    # (I − UUᵀ) annihilates span(U) only for orthonormal U; test the literal form instead.
    MU = ref.svd_factor_grads(x, x @ V, delta, U, s, V, BU, BS, BV, align=0.5, ortho=1.0,
                              projection="none")[0]
    torch.testing.assert_close(gU, MU - U @ (U.t() @ MU))
    Vo = torch.linalg.qr(V)[0]
    gV = ref.svd_factor_grads(x, x @ Vo, delta, U, s, Vo, BU, BS, BV, align=0.5, ortho=1.0,
                              projection="paper")[2]
    assert (Vo.t() @ gV).abs().max() < 1e-12 * max(1.0, gV.abs().max().item())


def test_stiefel_adds_ortho_after_projection():
    x, U, s, V, _, delta, *_ = _setup()
    with_o = ref.svd_factor_grads(x, x @ V, delta, U, s, V, ortho=0.4, projection="stiefel")
    without = ref.svd_factor_grads(x, x @ V, delta, U, s, V, ortho=0.0, projection="stiefel")
    eye = torch.eye(U.shape[1], dtype=D)
    torch.testing.assert_close(with_o[0] - without[0], 1.6 * U @ (U.t() @ U - eye))


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("k", [5, 2, 8], ids=["k=r", "k<r", "k>r"])
def test_python_cores_reproduce_reference(projection, scaling, k):
    """The r×r-core epilogue (ssa_kernels/_cores.py, used by Triton) equals DESIGN §6 literally."""
    x, U, s, V, b, delta, BU, BS, BV = _setup(k=k)
    t = x @ V
    kw = dict(ce=0.8, align=0.2, ortho=0.3, hoyer=0.1, hoyer_eps=1e-3, scaling=scaling,
              projection=projection, eps=1e-6)
    w = delta @ U
    cs, CU, CV, beta, gs, BUk, BVk = _cores.factor_cores(U, s, V, w.t() @ t, BU, BS, BV, **kw)
    kk = BUk.shape[1]
    gU = (delta.t() @ t) * cs + U @ CU
    gV = (x.t() @ w) * cs + V @ CV
    gU[:, :kk] += beta * BUk
    gV[:, :kk] += beta * BVk
    want = ref.svd_factor_grads(x, t, delta, U, s, V, BU, BS, BV, **kw)
    torch.testing.assert_close(gU, want[0])
    torch.testing.assert_close(gs, want[1])
    torch.testing.assert_close(gV, want[2])


# ------------------------------------------------------------------ dfa_project


def test_dfa_project_equals_dense_feedback():
    g = gen(1)
    p, C, d, k = 6, 10, 8, 4
    e = torch.randn(p, C, dtype=D, generator=g)
    P = torch.randn(d, k, dtype=D, generator=g)
    Q = torch.randn(C, k, dtype=D, generator=g)
    sigma = torch.rand(k, dtype=D, generator=g)
    a = torch.randn(p, d, dtype=D, generator=g)
    B = P @ torch.diag(sigma) @ Q.t()  # d×C
    h = torch.tanh(a)
    delta = ref.dfa_project(e, P, sigma, Q, h, "tanh")
    torch.testing.assert_close(delta, (e @ B.t()) * (1 - torch.tanh(a) ** 2))
    # spatial: the projected signal is shared by every position
    a4 = torch.randn(p, d, 3, 2, dtype=D, generator=g)
    d4 = ref.dfa_project(e, P, sigma, Q, torch.relu(a4), "relu")
    torch.testing.assert_close(d4, (e @ B.t())[:, :, None, None] * (a4 > 0))


@pytest.mark.parametrize("spatial", [(), (3, 2)])
def test_cos_term_equals_autograd(spatial):
    """delta − δh⊙f' = cos · ∇_a mean_i [1 − cos(a_i, −δh_i)] (DESIGN §6, sign as DESIGN reads)."""
    g = gen(2)
    p, C, d, k = 5, 10, 6, 6
    e = torch.randn(p, C, dtype=D, generator=g)
    P = torch.randn(d, k, dtype=D, generator=g)
    Q = torch.randn(C, k, dtype=D, generator=g)
    sigma = torch.rand(k, dtype=D, generator=g)
    a = torch.randn((p, d) + spatial, dtype=D, generator=g)
    h = torch.sigmoid(a)
    dh = ref.feedback_signal(e, P, sigma, Q)
    dhb = dh.reshape(dh.shape + (1,) * len(spatial)).expand(a.shape)
    al = a.clone().requires_grad_(True)
    cosine = torch.nn.functional.cosine_similarity(al.reshape(p, -1), -dhb.reshape(p, -1), dim=1)
    (1 - cosine).mean().backward()
    got = ref.dfa_project(e, P, sigma, Q, h, "sigmoid", a=a, cos=0.3)
    torch.testing.assert_close(got - dhb * h * (1 - h), 0.3 * al.grad)


def test_cos_term_descends_the_loss_direction():
    """One step on L_cos moves a towards −δh (DESIGN §6's reason for the sign)."""
    g = gen(3)
    a = torch.randn(4, 6, dtype=D, generator=g)
    e = torch.randn(4, 3, dtype=D, generator=g)
    P, Q = torch.eye(6, 3, dtype=D), torch.eye(3, dtype=D)
    sigma = torch.ones(3, dtype=D)
    dh = ref.feedback_signal(e, P, sigma, Q)
    step = ref.dfa_project(e, P, sigma, Q, a, "none", a=a, cos=1.0) - dh
    before = torch.nn.functional.cosine_similarity(a, -dh).mean()
    after = torch.nn.functional.cosine_similarity(a - 0.5 * step, -dh).mean()
    assert after > before


# -------------------------------------------------------------- lowrank_linear


@pytest.mark.parametrize("activation", ["none", "relu", "leaky_relu", "tanh", "sigmoid"])
def test_lowrank_backward_formula_equals_autograd(activation):
    x, U, s, V, b, *_ = _setup()
    xl, Ul, sl, Vl, bl = _leaves(x, U, s, V, b)
    t = xl @ Vl
    h = ref.activate((t * sl) @ Ul.t() + bl, activation, 0.1)
    gh = torch.randn_like(h)
    gt = torch.randn_like(t)
    torch.autograd.backward([h, t], [gh, gt])
    h0, t0 = ref.lowrank_linear(x, U, s, V, b, activation, 0.1)
    got = ref.lowrank_linear_backward(gh, gt, x, U, s, V, h0, t0, activation, 0.1)
    for g_, leaf in zip(got, (xl, Ul, sl, Vl, bl)):
        torch.testing.assert_close(g_, leaf.grad)


def test_activation_grad_from_output_matches_autograd():
    a = torch.linspace(-3, 3, 61, dtype=D)
    for act in ("none", "relu", "leaky_relu", "tanh", "sigmoid"):
        al = a.clone().requires_grad_(True)
        ref.activate(al, act, 0.2).sum().backward()
        torch.testing.assert_close(ref.activation_grad(ref.activate(a, act, 0.2), act, 0.2),
                                   al.grad)


# ---------------------------------------------------------------- reorthonormalize


def test_reorthonormalize_keeps_w_and_restores_orthonormality():
    g = gen(4)
    m, n, r = 12, 9, 5
    U = torch.randn(m, r, dtype=D, generator=g)
    V = torch.randn(n, r, dtype=D, generator=g)
    s = torch.randn(r, dtype=D, generator=g)
    U2, s2, V2 = ssa_kernels.reorthonormalize(U, s, V)
    torch.testing.assert_close(U2 * s2 @ V2.t(), U * s @ V.t())
    torch.testing.assert_close(U2.t() @ U2, torch.eye(r, dtype=D))
    torch.testing.assert_close(V2.t() @ V2, torch.eye(r, dtype=D))
    assert (s2 >= 0).all()


def test_reorthonormalize_keeps_columns_attached():
    """Near-orthonormal factors with unsorted s come back in the same column order and sign."""
    g = gen(5)
    m, n, r = 10, 8, 4
    U, _, V = factors(m, n, r, g)
    s = torch.tensor([0.5, 3.0, 1.0, 2.0], dtype=D)
    U[:, 1] *= -1  # a sign QR/SVD would like to flip
    Up = U + 1e-3 * torch.randn(m, r, dtype=D, generator=g)
    Vp = V + 1e-3 * torch.randn(n, r, dtype=D, generator=g)
    U2, s2, V2 = ref.reorthonormalize(Up, s, Vp)
    torch.testing.assert_close(U2, U, atol=1e-2, rtol=0)
    torch.testing.assert_close(V2, V, atol=1e-2, rtol=0)
    torch.testing.assert_close(s2, s, atol=1e-2, rtol=0)


def test_reorthonormalize_low_precision_and_device_kept():
    g = gen(6)
    U, s, V = factors(8, 6, 3, g)
    U2, s2, V2 = ssa_kernels.reorthonormalize(U.bfloat16(), s.bfloat16(), V.bfloat16())
    assert U2.dtype == s2.dtype == V2.dtype == torch.bfloat16
    torch.testing.assert_close((U2.double() * s2.double()) @ V2.double().t(),
                               (U * s) @ V.t(), atol=3e-2, rtol=0)
