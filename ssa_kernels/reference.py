"""Pure-PyTorch reference of every ssa_kernels op: the executable form of DESIGN.md.

Every backend is tested against these functions, the benchmarks time them (eagerly
and under ``torch.compile``) and they are the fallback kernel on any device. They
compute in the dtype of their inputs (``t`` is cast to it), so running them on
bf16/fp16 inputs gives "PyTorch's own same-precision error" that the low-precision
tests compare the fused kernels with.

Shapes (DESIGN §2): batch ``p``, inputs ``n``, outputs ``m``, rank ``r``,
classes ``C``, feedback width ``k = min(C, d)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ACTIVATIONS = ("none", "relu", "leaky_relu", "tanh", "sigmoid")
PROJECTIONS = ("stiefel", "paper", "none")
SCALINGS = ("euclidean", "inverse")

#: Norm floor of the cosine term (DESIGN §6), so a zero row gives a zero gradient.
COS_NORM_EPS = 1e-12


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32 for fp16/bf16/fp32, fp64 for fp64 (``t`` is kept in it)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def activate(a: Tensor, activation: str, negative_slope: float = 0.01) -> Tensor:
    """``h = f(a)`` for the activations of DESIGN §2."""
    if activation == "none":
        return a
    if activation == "relu":
        return torch.relu(a)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(a, negative_slope)
    if activation == "tanh":
        return torch.tanh(a)
    if activation == "sigmoid":
        return torch.sigmoid(a)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activation_grad(h: Tensor, activation: str, negative_slope: float = 0.01) -> Tensor:
    """``f'(a)`` computed from the output ``h = f(a)`` (why only these activations fuse).

    relu/leaky_relu use ``h > 0`` (so ``f'(0)`` is 0, resp. ``negative_slope``, as autograd
    has it); tanh ``1 - h²``; sigmoid ``h (1 - h)``. Needs ``negative_slope >= 0``.
    """
    if activation == "none":
        return torch.ones_like(h)
    if activation == "relu":
        return (h > 0).to(h.dtype)
    if activation == "leaky_relu":
        return torch.where(h > 0, torch.ones_like(h), torch.full_like(h, negative_slope))
    if activation == "tanh":
        return 1 - h * h
    if activation == "sigmoid":
        return h * (1 - h)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def lowrank_linear(
    x: Tensor,
    U: Tensor,
    s: Tensor,
    V: Tensor,
    bias: Tensor | None = None,
    activation: str = "none",
    negative_slope: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """Low-rank forward, DESIGN §3.

    ``x (p×n), U (m×r), s (r), V (n×r), bias (m) -> h (p×m), t (p×r)``::

        t = x V                  # kept for the update, returned in the accumulation dtype
        a = (t ⊙ s) Uᵀ + b
        h = f(a)
    """
    t = x @ V
    a = (t * s) @ U.t()
    if bias is not None:
        a = a + bias
    return activate(a, activation, negative_slope), t.to(acc_dtype(x.dtype))


def lowrank_linear_backward(
    grad_h: Tensor | None,
    grad_t: Tensor | None,
    x: Tensor,
    U: Tensor,
    s: Tensor,
    V: Tensor,
    h: Tensor,
    t: Tensor,
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``lowrank_linear`` w.r.t. ``(x, U, s, V, bias)``: its autograd formula.

    With ``ga = grad_h ⊙ f'(a)`` and ``gw = ga U`` (p×r)::

        gx = (gw ⊙ s) Vᵀ + grad_t Vᵀ      gU = gaᵀ (t ⊙ s)      gs = colsum(gw ⊙ t)
        gV = xᵀ (gw ⊙ s) + xᵀ grad_t      gb = colsum(ga)
    """
    dt = x.dtype
    tc = t.to(dt)
    if grad_h is None:
        grad_h = torch.zeros_like(h)
    ga = grad_h * activation_grad(h, activation, negative_slope)
    gw = ga @ U
    gws = gw * s
    if grad_t is not None:
        gws = gws + grad_t.to(dt)
    gx = gws @ V.t()
    gV = x.t() @ gws
    gU = ga.t() @ (tc * s)
    gs = (gw * tc).sum(0)
    gb = ga.sum(0)
    return gx, gU, gs, gV, gb


def feedback_signal(e: Tensor, P: Tensor, sigma: Tensor, Q: Tensor) -> Tensor:
    """``δh = ((e Q) ⊙ σ) Pᵀ`` (p×d): DFA feedback through ``B = P diag(σ) Qᵀ`` without forming B."""
    return ((e @ Q) * sigma) @ P.t()


def dfa_project(
    e: Tensor,
    P: Tensor,
    sigma: Tensor,
    Q: Tensor,
    h: Tensor,
    activation: str = "none",
    negative_slope: float = 0.01,
    a: Tensor | None = None,
    cos: float = 0.0,
) -> Tensor:
    """DFA feedback projection and activation mask, DESIGN §5 (+ the cosine term of §6).

    ``e (p×C), P (d×k), sigma (k), Q (C×k), h (p×d) or (p×d×…) -> delta (shape of h)``::

        δh    = ((e Q) ⊙ σ) Pᵀ                                  (p×d)
        delta = δh ⊙ f'(a)          (δh shared by every position when h has spatial dims)
        delta += cos · ∇_a mean_i [1 − cos(a_i, −δh_i)]          (when cos > 0; needs a)

    The cosine is per sample over the flattened layer output; its gradient for row ``i``
    with ``g = −δh_i`` is ``−(g/(‖a‖‖g‖) − (a·g) a/(‖a‖³‖g‖)) / p``.
    """
    p = h.shape[0]
    dh = feedback_signal(e, P, sigma, Q)
    if h.dim() > 2:
        dh = dh.reshape(dh.shape + (1,) * (h.dim() - 2)).expand(h.shape)
    delta = dh * activation_grad(h, activation, negative_slope)
    if cos != 0.0:
        if a is None:
            raise ValueError("dfa_project: cos != 0 needs the pre-activation a")
        width = math.prod(h.shape[1:])  # not -1: a reshape cannot infer it when p = 0
        af = a.reshape(p, width)
        g = -dh.reshape(p, width)
        na = af.norm(dim=1, keepdim=True).clamp_min(COS_NORM_EPS)
        ng = g.norm(dim=1, keepdim=True).clamp_min(COS_NORM_EPS)
        dot = (af * g).sum(1, keepdim=True)
        grad = -(g / (na * ng) - dot * af / (na**3 * ng)) / p
        delta = delta + cos * grad.reshape(h.shape)
    return delta


def _targets(BU, BS, BV, r):
    """Leading ``k = min(r, cols)`` columns of the alignment targets (DESIGN §6, §8)."""
    k = min(r, BS.shape[0])
    return BU[:, :k], BS[:k], BV[:, :k], k


def safe_inverse(s: Tensor, eps: float) -> Tensor:
    """``1/s_safe``, ``s_safe = sgn(s)·max(|s|, eps·max|s|)`` with ``sgn(0) = +1`` (DESIGN §6)."""
    sgn = torch.where(s < 0, -torch.ones_like(s), torch.ones_like(s))
    floor = eps * s.abs().max()
    return 1.0 / (sgn * torch.maximum(s.abs(), floor))


def align_s_grad(s: Tensor, BS: Tensor) -> Tensor:
    """Gradient of ``‖s/‖s‖ − BS/‖BS‖‖²`` w.r.t. ``s``: ``(2/‖s‖)(I − ŝŝᵀ)(ŝ − B̂_S)``."""
    ns = s.norm()
    sh = s / ns
    diff = sh - BS / BS.norm()
    return (2.0 / ns) * (diff - sh * (sh @ diff))


def hoyer_grad(s: Tensor, eps: float) -> Tensor:
    """Gradient of the smoothed Hoyer ``H(s) = Σ sqrt(s² + ε²) / ‖s‖₂`` (DESIGN §6)."""
    ns = s.norm()
    root = torch.sqrt(s * s + eps * eps)
    H = root.sum() / ns
    return s / (root * ns) - H * s / (ns * ns)


def tangent_projection(Y: Tensor, M: Tensor, projection: str) -> Tensor:
    """``Π_Y(M)``: ``stiefel`` = ``M − Y sym(YᵀM)``, ``paper`` = ``M − Y(YᵀM)``, ``none`` = ``M``."""
    if projection == "none":
        return M
    YtM = Y.t() @ M
    if projection == "stiefel":
        YtM = 0.5 * (YtM + YtM.t())
    return M - Y @ YtM


def svd_factor_grads(
    x: Tensor,
    t: Tensor,
    delta: Tensor,
    U: Tensor,
    s: Tensor,
    V: Tensor,
    BU: Tensor | None = None,
    BS: Tensor | None = None,
    BV: Tensor | None = None,
    ce: float = 1.0,
    align: float = 0.0,
    ortho: float = 0.0,
    hoyer: float = 0.0,
    hoyer_eps: float = 1e-3,
    scaling: str = "euclidean",
    projection: str = "stiefel",
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SVD-factor gradients with penalties and projection, DESIGN §6, written literally.

    ``x (p×n), t (p×r), delta (p×m), U (m×r), s (r), V (n×r)``, targets ``BU (m×k),
    BS (k), BV (n×k)`` (leading ``min(k, r)`` columns are aligned) ``-> gU, gs, gV, gb``::

        w  = δ U
        gs = ce·colsum(w ⊙ t) + align·(2/‖s‖)(I − ŝŝᵀ)(ŝ − B̂_S) + hoyer·∇H(s)
        MU = ce·(δᵀ t) D + align·2(U − B_U) + ortho·4 U(UᵀU − I)
        MV = ce·(xᵀ w) D + align·2(V − B_V) + ortho·4 V(VᵀV − I)
        gb = ce·colsum(δ)

    ``D = diag(s)`` (euclidean) or ``diag(1/s_safe)`` (inverse). ``stiefel`` projects the
    ce + align part with ``M − U sym(UᵀM)`` and adds the ortho part after; ``paper`` applies
    ``M − U(UᵀM)`` to all of M; ``none`` returns M.
    """
    dt = x.dtype
    t = t.to(dt)
    w = delta @ U
    return factor_epilogue(delta.t() @ t, x.t() @ w, (w * t).sum(0), delta.sum(0), U, s, V, BU, BS, BV,
                           ce, align, ortho, hoyer, hoyer_eps, scaling, projection, eps)


def factor_epilogue(
    RU: Tensor,
    RV: Tensor,
    gs_ce: Tensor,
    gb_ce: Tensor,
    U: Tensor,
    s: Tensor,
    V: Tensor,
    BU: Tensor | None,
    BS: Tensor | None,
    BV: Tensor | None,
    ce: float,
    align: float,
    ortho: float,
    hoyer: float,
    hoyer_eps: float,
    scaling: str,
    projection: str,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DESIGN §6 from the two big products, shared by the linear and the convolution ops.

    ``RU = δᵀt`` (m×r), ``RV = xᵀw`` (n×r), ``gs_ce = colsum(w ⊙ t)``, ``gb_ce = colsum(δ)``
    (for a convolution: the weight-gradients of its two convolutions without ``diag(s)``,
    reshaped to ``U``/``V``, and the sums over batch and positions, DESIGN §4). Applies the
    scaling ``D``, alignment, ortho, Hoyer terms and the projection.
    """
    r = U.shape[1]
    d = s if scaling == "euclidean" else safe_inverse(s, eps)
    MU = ce * RU * d
    MV = ce * RV * d
    gs = ce * gs_ce
    if align != 0.0:
        BU, BS, BV, k = _targets(BU, BS, BV, r)
        pad = (0, r - k)
        MU = MU + 2 * align * torch.nn.functional.pad(U[:, :k] - BU, pad)
        MV = MV + 2 * align * torch.nn.functional.pad(V[:, :k] - BV, pad)
        gs = gs + align * torch.nn.functional.pad(align_s_grad(s[:k], BS), pad)
    if hoyer != 0.0:
        gs = gs + hoyer * hoyer_grad(s, hoyer_eps)
    eye = torch.eye(r, dtype=U.dtype, device=U.device)
    OU = 4 * ortho * U @ (U.t() @ U - eye)
    OV = 4 * ortho * V @ (V.t() @ V - eye)
    if projection == "stiefel":
        gU = tangent_projection(U, MU, "stiefel") + OU
        gV = tangent_projection(V, MV, "stiefel") + OV
    else:
        gU = tangent_projection(U, MU + OU, projection)
        gV = tangent_projection(V, MV + OV, projection)
    gb = ce * gb_ce
    pt = U.dtype
    return gU.to(pt).contiguous(), gs.to(pt), gV.to(pt).contiguous(), gb.to(pt)


# ------------------------------------------------------------------ convolutions (DESIGN §4)


def conv_out_size(size: int, pad: int, kernel: int, stride: int, dilation: int) -> int:
    """Output length of a convolution along one dimension (``pad`` = both sides together)."""
    return (size + pad - dilation * (kernel - 1) - 1) // stride + 1


def nchw(t: Tensor) -> Tensor:
    """``t`` with canonical NCHW strides (a copy only when its strides are not).

    A tensor with size-1 dims (a 1×1 kernel, ``r = 1``) can be "contiguous" with strides that
    also read as channels-last; ATen then takes oneDNN's NHWC path, whose strided 1×1
    backward-weights kernel corrupts the heap in torch 2.14 on AVX-512 CPUs with several
    threads (reproduced with torch alone). Every tensor handed to a convolution here, and in
    ``csrc/conv.cpp``, goes through this first.
    """
    canonical = []
    step = 1
    for size in reversed(t.shape):
        canonical.append(step)
        step *= size
    if t.is_contiguous() and tuple(reversed(canonical)) == t.stride():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def conv_kernels(U: Tensor, V: Tensor, kernel_size) -> tuple[Tensor, Tensor]:
    """The two kernels of the spatial SVD (DESIGN §4), from ``V`` and ``U`` (no ``s``).

    ``K1[j, c, h, 0] = V[(c, h), j]`` (r×C×kh×1), ``K2[n, j, 0, w] = U[(n, w), j]`` (N×r×1×kw).
    """
    kh, kw = kernel_size
    r = U.shape[1]
    N, C = U.shape[0] // kw, V.shape[0] // kh
    K1 = nchw(V.t().reshape(r, C, kh, 1))  # a strided weight view makes oneDNN pick channels-last
    K2 = nchw(U.reshape(N, kw, r).permute(0, 2, 1).reshape(N, r, 1, kw))
    return K1, K2


def factors_like(gK1: Tensor, gK2: Tensor) -> tuple[Tensor, Tensor]:
    """Tensors of the two kernels' shapes back in ``U``/``V`` layout (the inverse of :func:`conv_kernels`).

    ``gK2`` (N×r×1×kw) → ``(N·kw) × r``, ``gK1`` (r×C×kh×1) → ``(C·kh) × r``.
    """
    r = gK1.shape[0]
    return gK2.squeeze(2).permute(0, 2, 1).reshape(-1, r), gK1.reshape(r, -1).t()


def factors_from_kernel(K: Tensor) -> Tensor:
    """``K'`` (N·kw × C·kh) of a kernel ``K`` (N×C×kh×kw): ``K'[(n, w), (c, h)] = K[n, c, h, w]``."""
    N, C, kh, kw = K.shape
    return K.permute(0, 3, 1, 2).reshape(N * kw, C * kh)


def kernel_from_factors(U: Tensor, s: Tensor, V: Tensor, kernel_size) -> Tensor:
    """The dense kernel ``K`` (N×C×kh×kw) of ``K' = U diag(s) Vᵀ``."""
    kh, kw = kernel_size
    Kp = (U * s) @ V.t()
    N, C = U.shape[0] // kw, V.shape[0] // kh
    return Kp.reshape(N, kw, C, kh).permute(0, 2, 3, 1)


def _pad_input(x: Tensor, padding) -> tuple[Tensor, tuple[int, int]]:
    """Symmetric padding goes to the first convolution; asymmetric padding pre-pads ``x``."""
    pt, pb, pl, pr = padding
    if pt == pb and pl == pr:
        return nchw(x), (pt, pl)
    return nchw(torch.nn.functional.pad(x, (pl, pr, pt, pb))), (0, 0)


def lowrank_conv2d(
    x: Tensor,
    U: Tensor,
    s: Tensor,
    V: Tensor,
    bias: Tensor | None,
    kernel_size,
    stride=(1, 1),
    padding=(0, 0, 0, 0),
    dilation=(1, 1),
    activation: str = "none",
    negative_slope: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """Low-rank convolution as two convolutions, DESIGN §4.

    ``x (p×C×H×W)``, ``U (N·kw × r)``, ``s (r)``, ``V (C·kh × r)``, ``padding`` =
    ``(top, bottom, left, right)`` ``-> h (p×N×Ho×Wo), t (p×r×Ho×(W + left + right))``::

        t = conv2d(x, K1, stride=(sh, 1), padding=(ph, pw), dilation=(dh, 1))
        a = conv2d(t ⊙ s, K2, bias, stride=(1, sw), dilation=(1, dw))
        h = f(a)
    """
    K1, K2 = conv_kernels(U, V, kernel_size)
    xp, pad = _pad_input(x, padding)
    t = torch.nn.functional.conv2d(xp, K1, None, (stride[0], 1), pad, (dilation[0], 1))
    a = torch.nn.functional.conv2d(t * s[:, None, None], K2, bias, (1, stride[1]), 0, (1, dilation[1]))
    return activate(a, activation, negative_slope), t.to(acc_dtype(x.dtype))


def _conv_backward(grad, inp, weight, stride, padding, dilation, mask, bias_sizes=None):
    grad, inp, weight = nchw(grad), nchw(inp), nchw(weight)
    return torch.ops.aten.convolution_backward(grad, inp, weight, bias_sizes, list(stride), list(padding),
                                               list(dilation), False, [0, 0], 1, list(mask))


def lowrank_conv2d_backward(
    grad_h: Tensor | None,
    grad_t: Tensor | None,
    x: Tensor,
    U: Tensor,
    s: Tensor,
    V: Tensor,
    h: Tensor,
    t: Tensor,
    kernel_size,
    stride,
    padding,
    dilation,
    activation: str,
    negative_slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``lowrank_conv2d`` w.r.t. ``(x, U, s, V, bias)``: its autograd formula.

    With ``ga = grad_h ⊙ f'(a)``: the input- and weight-gradients of the second convolution
    give ``g(t⊙s)`` and ``gU`` (which carries ``s``), ``gs = Σ g(t⊙s) ⊙ t``; then
    ``gt = g(t⊙s) ⊙ s + grad_t`` through the first convolution gives ``gx`` and ``gV``.
    """
    dt = x.dtype
    tc = t.to(dt)
    N = U.shape[0] // kernel_size[1]
    if grad_h is None:
        grad_h = torch.zeros_like(h)
    ga = grad_h * activation_grad(h, activation, negative_slope)
    K1, K2 = conv_kernels(U, V, kernel_size)
    xp, pad = _pad_input(x, padding)
    sv = s[:, None, None]
    gts, gK2, gb = _conv_backward(ga, tc * sv, K2, (1, stride[1]), (0, 0), (1, dilation[1]),
                                  (True, True, True), [N])
    gs = (gts * tc).sum((0, 2, 3))
    gt = gts * sv
    if grad_t is not None:
        gt = gt + grad_t.to(dt)
    gxp, gK1, _ = _conv_backward(gt, xp, K1, (stride[0], 1), pad, (dilation[0], 1), (True, True, False))
    if padding[0] != padding[1] or padding[2] != padding[3]:  # x was pre-padded: cut the pad off
        pt, _, pl, _ = padding
        gxp = gxp[:, :, pt:pt + x.shape[2], pl:pl + x.shape[3]]
    gU, gV = factors_like(gK1, gK2)
    return gxp, gU, gs, gV, gb


def svd_conv_factor_grads(
    x: Tensor,
    t: Tensor,
    delta: Tensor,
    U: Tensor,
    s: Tensor,
    V: Tensor,
    kernel_size,
    stride=(1, 1),
    padding=(0, 0, 0, 0),
    dilation=(1, 1),
    BU: Tensor | None = None,
    BS: Tensor | None = None,
    BV: Tensor | None = None,
    ce: float = 1.0,
    align: float = 0.0,
    ortho: float = 0.0,
    hoyer: float = 0.0,
    hoyer_eps: float = 1e-3,
    scaling: str = "euclidean",
    projection: str = "stiefel",
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SVD-factor gradients of a low-rank convolution, DESIGN §4 + §6.

    ``w`` = the input-gradient of the second convolution (the conv form of ``δU``);
    ``RU`` = its weight-gradient with input ``t`` (the conv form of ``δᵀt``), ``RV`` = the
    first convolution's weight-gradient with input ``x`` and output-gradient ``w`` (``xᵀw``),
    reshaped to ``U``/``V``; ``gs = Σ w ⊙ t``; then :func:`factor_epilogue`, as for a linear
    layer (so ``UᵀRU = wᵀt`` and ``VᵀRV = tᵀw`` hold here too).
    """
    dt = x.dtype
    tc = t.to(dt)
    K1, K2 = conv_kernels(U, V, kernel_size)
    xp, pad = _pad_input(x, padding)
    w, gK2, _ = _conv_backward(delta, tc, K2, (1, stride[1]), (0, 0), (1, dilation[1]), (True, True, False))
    _, gK1, _ = _conv_backward(w, xp, K1, (stride[0], 1), pad, (dilation[0], 1), (False, True, False))
    RU, RV = factors_like(gK1, gK2)
    return factor_epilogue(RU, RV, (w * tc).sum((0, 2, 3)), delta.sum((0, 2, 3)), U, s, V, BU, BS, BV,
                           ce, align, ortho, hoyer, hoyer_eps, scaling, projection, eps)


def reorthonormalize(U: Tensor, s: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact orthonormality without changing ``W = U diag(s) Vᵀ`` (DESIGN §7).

    ``U = Q_u R_u``, ``V = Q_v R_v``, ``R_u diag(s) R_vᵀ = A Σ Bᵀ``, then ``U ← Q_u A``,
    ``s ← Σ``, ``V ← Q_v B``. The new columns are matched to the old ones (greedy on
    ``|U_oldᵀ U_new|``, largest overlap first) and their signs chosen so each matched
    overlap is positive, keeping optimizer state and targets on the same directions.
    """
    work = acc_dtype(U.dtype)
    Uw, sw, Vw = U.to(work), s.to(work), V.to(work)
    Qu, Ru = torch.linalg.qr(Uw)
    Qv, Rv = torch.linalg.qr(Vw)
    A, S, Bh = torch.linalg.svd(Ru * sw @ Rv.t())
    Un, Vn = Qu @ A, Qv @ Bh.t()
    order, signs = match_columns(Uw, Un)
    Un = Un[:, order] * signs
    Vn = Vn[:, order] * signs
    return Un.to(U.dtype), S[order].to(s.dtype), Vn.to(V.dtype)


def match_columns(old: Tensor, new: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy matching of ``new`` columns to ``old`` ones on ``|oldᵀ new|``.

    Returns ``order`` (``new[:, order[j]]`` is matched to ``old[:, j]``) and the signs that
    make each matched overlap non-negative.
    """
    overlap = (old.t() @ new).cpu()
    r = overlap.shape[0]
    score = overlap.abs().clone()
    order = torch.empty(r, dtype=torch.long)
    for _ in range(r):
        flat = int(torch.argmax(score))
        i, j = divmod(flat, r)
        order[i] = j
        score[i, :] = -1.0
        score[:, j] = -1.0
    signs = torch.where(overlap[torch.arange(r), order] < 0, -1.0, 1.0)
    return order.to(new.device), signs.to(device=new.device, dtype=new.dtype)
