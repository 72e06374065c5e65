"""Public ops of ssa_kernels: one typed function per op, backend chosen per call."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backends, _checks
from . import reference as _ref


def lowrank_linear(
    x: Tensor,
    U: Tensor,
    s: Tensor,
    V: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "none",
    backend: str = "auto",
    *,
    negative_slope: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """Fused low-rank forward ``h = f((x V ⊙ s) Uᵀ + b)`` (DESIGN §3); returns ``(h, t)``.

    Shapes: ``x (*, n)``, ``U (m, r)``, ``s (r)``, ``V (n, r)``, ``bias (m)`` →
    ``h (*, m)`` in ``x.dtype`` and ``t = x V`` ``(*, r)`` in fp32 (fp64 for fp64 inputs),
    kept for the update. Equivalent PyTorch::

        t = x @ V
        h = f((t * s) @ U.T + bias)

    ``activation``: ``None``/``"none"``, ``"relu"``, ``"leaky_relu"`` (``negative_slope``),
    ``"tanh"``, ``"sigmoid"``. Differentiable w.r.t. ``x, U, s, V, bias`` (and through ``t``).
    ``backend``: ``"auto"`` or one of :func:`available_backends`.
    """
    fn = "ssa_kernels.lowrank_linear"
    activation, slope = _checks.activation(fn, activation, negative_slope)
    m, r, n = _checks.lowrank_linear(x, U, s, V, bias)
    impl = _backends.select("lowrank_linear", backend, x.device, x.dtype)
    lead = x.shape[:-1]
    h, t = impl(x.reshape(-1, n), U, s, V, bias, activation, slope)
    return h.reshape(*lead, m), t.reshape(*lead, r)


def dfa_project(
    e: Tensor,
    P: Tensor,
    sigma: Tensor,
    Q: Tensor,
    h: Tensor,
    activation: str | None = "none",
    *,
    a: Tensor | None = None,
    cos: float = 0.0,
    negative_slope: float = 0.01,
    backend: str = "auto",
) -> Tensor:
    """DFA feedback projection with the activation mask (DESIGN §5), autograd-free.

    Shapes: ``e (p, C)``, ``P (d, k)``, ``sigma (k)``, ``Q (C, k)`` (the feedback
    ``B = P diag(sigma) Qᵀ`` is never formed), ``h (p, d)`` or ``(p, d, H, W, …)`` →
    ``delta`` of ``h``'s shape. For spatial ``h`` the projected signal is shared by every
    position. Equivalent PyTorch (2-D ``h``)::

        dh = ((e @ Q) * sigma) @ P.T
        delta = dh * f_prime(h)          # f' read from h = f(a)

    With ``cos > 0`` the gradient of ``cos · mean_i [1 − cos(a_i, −dh_i)]`` w.r.t. ``a``
    (DESIGN §6, v1's cosine term) is added; it needs the pre-activation ``a``.
    """
    fn = "ssa_kernels.dfa_project"
    activation, slope = _checks.activation(fn, activation, negative_slope)
    cos = _checks.number(fn, "cos", cos)
    _checks.dfa_project(e, P, sigma, Q, h, a)
    if cos != 0.0 and a is None:
        raise ValueError(f"{fn}: cos = {cos} needs the pre-activation a (shape of h)")
    impl = _backends.select("dfa_project", backend, h.device, h.dtype)
    return impl(e, P, sigma, Q, h, a if cos != 0.0 else None, activation, slope, cos)


def svd_factor_grads(
    x: Tensor,
    t: Tensor,
    delta: Tensor,
    U: Tensor,
    s: Tensor,
    V: Tensor,
    *,
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
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SVD-factor gradients with penalties and projection in one pass (DESIGN §6).

    Shapes: ``x (p, n)``, ``t = x V (p, r)`` (from :func:`lowrank_linear`), ``delta (p, m)``,
    ``U (m, r)``, ``s (r)``, ``V (n, r)``; alignment targets ``BU (m, k)``, ``BS (k)``,
    ``BV (n, k)`` (the leading ``min(k, r)`` columns are aligned) → ``gU, gs, gV, gb`` in
    ``U.dtype``. Equivalent PyTorch (``projection="none"``)::

        w = delta @ U
        D = s if scaling == "euclidean" else 1 / s_safe
        gU = ce * (delta.T @ t) * D + 2 * align * (U - BU) + 4 * ortho * U @ (U.T @ U - I)
        gV = ce * (x.T @ w) * D + 2 * align * (V - BV) + 4 * ortho * V @ (V.T @ V - I)
        gs = ce * (w * t).sum(0) + align * grad_s |s/|s| - BS/|BS||^2 + hoyer * grad H(s)
        gb = ce * delta.sum(0)

    ``projection="stiefel"`` (default) projects the ce + align part onto the tangent space
    ``M − U sym(UᵀM)`` and adds the ortho part after; ``"paper"`` applies
    ``M − U(UᵀM)`` to all of it. The r×r cores use ``tᵀw = Vᵀxᵀw``, so ``t`` must be
    ``x V``. Autograd-free: the result is the update itself.
    """
    fn = "ssa_kernels.svd_factor_grads"
    ce, align, ortho, hoyer, hoyer_eps, scaling, projection, eps = _checks.factor_options(
        fn, ce, align, ortho, hoyer, hoyer_eps, scaling, projection, eps)
    _checks.svd_factor_grads(x, t, delta, U, s, V, BU, BS, BV, align)
    if align == 0.0:
        BU = BS = BV = None
    impl = _backends.select("svd_factor_grads", backend, x.device, x.dtype)
    return impl(x, t, delta, U, s, V, BU, BS, BV, ce, align, ortho, hoyer, hoyer_eps,
                scaling, projection, eps)


def lowrank_conv2d(
    x: Tensor,
    U: Tensor,
    s: Tensor,
    V: Tensor,
    bias: Tensor | None = None,
    *,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    activation: str | None = "none",
    negative_slope: float = 0.01,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Low-rank convolution ``h = f(conv2d(x, K) + b)`` with ``K' = U diag(s) Vᵀ`` (DESIGN §4).

    The kernel ``K`` (N×C×kh×kw) is viewed as ``K'[(n, w), (c, h)] = K[n, c, h, w]``:
    ``U`` is ``(N·kw) × r`` (row ``n·kw + w``), ``V`` is ``(C·kh) × r`` (row ``c·kh + h``).
    Two convolutions, equal to ``conv2d(x, K)`` at full rank::

        t = conv2d(x, K1, stride=(sh, 1), padding=(ph, pw), dilation=(dh, 1))   # K1[j,c,h,0] = V[(c,h),j]
        h = f(conv2d(t * s, K2, bias, stride=(1, sw), dilation=(1, dw)))        # K2[n,j,0,w] = U[(n,w),j]

    Shapes: ``x (p, C, H, W)`` → ``h (p, N, Ho, Wo)`` in ``x.dtype`` and ``t (p, r, Ho, W + pl + pr)``
    in fp32 (fp64 for fp64 inputs), kept for the update. ``kernel_size`` is required;
    ``stride``, ``dilation``: int or pair; ``padding``: int, pair, ``(top, bottom, left, right)``,
    ``"valid"`` or ``"same"`` (asymmetric for even kernels, as ``nn.Conv2d``). Differentiable
    w.r.t. ``x, U, s, V, bias``. Backends: ``"reference"``, ``"cpu"``, ``"cuda"`` (no Triton).
    """
    fn = "ssa_kernels.lowrank_conv2d"
    activation, slope = _checks.activation(fn, activation, negative_slope)
    geometry = _checks.conv_geometry(fn, kernel_size, stride, padding, dilation)
    _checks.lowrank_conv2d(x, U, s, V, bias, geometry)
    impl = _backends.select("lowrank_conv2d", backend, x.device, x.dtype)
    kernel, stride, padding, dilation = geometry
    return impl(x, U, s, V, bias, list(kernel), list(stride), list(padding), list(dilation),
                activation, slope)


def svd_conv_factor_grads(
    x: Tensor,
    t: Tensor,
    delta: Tensor,
    U: Tensor,
    s: Tensor,
    V: Tensor,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    *,
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
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SVD-factor gradients of :func:`lowrank_conv2d` with penalties and projection (DESIGN §4, §6).

    ``x (p, C, H, W)``, ``t`` from :func:`lowrank_conv2d`, ``delta (p, N, Ho, Wo)`` (the
    error at the pre-activation), factors as in :func:`lowrank_conv2d`, targets ``BU (N·kw, k)``,
    ``BS (k)``, ``BV (C·kh, k)`` → ``gU, gs, gV, gb`` in ``U.dtype``. The ce parts are the
    weight-gradients of the two convolutions reshaped to ``U``/``V`` (they carry ``diag(s)``:
    the ``euclidean`` form, the exact gradient of ``Σ delta ⊙ a``; ``scaling="inverse"``
    divides them by ``s²``); the epilogue (alignment, ortho, Hoyer, projection) is the one of
    :func:`svd_factor_grads`, with the same options. Autograd-free.
    """
    fn = "ssa_kernels.svd_conv_factor_grads"
    ce, align, ortho, hoyer, hoyer_eps, scaling, projection, eps = _checks.factor_options(
        fn, ce, align, ortho, hoyer, hoyer_eps, scaling, projection, eps)
    geometry = _checks.conv_geometry(fn, kernel_size, stride, padding, dilation)
    _checks.svd_conv_factor_grads(x, t, delta, U, s, V, geometry, BU, BS, BV, align)
    if align == 0.0:
        BU = BS = BV = None
    impl = _backends.select("svd_conv_factor_grads", backend, x.device, x.dtype)
    kernel, stride, padding, dilation = geometry
    return impl(x, t, delta, U, s, V, list(kernel), list(stride), list(padding), list(dilation),
                BU, BS, BV, ce, align, ortho, hoyer, hoyer_eps, scaling, projection, eps)


@torch.no_grad()
def reorthonormalize(U: Tensor, s: Tensor, V: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Restore ``UᵀU = VᵀV = I`` without changing ``W = U diag(s) Vᵀ`` (DESIGN §7).

    QR of ``U`` and ``V``, SVD of the small core ``R_u diag(s) R_vᵀ``; new columns matched
    to the old ones (greedy on ``|U_oldᵀ U_new|``) with signs making each overlap positive.
    ``O((m + n) r² + r³)``; returns new tensors ``(U, s, V)`` of the input dtypes.
    """
    _checks.factors("ssa_kernels.reorthonormalize", U, s, V)
    return _ref.reorthonormalize(U, s, V)


def available_backends(device: torch.device | str | None = None, op: str | None = None) -> list[str]:
    """Backends that can run on ``device`` (default CPU), ``"auto"``'s choice first.

    Among ``"reference"``, ``"cpu"`` (compiled C++), ``"cuda"`` (compiled CUDA) and
    ``"triton"`` (GPU, or CPU with ``TRITON_INTERPRET=1``). With ``op`` (e.g.
    ``"lowrank_conv2d"``), only the backends that implement that op.
    """
    return _backends.available_backends(device, op)
