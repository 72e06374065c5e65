"""Fused low-rank forward in Triton, DESIGN §3.

``x (p×n), U (m×r), s (r), V (n×r), bias (m) -> h (p×m) in x.dtype, t (p×r) in fp32``::

    t = x V                  (kept for the update)
    a = (t ⊙ s) Uᵀ + b
    h = f(a)

``_lowrank_fused_kernel`` keeps a block of rows of ``t`` on chip (``R`` = r padded to a power
of two, 16 ≤ R ≤ 128) between the two products: ``x`` is read once, ``t`` and ``h`` written
once. For r > 128 that block no longer fits in registers and the forward falls back to two
launches of the tiled ``_gemm_kernel``: ``t = x V`` (fp32 out), then ``(t ⊙ s) Uᵀ`` with the
bias + activation epilogue.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import (
    act_code,
    activate,
    cdiv,
    dot_block,
    dot_precision,
    mma,
    target_programs,
    widen,
)

#: Largest padded rank the fused kernel keeps on chip.
MAX_FUSED_RANK = 128
#: At most this many programs share one block of rows (each recomputes its ``t``).
MAX_M_SPLITS = 8


@triton.jit
def _lowrank_fused_kernel(
    x_ptr, V_ptr, s_ptr, U_ptr, b_ptr, h_ptr, t_ptr,
    p, n, m, r, m_per_split,
    stride_xp, stride_xn, stride_vn, stride_vr, stride_um, stride_ur,
    slope,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, R: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_m = tl.program_id(1)
    # 64-bit row offsets: x and h may hold more than 2³¹ elements.
    rows = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    ranks = tl.arange(0, R)
    row_ok = rows < p
    rank_ok = ranks < r

    t = tl.zeros((BLOCK_P, R), dtype=tl.float32)
    for n0 in range(0, n, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        xt = tl.load(x_ptr + rows[:, None] * stride_xp + cols[None, :] * stride_xn,
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        vt = tl.load(V_ptr + cols[:, None] * stride_vn + ranks[None, :] * stride_vr,
                     mask=col_ok[:, None] & rank_ok[None, :], other=0.0)
        t = mma(xt, vt, t, PRECISION, WIDEN)
    # Programs splitting the m range of one row block all hold the same t; one stores it.
    if pid_m == 0:
        tl.store(t_ptr + rows[:, None] * r + ranks[None, :], t,
                 mask=row_ok[:, None] & rank_ok[None, :])

    s = tl.load(s_ptr + ranks, mask=rank_ok, other=0.0).to(tl.float32)
    # Low-precision U meets t ⊙ s rounded once to its dtype, as a cuBLAS product would.
    ts = (t * s[None, :]).to(U_ptr.dtype.element_ty)
    m_start = pid_m * m_per_split
    m_end = tl.minimum(m_start + m_per_split, m)
    for m0 in range(m_start, m_end, BLOCK_M):
        outs = m0 + tl.arange(0, BLOCK_M)
        out_ok = outs < m_end
        ut = tl.load(U_ptr + ranks[:, None] * stride_ur + outs[None, :] * stride_um,
                     mask=rank_ok[:, None] & out_ok[None, :], other=0.0)
        a = mma(ts, ut, tl.zeros((BLOCK_P, BLOCK_M), dtype=tl.float32), PRECISION, WIDEN)
        if HAS_BIAS:
            a += tl.load(b_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
        a = activate(a, ACT, slope)
        tl.store(h_ptr + rows[:, None] * m + outs[None, :], a.to(h_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & out_ok[None, :])


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, scale_ptr, bias_ptr, c_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    slope,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    PRECISION: tl.constexpr, WIDEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``c = f((a diag(scale)) b + bias)``, fp32 accumulation, ``c`` contiguous (M×N)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        at = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bt = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            at = at.to(tl.float32) * sc[None, :]
        acc = mma(at.to(bt.dtype), bt, acc, PRECISION, WIDEN)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    acc = activate(acc, ACT, slope)
    tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _gemm(a, b, out, scale=None, bias=None, activation="none", negative_slope=0.0,
          precision="ieee"):
    M, K = a.shape
    N = b.shape[1]
    block_k = 64 if a.element_size() == 2 else 32
    grid = (cdiv(M, 64), cdiv(N, 64))
    wrap_triton(_gemm_kernel)[grid](
        a, b, out if scale is None else scale, out if bias is None else bias, out,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        negative_slope,
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, ACT=act_code(activation),
        PRECISION=precision, WIDEN=widen(b.dtype), BLOCK_M=64, BLOCK_N=64, BLOCK_K=block_k,
        num_warps=4)
    return out


def _m_splits(device, row_programs: int, m: int, n: int, block_m: int) -> int:
    """How many programs share a block of rows, each taking a slice of the m loop.

    Few row blocks (small batch) would leave most SMs idle. A split recomputes ``x V`` for
    its rows, which pays only when the m loop is at least as long as the n loop.
    """
    if m < n:
        return 1
    want = cdiv(target_programs(device), row_programs)
    return max(1, min(cdiv(m, block_m), want, MAX_M_SPLITS))


def lowrank_linear(x, U, s, V, bias, activation, negative_slope, *, m_splits=None):
    """Plain launcher of DESIGN §3 (``x`` 2-D; the public wrapper flattens batch dims).

    ``m_splits`` forces the number of programs per row block (tests); ``None`` picks it.
    """
    p, n = x.shape
    m, r = U.shape
    h = torch.empty((p, m), dtype=x.dtype, device=x.device)
    t = torch.empty((p, r), dtype=torch.float32, device=x.device)
    if p == 0:
        return h, t
    precision = dot_precision(x.dtype)
    s = s.contiguous()
    bias = bias.contiguous() if bias is not None else None
    if r > MAX_FUSED_RANK:
        _gemm(x, V, t, precision=precision)
        _gemm(t, U.t(), h, scale=s, bias=bias, activation=activation,
              negative_slope=negative_slope, precision=precision)
        return h, t

    R = dot_block(r, MAX_FUSED_RANK)
    # Row blocks no taller than the batch needs (padded to 16 for tl.dot).
    block_p = dot_block(p, 64 if R <= 64 else 32)
    block_m = 64 if R <= 64 else 32
    block_n = 64 if x.element_size() == 2 else 32
    row_programs = cdiv(p, block_p)
    splits = m_splits or _m_splits(x.device, row_programs, m, n, block_m)
    m_per_split = cdiv(cdiv(m, block_m), splits) * block_m
    splits = cdiv(m, m_per_split)
    wrap_triton(_lowrank_fused_kernel)[(row_programs, splits)](
        x, V, s, U, h if bias is None else bias, h, t,
        p, n, m, r, m_per_split,
        x.stride(0), x.stride(1), V.stride(0), V.stride(1), U.stride(0), U.stride(1),
        negative_slope,
        HAS_BIAS=bias is not None, ACT=act_code(activation), PRECISION=precision,
        WIDEN=widen(x.dtype), BLOCK_P=block_p, BLOCK_N=block_n, BLOCK_M=block_m, R=R,
        num_warps=8 if R * block_p >= 4096 else 4)
    return h, t
