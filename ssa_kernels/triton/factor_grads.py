"""One-pass SVD-factor gradients in Triton, DESIGN §6.

``x (p×n), t = x V (p×r), δ (p×m), U (m×r), s (r), V (n×r)`` (+ targets) ``-> gU, gs, gV, gb``::

    w, colsum(δ) = δ U, Σ_i δ_i           _delta_u_kernel (one pass over the batch)
    wt = wᵀ t                              (r×r, fp32)
    colscale, C_U, C_V, beta, gs, B_U, B_V = _cores.factor_cores(…, wt, …)
    gU = (δᵀ t) diag(colscale) + U C_U + beta·B_U[:, :k]      _skinny_kernel
    gV = (xᵀ w) diag(colscale) + V C_V + beta·B_V[:, :k]      _skinny_kernel
    gb = ce · colsum(δ)

The r×r cores carry the projection, penalties and scaling (see ``ssa_kernels._cores``), so
both big products need nothing but that epilogue, applied to each output tile before the
cast. The products are skinny (``M×r`` outputs, ``K = p``): when their output tiles alone
cannot fill the GPU, ``K`` is split across programs that add into an fp32 workspace with
atomics, and ``_skinny_epilogue_kernel`` applies the same epilogue to the sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import _cores
from ._common import cdiv, dot_block, dot_precision, mma, target_programs, widen

#: Fewest batch rows worth a split of the skinny products.
MIN_ROWS_PER_SPLIT = 256


@triton.jit
def _delta_u_kernel(
    d_ptr, U_ptr, w_ptr, colsum_ptr,
    p, m, r,
    stride_dp, stride_dm, stride_um, stride_ur,
    PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``w = δ U`` (fp32, contiguous p×r) and per-row-block partial ``colsum(δ)``."""
    pid_p = tl.program_id(0)
    pid_r = tl.program_id(1)
    # 64-bit row offsets: δ may hold more than 2³¹ elements.
    rows = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    ranks = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < p
    rank_ok = ranks < r
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for m0 in range(0, m, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        col_ok = cols < m
        dt = tl.load(d_ptr + rows[:, None] * stride_dp + cols[None, :] * stride_dm,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        ut = tl.load(U_ptr + cols[:, None] * stride_um + ranks[None, :] * stride_ur,
                     mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        acc = mma(dt, ut, acc, PRECISION, WIDEN)
        # gb rides on the same read of δ; one rank block writes it.
        tl.store(colsum_ptr + pid_p * m + cols, tl.sum(dt.to(tl.float32), 0),
                 mask=col_ok & (pid_r == 0))
    tl.store(w_ptr + rows[:, None] * r + ranks[None, :], acc,
             mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _factor_epilogue(
    acc, rows, cols, M, R, k_align, beta,
    colscale_ptr, y_ptr, c_ptr, bt_ptr, out_ptr,
    stride_ym, stride_yr, stride_btm, stride_btr,
    HAS_TARGETS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``out = acc diag(colscale) + Y C + beta Bt[:, :k]`` on one tile, cast to out's dtype."""
    row_ok = rows < M
    col_ok = cols < R
    cs = tl.load(colscale_ptr + cols, mask=col_ok, other=0.0)
    out = acc * cs[None, :]
    for l0 in range(0, R, BLOCK_R):
        ls = l0 + tl.arange(0, BLOCK_R)
        l_ok = ls < R
        yt = tl.load(y_ptr + rows[:, None] * stride_ym + ls[None, :] * stride_yr,
                     mask=row_ok[:, None] & l_ok[None, :], other=0.0).to(tl.float32)
        ct = tl.load(c_ptr + ls[:, None] * R + cols[None, :],
                     mask=l_ok[:, None] & col_ok[None, :], other=0.0)
        out = tl.dot(yt, ct, out, input_precision=PRECISION)
    if HAS_TARGETS:
        bt = tl.load(bt_ptr + rows[:, None] * stride_btm + cols[None, :] * stride_btr,
                     mask=row_ok[:, None] & (cols < k_align)[None, :], other=0.0)
        out += beta * bt.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * R + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _skinny_kernel(
    a_ptr, b_ptr, ws_ptr, colscale_ptr, y_ptr, c_ptr, bt_ptr, out_ptr,
    M, R, K, k_per_split, k_align, beta,
    stride_ak, stride_am, stride_bk, stride_br, stride_ym, stride_yr, stride_btm, stride_btr,
    SPLIT: tl.constexpr, HAS_TARGETS: tl.constexpr, PRECISION: tl.constexpr,
    WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out (M×R) = Aᵀ B`` (A: K×M, B: K×R) over ``K`` rows ``[k_per_split·pid_k, …)``.

    Unsplit, the epilogue is applied here; split, the fp32 partial sum is added to ``ws``.
    """
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < M
    col_ok = cols < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        # 64-bit batch offsets: δ and x may hold more than 2³¹ elements.
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = ks < k_end
        at = tl.load(a_ptr + ks[:, None] * stride_ak + rows[None, :] * stride_am,
                     mask=k_ok[:, None] & row_ok[None, :], other=0.0)
        bt = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_br,
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        # B is fp32 (t, w): with low-precision A it is rounded once to A's dtype.
        acc = mma(tl.trans(at), bt.to(at.dtype), acc, PRECISION, WIDEN)
    if SPLIT:
        tl.atomic_add(ws_ptr + rows[:, None] * R + cols[None, :], acc,
                      mask=row_ok[:, None] & col_ok[None, :])
    else:
        _factor_epilogue(acc, rows, cols, M, R, k_align, beta,
                         colscale_ptr, y_ptr, c_ptr, bt_ptr, out_ptr,
                         stride_ym, stride_yr, stride_btm, stride_btr,
                         HAS_TARGETS, PRECISION, BLOCK_M, BLOCK_R)


@triton.jit
def _skinny_epilogue_kernel(
    ws_ptr, colscale_ptr, y_ptr, c_ptr, bt_ptr, out_ptr,
    M, R, k_align, beta,
    stride_ym, stride_yr, stride_btm, stride_btr,
    HAS_TARGETS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """The epilogue of a split ``_skinny_kernel``, on the fp32 workspace."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.load(ws_ptr + rows[:, None] * R + cols[None, :],
                  mask=(rows < M)[:, None] & (cols < R)[None, :], other=0.0)
    _factor_epilogue(acc, rows, cols, M, R, k_align, beta,
                     colscale_ptr, y_ptr, c_ptr, bt_ptr, out_ptr,
                     stride_ym, stride_yr, stride_btm, stride_btr,
                     HAS_TARGETS, PRECISION, BLOCK_M, BLOCK_R)


def _delta_u(delta, U, precision):
    """``w = δ U`` (p×r, fp32) and ``colsum(δ)`` (m, fp32)."""
    p, m = delta.shape
    r = U.shape[1]
    block_p = dot_block(p, 64)
    block_r = dot_block(r, 128)
    block_m = 64 if delta.element_size() == 2 else 32
    w = torch.empty((p, r), dtype=torch.float32, device=delta.device)
    partial = torch.empty((cdiv(p, block_p), m), dtype=torch.float32, device=delta.device)
    if p > 0:
        wrap_triton(_delta_u_kernel)[(cdiv(p, block_p), cdiv(r, block_r))](
            delta, U, w, partial,
            p, m, r,
            delta.stride(0), delta.stride(1), U.stride(0), U.stride(1),
            PRECISION=precision, WIDEN=widen(delta.dtype),
            BLOCK_P=block_p, BLOCK_M=block_m, BLOCK_R=block_r,
            num_warps=8 if block_p * block_r >= 8192 else 4)
    return w, partial.sum(0)


def _skinny(A, B, colscale, Y, C, beta, Bt, out_dtype, precision, split_k=None):
    """``(Aᵀ B) diag(colscale) + Y C + beta·Bt`` (M×r) with A: p×M, B: p×r, Bt: M×k or None."""
    K, M = A.shape
    R = B.shape[1]
    out = torch.empty((M, R), dtype=out_dtype, device=A.device)
    block_m = 64
    block_r = dot_block(R, 64)
    block_k = 64 if A.element_size() == 2 else 32
    tiles = cdiv(M, block_m) * cdiv(R, block_r)
    splits = split_k or min(cdiv(target_programs(A.device), tiles),
                            max(1, K // MIN_ROWS_PER_SPLIT))
    k_per_split = cdiv(cdiv(max(K, 1), splits), block_k) * block_k
    splits = max(1, cdiv(K, k_per_split))
    C = C.contiguous()
    colscale = colscale.contiguous()
    has_targets = Bt is not None and Bt.shape[1] > 0
    if not has_targets:
        Bt = colscale.reshape(1, -1)
    k_align = Bt.shape[1] if has_targets else 0
    epilogue = (colscale, Y, C, Bt, out, M, R, k_align, beta,
                Y.stride(0), Y.stride(1), Bt.stride(0), Bt.stride(1))
    meta = dict(HAS_TARGETS=has_targets, PRECISION=precision, BLOCK_M=block_m, BLOCK_R=block_r,
                num_warps=4)
    grid = (cdiv(M, block_m), cdiv(R, block_r))
    ws = torch.zeros((M, R), dtype=torch.float32, device=A.device) if splits > 1 else out
    wrap_triton(_skinny_kernel)[grid + (splits,)](
        A, B, ws, colscale, Y, C, Bt, out,
        M, R, K, k_per_split, k_align, beta,
        A.stride(0), A.stride(1), B.stride(0), B.stride(1),
        Y.stride(0), Y.stride(1), Bt.stride(0), Bt.stride(1),
        SPLIT=splits > 1, WIDEN=widen(A.dtype), BLOCK_K=block_k, **meta)
    if splits > 1:
        wrap_triton(_skinny_epilogue_kernel)[grid](ws, *epilogue, **meta)
    return out


def svd_factor_grads(x, t, delta, U, s, V, BU, BS, BV, ce, align, ortho, hoyer, hoyer_eps,
                     scaling, projection, eps, *, split_k=None):
    """Plain launcher of DESIGN §6; ``t`` must be ``x V`` (fp32 or x.dtype).

    ``split_k`` forces the number of batch splits of the two skinny products (tests).
    """
    precision = dot_precision(x.dtype)
    w, colsum = _delta_u(delta, U, precision)
    wt = torch.mm(w.t(), t.float())
    colscale, CU, CV, beta, gs, BUk, BVk = _cores.factor_cores(
        U, s, V, wt, BU, BS, BV, ce, align, ortho, hoyer, hoyer_eps, scaling, projection, eps)
    pt = U.dtype
    gU = _skinny(delta, t, colscale, U, CU, beta, BUk, pt, precision, split_k)
    gV = _skinny(x, w, colscale, V, CV, beta, BVk, pt, precision, split_k)
    return gU, gs.to(pt), gV, (ce * colsum).to(pt)
