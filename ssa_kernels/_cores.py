"""The r×r cores of the one-pass factor gradients (DESIGN §6), shared by the fused backends.

Every projection turns the factor gradients into the same epilogue of the two big
products (``k`` = aligned columns, ``BU``/``BV`` zero past column ``k``)::

    gU = (δᵀ t) diag(colscale) + U C_U + beta · BU
    gV = (xᵀ w) diag(colscale) + V C_V + beta · BV

with ``colscale = ce·d``, ``beta = −2·align`` and, writing ``E_k`` for the diagonal mask
of the aligned columns, ``K_U = (wᵀt) diag(colscale) + 2·align (UᵀU E_k − UᵀBU)`` and
``G_U = 4·ortho (UᵀU − I)``::

    stiefel: C_U = 2·align E_k − sym(K_U) + G_U
    paper:   C_U = 2·align E_k − K_U + G_U − (UᵀU) G_U
    none:    C_U = 2·align E_k + G_U

(the same for V with ``K_V = (tᵀw) diag(colscale) + …``, since ``Vᵀxᵀ = tᵀ``). The
C++ twin is ``csrc/factor_cores.cpp``; tests tie both to ``reference.svd_factor_grads``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference as ref


def _core(Y: Tensor, K0: Tensor, BY: Tensor | None, k: int, align: float, ortho: float,
          projection: str) -> Tensor:
    r = Y.shape[1]
    G = Y.t() @ Y
    eye = torch.eye(r, dtype=Y.dtype, device=Y.device)
    Ek = torch.zeros(r, dtype=Y.dtype, device=Y.device)
    Ek[:k] = 1.0
    C = 4.0 * ortho * (G - eye) + 2.0 * align * torch.diag(Ek)
    if projection == "none":
        return C
    K = K0 + 2.0 * align * (G * Ek)
    if k > 0:
        K[:, :k] -= 2.0 * align * (Y.t() @ BY)
    if projection == "stiefel":
        return C - 0.5 * (K + K.t())
    return C - K - G @ (4.0 * ortho * (G - eye))


def factor_cores(
    U: Tensor, s: Tensor, V: Tensor, wt: Tensor,
    BU: Tensor | None, BS: Tensor | None, BV: Tensor | None,
    ce: float, align: float, ortho: float, hoyer: float, hoyer_eps: float,
    scaling: str, projection: str, eps: float,
) -> tuple[Tensor, Tensor, Tensor, float, Tensor, Tensor | None, Tensor | None]:
    """``(colscale, C_U, C_V, beta, gs, BU_k, BV_k)`` in fp32/fp64 from ``wt = wᵀt`` (r×r)."""
    work = wt.dtype
    Uw, sw, Vw = U.to(work), s.to(work), V.to(work)
    r = Uw.shape[1]
    d = sw if scaling == "euclidean" else ref.safe_inverse(sw, eps)
    colscale = ce * d
    gs = ce * torch.diagonal(wt).clone()
    k = 0
    BUk = BVk = None
    if align != 0.0:
        BUk, BSk, BVk, k = ref._targets(BU.to(work), BS.to(work), BV.to(work), r)
        gs[:k] += align * ref.align_s_grad(sw[:k], BSk)
    if hoyer != 0.0:
        gs += hoyer * ref.hoyer_grad(sw, hoyer_eps)
    CU = _core(Uw, wt * colscale, BUk, k, align, ortho, projection)
    CV = _core(Vw, wt.t() * colscale, BVk, k, align, ortho, projection)
    return colscale, CU, CV, -2.0 * align, gs, BUk, BVk
